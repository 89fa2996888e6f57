"""Attention of a chunk of new tokens over an evicting slot cache, plus the probability mass
each key received (what accumulated-attention policies score with).

The keys a query may see are the *kept* slots of the cache (all older than the chunk, in no
particular order) and the chunk's own tokens up to and including itself. Slot order carries no
meaning, so the cache is a set: the mask comes from ``slot_valid`` and, for sliding-window and
chunked-attention layers, from true token positions.

This file is the torch reference and the dispatch (``attend_attention``: on CUDA, fused SDPA for the
output and the Triton chunk-scoring kernel of :mod:`.mass_triton` for the mass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend


@torch.library.custom_op("kvpass::attend", mutates_args=())
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slot_k: Tensor,
    slot_v: Tensor,
    slot_valid: Tensor,
    slot_pos: Tensor,
    pos: Tensor,
    scale: float,
    window: int,
    softcap: float,
    obs: int,
    entropy_k: int = 0,
    value_weighted: bool = False,
    chunk_keep: Tensor | None = None,
    keep_window: int = 0,
    sinks: Tensor | None = None,
    alibi: Tensor | None = None,
    chunked: int = 0,
) -> tuple[Tensor, Tensor]:
    """Attend ``q`` over the kept slots and the chunk; return ``(out, mass)``.

    Shapes: ``q [B, H, T, D]``; ``k, v [B, Hkv, T, D]`` (the chunk, after RoPE);
    ``slot_k, slot_v [B, Hkv, C, D]``; ``slot_valid, slot_pos [B, Hkv, C]``; ``pos [B, T]``
    (true positions of the chunk, ``-1`` for padding, which no query sees).
    ``window > 0`` limits each query to keys at most ``window - 1`` positions back.
    ``softcap > 0`` caps the scaled logits ``x`` to ``softcap * tanh(x / softcap)`` (Gemma 2).

    ``out [B, H, T, D]`` has ``q``'s dtype. ``mass [B, Hkv, C + T]`` (fp32) is, for every key
    (slots first, then the chunk), the attention probability it received from the last ``obs``
    queries of the chunk, summed over those queries and over the query heads sharing its KV head.
    Two options change only the mass (what scoring reads), never ``out`` -- see :func:`mass_scale`
    and :func:`value_weights`: ``entropy_k > 0`` computes it with an adaptive softmax scale,
    ``value_weighted`` multiplies each key's mass by its value's squared norm.

    ``chunk_keep [B, Hkv, T]`` (bool, optional): in-context eviction -- a chunk token that is not
    kept is seen only by itself and the queries at most ``keep_window`` positions after it.
    ``sinks [H]`` (optional): each query head's sink logit, which joins every row's softmax and whose
    probability is dropped (GPT-OSS); the mass is of the keys only.
    ``alibi [H]`` (optional): each query head's ALiBi slope ``m_h``, which adds ``m_h x`` the key's
    true position to its logits (BLOOM, MPT: their bias, less what is constant along a query's row).
    ``chunked > 0``: chunked attention (Llama 4's local layers): a query sees only the keys of its
    own block of ``chunked`` positions (``position // chunked`` equal).
    """
    return attend_attention(
        q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, obs, entropy_k, value_weighted,
        chunk_keep, keep_window, sinks, alibi, chunked,
    )  # fmt: skip


@attend.register_fake
def _(q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, obs, *options):
    B, Hkv, C, _ = slot_k.shape
    return q.new_empty((*q.shape[:-1], slot_v.shape[-1])), q.new_empty((B, Hkv, C + k.shape[2]), dtype=torch.float32)


def visible(slot_valid, slot_pos, pos, window: int, chunk_keep=None, keep_window: int = 0, chunked: int = 0) -> Tensor:
    """Boolean ``[B, Hkv, T, C + T]``: which key each query of the chunk may see."""
    B, Hkv, C = slot_valid.shape
    T = pos.shape[1]
    qpos = pos[:, None, :, None]  # [B, 1, T, 1]
    old = slot_valid[:, :, None, :].expand(B, Hkv, T, C)
    causal = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
    new = causal & (pos[:, None, None, :] >= 0)  # [B, 1, T, T]
    if window > 0:
        old = old & (qpos - slot_pos[:, :, None, :] < window)
        new = new & (qpos - pos[:, None, None, :] < window)
    if chunked > 0:
        block = qpos.div(chunked, rounding_mode="floor")
        old = old & (slot_pos[:, :, None, :].div(chunked, rounding_mode="floor") == block)
        new = new & (pos[:, None, None, :].div(chunked, rounding_mode="floor") == block)
    if chunk_keep is not None:
        new = new & (chunk_keep[:, :, None, :] | (qpos - pos[:, None, None, :] <= keep_window))
    new = new | torch.eye(T, dtype=torch.bool, device=pos.device)  # a query always sees itself
    return torch.cat([old, new.expand(B, Hkv, T, T)], dim=-1)


def attend_reference(
    q,
    k,
    v,
    slot_k,
    slot_v,
    slot_valid,
    slot_pos,
    pos,
    scale,
    window,
    softcap,
    obs,
    entropy_k=0,
    value_weighted=False,
    chunk_keep=None,
    keep_window=0,
    sinks=None,
    alibi=None,
    chunked=0,
):
    """The op's torch implementation, callable without the dispatcher's per-call cost (eager runtime)."""
    T = q.shape[2]
    mask = visible(slot_valid, slot_pos, pos, window, chunk_keep, keep_window, chunked)
    bias = None if alibi is None else alibi_bias(alibi, slot_pos, pos)
    if isinstance(T, torch.SymInt):  # traced for any chunk length (an exported prefill): no branch on T
        return _attend_any_length(
            q, k, v, slot_k, slot_v, mask, scale, softcap, obs, entropy_k, value_weighted, sinks, bias
        )  # fmt: skip
    obs = min(obs, T)
    if T == 1 or obs == T or softcap or sinks is not None or bias is not None:
        probs = _probs(q, (slot_k, k), mask, scale, softcap, sinks, bias)
        C = slot_k.shape[2]
        pg = probs.flatten(2, 3)  # [B, Hkv, G*T, C+T]
        out = (pg[..., :C] @ slot_v.float() + pg[..., C:] @ v.float()).view(*q.shape[:-1], -1).to(q.dtype)
        probs = probs[:, :, :, T - obs :]
    else:
        # Few queries feed the mass: fused SDPA for the output, explicit softmax for those rows only.
        if _splits(q, v, pos, window, chunk_keep, chunked):
            out = split_sdpa(q, k, v, slot_k, slot_v, slot_valid, scale)
        else:
            out = _sdpa(q, k, v, slot_k, slot_v, mask, scale)
        probs = None
    if probs is None or entropy_k:
        m = mask[:, :, T - obs :]
        lam = mass_scale(m.sum(dim=-1), q.shape[-1], scale, entropy_k)[:, :, None, :, None] if entropy_k else scale
        probs = _probs(q[:, :, T - obs :], (slot_k, k), m, lam, 0.0 if entropy_k else softcap, sinks, bias)
    mass = probs.sum(dim=(2, 3))
    return out, mass * value_weights(torch.cat([slot_v, v], dim=2)) if value_weighted else mass


def _attend_any_length(
    q, k, v, slot_k, slot_v, mask, scale, softcap, obs, entropy_k, value_weighted, sinks=None, bias=None
):  # fmt: skip
    """``attend_reference`` without a Python branch on the chunk length: every query's probabilities,
    the last ``obs`` queries' summed by a mask (a branch would hold for some lengths only)."""
    B, H, T, D = q.shape
    C = slot_k.shape[2]
    probs = _probs(q, (slot_k, k), mask, scale, softcap, sinks, bias)
    pg = probs.flatten(2, 3)
    out = (pg[..., :C] @ slot_v.float() + pg[..., C:] @ v.float()).view(B, H, T, slot_v.shape[-1]).to(q.dtype)
    if entropy_k:
        lam = mass_scale(mask.sum(dim=-1), D, scale, entropy_k)[:, :, None, :, None]
        probs = _probs(q, (slot_k, k), mask, lam, 0.0, sinks, bias)
    observed = torch.arange(T, device=q.device) >= T - obs
    mass = (probs * observed[:, None]).sum(dim=(2, 3))
    return out, mass * value_weights(torch.cat([slot_v, v], dim=2)) if value_weighted else mass


def attend_attention(
    q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, obs, entropy_k=0,
    value_weighted=False, chunk_keep=None, keep_window=0, sinks=None, alibi=None, chunked=0,
):  # fmt: skip
    """``kvpass::attend`` without the dispatcher. Where :func:`backend.use_triton` says so (CUDA, by
    default) and there is no soft-capping, sink, ALiBi or chunked attention (which the kernel lacks): the output from
    fused SDPA and the mass from the Triton chunk-scoring kernel, so no probability matrix is built.
    Else the reference."""
    fused = not softcap and sinks is None and alibi is None and not chunked  # what SDPA and the kernel compute
    if backend.use_triton(q, slot_v) and fused and not torch.compiler.is_exporting():  # an engine: torch ops only
        if torch.compiler.is_compiling():  # a compiled step sees the op, opaque
            return attend(
                q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, obs, entropy_k,
                value_weighted, chunk_keep, keep_window, sinks, alibi, chunked,
            )  # fmt: skip
        from .mass_triton import chunk_mass_triton

        mask = visible(slot_valid, slot_pos, pos, window, chunk_keep, keep_window)
        mass = chunk_mass_triton(
            q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, obs, entropy_k,
            value_weighted, chunk_keep, keep_window,
        )  # fmt: skip
        return _sdpa(q, k, v, slot_k, slot_v, mask, scale), mass
    return attend_reference(
        q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, obs, entropy_k, value_weighted,
        chunk_keep, keep_window, sinks, alibi, chunked,
    )  # fmt: skip


def alibi_bias(alibi: Tensor, slot_pos: Tensor, pos: Tensor) -> Tensor:
    """ALiBi's bias ``[B, Hkv, G, 1, C + T]`` (fp32) for ``_probs``: query head ``h``'s slope times
    each key's true position, the slots' (``slot_pos [B, Hkv, C]``) then the chunk's (``pos [B, T]``)."""
    B, Hkv, _ = slot_pos.shape
    keys = torch.cat([slot_pos, pos[:, None, :].expand(B, Hkv, pos.shape[1])], dim=-1).float()
    return alibi.float().view(1, Hkv, -1, 1, 1) * keys[:, :, None, None, :]


def _sdpa(q, k, v, slot_k, slot_v, mask, scale):
    """The chunk's attention output over the slots and itself under ``mask`` (fused SDPA, GQA)."""
    G = q.shape[1] // k.shape[1]
    keys, values = torch.cat([slot_k, k], dim=2), torch.cat([slot_v, v], dim=2)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask.repeat_interleave(G, dim=1), scale=scale, enable_gqa=G > 1
    )


def _splits(q, v, pos, window, chunk_keep, chunked) -> bool:
    """Whether :func:`split_sdpa` computes this chunk's output: on the CPU, eager (not traced), where
    the mask is only the slots' validity and causality within the chunk (no window, block, in-context
    eviction or padding), with values of the keys' head dim."""
    if q.device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if v.shape[-1] != q.shape[-1]:
        return False
    return not window and not chunked and chunk_keep is None and bool((pos >= 0).all())


def split_sdpa(q, k, v, slot_k, slot_v, slot_valid, scale):
    """``_sdpa`` with no ``[T, C + T]`` mask: the slots (a set every query sees, less the invalid
    ones) and the chunk (causal) in two calls of torch's CPU flash kernel, joined by their
    log-sum-exps. The slots' call folds the query heads of a KV group into rows (``[B, Hkv, G*T, D]``:
    no copy of the keys) under a mask of one row per KV head. 1.5-2x faster than one call over a
    materialized mask on the CPU (``docs/research-log.md``, 2026-12-06)."""
    B, H, T, D = q.shape
    Hkv = slot_k.shape[1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    dt = q.dtype
    out, lse = flash(q, k.to(dt), v.to(dt), 0.0, True, scale=scale)
    valid = slot_valid.any(dim=-1)  # [B, Hkv]: a head with no valid slot takes nothing from the slots
    if not bool(valid.any()):
        return out
    bias = None
    if not bool(slot_valid.all()):
        bias = torch.zeros(slot_valid.shape, dtype=dt, device=q.device).masked_fill_(~slot_valid, float("-inf"))
        bias = bias[:, :, None, :]
    o_s, lse_s = flash(q.reshape(B, Hkv, -1, D), slot_k.to(dt), slot_v.to(dt), 0.0, False, attn_mask=bias, scale=scale)
    lse_s = lse_s.masked_fill(~valid[..., None], float("-inf")).reshape(B, H, T)
    top = torch.maximum(lse, lse_s)
    w, w_s = (lse - top).exp()[..., None], (lse_s - top).exp()[..., None]
    return ((out.float() * w + o_s.reshape(B, H, T, -1).float() * w_s) / (w + w_s)).to(dt)


def mass_scale(seen: Tensor, head_dim: int, scale: float, k: int) -> Tensor:
    """AhaKV's adaptive softmax scale for a query that sees ``seen`` keys: ``sqrt(2 ln(seen / k) / d)``.

    For ``n`` keys with independent Gaussian logits of variance ``s^2``, the softmax entropy is
    about ``ln n - s^2 / 2``; this scale holds it near ``ln k`` however long the context. It is never
    flatter than the model's own ``scale`` (reached below ~1.65 ``k`` keys).
    """
    lam = (2 * torch.log(seen.float().clamp_min(1) / k) / head_dim).clamp_min(0).sqrt()
    return lam.clamp_min(scale)


def value_weights(values: Tensor) -> Tensor:
    """``||v_j||^2`` for every key ``[B, Hkv, N]`` (fp32): AhaKV's value refinement. The paper
    divides by the largest norm among the keys; a common factor per head and step, it does not
    change which tokens rank lowest, and is left out."""
    return values.float().square().sum(dim=-1)


def _probs(
    q: Tensor, keys: tuple[Tensor, ...], mask: Tensor, scale, softcap: float = 0.0, sinks=None, bias=None
) -> Tensor:
    """Softmax probabilities ``[B, Hkv, G, T, N]`` (fp32) of ``q`` over the concatenated ``keys``
    (``scale``: a number, or per query ``[B, Hkv, 1, T, 1]``; ``sinks [H]``: a logit per query
    head that joins the softmax, its probability dropped; ``bias``: added to the logits, ALiBi's
    from :func:`alibi_bias`)."""
    B, H, T, D = q.shape
    Hkv = keys[0].shape[1]
    G = H // Hkv
    # Query heads of one KV group become extra rows: [B, Hkv, G*T, D], no copy of K.
    qg = q.reshape(B, Hkv, G * T, D).float()
    logits = torch.cat([qg @ key.float().transpose(-1, -2) for key in keys], dim=-1)
    logits = logits.view(B, Hkv, G, T, -1) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    if sinks is None:
        return logits.softmax(dim=-1)
    sink = sinks.float().view(1, Hkv, G, 1, 1).expand(*logits.shape[:-1], 1)
    return torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
