"""In-context eviction inside full-sequence attention, as gate training uses it (Attention-Gate, Zeng et
al., arXiv 2410.12876): a token whose keep flag ``f_j`` is 0 is seen only by itself and the ``window``
queries after it. Per query i, over the keys j <= i,

    w_ij = f_j  if i - j > window  else 1
    out_i = sum_j e^(l_ij) w_ij v_j / sum_j e^(l_ij) w_ij,        l_ij = scale * q_i . k_j

Flags are floats so that gradients reach them: d out_i / d w_ij = e^(l_ij) (v_j - out_i) / sum_j e^(l_ij) w_ij,
which is not zero for an evicted token (what keeping it would have changed) -- the reason this is not an
ordinary masked attention, whose mask has no gradient.

:func:`reference` builds the ``[B, H, T, T]`` weights outright and lets autograd keep them: simple, and
memory-bound past a few hundred tokens (six such tensors per layer stay alive for the backward pass).
:func:`in_context_attention` computes the same in blocks of queries and recomputes each block in its own
backward pass, so only the inputs and the output are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, window: int = 0) -> Tensor:
    """``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``, ``keep [B, Hkv, T]`` (float flags, per KV head)."""
    H, T = q.shape[1], q.shape[2]
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    logits = (q @ k.transpose(-1, -2)).float() * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    earlier = torch.ones(T, T, device=q.device).tril(-1)
    recent = torch.ones(T, T, device=q.device).tril(-1).triu(-window) if window else 0  # 0 < i - j <= window
    flags = keep.float().repeat_interleave(G, dim=1)[:, :, None, :]
    weight = earlier * flags + recent * (1 - flags) + torch.eye(T, device=q.device)
    probs = probs * weight
    return (probs / probs.sum(dim=-1, keepdim=True)).to(v.dtype) @ v


def in_context_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, window: int = 0, block: int = 128
) -> Tensor:
    """:func:`reference`, ``block`` queries at a time, forward and backward."""
    return _Blockwise.apply(q, k, v, keep, scale, window, block)


def _block(q: Tensor, k: Tensor, f: Tensor, scale: float, window: int, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """For queries ``start .. start + C`` (``q [B, H, C, D]``) over keys ``0 .. start + C``: the
    attention ``P [B, H, C, S]``, ``e^(l_ij) / sum_j e^(l_ij) w_ij`` (``E``, unweighted) and where
    ``w_ij = f_j`` (``far``)."""
    C, S = q.shape[2], k.shape[2]
    i = torch.arange(start, start + C, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    far = i - j > window
    w = torch.where(far, f[:, :, None, :], (j <= i).float())
    logits = (q @ k.transpose(-1, -2)).float() * scale
    top = logits.masked_fill(w == 0, float("-inf")).amax(dim=-1, keepdim=True)  # the diagonal is always seen
    e = (logits - top).exp().masked_fill(j > i, 0.0)
    E = e / (e * w).sum(dim=-1, keepdim=True)
    return torch.where(w > 0, E * w, 0.0), E, far


class _Blockwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keep, scale, window, block):
        G = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        f = keep.float().repeat_interleave(G, dim=1)
        out = torch.full_like(q, float("nan"))  # every row is written below
        for s in range(0, q.shape[2], block):
            e = min(s + block, q.shape[2])
            P, _, _ = _block(q[:, :, s:e], kk[:, :, :e], f[:, :, :e], scale, window, s)
            out[:, :, s:e] = (P @ vv[:, :, :e].float()).to(out.dtype)
        ctx.save_for_backward(q, k, v, keep, out)
        ctx.scale, ctx.window, ctx.block = scale, window, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, keep, out = ctx.saved_tensors
        scale, window, block = ctx.scale, ctx.window, ctx.block
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        kk, vv = k.repeat_interleave(G, dim=1).float(), v.repeat_interleave(G, dim=1).float()
        f = keep.float().repeat_interleave(G, dim=1)
        dout = dout.float()
        delta = (dout * out.float()).sum(dim=-1, keepdim=True)  # <dout_i, out_i>
        dq = torch.full((B, H, T, D), float("nan"), device=q.device)
        dk, dv = torch.zeros(B, H, T, D, device=q.device), torch.zeros(B, H, T, D, device=q.device)
        df = torch.zeros(B, H, T, device=q.device)
        for s in range(0, T, block):
            e = min(s + block, T)
            qs, do, dl = q[:, :, s:e].float(), dout[:, :, s:e], delta[:, :, s:e]
            P, E, far = _block(qs, kk[:, :, :e], f[:, :, :e], scale, window, s)
            dv[:, :, :e] += P.transpose(-1, -2) @ do
            dP = do @ vv[:, :, :e].transpose(-1, -2) - dl  # d loss / d out_i . (v_j - out_i)
            dS = P * dP  # d loss / d logit_ij
            dq[:, :, s:e] = dS @ kk[:, :, :e] * scale
            dk[:, :, :e] += dS.transpose(-1, -2) @ qs * scale
            df[:, :, :e] += (E * dP * far).sum(dim=-2)

        def per_kv_head(t: Tensor) -> Tensor:
            return t.view(B, Hkv, G, *t.shape[2:]).sum(dim=2)

        return (
            dq.to(q.dtype),
            per_kv_head(dk).to(k.dtype),
            per_kv_head(dv).to(v.dtype),
            per_kv_head(df).to(keep.dtype) if ctx.needs_input_grad[3] else None,
            None,
            None,
            None,
        )
