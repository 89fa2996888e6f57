"""The evicting cache as a pure function: one step of one layer, from explicit slot tables to new
ones. Exported engines (ONNX, TensorRT) run this, so the cache is the graph's input and output.

A chunk of ``T`` tokens attends over the layer's ``C`` kept slots and itself, the policy scores
the ``C + T`` candidates, and the best ``C`` become the new slots -- gathered by ``topk``; a
decoded token (``T = 1``) replaces the lowest-ranked slot by a select. Nothing is written in
place, so the step has no side effects and uses only standard operators (MatMul, Softmax, TopK,
GatherElements, Where). Slot order carries no meaning, so this
keeps the same *set* of tokens as :class:`kvpass.cache.EvictingCache`, which runs the same policy
code on tables it updates in place (tested to give the same tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kvpass.cache import rank_candidates
from kvpass.kernels.attend import _probs, mass_scale, value_weights, visible
from kvpass.policies.base import Chunk, Policy


class Slots(NamedTuple):
    """One layer's tables, ``[B, Hkv, C, ...]``: keys and values (the model's dtype), true
    positions (int64, -1 = empty), scores (fp32) and valid flags (bool)."""

    keys: Tensor
    values: Tensor
    pos: Tensor
    score: Tensor
    valid: Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype=torch.float32, device=None) -> Slots:
        shape = (batch, kv_heads, capacity)
        return cls(
            keys=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            values=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            pos=torch.full(shape, -1, dtype=torch.long, device=device),
            score=torch.zeros(shape, dtype=torch.float32, device=device),
            valid=torch.zeros(shape, dtype=torch.bool, device=device),
        )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slots: Slots,
    pos: Tensor,
    scale: float,
    window: int,
    softcap: float,
    policy: Policy,
    chunk_keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, mass)`` as :func:`kvpass.kernels.attend.attend_reference` computes them, with no
    branch on the chunk length ``T`` (it may be a symbolic size): every query's probabilities
    are computed and the last ``policy.obs`` queries' are summed into ``mass``."""
    B, H, T, D = q.shape
    C = slots.keys.shape[2]
    mask = visible(slots.valid, slots.pos, pos, window, chunk_keep, policy.window if chunk_keep is not None else 0)
    probs = _probs(q, (slots.keys, k), mask, scale, softcap)  # [B, Hkv, G, T, C + T]
    pg = probs.flatten(2, 3)
    out = (pg[..., :C] @ slots.values.float() + pg[..., C:] @ v.float()).view(B, H, T, D).to(q.dtype)
    if policy.mass_entropy_k:  # AhaKV's adaptive scale, for the mass only (soft-capping left out, as in the op)
        lam = mass_scale(mask.sum(dim=-1), D, scale, policy.mass_entropy_k)[:, :, None, :, None]
        probs = _probs(q, (slots.keys, k), mask, lam)
    observed = torch.arange(T, device=q.device) >= T - policy.obs  # the last ``obs`` queries
    mass = (probs * observed[:, None]).sum(dim=(2, 3))
    if policy.mass_by_value:
        mass = mass * torch.cat([value_weights(slots.values), value_weights(v)], dim=-1)
    return out, mass


def step(
    policy: Policy,
    layer: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    slots: Slots,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[Tensor, Slots]:
    """Attend the chunk (``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``, ``pos [B, T]``, -1 = padding)
    over ``slots`` and itself; return the output and the slots that stay."""
    B, Hkv, T, D = k.shape
    C = slots.keys.shape[2]
    gate = chunk_keep = None
    if policy.gated:  # keep probabilities first: a token flagged out is hidden from the chunk's later queries
        gate = policy.keep_prob(layer, q, k, v, lambda a: attend(a, k, v, slots, pos, scale, window, 0.0, policy)[0])
        chunk_keep = ~policy.drops(gate) | (pos < policy.sink_tokens)[:, None, :]
    out, mass = attend(q, k, v, slots, pos, scale, window, softcap, policy, chunk_keep)
    chunk = Chunk(old=slots.score, keys=k, values=v, pos=pos, mass=mass, slot_pos=slots.pos, gate=gate)
    score = policy.score(chunk)
    cand_pos, cand_valid, rank = rank_candidates(policy, score, slots.pos, slots.valid, pos, window)
    if T == 1:  # a decoded token takes the place of the lowest-ranked slot (the first, on ties), unless it
        # ranks lowest itself: one select over the tables instead of a gather of C + 1 candidates
        hit = (torch.arange(C, device=k.device) == rank.argmin(dim=-1, keepdim=True))[..., None]  # [B, Hkv, C, 1]
        new = Slots(
            keys=torch.where(hit, k, slots.keys),
            values=torch.where(hit, v, slots.values),
            pos=torch.where(hit[..., 0], cand_pos[..., C:], slots.pos),
            score=torch.where(hit[..., 0], score[..., C:], score[..., :C]),
            valid=(hit[..., 0] & cand_valid[..., C:]) | (~hit[..., 0] & cand_valid[..., :C]),  # no bool Where in ORT
        )
        return out, new
    keep = rank.topk(C, dim=-1).indices  # [B, Hkv, C]
    rows = keep[..., None].expand(B, Hkv, C, D)
    new = Slots(
        keys=torch.cat([slots.keys, k], dim=2).gather(2, rows),
        values=torch.cat([slots.values, v], dim=2).gather(2, rows),
        pos=cand_pos.gather(-1, keep),
        score=score.gather(-1, keep),
        valid=cand_valid.gather(-1, keep),
    )
    return out, new
