"""The per-layer shares of one budget for the whole model, measured: an allocation for engines.

With ``share="model"`` the policy's scores size each layer's pool per prompt
(:mod:`kvpass.runtime.shares`); an exported engine's shapes are fixed, so it cannot follow them. It
can take the shares such prompts give on average: ``kvpass calibrate --shares`` reads the
calibration samples (those of :mod:`kvpass.eval.sensitivity`, seeds of their own) with
``share="model"`` and records each layer's slots per KV head once the prompt is read, as a multiple
of its equal share, averaged over the samples. The multiples average 1 (the pools hold the equal
shares' slots in all), so an engine made with them as its ``allocation`` (and ``share="layer"`` or
``"head"``) keeps the same memory, spent where the policy spends it on such prompts.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm import tqdm

from kvpass import policies
from kvpass.eval.sensitivity import samples
from kvpass.runtime.allocation import check_fraction
from kvpass.transform import transform


@torch.no_grad()
def measure(
    model: nn.Module,
    tokenizer,
    policy: str = "kvzip",
    budget: float = 0.25,
    *,
    n_samples: int = 4,
    tokens: int = 1024,
    chunk: int = 512,
    progress: bool = True,
    **knobs,
) -> list[float]:
    """Each attention layer's share of ``policy``'s budget (a fraction of the prompt) shared by the
    whole model, as a multiple of its equal share, averaged over ``n_samples`` prompts."""
    check_fraction(budget)
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    knobs = {**policies.text_knobs(policy, tokenizer), **knobs, "share": "model"}
    shared = transform(model, policy, budget, chunk=chunk, **knobs)
    device = next(model.parameters()).device
    total: list[float] = []
    for prompt, _ in tqdm(samples(tokenizer, n_samples, tokens), desc=f"{policy}'s shares", disable=not progress):
        _, cache = shared.kvpass_forward(prompt.to(device), shared.kvpass_new_cache(), logits_to_keep=1)
        layers = sorted(cache.layout.layers)
        share = [cache.layout.layer_capacity(i) / cache.layer_budget(i) for i in layers]
        total = share if not total else [a + b for a, b in zip(total, share, strict=True)]
    return [round(x / n_samples, 4) for x in total]


def calibrate(model: nn.Module, tokenizer, policy: str = "kvzip", budget: float = 0.25, **kwargs) -> dict:
    """Measure ``policy``'s per-layer shares at ``budget``: ``{"policy", "budget", "samples",
    "shares", "allocation", "seconds"}`` (the allocation is the shares), a ``kvpass calibrate`` file's
    content that :func:`kvpass.transform` takes as ``allocation=``."""
    t0 = time.time()
    shares = measure(model, tokenizer, policy, budget, **kwargs)
    return {
        "policy": policy,
        "budget": budget,
        "samples": kwargs.get("n_samples", 4),
        "shares": shares,
        "allocation": shares,
        "seconds": round(time.time() - t0, 1),
    }
