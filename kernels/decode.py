"""Decode attention: one new token per sequence over the slots of an evicting cache, plus the
attention probability mass each slot received (what accumulated-attention policies score with).

The new token has already been written into the cache (its arrival slot), so this is attention
of one query per head over ``N`` slots under a validity mask, with grouped-query heads: one
batched product per (row, KV head) for the logits, one for the output, no concatenation. At
decode sizes the step is bound by per-operation cost, so this is the fewest operations torch
allows. This file is the torch reference and the dispatch (``decode_attention``: Triton on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backend
from .attend import mass_scale, value_weights


@torch.library.custom_op("kvpass::decode", mutates_args=())
def decode(
    q: Tensor,
    slot_k: Tensor,
    slot_v: Tensor,
    slot_valid: Tensor,
    slot_pos: Tensor,
    pos: Tensor,
    scale: float,
    window: int,
    softcap: float,
    entropy_k: int = 0,
    value_weighted: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attend ``q [B, H, 1, D]`` over the valid slots ``slot_k, slot_v [B, Hkv, N, D]``.

    ``slot_valid, slot_pos [B, Hkv, N]``; ``pos [B, 1]``: the query's position (only read for a
    sliding ``window > 0``, which hides slots ``window`` or more positions back). ``softcap > 0``
    caps the scaled logits ``x`` to ``softcap * tanh(x / softcap)``. Returns ``out [B, H, 1, D]``
    (``q``'s dtype) and ``mass [B, Hkv, N]`` (fp32): each slot's probability, summed over the query
    heads that share its KV head. A row with no valid slot gets NaN. ``entropy_k`` and
    ``value_weighted`` change only the mass, as in ``kvpass::attend``.
    """
    return decode_attention(
        q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k, value_weighted
    )


def decode_attention(
    q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window=0, softcap=0.0, entropy_k=0, value_weighted=False
):
    """``kvpass::decode`` without the dispatcher: the Triton kernel (:mod:`.decode_triton`) for CUDA
    tensors where Triton is installed and the head dim is a power of two >= 16, else the torch
    reference. Returns ``(out, mass)``. The cache calls this eagerly (its bookkeeping is never
    traced), so compile and export see only the opaque op. ``backend.BACKEND`` overrides the choice."""
    if backend.use_triton(q):
        from .decode_triton import decode_triton

        return decode_triton(
            q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k, value_weighted
        )
    return decode_reference(
        q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k, value_weighted
    )


@decode.register_fake
def _(q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, *options):
    return torch.empty_like(q), q.new_empty(slot_valid.shape, dtype=torch.float32)


def decode_reference(
    q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k=0, value_weighted=False
):
    """The op's torch implementation, callable without the dispatcher's per-call cost (eager runtime)."""
    B, H, _, D = q.shape
    Hkv, N = slot_k.shape[1], slot_k.shape[2]
    G = H // Hkv
    rows = B * Hkv  # one batched product per (row, KV head), its G query heads as rows: no copy of K
    qg = q.reshape(rows, G, D).float() * scale
    logits = torch.bmm(qg, slot_k.reshape(rows, N, D).float().mT).view(B, Hkv, G, N)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    seen = slot_valid if not window else slot_valid & (pos[:, :, None] - slot_pos < window)
    probs = torch.where(seen[:, :, None], logits, float("-inf")).softmax(dim=-1)
    out = torch.bmm(probs.view(rows, G, N), slot_v.reshape(rows, N, D).float())
    if entropy_k:  # the raw products q.k at the adaptive scale (soft-capping is left out of scoring)
        raw = torch.bmm(q.reshape(rows, G, D).float(), slot_k.reshape(rows, N, D).float().mT).view(B, Hkv, G, N)
        lam = mass_scale(seen.sum(dim=-1), D, scale, entropy_k)[:, :, None, None]
        probs = torch.where(seen[:, :, None], raw * lam, float("-inf")).softmax(dim=-1)
    mass = probs.sum(dim=2)
    return out.view(B, H, 1, D).to(q.dtype), mass * value_weights(slot_v) if value_weighted else mass
