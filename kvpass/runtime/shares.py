"""One budget for the whole model (``share="model"``): the layers' shares decided by their scores.

When the reading buffer is compressed, every layer's pool (its KV heads share it: a ``share="layer"``
layout) is ranked as a step ranks candidates (:func:`kvpass.runtime.step.rank_candidates`; each
head's best ``floor`` of its equal share, at least one entry, ranks first), and the best ``total``
entries of all the layers together stay -- ``total`` is the budget x KV heads x layers, the equal
shares' memory. Each pool's kept entries move to its first slots, best first, so that when the
prompt has been read the tables shrink to each layer's share (:func:`capacities`) by keeping
each pool's first slots. A layer keeps at most ``most`` entries (its reading buffer) between two
compressions. Batch rows rank apart; the layout's per-layer sizes are their mean shares.

Sliding-window and chunked-attention layers keep their window's (block's) slots and take no part.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvpass.policies.base import Policy
from kvpass.runtime.step import Slots, floored, per_head, pooled, rank_candidates


def ranks(policy: Policy, slots: Slots, kv_heads: int, share: int) -> Tensor:
    """A pool's entries ``[B, S]`` ranked as a step ranks its slots (-inf: empty, or may not stay;
    +inf: protected, or among its head's best ``ceil(floor x share)``, at least one)."""
    view = per_head(slots, kv_heads)
    none = slots.pos.new_empty(slots.pos.shape[0], 0)
    _, _, rank = rank_candidates(policy, view.score, view.pos, view.valid, none)
    rank = floored(rank, max(1, math.ceil(policy.floor * share)))
    return pooled(rank, slots.owner)[:, 0]


def compress(policy: Policy, pools: dict[int, tuple[Slots, int, int]], most: int | None) -> dict[int, Tensor]:
    """Keep the best entries of ``pools`` (per layer: its slots, one pool ``[B, 1, S]``, KV heads
    and slots per KV head of its budget), in place: each pool's entries sorted best first, the
    first ``count`` of them valid. Returns ``count [B]`` per layer (at most ``most`` x KV heads;
    None: up to all its slots)."""
    ranked = {}
    for layer, (slots, heads, share) in pools.items():
        rank, order = ranks(policy, slots, heads, share).sort(dim=-1, descending=True, stable=True)
        for table in slots:
            index = order[:, None] if table.dim() == 3 else order[:, None, :, None].expand_as(table)
            table.copy_(table.gather(2, index))
        ranked[layer] = rank if most is None else rank[:, : most * heads]
    total = sum(heads * share for _, heads, share in pools.values())
    flat = torch.cat(list(ranked.values()), dim=1)  # [B, N]
    which = torch.cat([torch.full((r.shape[1],), j, device=flat.device) for j, r in enumerate(ranked.values())])
    best = flat.topk(min(total, flat.shape[1]), dim=1)
    counts = torch.zeros(flat.shape[0], len(ranked), dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, which[best.indices], (best.values > -torch.inf).long())
    kept = {}
    for j, (layer, (slots, _, _)) in enumerate(pools.items()):
        n = counts[:, j]
        slots.valid.logical_and_(torch.arange(slots.pos.shape[-1], device=n.device) < n[:, None, None])
        slots.pos.masked_fill_(~slots.valid, -1)
        kept[layer] = n
    return kept


def capacities(kept: dict[int, Tensor], heads: dict[int, int], budget: dict[int, int]) -> dict[int, int]:
    """Slots per KV head of each layer's pool once the prompt is read: its mean ``kept`` entries
    over the batch rows, in whole slots per KV head (largest remainders first), with what no layer
    kept (a prompt shorter than the budget) spread evenly, so that the pools hold the equal shares'
    slots in all (``budget`` per KV head), at least one per KV head."""
    total = sum(heads[i] * budget[i] for i in kept)
    mean = {i: n.float().mean().item() for i, n in kept.items()}
    spare = max(0.0, total - sum(mean.values())) / len(kept)
    want = {i: (mean[i] + spare) / heads[i] for i in kept}
    cap = {i: max(1, math.floor(w)) for i, w in want.items()}
    for i in sorted(kept, key=lambda i: cap[i] - want[i]):  # the largest remainders first
        if sum(heads[j] * cap[j] for j in cap) + heads[i] <= total:
            cap[i] += 1
    return cap
