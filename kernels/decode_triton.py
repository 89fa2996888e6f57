"""Triton decode attention over the evicting cache (flash-decoding), with the per-slot probability
mass fused in: the Triton counterpart of :func:`kvpass.kernels.decode.decode_reference`.

Pass 1 (``_partial``): one program per (batch row, KV head, split of the slots). It loads the
query heads of the GQA group once, walks its split in blocks of ``BLOCK_N`` slots, skips a block
with no visible slot without reading its keys or values, and keeps an online softmax (running
max ``m``, sum ``lsum``, output ``acc``) per query head. It writes its partial ``m, lsum, acc`` and each
visible slot's logit -- 4 bytes per query head and slot, against the ``2 * D * itemsize`` bytes of
K and V it reads -- so the mass needs no second pass over K.

Pass 2 (``_merge``): one program per (batch row, KV head, split), as many as pass 1. Each merges
the splits' maxima and sums by log-sum-exp (a few numbers per split), turns its own split's stored
logits into probabilities summed over the group's query heads (the mass), and the first split's
program also merges the partial outputs. AhaKV's options change only the mass: ``entropy_k``
rescales the raw products q.k by the adaptive scale, which depends only on how many keys the
query sees (counted before pass 1), so pass 1 keeps a second online max and sum at that scale;
``value_weighted`` multiplies by ``||v||^2``, computed in pass 1 from the values it reads anyway.

The new token's own key and value (``k_new, v_new``), when given, are the ``N + 1``-th key: the
block that holds index ``N`` reads them from their own tensors, so the cache is never appended to.

Inputs may be fp32, fp16 or bf16; products run on ``tl.dot`` in the input dtype (the query
heads of a group padded to 16 rows) with fp32 accumulation. Head dims and blocks are powers of
two, at least 16 (64, 128, 256 in practice).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .attend import mass_scale


@triton.jit
def _partial(
    Q, K, V, VALID, SPOS, QPOS, KNEW, VNEW, LAM,  # inputs
    M, L, M2, L2, ACC, LOGITS, VNORM,  # outputs
    scale, softcap, window, N, NA, split_len, Hkv,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sp_b, sp_h, skn_b, skn_h, svn_b, svn_h,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, RAW: tl.constexpr, NORMS: tl.constexpr, UPCAST: tl.constexpr,
    NEW: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=g[:, None] < G, other=0.0)
    qpos = tl.load(QPOS + b)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    lsum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    m2 = tl.full([G_PAD], float("-inf"), tl.float32)  # the mass's softmax at AhaKV's scale (RAW)
    l2 = tl.zeros([G_PAD], tl.float32)
    if RAW:
        lam = tl.load(LAM + bh)
    else:
        lam = 1.0
    start = split * split_len
    end = tl.minimum(start + split_len, NA)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        inside = n < end
        seen = _seen(VALID, SPOS, b * sm_b + h * sm_h, b * sp_b + h * sp_h, n, N, qpos, window, WINDOW, NEW) & inside
        if tl.max(seen.to(tl.int32), axis=0) > 0:  # a block nobody sees is not read
            slot = seen & (n < N)  # a slot, not the token
            k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=slot[:, None], other=0.0)
            v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=slot[:, None], other=0.0)
            if NEW:  # the token's own key and value, at index N
                own = (n == N)[:, None]
                k = tl.where(own, tl.load(KNEW + b * skn_b + h * skn_h + d)[None, :], k)
                v = tl.where(own, tl.load(VNEW + b * svn_b + h * svn_h + d)[None, :], v)
            if UPCAST:  # Triton's interpreter computes bf16 dots wrongly (3.9); GPUs use bf16 tensor cores
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            raw = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee")  # [G_PAD, BLOCK_N], fp32
            x = raw * scale
            if SOFTCAP:
                x = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)  # softcap * tanh(x / softcap)
            x = tl.where(seen[None, :], x, float("-inf"))
            if RAW:  # the raw products, and their online softmax at the adaptive scale
                keep = tl.where(seen[None, :], raw, float("-inf"))
                y = keep * lam
                m2_new = tl.maximum(m2, tl.max(y, axis=1))
                l2 = l2 * tl.exp(m2 - m2_new) + tl.sum(tl.exp(y - m2_new[:, None]), axis=1)
                m2 = m2_new
            else:
                keep = x
            tl.store(LOGITS + (bh * G + g)[:, None] * NA + n[None, :], keep, mask=(g[:, None] < G) & inside[None, :])
            if NORMS:
                vf = v.to(tl.float32)
                tl.store(VNORM + bh * NA + n, tl.sum(vf * vf, axis=1), mask=inside)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(x - m_new[:, None])
            lsum = lsum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
    out = (bh * tl.num_programs(1) + split) * G_PAD + g
    tl.store(M + out, m)
    tl.store(L + out, lsum)
    if RAW:
        tl.store(M2 + out, m2)
        tl.store(L2 + out, l2)
    tl.store(ACC + out[:, None] * D + d[None, :], acc)


@triton.jit
def _lse(M, L, bh, splits, g, G_PAD: tl.constexpr):
    """The splits' running maxima and sums merged: the softmax's max and normaliser per query head."""
    top = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    for s in range(0, splits):
        part = (bh * splits + s) * G_PAD + g
        m = tl.load(M + part)
        new_top = tl.maximum(top, m)
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # nothing seen yet: no -inf - -inf
        total = total * tl.exp(top - shift) + tl.load(L + part) * tl.exp(m - shift)
        top = new_top
    return top, total


@triton.jit
def _merge(
    M, L, M2, L2, ACC, LOGITS, VNORM, VALID, SPOS, QPOS, LAM,  # inputs
    OUT, MASS,  # outputs
    window, N, NA, split_len, Hkv,
    so_b, so_h, sm_b, sm_h, sp_b, sp_h,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, RAW: tl.constexpr, NORMS: tl.constexpr, NEW: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = bh // Hkv
    h = bh % Hkv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    top, total = _lse(M, L, bh, splits, g, G_PAD)
    if split == 0:  # the output: the partial outputs merged, one split at a time
        acc = tl.zeros([G_PAD, D], tl.float32)
        for s in range(0, splits):
            part = (bh * splits + s) * G_PAD + g
            beta = tl.exp(tl.load(M + part) - tl.where(top == float("-inf"), 0.0, top))
            acc += tl.load(ACC + part[:, None] * D + d[None, :]) * beta[:, None]
        out = acc / total[:, None]  # a row that sees nothing: 0 / 0 = NaN
        tl.store(OUT + b * so_b + (h * G + g)[:, None] * so_h + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=g[:, None] < G)  # fmt: skip
    if RAW:  # the mass's own softmax, at the adaptive scale
        top, total = _lse(M2, L2, bh, splits, g, G_PAD)
        lam = tl.load(LAM + bh)
    else:
        lam = 1.0
    qpos = tl.load(QPOS + b)
    rows = (bh * G + g)[:, None] * NA
    start = split * split_len
    end = tl.minimum(start + split_len, NA)
    for n0 in range(start, end, BLOCK_N):  # this split's slots
        n = n0 + tl.arange(0, BLOCK_N)
        seen = _seen(VALID, SPOS, b * sm_b + h * sm_h, b * sp_b + h * sp_h, n, N, qpos, window, WINDOW, NEW)
        seen = seen & (n < end)
        x = tl.load(LOGITS + rows + n[None, :], mask=seen[None, :] & (g[:, None] < G), other=float("-inf"))
        p = tl.exp(x * lam - top[:, None]) / total[:, None]
        p = tl.where(seen[None, :] & (g[:, None] < G), p, 0.0)
        mass = tl.sum(p, axis=0)
        if NORMS:
            mass = mass * tl.load(VNORM + bh * NA + n, mask=seen, other=0.0)
        tl.store(MASS + bh * NA + n, mass, mask=n < end)


@triton.jit
def _seen(VALID, SPOS, valid_at, pos_at, n, N, qpos, window, WINDOW: tl.constexpr, NEW: tl.constexpr):
    """Which of the keys ``n`` the query sees: valid slots (inside its window), and at index ``N``
    the token itself unless it is padding."""
    inside = n < N
    seen = (tl.load(VALID + valid_at + n, mask=inside, other=0) != 0) & inside
    if WINDOW:
        seen = seen & (qpos - tl.load(SPOS + pos_at + n, mask=inside, other=0) < window)
    if NEW:
        seen = seen | ((n == N) & (qpos + n * 0 >= 0))  # (a tensor comparison: the interpreter)
    return seen


def launch(D: int, itemsize: int) -> dict:
    """Launch settings for head dim ``D`` and inputs of ``itemsize`` bytes, chosen so that pass 1
    compiles without register spills on sm_80 and sm_90 (``python -m kvpass.kernels.build``): a
    block of keys and values of at most 16 KiB each, across 8 warps."""
    return dict(BLOCK_N=64 if D * itemsize <= 256 else 32, num_warps=8, merge_warps=4)


def decode_triton(
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
    *,
    block_n: int | None = None,
    splits: int | None = None,
    poison: bool = False,
) -> tuple[Tensor, Tensor]:
    """``kvpass::decode`` in Triton: same arguments and results as ``decode_reference``.

    ``splits``: programs per (row, KV head) over the slots; default enough to give a GPU about
    two programs per multiprocessor. ``block_n``: slots per block (a power of two; default from
    :func:`launch`). ``poison``:
    fill outputs and scratch with NaN first (tests: every element read must have been written)."""
    B, H, _, D = q.shape
    Hkv, N = slot_k.shape[1], slot_k.shape[2]
    NA = N + (k_new is not None)  # keys: the slots, then the token's own
    G = H // Hkv
    config = launch(D, q.element_size())
    block_n = block_n or config["BLOCK_N"]
    if D & (D - 1) or block_n & (block_n - 1) or D < 16 or block_n < 16:
        raise ValueError(f"decode_triton needs a power-of-two head dim and block of at least 16, got {D}, {block_n}")
    if q.stride(-1) != 1 or slot_k.stride(-1) != 1 or slot_v.stride(-1) != 1:
        raise ValueError("decode_triton needs the head dimension contiguous")
    if splits is None:
        programs = 264 if q.is_cuda else 4  # ~2 per SM of an H100
        splits = max(1, min(math.ceil(programs / (B * Hkv)), math.ceil(NA / block_n)))
    split_len = math.ceil(math.ceil(NA / splits) / block_n) * block_n
    splits = math.ceil(NA / split_len)
    G_PAD = max(16, triton.next_power_of_2(G))  # tl.dot: >= 16 rows
    new = functools.partial(torch.full, fill_value=torch.nan, device=q.device) if poison else torch.empty
    f32 = dict(dtype=torch.float32, device=q.device)
    stats = B * Hkv * splits * G_PAD
    m, lsum = new((stats,), **f32), new((stats,), **f32)
    m2, l2 = (new((stats,), **f32), new((stats,), **f32)) if entropy_k else (m, lsum)
    acc = new((stats * D,), **f32)
    logits = new((B * Hkv * G * NA,), **f32)
    vnorm = new((B * Hkv * NA if value_weighted else 1,), **f32)
    out = new(tuple(q.shape), dtype=q.dtype, device=q.device)
    mass = new((B, Hkv, NA), **f32)
    if k_new is None:  # never read
        k_new = v_new = slot_k
    elif k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("decode_triton needs the head dimension contiguous")
    valid = slot_valid.to(torch.int8)
    qpos = pos[:, 0].contiguous()
    spos = slot_pos
    lam = _adaptive_scale(slot_valid, slot_pos, qpos, window, NA > N, D, scale, entropy_k) if entropy_k else qpos
    common = dict(G=G, G_PAD=G_PAD, D=D, BLOCK_N=block_n, WINDOW=window > 0, RAW=entropy_k > 0, NEW=NA > N)
    _partial[(B * Hkv, splits)](
        q, slot_k, slot_v, valid, spos, qpos, k_new, v_new, lam, m, lsum, m2, l2, acc, logits, vnorm,
        scale, softcap, window, N, NA, split_len, Hkv,
        q.stride(0), q.stride(1), *slot_k.stride()[:3], *slot_v.stride()[:3], *valid.stride()[:2], *spos.stride()[:2],
        *k_new.stride()[:2], *v_new.stride()[:2],
        SOFTCAP=softcap > 0, NORMS=value_weighted, UPCAST=not q.is_cuda and q.dtype == torch.bfloat16, **common,
        num_warps=config["num_warps"],
    )  # fmt: skip
    _merge[(B * Hkv, splits)](
        m, lsum, m2, l2, acc, logits, vnorm, valid, spos, qpos, lam, out, mass,
        window, N, NA, split_len, Hkv,
        out.stride(0), out.stride(1), *valid.stride()[:2], *spos.stride()[:2],
        NORMS=value_weighted, **common, num_warps=config["merge_warps"],
    )  # fmt: skip
    return out, mass


def _adaptive_scale(slot_valid, slot_pos, qpos, window, own, D, scale, entropy_k) -> Tensor:
    """AhaKV's scale per (row, KV head) ``[B * Hkv]`` (fp32): it depends only on how many keys the
    query sees, so it is known before any key is read."""
    seen = slot_valid if not window else slot_valid & (qpos[:, None, None] - slot_pos < window)
    count = seen.sum(dim=-1)
    if own:  # the token's own key, unless it is padding
        count = count + (qpos >= 0)[:, None]
    return mass_scale(count, D, scale, entropy_k).reshape(-1).contiguous()
