"""Triton decode attention over the evicting cache (flash-decoding), with the per-slot probability
mass fused in: the Triton counterpart of :func:`kvpass.kernels.decode.decode_reference`.

Pass 1 (``_partial``): one program per (batch row, KV head, split of the slots). It loads the
query heads of the GQA group once, walks its split in blocks of ``BLOCK_N`` slots, skips a block
with no visible slot without reading its keys or values, and keeps an online softmax (running
max ``m``, sum ``lsum``, output ``acc``) per query head. It writes its partial ``m, lsum, acc`` and each
visible slot's logit -- 4 bytes per query head and slot, against the ``2 * D * itemsize`` bytes of
K and V it reads -- so the mass needs no second pass over K.

Pass 2 (``_merge``): one program per (batch row, KV head) merges the splits by log-sum-exp into
the output, then turns the stored logits into probabilities summed over the group's query heads
(the mass). AhaKV's options change only the mass: ``entropy_k`` rescales the stored raw products
q.k by the adaptive scale (two more passes over the stored logits, none over K), and
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


@triton.jit
def _partial(
    Q, K, V, VALID, SPOS, QPOS, KNEW, VNEW,  # inputs
    M, L, ACC, LOGITS, VNORM,  # outputs
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
            keep = tl.where(seen[None, :], raw, float("-inf")) if RAW else x
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
    tl.store(ACC + out[:, None] * D + d[None, :], acc)


@triton.jit
def _merge(
    M, L, ACC, LOGITS, VNORM, VALID, SPOS, QPOS,  # inputs
    OUT, MASS,  # outputs
    scale, window, entropy_k, N, NA, splits, Hkv,
    so_b, so_h, sm_b, sm_h, sp_b, sp_h,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, RAW: tl.constexpr, NORMS: tl.constexpr, NEW: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    top = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in range(0, splits):  # one split at a time: registers hold one partial, whatever the splits
        part = (bh * splits + s) * G_PAD + g
        m = tl.load(M + part)
        new_top = tl.maximum(top, m)
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # nothing seen yet: no -inf - -inf
        alpha = tl.exp(top - shift)
        beta = tl.exp(m - shift)
        total = total * alpha + tl.load(L + part) * beta
        acc = acc * alpha[:, None] + tl.load(ACC + part[:, None] * D + d[None, :]) * beta[:, None]
        top = new_top
    out = acc / total[:, None]  # a row that sees nothing: 0 / 0 = NaN
    tl.store(OUT + b * so_b + (h * G + g)[:, None] * so_h + d[None, :], out.to(OUT.dtype.element_ty),
             mask=g[:, None] < G)  # fmt: skip
    qpos = tl.load(QPOS + b)
    rows = (bh * G + g)[:, None] * NA
    if RAW:  # the mass at AhaKV's adaptive scale: count what the query sees, then max and sum of the rescaled
        count = tl.zeros([BLOCK_N], tl.float32)
        big = tl.full([G_PAD], float("-inf"), tl.float32)
        for n0 in range(0, NA, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            seen = _seen(VALID, SPOS, b * sm_b + h * sm_h, b * sp_b + h * sp_h, n, N, qpos, window, WINDOW, NEW)
            count += seen.to(tl.float32)
            x = tl.load(LOGITS + rows + n[None, :], mask=seen[None, :] & (g[:, None] < G), other=float("-inf"))
            big = tl.maximum(big, tl.max(x, axis=1))
        seen_n = tl.maximum(tl.sum(count, axis=0), 1.0)
        lam = tl.maximum(tl.sqrt(tl.maximum(2.0 * tl.log(seen_n / entropy_k) / D, 0.0)), scale)
        top = big * lam
        total = tl.zeros([G_PAD], tl.float32)
        for n0 in range(0, NA, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            seen = _seen(VALID, SPOS, b * sm_b + h * sm_h, b * sp_b + h * sp_h, n, N, qpos, window, WINDOW, NEW)
            x = tl.load(LOGITS + rows + n[None, :], mask=seen[None, :] & (g[:, None] < G), other=float("-inf"))
            total += tl.sum(tl.exp(x * lam - top[:, None]), axis=1)
    else:
        lam = 1.0
    for n0 in range(0, NA, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        seen = _seen(VALID, SPOS, b * sm_b + h * sm_h, b * sp_b + h * sp_h, n, N, qpos, window, WINDOW, NEW)
        x = tl.load(LOGITS + rows + n[None, :], mask=seen[None, :] & (g[:, None] < G), other=float("-inf"))
        p = tl.exp(x * lam - top[:, None]) / total[:, None]
        p = tl.where(seen[None, :] & (g[:, None] < G), p, 0.0)
        mass = tl.sum(p, axis=0)
        if NORMS:
            mass = mass * tl.load(VNORM + bh * NA + n, mask=seen, other=0.0)
        tl.store(MASS + bh * NA + n, mass, mask=n < NA)


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
    m = new((B * Hkv * splits * G_PAD,), **f32)
    lsum = new((B * Hkv * splits * G_PAD,), **f32)
    acc = new((B * Hkv * splits * G_PAD * D,), **f32)
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
    common = dict(G=G, G_PAD=G_PAD, D=D, BLOCK_N=block_n, WINDOW=window > 0, RAW=entropy_k > 0, NEW=NA > N)
    _partial[(B * Hkv, splits)](
        q, slot_k, slot_v, valid, spos, qpos, k_new, v_new, m, lsum, acc, logits, vnorm,
        scale, softcap, window, N, NA, split_len, Hkv,
        q.stride(0), q.stride(1), *slot_k.stride()[:3], *slot_v.stride()[:3], *valid.stride()[:2], *spos.stride()[:2],
        *k_new.stride()[:2], *v_new.stride()[:2],
        SOFTCAP=softcap > 0, NORMS=value_weighted, UPCAST=not q.is_cuda and q.dtype == torch.bfloat16, **common,
        num_warps=config["num_warps"],
    )  # fmt: skip
    _merge[(B * Hkv,)](
        m, lsum, acc, logits, vnorm, valid, spos, qpos, out, mass,
        scale, window, max(entropy_k, 1), N, NA, splits, Hkv,
        out.stride(0), out.stride(1), *valid.stride()[:2], *spos.stride()[:2],
        NORMS=value_weighted, **common, num_warps=config["merge_warps"],
    )  # fmt: skip
    return out, mass
