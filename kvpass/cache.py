"""The evicting KV cache: fixed-capacity slot tables per layer, filled and evicted per KV head.

Every layer holds, for each batch row and KV head, ``C`` slots: key, value, true position, score
and a valid flag -- plus one *arrival* slot. A prefill chunk attends over the kept slots plus
itself, the policy scores every candidate (slots and chunk), the best ``C`` per KV head stay,
and the chunk's kept tokens move into the freed slots. A decoded token is written into the
arrival slot, attends over all ``C + 1`` slots at once, and then takes the place of the
lowest-ranked slot, unless it ranks lowest itself. Tensors keep their shapes from step to step.

Nothing here knows transformers: :mod:`kvpass.hf` presents this cache to ``generate()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvpass.kernels.attend import attend_attention, attend_reference
from kvpass.kernels.decode import decode_attention
from kvpass.policies.base import Chunk, Policy


@dataclass
class LayerSlots:
    """One layer's slot tables, all ``[B, Hkv, C + arrival, ...]``: ``C`` slots, then (``arrival=1``)
    the arrival slot, empty between steps."""

    keys: Tensor
    values: Tensor
    pos: Tensor
    score: Tensor
    valid: Tensor
    arrival: int = 1

    FIELDS: ClassVar[tuple[str, ...]] = ("keys", "values", "pos", "score", "valid")
    FILL: ClassVar[dict[str, float]] = {"keys": 0, "values": 0, "pos": -1, "score": 0, "valid": False}

    @classmethod
    def empty(cls, k: Tensor, capacity: int) -> LayerSlots:
        B, Hkv, _, D = k.shape
        shape = (B, Hkv, capacity + 1)
        return cls(
            keys=k.new_zeros(*shape, D),
            values=k.new_zeros(*shape, D),
            pos=torch.full(shape, -1, dtype=torch.long, device=k.device),
            score=torch.zeros(shape, dtype=torch.float32, device=k.device),
            valid=torch.zeros(shape, dtype=torch.bool, device=k.device),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2] - self.arrival

    @property
    def kv_bytes(self) -> int:
        """Keys and values as allocated, the arrival slot included."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def meta_bytes(self) -> int:
        return self.pos.nbytes + self.score.nbytes + self.valid.nbytes

    def kept(self) -> LayerSlots:
        """Views of the ``C`` slots without the arrival slot."""
        return LayerSlots(*(getattr(self, f)[:, :, : self.capacity] for f in self.FIELDS), arrival=0)

    def grow(self, capacity: int) -> None:
        """Widen every table to ``capacity`` slots (only the non-evicting ``full`` policy does this)."""
        extra = capacity - self.capacity
        for name in self.FIELDS:
            t = getattr(self, name)
            pad = t.new_full((*t.shape[:2], extra, *t.shape[3:]), self.FILL[name])
            setattr(self, name, torch.cat([t[:, :, :-1], pad, t[:, :, -1:]], dim=2))


class EvictingCache:
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
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.policy = policy
        self.chunk = chunk
        self.evict_during_decode = evict_during_decode
        self.decode_reserve = decode_reserve
        self.slots: dict[int, LayerSlots] = {}
        self.seen = 0  # tokens (columns, padding included) fed so far
        self.budget = 0  # slots kept after the prompt; fixed by the first input
        self.capacity = 0  # slots per layer and KV head: the budget (scaled per layer by an allocation), + any reserve
        self.prompt_len = 0
        self.prefilling = False
        self.lengths: Tensor | None = None  # real (non-padding) tokens seen, per batch row
        self.deferred = False  # a forward is running: decoded tokens are admitted at its end (``flush``)
        self._pending: dict[int, tuple[Tensor, ...]] = {}
        self._stacks: dict[tuple[int, ...], LayerSlots] = {}

    def __repr__(self) -> str:
        name, p = type(self).__name__, self.policy.name
        return f"{name}(policy={p}, seen={self.seen}, capacity={self.capacity}, layers={len(self.slots)})"

    def reset(self) -> None:
        self.slots.clear()
        self._pending.clear()
        self._stacks.clear()
        self.seen = self.budget = self.capacity = 0
        self.lengths = None

    def select_rows(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (in that order; a row may repeat): how beam search moves
        each beam's cache to the beams that continue it."""
        if self._pending:
            raise RuntimeError("rows can be selected only between forwards (decoded tokens are still pending)")
        for s in self.slots.values():
            for name in LayerSlots.FIELDS:
                setattr(s, name, getattr(s, name).index_select(0, index))
        self._stacks.clear()  # the layers have new tables: stack again at the next flush
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, index)

    def evicted(self, layer: int) -> int:
        """Entries (token x KV head x batch row) that entered ``layer`` and are no longer held."""
        s = self.slots[layer]
        return int(self.lengths.sum()) * s.valid.shape[1] - int(s.valid.sum())

    # --- the runtime -------------------------------------------------------------------------
    def begin(self, batch: int, prompt_len: int, device: torch.device) -> None:
        """Start new sequences; the capacity is fixed by the first input's length, ``prompt_len``."""
        self.reset()
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        p = self.policy
        self.budget = p.capacity(prompt_len) if p.evicts else prompt_len
        self.capacity = self.budget if (self.evict_during_decode or not p.evicts) else self.budget + self.decode_reserve
        self.prompt_len = prompt_len
        if p.evicts:
            p.check_fits(self.budget)

    def layer_budget(self, layer: int) -> int:
        """Slots ``layer`` keeps after the prompt: the budget, scaled by the policy's allocation."""
        p = self.policy
        if not p.evicts:
            return self.budget
        return p.layer_slots(self.budget, layer, self.prompt_len if isinstance(p.budget, float) else None)

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
        s = self.slots.get(layer)
        if s is None:
            capacity = self.capacity - self.budget + self.layer_budget(layer)
            s = self.slots[layer] = LayerSlots.empty(k, min(capacity, window) if window else capacity)
        T = k.shape[2]
        if not self.policy.evicts and not window and self.seen + T > s.capacity:
            s.grow(max(2 * s.capacity, self.seen + T))
            self._stacks.clear()  # the grown layer has new tables: stack again at the next flush
        if T == 1 and not self.prefilling:
            # Decoding: the token enters the arrival slot, attends, and is admitted later (``flush``).
            C = s.capacity
            s.keys[:, :, C:].copy_(k)
            s.values[:, :, C:].copy_(v)
            s.pos[..., C:].copy_(pos[:, None])
            s.valid[..., C:].copy_(pos[:, None] >= 0)
            p = self.policy
            out, mass = decode_attention(
                q, s.keys, s.values, s.valid, s.pos, pos, scale, window, softcap, p.mass_entropy_k, p.mass_by_value
            )
            # a gated policy's keep probability is needed only at admission: computed there, for all layers at once
            self._pending[layer] = (k, v, pos, mass, q if p.gated else None, (window, scale))
            if not self.deferred:
                self.flush()
            return out
        kept = s.kept()
        p = self.policy
        gate = chunk_keep = None
        if p.gated:  # keep probabilities first: a token flagged out is hidden from the chunk's later queries
            args = (k, v, kept.keys, kept.values, kept.valid, kept.pos, pos, scale, window, 0.0, 1)
            gate = p.keep_prob(layer, q, k, v, lambda a: attend_reference(a, *args)[0])
            chunk_keep = ~p.drops(gate) | (pos < p.sink_tokens)[:, None, :]
        out, mass = attend_attention(  # the op's body: eager, so no dispatcher cost per layer
            q, k, v, kept.keys, kept.values, kept.valid, kept.pos, pos, scale, window, softcap, p.obs,
            p.mass_entropy_k, p.mass_by_value, chunk_keep, p.window,
        )  # fmt: skip
        self._update(kept, k, v, pos, mass, self.layer_budget(layer), window, gate)
        return out

    @torch.compiler.disable  # bookkeeping: never traced, also when a compiled forward calls it
    def flush(self) -> None:
        """Admit the pending decoded tokens into their layers' slots.

        A layer's admission only has to happen before that layer's next step, so a forward defers
        them to its end (``deferred``) and admits all layers whose tables have the same shape in
        one batch: their tables are stacked once into one tensor per field (each layer keeps a view
        of its part) and the batch is the layers times the batch rows. Same result as admitting
        layer by layer, in a thirtieth of the operations. A gated policy's keep probabilities are
        computed here too, for all layers at once (a decoded token sees itself whatever its flag).
        """
        pending, self._pending = self._pending, {}
        groups: dict[tuple, list[int]] = {}
        for layer, (*_, site) in pending.items():
            s = self.slots[layer]
            groups.setdefault((s.keys.shape, s.keys.dtype, s.keys.device, site), []).append(layer)
        p = self.policy
        for (*_, (window, scale)), layers in groups.items():
            layers = tuple(sorted(layers))
            s = self._stacks.get(layers) or self._stack(layers)
            k, v, pos, mass, q = (
                None if t[0] is None else torch.cat(t)
                for t in list(zip(*(pending[i] for i in layers), strict=True))[:5]
            )
            gate = None
            if p.gated:  # the gate queries attend over the same slots (the token is in its arrival slot)
                args = (s.keys, s.values, s.valid, s.pos, pos, scale, window, 0.0)
                gate = p.keep_prob(layers, q, k, v, lambda a, args=args: decode_attention(a, *args)[0])
            _admit(s, k, v, pos, mass, p, window, gate)

    def _stack(self, layers: tuple[int, ...]) -> LayerSlots:
        """One tensor per field for ``layers`` (their slots become views into it), flattened to a
        batch of ``len(layers) * B`` rows. A single layer is its own stack."""
        tables = [self.slots[i] for i in layers]
        if len(tables) == 1:
            return tables[0]
        whole = {f: torch.stack([getattr(t, f) for t in tables]) for f in LayerSlots.FIELDS}
        for n, t in enumerate(tables):
            for f in LayerSlots.FIELDS:
                setattr(t, f, whole[f][n])
        self._stacks[layers] = stacked = LayerSlots(**{f: w.flatten(0, 1) for f, w in whole.items()})
        return stacked

    def _update(self, s: LayerSlots, k, v, pos, mass, budget: int, window: int = 0, gate: Tensor | None = None) -> None:
        """Keep the best ``C`` of the slots and the chunk (a prefill chunk; ``s``: the kept slots;
        ``budget``: what the layer keeps after the prompt)."""
        B, Hkv, T, D = k.shape
        C = s.capacity
        score = self.policy.score(Chunk(old=s.score, keys=k, values=v, pos=pos, mass=mass, slot_pos=s.pos, gate=gate))
        cand_pos, cand_valid, rank = rank_candidates(self.policy, score, s.pos, s.valid, pos, window)
        s.score.copy_(score[..., :C])
        target = min(budget, C) if self.prefilling else C
        keep = torch.zeros_like(cand_valid).scatter_(-1, rank.topk(min(target, C + T), dim=-1).indices, True)
        keep &= cand_valid
        slot_keep, new_keep = keep[..., :C], keep[..., C:]
        s.valid.copy_(slot_keep)
        # Pair free slots (in slot order) with kept chunk tokens (in chunk order).
        m = min(C, T)
        dest = slot_keep.to(torch.int8).argsort(dim=-1, stable=True)[..., :m]
        src = (~new_keep).to(torch.int8).argsort(dim=-1, stable=True)[..., :m]
        write = new_keep.gather(-1, src)
        _put(s.keys, dest, write, k.gather(2, src[..., None].expand(B, Hkv, m, D)))
        _put(s.values, dest, write, v.gather(2, src[..., None].expand(B, Hkv, m, D)))
        _put(s.pos, dest, write, cand_pos[..., C:].gather(-1, src))
        _put(s.score, dest, write, score[..., C:].gather(-1, src))
        _put(s.valid, dest, write, write)


def prefill_spans(length: int, chunk: int) -> list[tuple[int, int]]:
    """Where an input of ``length`` tokens is cut into prefill chunks of at most ``chunk``: from its
    end, so the last chunk is a whole one and the first takes the remainder. Eviction follows every
    chunk; cut this way, the end of a prompt (where the question usually is) scores the most
    candidates before anything is lost, at the same peak memory."""
    return [(max(0, end - chunk), end) for end in reversed(range(length, 0, -chunk))]


def _admit(
    s: LayerSlots,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    mass: Tensor,
    policy: Policy,
    window: int = 0,
    gate: Tensor | None = None,
) -> None:
    """Admit the token in each row's arrival slot (``k, v [B, Hkv, 1, D]``, ``pos [B, 1]``): it takes
    the place of the lowest-ranked slot, unless it ranks lowest itself or the policy drops it; the
    arrival slot is emptied."""
    B, Hkv, _, D = k.shape
    C = s.capacity
    kept = s.kept()
    score = policy.score(Chunk(old=kept.score, keys=k, values=v, pos=pos, mass=mass, slot_pos=kept.pos, gate=gate))
    s.score.copy_(score)
    newest = torch.maximum(pos[:, 0], kept.pos.amax(dim=(1, 2)))  # [B]
    rank = torch.where(policy.protected(s.pos, newest), torch.inf, policy.rank(score, s.pos, newest))
    alive = s.valid
    if window:  # dead slots (out of the next query's window) go first
        alive = alive & (s.pos > newest[:, None, None] + 1 - window)
    dest = torch.where(alive, rank, -torch.inf).argmin(dim=-1, keepdim=True)  # ties: an old slot goes
    if gate is not None:  # a dropped token stays in the arrival slot, which is emptied below; flagged
        # tokens that just left the policy's window leave their slots
        dropped = _dropped(policy, score, s.pos, newest)
        dest = torch.where(dropped[..., C:], C, dest)
        s.valid[..., :C] &= ~dropped[..., :C]
    s.keys.scatter_(2, dest[..., None].expand(B, Hkv, 1, D), k)
    s.values.scatter_(2, dest[..., None].expand(B, Hkv, 1, D), v)
    s.pos.scatter_(-1, dest, pos[:, None].expand(B, Hkv, 1))
    s.score.scatter_(-1, dest, score[..., C:])
    s.valid.scatter_(-1, dest, (pos >= 0)[:, None].expand(B, Hkv, 1))
    s.valid[..., C] = False


def rank_candidates(
    policy: Policy, score: Tensor, slot_pos: Tensor, slot_valid: Tensor, pos: Tensor, window: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """A chunk's candidates -- the slots, then the chunk's tokens (``pos [B, T]``) -- as ``[B, Hkv, C + T]``:
    their positions, which of them may stay (valid, visible to the next query, not dropped by the
    policy) and what they are ranked by (``score`` as the policy ranks it; protected +inf; those
    that may not stay -inf). The cache's prefill and the exported step choose by it alike."""
    B, Hkv, _ = slot_pos.shape
    T = pos.shape[1]
    cand_pos = torch.cat([slot_pos, pos[:, None, :].expand(B, Hkv, T)], dim=-1)
    cand_valid = torch.cat([slot_valid, (pos >= 0)[:, None, :].expand(B, Hkv, T)], dim=-1)
    newest = cand_pos.amax(dim=(1, 2))  # [B]
    if window:  # the next query (newest + 1) sees positions > newest + 1 - window; the rest is dead
        cand_valid = cand_valid & (cand_pos > newest[:, None, None] + 1 - window)
    cand_valid = cand_valid & ~_dropped(policy, score, cand_pos, newest)
    rank = torch.where(policy.protected(cand_pos, newest), torch.inf, policy.rank(score, cand_pos, newest))
    return cand_pos, cand_valid, torch.where(cand_valid, rank, -torch.inf)


def _dropped(policy: Policy, score: Tensor, pos: Tensor, newest: Tensor) -> Tensor:
    """Candidates the policy drops at once (in-context eviction), unless protected; all-False if none."""
    drop = policy.drops(score)
    if drop is None:
        return torch.zeros_like(pos, dtype=torch.bool)
    return drop & ~policy.protected(pos, newest)


def _put(table: Tensor, dest: Tensor, write: Tensor, new: Tensor) -> None:
    """``table[..., dest] = new`` where ``write``, leaving the other ``dest`` slots as they are."""
    if table.dim() == 4:
        idx = dest[..., None].expand(*dest.shape, table.shape[-1])
        table.scatter_(2, idx, torch.where(write[..., None], new, table.gather(2, idx)))
    else:
        table.scatter_(-1, dest, torch.where(write, new, table.gather(-1, dest)))
