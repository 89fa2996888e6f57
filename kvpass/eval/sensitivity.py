"""A layer's sensitivity to eviction, measured on the model: what ``kvpass calibrate`` runs to make
the per-layer budgets of :mod:`kvpass.runtime.allocation`.

A layer's **sensitivity** is how much the answers of retrieval samples get worse (their mean
negative log-likelihood, teacher-forced, in nats per token) when that layer alone evicts at the
budget and every other layer keeps the whole prompt. The samples are the gate-training "lockers"
chats (:mod:`kvpass.data.corpus`: facts in documentation text, a question, its answer), with seeds of
their own, so nothing is shared with the evaluation suite. One prefill per layer and sample.
"""

from __future__ import annotations

import random
import time

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kvpass import policies
from kvpass.data import corpus
from kvpass.runtime.allocation import allocate, check_fraction
from kvpass.transform import transform


def samples(tokenizer, n: int, tokens: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` (prompt ``[1, P]``, answer ``[1, A]``) pairs of at most ``tokens`` ids in all."""
    out = []
    for i in range(n):
        ids, answer = corpus.lockers(tokenizer, tokens, random.Random(f"calibrate/{i}"))
        out.append((torch.tensor([ids[:-answer]]), torch.tensor([ids[-answer:]])))
    return out


@torch.no_grad()
def answer_nll(model: nn.Module, prompt: Tensor, answer: Tensor) -> float:
    """Mean NLL of ``answer`` after ``prompt``: a kvpass model prefills (and evicts) the prompt,
    then reads the answer through its cache, as it would generate it."""
    if not hasattr(model, "kvpass_new_cache"):
        logits = model(input_ids=torch.cat([prompt, answer[:, :-1]], 1)).logits[:, prompt.shape[1] - 1 :]
    else:
        cache = model.kvpass_new_cache(decode_reserve=answer.shape[1])
        first, cache = model.kvpass_forward(prompt, cache, logits_to_keep=1)
        rest, _ = model.kvpass_forward(answer[:, :-1], cache)
        logits = torch.cat([first, rest], dim=1)
    return float(torch.nn.functional.cross_entropy(logits[0].float(), answer[0].to(logits.device)))


def sensitivity(
    model: nn.Module,
    tokenizer,
    policy: str = "aha",
    budget: float = 0.5,
    *,
    n_samples: int = 4,
    tokens: int = 1024,
    chunk: int = 512,
    progress: bool = True,
    **knobs,
) -> list[float]:
    """Each attention layer's sensitivity to ``policy`` at ``budget`` (a fraction of the prompt):
    the increase of the answers' mean NLL when only that layer evicts (see the module's docstring)."""
    check_fraction(budget)
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    # kvzip's probe, say, as eval builds it; each layer its own budget (what an allocation scales)
    knobs = {"share": "head", **policies.text_knobs(policy, tokenizer), **knobs}
    device = next(model.parameters()).device
    data = [(p.to(device), a.to(device)) for p, a in samples(tokenizer, n_samples, tokens)]
    small = transform(model, policy, budget, chunk=chunk, evict_during_decode=False, **knobs)
    layers = len(small.kvpass_sites)
    base = [answer_nll(model, p, a) for p, a in data]
    pol, out = small.kvpass_policy, []
    for layer in tqdm(range(layers), desc=f"calibrating {policy} at {budget:g}", disable=not progress):
        # only `layer` evicts: the others are allowed the whole prompt
        pol.allocation = tuple(1.0 if i == layer else 1.0 / budget for i in range(layers))
        out.append(sum(answer_nll(small, p, a) - b for (p, a), b in zip(data, base, strict=True)) / len(data))
    pol.allocation = None
    return out


def calibrate(model: nn.Module, tokenizer, policy: str = "aha", budget: float = 0.5, **kwargs) -> dict:
    """Measure ``policy``'s per-layer sensitivity at ``budget`` and allocate from it.

    Returns ``{"allocation", "sensitivity", "policy", "budget", "samples", "seconds"}``; pass the
    allocation to :func:`kvpass.transform` (``allocation=...``), or ``allocate(sensitivity, b)``
    for another budget ``b``. Takes one prefill per layer and sample.
    """
    t0 = time.time()
    sens = sensitivity(model, tokenizer, policy, budget, **kwargs)
    return {
        "policy": policy,
        "budget": budget,
        "samples": kwargs.get("n_samples", 4),
        "sensitivity": [round(x, 5) for x in sens],
        "allocation": list(allocate(sens, budget)),
        "seconds": round(time.time() - t0, 1),
    }
