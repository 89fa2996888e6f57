"""A request's tables as the serving engine's per-request state, and a batch's tables over those
state rows (no vLLM import: testable alone).

vLLM holds each request's tables in one row of a flat tensor per dtype (``states``); a
:class:`Plan` says where each table lies in a row. The step takes tables
``[L, B, ...]``. One request whose state is in the step's dtypes -- every prompt, natively -- gets
views of its row, which the step writes in place. Otherwise (a batch of decoding requests, or
another dtype) the tables are copied in once and written back where they changed: the small tables
whole, and of the keys and values only the slots whose token changed (its position or owning KV
head). A token's key and value never change while it holds a slot, so a decode step -- one token
admitted per layer and KV head -- writes back a few rows, not the bulk of the state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from kvpass.runtime.step import Slots

_N = len(Slots._fields)
_POS, _OWNER = Slots._fields.index("pos"), Slots._fields.index("owner")
_BULK = (Slots._fields.index("keys"), Slots._fields.index("values"))


class Plan(NamedTuple):
    """Where each of a layout's tables lies in a request's state: ``states`` are the flat
    ``(shape, dtype)`` per dtype, widest first, so that each starts aligned, and the last padded
    to a whole number of 8 bytes (vLLM views a block's bytes as each dtype); ``spans`` per table,
    in the layout's order: (state, offset, length, shape without the batch axis)."""

    states: tuple[tuple[tuple[int], torch.dtype], ...]
    spans: tuple[tuple[int, int, int, tuple[int, ...]], ...]

    @classmethod
    def of(cls, layout, dtype: torch.dtype) -> Plan:
        empty = layout.empty(1, dtype)  # [layers, 1, kv heads, capacity(, dim)] each; keys and values in dtype
        dtypes = sorted({t.dtype for t in empty}, key=lambda d: (-d.itemsize, str(d)))  # (the same in every process)
        used = dict.fromkeys(dtypes, 0)
        spans = []
        for t in empty:
            spans.append((dtypes.index(t.dtype), used[t.dtype], t.numel(), (t.shape[0], *t.shape[2:])))
            used[t.dtype] += t.numel()
        pad = -sum(n * d.itemsize for d, n in used.items()) % 8
        used[dtypes[-1]] += pad // dtypes[-1].itemsize
        return cls(tuple(((n,), d) for d, n in used.items()), tuple(spans))


class Rows(NamedTuple):
    """``spans``: per table, ``(state, offset, length, shape without the batch axis)``; ``empty``:
    per table, a request's empty table ``[L, 1, ...]`` in the step's dtype; ``slot_tables``: how many
    of the tables are KV slots (:attr:`Layout.slot_tables`; the rest, recurrent state, copied whole);
    ``work``: the copies' memory, per table, kept from one step to the next (a step's copies are
    there at its peak anyway; allocating them anew each step costs more than copying: fresh pages)."""

    spans: tuple[tuple[int, int, int, tuple[int, ...]], ...]
    empty: list[Tensor]
    slot_tables: int
    work: dict[int, Tensor]

    def _copy(self, t: int, rows: Tensor, index: list[int]) -> Tensor:
        """Rows ``index`` of table ``t`` (``rows [rows, L, ...]``) copied into ``[L, B, ...]``."""
        empty = self.empty[t]
        size = empty.numel() * len(index)
        work = self.work.get(t)
        if work is None or work.numel() < size or work.device != rows.device:
            work = self.work[t] = torch.empty(size, dtype=empty.dtype, device=rows.device)
        out = work[:size].view(empty.shape[0], len(index), *empty.shape[2:])
        for b, i in enumerate(index):
            out[:, b].copy_(rows[i])
        return out

    def view(self, states, t: int) -> Tensor:
        """Table ``t`` of every state row, ``[rows, *shape]``: a view of ``states``."""
        s, o, n, shape = self.spans[t]
        return states[s][:, o : o + n].view(-1, *shape)

    @contextmanager
    def tables(self, states, index: list[int], new: list[bool]) -> Iterator[list[Tensor]]:
        """The requests' tables for one step (:meth:`gather`), written back when it returns
        (:meth:`scatter`; views need nothing)."""
        flat, before = self.gather(states, index, new)
        yield flat
        if before is not None:
            self.scatter(states, index, new, flat, before)

    def gather(self, states, index: list[int], new: list[bool]) -> tuple[list[Tensor], list | None]:
        """The requests' tables (rows ``index``) ``[L, B, ...]`` in the step's dtypes, a ``new``
        request's emptied (its row held an earlier request's); and what :meth:`scatter` needs, or
        None where they are views (one request, the same dtypes)."""
        rows = [self.view(states, t) for t in range(len(self.spans))]
        views = len(index) == 1 and all(r.dtype == e.dtype for r, e in zip(rows, self.empty, strict=True))
        if views:
            flat = [r[index[0]].unsqueeze(1) for r in rows]
        else:
            flat = [self._copy(t, r, index) for t, r in enumerate(rows)]
        if any(new):
            fresh = torch.tensor(new, device=rows[0].device)
            for table, empty in zip(flat, self.empty, strict=True):
                table[:, fresh] = empty
        if views:
            return flat, None
        return flat, [(flat[g + _POS].clone(), flat[g + _OWNER].clone()) for g in range(0, self.slot_tables, _N)]

    def scatter(self, states, index: list[int], new: list[bool], flat: list[Tensor], before: list) -> None:
        """Write copied tables back to rows ``index``: whole, but the keys and values of a request
        that is not ``new`` only where a slot's token changed (a new request's row is written whole,
        so no stale entry stays in it)."""
        at, fresh = (torch.tensor(x, device=flat[0].device) for x in (index, new))
        for t, table in enumerate(flat):
            rows = self.view(states, t).transpose(0, 1)  # [L, rows, ...]
            if t >= self.slot_tables or t % _N not in _BULK:
                rows[:, at] = table.to(rows.dtype)
                continue
            g = t - t % _N
            pos, owner = before[g // _N]
            changed = (flat[g + _POS] != pos) | (flat[g + _OWNER] != owner) | fresh[None, :, None, None]
            layer, b, head, slot = changed.nonzero(as_tuple=True)
            rows[layer, at[b], head, slot] = table[layer, b, head, slot].to(rows.dtype)
