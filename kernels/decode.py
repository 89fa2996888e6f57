"""Decode attention: one new token per sequence over the slots of an evicting cache and its own
key, plus the attention probability mass each key received (what accumulated-attention policies
score with).

The cache is only read: the new token's key and value (``k_new, v_new``) come apart from the
slots, as the ``N + 1``-th key, so a compiled step never copies a table to append to it. This is
attention of one query per head under a validity mask, with grouped-query heads: one batched
product per (row, KV head) for the logits over the slots, one for the output. This file is the
torch reference and the dispatch (``decode_attention``: Triton on CUDA).
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
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    sinks: Tensor | None = None,
    alibi: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attend ``q [B, H, 1, D]`` over the valid slots ``slot_k, slot_v [B, Hkv, N, D]`` and, if
    given, the token's own ``k_new, v_new [B, Hkv, 1, D]`` (seen unless ``pos`` is -1: padding).
    Values may have another head dim than keys; ``out`` has theirs.

    ``slot_valid, slot_pos [B, Hkv, N]``; ``pos [B, 1]``: the query's position (read for a sliding
    ``window > 0``, which hides slots ``window`` or more positions back). ``softcap > 0`` caps the
    scaled logits ``x`` to ``softcap * tanh(x / softcap)``. Returns ``out [B, H, 1, D]`` (``q``'s
    dtype) and ``mass [B, Hkv, N (+ 1)]`` (fp32): each key's probability (the slots', then the new
    token's), summed over the query heads that share its KV head. A row that sees no key gets NaN.
    ``entropy_k`` and ``value_weighted`` change only the mass, as in ``kvpass::attend``; so does
    ``sinks [H]`` (each query head's sink logit, its probability dropped), as there, and
    ``alibi [H]`` (each query head's ALiBi slope, times the key's position added to its logits).
    """
    return decode_attention(
        q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k, value_weighted, k_new, v_new,
        sinks, alibi,
    )  # fmt: skip


def decode_attention(
    q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window=0, softcap=0.0, entropy_k=0, value_weighted=False,
    k_new=None, v_new=None, sinks=None, alibi=None,
):  # fmt: skip
    """``kvpass::decode`` without the dispatcher: the Triton kernel (:mod:`.decode_triton`) for CUDA
    tensors where Triton is installed and the head dim is a power of two >= 16 (inside a compiled
    step, as the opaque op), else the torch reference, which Inductor compiles with the rest of the
    step. Returns ``(out, mass)``. ``backend.BACKEND`` overrides the choice."""
    args = (q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k, value_weighted)
    plain = sinks is None and alibi is None  # what the kernel computes
    if backend.use_triton(q, slot_v) and plain and not torch.compiler.is_exporting():  # engines: torch ops
        if torch.compiler.is_compiling():
            return decode(*args, k_new, v_new)
        from .decode_triton import decode_triton

        return decode_triton(*args, k_new=k_new, v_new=v_new)
    return decode_reference(*args, k_new, v_new, sinks, alibi)


@decode.register_fake
def _(q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k=0, value_weighted=False,
      k_new=None, v_new=None, sinks=None, alibi=None):  # fmt: skip
    B, Hkv, N = slot_valid.shape
    out = q.new_empty((*q.shape[:-1], slot_v.shape[-1]))
    return out, q.new_empty((B, Hkv, N + int(k_new is not None)), dtype=torch.float32)


def decode_reference(
    q, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, entropy_k=0, value_weighted=False,
    k_new=None, v_new=None, sinks=None, alibi=None,
):  # fmt: skip
    """The op's torch implementation, callable without the dispatcher's per-call cost (eager runtime)."""
    B, H, _, D = q.shape
    Hkv, N = slot_k.shape[1], slot_k.shape[2]
    G = H // Hkv
    rows = B * Hkv  # one batched product per (row, KV head), its G query heads as rows: no copy of K
    qf = q.reshape(rows, G, D).float()
    raw = torch.bmm(qf, slot_k.reshape(rows, N, D).float().mT).view(B, Hkv, G, N)
    seen = slot_valid if not window else slot_valid & (pos[:, :, None] - slot_pos < window)
    if k_new is not None:  # the token's own key: the last one, seen unless the token is padding
        own = (qf.view(B, Hkv, G, D) * k_new.float()).sum(dim=-1, keepdim=True)  # [B, Hkv, G, 1]
        raw = torch.cat([raw, own], dim=-1)
        seen = torch.cat([seen, (pos >= 0)[:, :, None].expand(B, Hkv, 1)], dim=-1)
    logits = raw * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if alibi is not None:  # each query head's slope times the key's position
        keys = slot_pos if k_new is None else torch.cat([slot_pos, pos[:, :, None].expand(B, Hkv, 1)], dim=-1)
        bias = alibi.float().view(1, Hkv, G, 1) * keys[:, :, None, :].float()
        logits = logits + bias
    logits = torch.where(seen[:, :, None], logits, float("-inf"))
    if sinks is None:
        probs = logits.softmax(dim=-1)
    else:  # each query head's sink logit joins the softmax; its probability is dropped
        sink = sinks.float().view(1, Hkv, G, 1).expand(B, Hkv, G, 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
    Dv = slot_v.shape[-1]  # values may be narrower or wider than keys (multi-head latent attention)
    out = torch.bmm(probs[..., :N].reshape(rows, G, N), slot_v.reshape(rows, N, Dv).float())
    if k_new is not None:
        out = out + probs[..., N:].reshape(rows, G, 1) * v_new.reshape(rows, 1, Dv).float()
    if entropy_k:  # the raw products q.k at the adaptive scale (soft-capping is left out of scoring)
        lam = mass_scale(seen.sum(dim=-1), D, scale, entropy_k)[:, :, None, None]
        scored = raw * lam if alibi is None else raw * lam + bias
        probs = torch.where(seen[:, :, None], scored, float("-inf")).softmax(dim=-1)
    mass = probs.sum(dim=2)
    if value_weighted:
        weights = value_weights(slot_v)
        mass = mass * (weights if k_new is None else torch.cat([weights, value_weights(v_new)], dim=-1))
    return out.view(B, H, 1, Dv).to(q.dtype), mass
