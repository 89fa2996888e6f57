"""Per-layer budgets measured on the model: where eviction costs most, and an allocation that moves
slots there from the layers where it costs nothing, at the same total memory.

A layer's **sensitivity** is how much the answers of retrieval samples get worse (their mean
negative log-likelihood, teacher-forced, in nats per token) when that layer alone evicts at the
budget and every other layer keeps the whole prompt. The samples are the gate-training "lockers"
chats (:mod:`kvpass.corpus`: facts in documentation text, a question, its answer), with seeds of
their own, so nothing is shared with the evaluation suite. One prefill per layer and sample.

The **allocation** gives layer i the multiplier ``a_i = clip(c * (s_i + mean(s)), low, high)`` of
the budget, ``s_i`` its sensitivity (negative values count as 0), with ``c`` chosen so that the
multipliers average 1: the same memory as the uniform budget. A layer where eviction costs
nothing weighs half as much as one of average sensitivity and keeps at least ``low``; ``high`` is
1 / budget (the whole prompt). The idea of per-layer budgets is PyramidKV's (Cai et al., arXiv
2406.02069), which fixes their shape in advance; here it is measured per model and policy.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kvpass import corpus


def check_fraction(budget) -> None:
    """A calibration is made at a fraction of the prompt in (0, 1)."""
    if isinstance(budget, bool) or not isinstance(budget, float) or not 0.0 < budget < 1.0:
        raise ValueError(f"calibrate at a fraction of the prompt in (0, 1), got {budget!r}")


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
    from kvpass import policies
    from kvpass.transform import transform  # (kvpass.transform reads calibration files with this module)

    knobs = {**policies.text_knobs(policy, tokenizer), **knobs}  # kvzip's probe, say, as eval builds it
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


def allocate(sens: list[float], budget: float, low: float = 0.25) -> tuple[float, ...]:
    """Multipliers of the budget, one per layer, averaging 1 (the module's docstring has the rule)."""
    if not sens:
        raise ValueError("no sensitivities: the model has no attention layers")
    high = 1.0 / budget
    s = [max(0.0, x) for x in sens]
    mean = sum(s) / len(s)
    if mean == 0.0:  # eviction hurt nowhere: nothing to move
        return tuple(1.0 for _ in s)
    w = [x + mean for x in s]

    def total(c: float) -> float:
        return sum(min(high, max(low, c * x)) for x in w)

    lo, hi = 0.0, len(w) / min(w)  # total(lo) <= n <= total(hi): bisect for the c that averages 1
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < len(w) else (lo, mid)
    return tuple(round(min(high, max(low, hi * x)), 4) for x in w)


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


def for_budget(result: dict, budget: int | float | None) -> tuple[float, ...]:
    """The allocation of a calibration ``result`` at ``budget``: a fraction, or (slots, or None) the
    calibration's own fraction, which then bounds the largest multiplier."""
    return allocate(result["sensitivity"], budget if isinstance(budget, float) else result["budget"])


def nearest(results: list[dict], budget: float) -> tuple[float, ...]:
    """The allocation at ``budget`` from whichever calibration in ``results`` was made nearest it."""
    return for_budget(min(results, key=lambda r: abs(r["budget"] - budget)), budget)


def save(result: dict, path: str | Path) -> Path:
    """Write a :func:`calibrate` result as JSON."""
    path = Path(path)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def load(path: str | Path) -> dict:
    """A calibration written by :func:`save`; a clear error for a missing, corrupt or foreign file."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no calibration file at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a kvpass calibration (not JSON: {e})") from None
    sens = result.get("sensitivity") if isinstance(result, dict) else None
    if (
        not isinstance(sens, list)
        or not sens
        or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in sens)
        or not isinstance(result.get("budget"), float)
    ):
        raise ValueError(f"{path} is not a kvpass calibration (it needs 'sensitivity': numbers, 'budget': a fraction)")
    return result
