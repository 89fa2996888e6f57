"""The evicting KV cache: the state a transformed model keeps between steps, and nothing else.

It holds fixed-capacity slot tables (see :class:`kvpass.runtime.step.Layout`: per group of layers, keys,
values, true positions, scores and valid flags, ``[L, B, Hkv, C, ...]``; a hybrid's recurrent state
after them, fixed-size), the number of tokens
seen and each row's real length, and what the first input fixed: the budget and the capacity.
While the first input (the prompt) is read, the tables are a reading buffer of up to ``reading``
entries per layer and KV head (less the chunk in flight, unless the policy probes the buffer
after reading it whole); once it is read they are compressed to
the budget and shrunk to the capacity, so the memory held afterwards is the budget's
(:mod:`kvpass.runtime.plan` says when the buffer is compressed).
What a step does with the tables -- attention, scoring, eviction, admission -- is
:mod:`kvpass.runtime.step`, the same for every path.

Nothing here knows transformers: :mod:`kvpass.runtime.hf` presents this cache to ``generate()``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from kvpass.policies.base import Policy
from kvpass.runtime import shares
from kvpass.runtime.step import Layout, Slots, Step

READING: int | None = 0  # the default reading buffer, in tokens (0: evict after every chunk; None: the whole prompt)


class EvictingCache:
    """Per-layer fixed-capacity KV slots, evicted by ``policy``.

    ``chunk``: prefill chunk length (prompts longer than it are processed in pieces).
    ``reading``: entries per layer and KV head the prompt is read into before it is compressed
    (tables plus the chunk in flight; budget + chunk or less, 0 say, is eviction after every chunk;
    None: the whole prompt, compressed once it is read).
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
        reading: int | None = READING,
    ) -> None:
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        check_reading(reading)
        self.policy = policy
        self.chunk = chunk
        self.reading = reading
        self.evict_during_decode = evict_during_decode
        self.decode_reserve = decode_reserve
        self.layout: Layout | None = None
        self.tables: list[Tensor] = []
        self.seen = 0  # tokens (columns, padding included) fed so far
        self.budget = 0  # slots kept after the prompt; fixed by the first input
        self.capacity = 0  # slots per layer and KV head: the budget (scaled per layer by an allocation), + any reserve
        self.prompt_len = 0
        self.room = 0  # entries per layer and KV head the tables hold while the prompt is read
        self.read_whole = False  # the buffer holds the chunk in flight too; it is compressed after the step
        self.kept: dict[int, Tensor] = {}  # share="model": each layer's entries at the last compression, per row
        self.lengths: Tensor | None = None  # real (non-padding) tokens seen, per batch row
        self.peak_bytes = 0  # the most bytes of tables held at once since begin()

    def __repr__(self) -> str:
        name, p = type(self).__name__, self.policy.name
        return f"{name}(policy={p}, seen={self.seen}, capacity={self.capacity}, layers={len(self.slots)})"

    def reset(self) -> None:
        self.layout, self.tables = None, []
        self.seen = self.budget = self.capacity = self.room = self.peak_bytes = 0
        self.lengths, self.kept = None, {}

    def begin(self, batch: int, prompt_len: int, step: Step, dtype: torch.dtype, device: torch.device) -> None:
        """Start new sequences of the model whose step is ``step``: the capacity is fixed by the first
        input's length, ``prompt_len``; the tables are allocated here, ``dtype`` and ``device``."""
        self.reset()
        p = self.policy
        self.budget = p.capacity(prompt_len) if p.evicts else prompt_len
        self.capacity = self.budget if (self.evict_during_decode or not p.evicts) else self.budget + self.decode_reserve
        self.prompt_len = prompt_len
        if p.evicts:
            p.check_fits(self.budget)
        reading = prompt_len + self.chunk if self.reading is None else self.reading
        buffer = min(prompt_len, reading - self.chunk)  # what the tables hold between chunks while reading
        self.room = min(max(buffer, self.layer_budget(i)) for i in step.sites)  # in every layer
        # a policy that probes reads its buffer whole, chunk in flight included, then probes it (plan.py);
        # so does a budget the layers share: all layers' entries are ranked after the step (shares.py)
        biggest = max(self.layer_budget(i) for i in step.sites)
        self.read_whole = p.evicts and ((p.probes and self.room > biggest) or p.share == "model")
        if self.read_whole:
            buffer = min(prompt_len, self.room + self.chunk)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.layout = step.layout(self._capacities(step, buffer))
        self.tables = self.layout.empty(batch, dtype, device)
        self._held()

    def _capacities(self, step: Step, least: int = 0, share: dict[int, int] | None = None) -> dict[int, int]:
        """Per layer, its slots: its budget (or its ``share``, where given) plus the reserve, at least
        ``least`` (the reading buffer)."""
        reserve, share = self.capacity - self.budget, share or {}
        return {i: max(least, reserve + share.get(i, self.layer_budget(i))) for i in step.sites}

    def _relayout(self, step: Step, capacity: dict[int, int]) -> None:
        """Move the tables to a layout of ``capacity`` slots per layer: each layer keeps its first
        slots (a prefill that compressed left its kept slots first, best first)."""
        old, states = self.slots, self.tables[self.layout.slot_tables :]
        batch, dtype, device = self.lengths.shape[0], self.tables[0].dtype, self.tables[0].device
        self.layout = step.layout(capacity)
        self.tables = self.layout.empty(batch, dtype, device)
        for layer, new in self.slots.items():
            n = min(new.capacity, old[layer].capacity)
            for a, b in zip(old[layer], new, strict=True):
                b[:, :, :n] = a[:, :, :n]
        self.tables[self.layout.slot_tables :] = states  # recurrent state: the same tensors
        self._held()

    def _held(self) -> None:
        self.peak_bytes = max(self.peak_bytes, sum(t.nbytes for t in self.tables))
        self._fix_addresses()

    def settle(self, step: Step) -> None:
        """After the prompt: the reading buffer, compressed, shrinks to the capacity (with
        ``share="model"``, each layer's share of it: :func:`shares.capacities`)."""
        share = None
        if self.kept:
            heads = {i: step.sites[i].kv_heads for i in self.kept}
            share = shares.capacities(self.kept, heads, {i: self.layer_budget(i) for i in self.kept})
        capacity = self._capacities(step, share=share)
        if step.layout(capacity) != self.layout:
            self._relayout(step, capacity)

    def held_after_compression(self) -> int:
        """The most entries per KV head a layer holds after a compression, while the prompt is read:
        its budget, or with ``share="model"`` its reading buffer."""
        return self.room if self.policy.share == "model" else max(self.keep().values())

    def compress(self, step: Step, last: bool) -> None:
        """``share="model"``: after a compressing step, the best entries of all the layers together
        stay (:func:`shares.compress`); a layer keeps at most its reading buffer unless the prompt
        is all read (``last``)."""
        if self.policy.share != "model":
            return
        slots, sites = self.slots, step.sites
        local = {i for i in slots if sites[i].window or sites[i].chunked}  # they keep their own window or block
        pools = {i: (slots[i], sites[i].kv_heads, self.layer_budget(i)) for i in slots if i not in local}
        if pools:
            self.kept = shares.compress(self.policy, pools, None if last else self.room)

    def _fix_addresses(self) -> None:
        """On CUDA, mark the tables' addresses static: a CUDA graph replays over the same tables."""
        if self.tables and self.tables[0].is_cuda:
            for t in self.tables:
                torch._dynamo.mark_static_address(t)

    def layer_budget(self, layer: int) -> int:
        """Slots ``layer`` keeps after the prompt: the budget, scaled by the policy's allocation."""
        p = self.policy
        if not p.evicts:
            return self.budget
        return p.layer_slots(self.budget, layer, self.prompt_len if isinstance(p.budget, float) else None)

    def keep(self) -> dict[int, int] | None:
        """Per layer, the slots a prompt's compressing prefill keeps (the rest of the capacity is
        reserve); None with ``share="model"``: everything, then :meth:`compress`."""
        if self.policy.share == "model":
            return None
        return {i: min(self.layer_budget(i), self.layout.layer_capacity(i)) for i in self.layout.layers}

    def make_room(self, tokens: int, step: Step) -> None:
        """A policy that evicts nothing (``full``) widens its tables before ``tokens`` more come
        (sliding-window layers excepted: they never hold more than their window)."""
        if self.policy.evicts or self.seen + tokens <= self.capacity:
            return
        self.budget = self.capacity = max(2 * self.capacity, self.seen + tokens)
        self._relayout(step, self._capacities(step))

    @property
    def slots(self) -> dict[int, Slots]:
        """Each layer's tables (views)."""
        if self.layout is None:
            return {}
        groups = self.layout.split(self.tables)
        return {layer: groups[g].layer(i) for layer, (g, i) in sorted(self.layout.where.items())}

    def fork(self) -> EvictingCache:
        """An independent copy: the same tables and counts, which the copy and this cache then change
        apart (several questions asked of one compressed context, each from its own copy)."""
        new = copy.copy(self)
        new.tables = [t.clone() for t in self.tables]
        new.lengths = None if self.lengths is None else self.lengths.clone()
        new._fix_addresses()
        return new

    def select_rows(self, index: Tensor) -> None:
        """Keep the batch rows ``index`` (in that order; a row may repeat): how beam search moves
        each beam's cache to the beams that continue it."""
        if self.layout is not None:
            self.tables = [t.index_select(1, index) for t in self.tables]
            self._fix_addresses()
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, index)

    def evicted(self, layer: int) -> int:
        """Entries (token x KV head x batch row) that entered ``layer`` and are no longer held."""
        s = self.slots[layer]
        return int(self.lengths.sum()) * self.layout.kv_heads[self.layout.where[layer][0]] - int(s.valid.sum())


def check_reading(reading) -> None:
    """``reading`` is a number of tokens (0: evict after every chunk), or None (the whole prompt)."""
    if reading is not None and (isinstance(reading, bool) or not isinstance(reading, int) or reading < 0):
        raise ValueError(
            f"reading must be a number of tokens >= 0 (0: evict after every chunk) or None (the whole prompt), "
            f"got {reading!r}"
        )
