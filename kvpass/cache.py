"""The evicting KV cache: fixed-capacity slot tables per layer, filled and evicted per KV head.

Every layer holds, for each batch row and KV head, ``C`` slots: key, value, true position, score
and a valid flag. A step attends over the kept slots plus the new chunk, lets the policy score
every candidate (slots and chunk), keeps the best ``C`` per KV head, and writes the chunk's kept
tokens into the freed slots. Tensors keep their shapes from step to step.

To ``transformers`` this is a :class:`~transformers.Cache` whose ``get_seq_length()`` is the
number of tokens *seen*, so ``generate()`` feeds only new tokens and derives true positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Cache

from kvpass.kernels import attend
from kvpass.policies.base import Chunk, Policy


@dataclass
class LayerSlots:
    """One layer's slot tables, all ``[B, Hkv, C, ...]``."""

    keys: Tensor
    values: Tensor
    pos: Tensor
    score: Tensor
    valid: Tensor
    evicted: Tensor  # entries (token x KV head x batch row) evicted so far, a 0-dim int64

    @classmethod
    def empty(cls, k: Tensor, capacity: int) -> LayerSlots:
        B, Hkv, _, D = k.shape
        shape = (B, Hkv, capacity)
        return cls(
            keys=k.new_zeros(*shape, D),
            values=k.new_zeros(*shape, D),
            pos=torch.full(shape, -1, dtype=torch.long, device=k.device),
            score=torch.zeros(shape, dtype=torch.float32, device=k.device),
            valid=torch.zeros(shape, dtype=torch.bool, device=k.device),
            evicted=torch.zeros((), dtype=torch.long, device=k.device),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def kv_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def meta_bytes(self) -> int:
        return self.pos.nbytes + self.score.nbytes + self.valid.nbytes

    def grow(self, capacity: int) -> None:
        """Widen every table to ``capacity`` slots (only the non-evicting ``full`` policy does this)."""
        extra = capacity - self.capacity
        for name, fill in (("keys", 0), ("values", 0), ("pos", -1), ("score", 0), ("valid", False)):
            t = getattr(self, name)
            pad = t.new_full((*t.shape[:2], extra, *t.shape[3:]), fill)
            setattr(self, name, torch.cat([t, pad], dim=2))


class EvictingCache(Cache):
    """Per-layer fixed-capacity KV slots, evicted by ``policy``.

    ``chunk``: prefill chunk length (prompts longer than it are processed in pieces).
    ``evict_during_decode=False`` evicts only while the prompt is processed (as kvpress does);
    the cache then has ``decode_reserve`` extra slots for generated tokens, and evicts again only
    when those are used up, so memory stays bounded either way.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        chunk: int = 512,
        evict_during_decode: bool = True,
        decode_reserve: int = 256,
    ) -> None:
        super().__init__(layers=[])
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.policy = policy
        self.chunk = chunk
        self.evict_during_decode = evict_during_decode
        self.decode_reserve = decode_reserve
        self.slots: dict[int, LayerSlots] = {}
        self.seen = 0  # tokens (columns, padding included) fed so far
        self.budget = 0  # slots kept after the prompt; fixed by the first input
        self.capacity = 0  # slots per layer and KV head
        self.prefilling = False
        self.lengths: Tensor | None = None  # real (non-padding) tokens seen, per batch row

    # --- what transformers asks of a Cache ---------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_compileable(self) -> bool:  # keeps generate() from building 4D masks for us
        return False

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        raise NotImplementedError("kvpass attention builds its own masks from slot positions")

    def reset(self) -> None:
        self.slots.clear()
        self.seen = self.budget = self.capacity = 0
        self.lengths = None

    # --- the runtime -------------------------------------------------------------------------
    def begin(self, batch: int, prompt_len: int, device: torch.device) -> None:
        """Start new sequences; the capacity is fixed by the first input's length, ``prompt_len``."""
        self.reset()
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        p = self.policy
        self.budget = p.capacity(prompt_len) if p.evicts else prompt_len
        self.capacity = self.budget if (self.evict_during_decode or not p.evicts) else self.budget + self.decode_reserve
        if p.evicts:
            p.check_fits(self.budget)

    def step(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: Tensor,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> Tensor:
        """Attend the chunk ``q, k, v`` (``pos``: true positions, -1 = padding) and update the layer's slots.

        A sliding-window layer (``window > 0``) never holds more than ``window`` slots: tokens that
        no later query can see are dropped before the policy ranks the rest.
        """
        slots = self.slots.get(layer)
        if slots is None:
            slots = self.slots[layer] = LayerSlots.empty(k, min(self.capacity, window) if window else self.capacity)
        if not self.policy.evicts and not window and self.seen + k.shape[2] > slots.capacity:
            slots.grow(max(2 * slots.capacity, self.seen + k.shape[2]))
        out, mass = attend(
            q, k, v, slots.keys, slots.values, slots.valid, slots.pos, pos, scale, window, softcap, self.policy.obs
        )
        self._update(slots, k, v, pos, mass, window)
        return out

    def _update(self, s: LayerSlots, k: Tensor, v: Tensor, pos: Tensor, mass: Tensor, window: int = 0) -> None:
        B, Hkv, T, D = k.shape
        C = s.capacity
        cand_pos = torch.cat([s.pos, pos[:, None, :].expand(B, Hkv, T)], dim=-1)
        cand_valid = torch.cat([s.valid, (pos >= 0)[:, None, :].expand(B, Hkv, T)], dim=-1)
        newest = cand_pos.amax(dim=(1, 2))  # [B]
        if window:  # the next query (newest + 1) sees positions > newest + 1 - window; the rest is dead
            cand_valid &= cand_pos > newest[:, None, None] + 1 - window
        score = self.policy.score(Chunk(old=s.score, keys=k, values=v, pos=pos, mass=mass, slot_pos=s.pos))
        rank = torch.where(self.policy.protected(cand_pos, newest), torch.inf, score)
        rank = torch.where(cand_valid, rank, -torch.inf)
        s.score.copy_(score[..., :C])
        if T == 1 and not self.prefilling:
            # One new token: it replaces the lowest-ranked slot, unless it ranks lower still.
            dest = rank[..., :C].argmin(dim=-1, keepdim=True)
            write = (rank[..., C:] >= rank.gather(-1, dest)) & cand_valid[..., C:]
            s.evicted += (s.valid.gather(-1, dest) & write).sum() + (cand_valid[..., C:] & ~write).sum()
            src = torch.zeros_like(dest)
        else:
            target = min(self.budget, C) if self.prefilling else C
            keep = torch.zeros_like(cand_valid).scatter_(-1, rank.topk(min(target, C + T), dim=-1).indices, True)
            keep &= cand_valid
            s.evicted += cand_valid.sum() - keep.sum()
            slot_keep, new_keep = keep[..., :C], keep[..., C:]
            s.valid.copy_(slot_keep)
            # Pair free slots (in slot order) with kept chunk tokens (in chunk order).
            m = min(C, T)
            dest = slot_keep.to(torch.int8).argsort(dim=-1, stable=True)[..., :m]
            src = (~new_keep).to(torch.int8).argsort(dim=-1, stable=True)[..., :m]
            write = new_keep.gather(-1, src)
        m = dest.shape[-1]
        _put(s.keys, dest, write, k.gather(2, src[..., None].expand(B, Hkv, m, D)))
        _put(s.values, dest, write, v.gather(2, src[..., None].expand(B, Hkv, m, D)))
        _put(s.pos, dest, write, cand_pos[..., C:].gather(-1, src))
        _put(s.score, dest, write, score[..., C:].gather(-1, src))
        _put(s.valid, dest, write, write)


def _put(table: Tensor, dest: Tensor, write: Tensor, new: Tensor) -> None:
    """``table[..., dest] = new`` where ``write``, leaving the other ``dest`` slots as they are."""
    if table.dim() == 4:
        idx = dest[..., None].expand(*dest.shape, table.shape[-1])
        table.scatter_(2, idx, torch.where(write[..., None], new, table.gather(2, idx)))
    else:
        table.scatter_(-1, dest, torch.where(write, new, table.gather(-1, dest)))
