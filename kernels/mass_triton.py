"""Triton chunk scoring: the attention mass each key receives from the observation window's queries
(the last ``obs`` queries of a prefill chunk), over the kept slots plus the chunk, without ever
holding the ``G * obs x (C + T)`` probability matrix. The Triton counterpart of the ``mass`` that
:func:`kvpass.kernels.attend.attend_reference` returns (what ``snapkv``, ``aha``, ``h2o`` and
``tova`` score a chunk with); the chunk's attention output comes from fused SDPA beside it.

Pass 1 (``_rows``): one program per (batch row, KV head, block of query rows) -- a row is one
query head of the GQA group at one observed position. It walks the slots, then the chunk, in blocks
of keys (skipping a block nobody sees without reading it) and keeps each row's running max and
sum: the row's log-sum-exp. With AhaKV's ``entropy_k``, a first walk over the masks alone (no key
read) counts what each row sees, which fixes the row's adaptive scale.

Pass 2 (``_columns``): one program per (batch row, KV head, block of keys), launched once over
the slots and once over the chunk. It loads its keys once, recomputes their logits against every
observed row, and sums ``exp(logit - lse)`` down the rows: the block's mass. ``value_weighted``
multiplies by ``||v||^2`` from the values of the same block.

Visibility is :func:`kvpass.kernels.attend.visible`: a slot if valid (and, for a sliding window,
fewer than ``window`` positions back); a chunk token if at or before the query, not padding,
inside the window, and kept or at most ``keep_window`` back (in-context eviction); always itself.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _slot_seen(VALID, SPOS, at, n, C, qpos, window):
    """``[ROWS, BLOCK]``: which of the slots ``n`` each row (at position ``qpos``) sees."""
    inside = n < C
    valid = (tl.load(VALID + at + n, mask=inside, other=0) != 0) & inside
    spos = tl.load(SPOS + at + n, mask=inside, other=0)
    return valid[None, :] & ((qpos[:, None] - spos[None, :] < window) | (window <= 0))


@triton.jit
def _chunk_seen(CPOS, KEEP, b, bh, t, T, qt, qpos, window, keep_window, KEEPING: tl.constexpr):
    """``[ROWS, BLOCK]``: which of the chunk's tokens ``t`` each row (chunk index ``qt``) sees."""
    inside = t < T
    kpos = tl.load(CPOS + b * T + t, mask=inside, other=-1)
    back = qpos[:, None] - kpos[None, :]
    seen = (t[None, :] <= qt[:, None]) & (kpos[None, :] >= 0) & ((back < window) | (window <= 0))
    if KEEPING:
        keep = tl.load(KEEP + bh * T + t, mask=inside, other=0) != 0
        seen = seen & (keep[None, :] | (back <= keep_window))
    return seen | (t[None, :] == qt[:, None])


@triton.jit
def _logits(q, K, at, stride_n, n, live, mul, softcap, D: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """The rows' logits against keys ``n`` (``live``: load mask): ``q.k * mul``, soft-capped."""
    d = tl.arange(0, D)
    k = tl.load(K + at + n[:, None] * stride_n + d[None, :], mask=live[:, None], other=0.0)
    if UPCAST:  # Triton's interpreter computes bf16 dots wrongly (3.9); GPUs use bf16 tensor cores
        k = k.to(tl.float32)
    x = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee") * mul[:, None]
    if SOFTCAP:
        x = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)  # softcap * tanh(x / softcap)
    return x


@triton.jit
def _query_rows(Q, CPOS, b, h, r, R, OBS, T, sq_b, sq_h, sq_t, G: tl.constexpr, D: tl.constexpr):
    """Rows ``r`` (``g * OBS + i``): their queries, chunk indices and positions, and which are real."""
    live = r < R
    g = r // OBS
    qt = T - OBS + r % OBS
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (h * G + g)[:, None] * sq_h + qt[:, None] * sq_t + d[None, :], mask=live[:, None],
                other=0.0)  # fmt: skip
    qpos = tl.load(CPOS + b * T + qt, mask=live, other=0)
    return q, qt, qpos, live


@triton.jit
def _online(m, lsum, x):
    """One block ``x [ROWS, BLOCK]`` into each row's running max ``m`` and sum ``lsum`` (a row that has
    seen nothing yet has ``m = -inf``: shift by 0 there, not by -inf)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, lsum * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)


@triton.jit
def _rows(
    Q, SK, CK, VALID, SPOS, CPOS, KEEP,  # inputs
    LSE, MUL,  # outputs: each row's log-sum-exp and logit multiplier
    scale, softcap, window, keep_window, entropy_k, C, T, OBS, R, Hkv,
    sq_b, sq_h, sq_t, ss_b, ss_h, ss_n, sc_b, sc_h, sc_n, sm_b, sm_h,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KEEPING: tl.constexpr, SOFTCAP: tl.constexpr, RAW: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    q, qt, qpos, live = _query_rows(Q, CPOS, b, h, r, R, OBS, T, sq_b, sq_h, sq_t, G, D)
    at = b * sm_b + h * sm_h
    if RAW:  # AhaKV's adaptive scale from the number of keys each row sees (masks only, no key read)
        count = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, C, BLOCK_N):
            seen = _slot_seen(VALID, SPOS, at, n0 + tl.arange(0, BLOCK_N), C, qpos, window)
            count += tl.sum(seen.to(tl.float32), axis=1)
        for t0 in range(0, T, BLOCK_N):
            seen = _chunk_seen(CPOS, KEEP, b, bh, t0 + tl.arange(0, BLOCK_N), T, qt, qpos, window, keep_window,
                               KEEPING)  # fmt: skip
            count += tl.sum(seen.to(tl.float32), axis=1)
        mul = tl.maximum(tl.sqrt(tl.maximum(2.0 * tl.log(tl.maximum(count, 1.0) / entropy_k) / D, 0.0)), scale)
    else:
        mul = tl.full([BLOCK_M], 1.0, tl.float32) * scale
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, C, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        seen = _slot_seen(VALID, SPOS, at, n, C, qpos, window) & live[:, None]
        cols = tl.max(seen.to(tl.int32), axis=0) > 0  # the keys some row sees: the only ones read
        if tl.max(cols.to(tl.int32), axis=0) > 0:  # a block nobody sees is not read
            x = _logits(q, SK, b * ss_b + h * ss_h, ss_n, n, cols, mul, softcap, D, SOFTCAP, UPCAST)
            m, lsum = _online(m, lsum, tl.where(seen, x, float("-inf")))
    for t0 in range(0, T, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        seen = _chunk_seen(CPOS, KEEP, b, bh, t, T, qt, qpos, window, keep_window, KEEPING) & live[:, None]
        cols = tl.max(seen.to(tl.int32), axis=0) > 0
        if tl.max(cols.to(tl.int32), axis=0) > 0:
            x = _logits(q, CK, b * sc_b + h * sc_h, sc_n, t, cols, mul, softcap, D, SOFTCAP, UPCAST)
            m, lsum = _online(m, lsum, tl.where(seen, x, float("-inf")))
    tl.store(LSE + bh * R + r, m + tl.log(tl.where(live, lsum, 1.0)), mask=live)  # a real row sees at least itself
    tl.store(MUL + bh * R + r, mul, mask=live)


@triton.jit
def _columns(
    Q, K, V, VALID, SPOS, CPOS, KEEP, LSE, MUL,  # inputs (K, V: the slots or the chunk)
    MASS,  # output
    softcap, window, keep_window, C, T, OBS, R, Hkv, first,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SLOTS: tl.constexpr, KEEPING: tl.constexpr, SOFTCAP: tl.constexpr, NORMS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    N = C if SLOTS else T
    inside = n < N
    if SLOTS:
        live_keys = (tl.load(VALID + b * sm_b + h * sm_h + n, mask=inside, other=0) != 0) & inside
    else:
        live_keys = inside
    mass = tl.zeros([BLOCK_N], tl.float32)
    if tl.max(live_keys.to(tl.int32), axis=0) > 0:  # a block of invalid slots has no mass: not read
        for r0 in range(0, R, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            q, qt, qpos, live = _query_rows(Q, CPOS, b, h, r, R, OBS, T, sq_b, sq_h, sq_t, G, D)
            if SLOTS:
                seen = _slot_seen(VALID, SPOS, b * sm_b + h * sm_h, n, C, qpos, window)
            else:
                seen = _chunk_seen(CPOS, KEEP, b, bh, n, T, qt, qpos, window, keep_window, KEEPING)
            seen = seen & live[:, None]
            mul = tl.load(MUL + bh * R + r, mask=live, other=1.0)
            lse = tl.load(LSE + bh * R + r, mask=live, other=0.0)
            x = _logits(q, K, b * sk_b + h * sk_h, sk_n, n, live_keys, mul, softcap, D, SOFTCAP, UPCAST)
            mass += tl.sum(tl.where(seen, tl.exp(x - lse[:, None]), 0.0), axis=0)
        if NORMS:
            d = tl.arange(0, D)
            v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=live_keys[:, None], other=0.0)
            v = v.to(tl.float32)
            mass = mass * tl.sum(v * v, axis=1)
    tl.store(MASS + bh * (C + T) + first + n, mass, mask=inside)


def launch(D: int, itemsize: int) -> dict:
    """Launch settings for head dim ``D`` and inputs of ``itemsize`` bytes, checked with
    ``python -m kvpass.kernels.build``: with 16-bit inputs both passes compile without register
    spills on sm_80 and sm_90 for head dims up to 256; fp32 (products in full precision, no tensor
    cores) spills a little at any block size and takes the smallest that keeps it lowest."""
    wide = itemsize > 2
    return dict(BLOCK_M=16 if wide else 32, BLOCK_N=32 if wide else 64, num_warps=8)


def chunk_mass_triton(
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
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    poison: bool = False,
) -> Tensor:
    """The ``mass [B, Hkv, C + T]`` (fp32) of ``kvpass::attend`` for the same arguments, in Triton.

    ``block_m``: observed rows per program in pass 1 and per step in pass 2; ``block_n``: keys per
    block (both powers of two >= 16; defaults from :func:`launch`). ``poison``: fill the outputs and
    scratch with NaN first."""
    B, H, T, D = q.shape
    Hkv, C = slot_k.shape[1], slot_k.shape[2]
    G = H // Hkv
    OBS = min(obs, T)
    R = G * OBS
    config = launch(D, q.element_size())
    block_m, block_n = block_m or config["BLOCK_M"], block_n or config["BLOCK_N"]
    for size in (D, block_m, block_n):
        if size & (size - 1) or size < 16:
            raise ValueError(f"chunk_mass_triton needs a power-of-two head dim and blocks of at least 16, got {size}")
    if min(t.stride(-1) for t in (q, k, v, slot_k, slot_v)) != 1:
        raise ValueError("chunk_mass_triton needs the head dimension contiguous")
    new = functools.partial(torch.full, fill_value=torch.nan, device=q.device) if poison else torch.empty
    f32 = dict(dtype=torch.float32, device=q.device)
    lse, mul = new((B * Hkv * R,), **f32), new((B * Hkv * R,), **f32)
    mass = new((B, Hkv, C + T), **f32)
    valid = slot_valid.to(torch.int8).contiguous()
    spos = slot_pos.contiguous()
    cpos = pos.contiguous()
    keep = chunk_keep.to(torch.int8).contiguous() if chunk_keep is not None else valid  # unread when not keeping
    common = dict(
        G=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, KEEPING=chunk_keep is not None,
        SOFTCAP=softcap > 0 and not entropy_k, UPCAST=not q.is_cuda and q.dtype == torch.bfloat16,
    )  # fmt: skip
    queries = (q.stride(0), q.stride(1), q.stride(2))
    _rows[(B * Hkv, triton.cdiv(R, block_m))](
        q, slot_k, k, valid, spos, cpos, keep, lse, mul,
        scale, softcap, window, keep_window, max(entropy_k, 1), C, T, OBS, R, Hkv,
        *queries, *slot_k.stride()[:3], *k.stride()[:3], *valid.stride()[:2],
        RAW=entropy_k > 0, **common, num_warps=config["num_warps"],
    )  # fmt: skip
    for slots, keys, values, first, count in ((True, slot_k, slot_v, 0, C), (False, k, v, C, T)):
        if count:
            _columns[(B * Hkv, triton.cdiv(count, block_n))](
                q, keys, values, valid, spos, cpos, keep, lse, mul, mass,
                softcap, window, keep_window, C, T, OBS, R, Hkv, first,
                *queries, *keys.stride()[:3], *values.stride()[:3], *valid.stride()[:2],
                SLOTS=slots, NORMS=value_weighted, **common, num_warps=config["num_warps"],
            )  # fmt: skip
    return mass
