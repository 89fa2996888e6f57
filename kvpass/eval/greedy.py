"""Greedy decoding with timings, shared by the demo and the benchmarks."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kvpass.runtime import hf
from kvpass.runtime.cache import EvictingCache


@dataclass
class Run:
    tokens: Tensor  # generated ids [B, n]
    prefill_s: float
    decode_tok_s: float
    kv_bytes: int  # keys + values the cache physically holds at the end


def kv_bytes(cache) -> int:
    """Bytes of keys and values held by a kvpass or a transformers cache."""
    if isinstance(cache, EvictingCache):
        return sum(s.kv_bytes for s in cache.slots.values())
    return sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None
    )


def _wait(t: Tensor) -> None:
    """Wait for the device's queued work (a clock read after it times the work, not its launch)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@torch.no_grad()
def greedy(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    eos: int | None = None,
    desc: str | None = None,
    press=None,
    cache=None,
) -> Run:
    """Prefill ``input_ids``, then decode greedily one token at a time (stopping at ``eos``).

    ``press``: a kvpress press applied during the prefill (see :mod:`kvpass.eval.peers`). ``cache``: the
    cache to start from (e.g. a transformers ``StaticCache``, reset first); default a fresh one.
    """
    from kvpass.eval import peers

    t0 = time.perf_counter()
    with peers.applied(press, model) if press is not None else contextlib.nullcontext():
        if cache is not None:
            cache.reset()
        logits, cache = hf.call(model, input_ids, cache, logits_to_keep=1)
    nxt = logits[:, -1:].argmax(-1)
    _wait(nxt)
    prefill = time.perf_counter() - t0
    tokens = [nxt]
    t1 = time.perf_counter()
    for _ in tqdm(range(max_new_tokens - 1), desc=desc, leave=False, disable=desc is None):
        if eos is not None and bool((nxt == eos).all()):
            break
        pos = torch.full_like(nxt, input_ids.shape[1] + len(tokens) - 1)  # true positions (kvpress caches shrink)
        logits, cache = hf.call(model, nxt, cache, position_ids=pos, logits_to_keep=1)
        nxt = logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    _wait(nxt)
    decode = time.perf_counter() - t1
    steps = len(tokens) - 1
    return Run(torch.cat(tokens, dim=1), prefill, steps / decode if steps else float("nan"), kv_bytes(cache))
