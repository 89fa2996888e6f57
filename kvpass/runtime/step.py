"""The one step: a transformed model's forward over explicit cache tables.

``Step(input_ids, positions, *tables, layout=..., mode=...)`` runs the rewritten graph of
:func:`kvpass.transform`; each attention site attends over its layer's tables and the new tokens,
and the policy decides what stays. Attention, scoring, eviction and admission live here once:
the eager runtime, ``torch.compile`` (the whole decode step, one graph) and the exported engines
(:class:`PureStep`) all run this code, so they cannot disagree.

Tables are stacked by *group*: the layers that share a capacity, sliding window and scale hold one
tensor per field, ``[L, B, Hkv, C(, D)]`` (:class:`Layout`). A step writes its tables in place,
at fixed shapes, so a compiled decode step reads the cache once and writes one slot per layer and
KV head. The mode is the planner's (:mod:`kvpass.runtime.plan`), passed in, and what a step needs
travels in one :class:`Call` per step:

- a prefill chunk: each layer attends over its ``C`` slots and the chunk causally, the policy
  scores the ``C + T`` candidates, and the best ``keep`` (default ``C``) of them become the layer's
  slots;
- a decoded token: each layer attends over its slots and the token's own key (the cache is only
  read), and at the end of the step every group admits its layers' tokens at once: a token takes
  the place of the lowest-ranked slot, unless it ranks lowest itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kvpass.kernels.attend import attend_attention, attend_reference
from kvpass.kernels.decode import decode_attention
from kvpass.policies.base import Chunk, Policy, Probe
from kvpass.runtime.attention import KVAttention
from kvpass.runtime.plan import DECODE, PREFILL, mode_of


class Slots(NamedTuple):
    """Slot tables: keys and values (the model's dtype) ``[..., Hkv, C, D]``, true positions (int64,
    -1 = empty), scores (fp32) and valid flags (bool) ``[..., Hkv, C]``. A group's tables lead with
    ``[L, B]``, one layer's (a view) with ``[B]``."""

    keys: Tensor
    values: Tensor
    pos: Tensor
    score: Tensor
    valid: Tensor

    @classmethod
    def empty(
        cls, lead: tuple[int, ...], capacity: int, head_dim: int, dtype=torch.float32, device=None, value_dim=None
    ) -> Slots:
        shape = (*lead, capacity)
        return cls(
            keys=torch.zeros(*shape, head_dim, dtype=dtype, device=device),
            values=torch.zeros(*shape, value_dim or head_dim, dtype=dtype, device=device),
            pos=torch.full(shape, -1, dtype=torch.long, device=device),
            score=torch.zeros(shape, dtype=torch.float32, device=device),
            valid=torch.zeros(shape, dtype=torch.bool, device=device),
        )

    def layer(self, i: int) -> Slots:
        """Layer ``i`` of a group (views)."""
        return Slots(*(t[i] for t in self))

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    @property
    def kv_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def meta_bytes(self) -> int:
        return self.pos.nbytes + self.score.nbytes + self.valid.nbytes


@dataclass(frozen=True)
class Layout:
    """How a step's tables are laid out: ``groups`` of layers, each with one ``capacity`` (slots per
    layer and KV head), number of KV heads and head dim of keys and of values; five tables per group
    (:class:`Slots`), ``[len(group), batch, kv_heads, capacity(, head_dim or value_dim)]``, in
    group order."""

    groups: tuple[tuple[int, ...], ...]
    capacity: tuple[int, ...]
    kv_heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    value_dim: tuple[int, ...]
    where: dict[int, tuple[int, int]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = {layer: (g, i) for g, layers in enumerate(self.groups) for i, layer in enumerate(layers)}
        object.__setattr__(self, "where", where)

    def __hash__(self) -> int:
        return hash((self.groups, self.capacity, self.kv_heads, self.head_dim, self.value_dim))

    @classmethod
    def build(cls, capacity: dict[int, int], shape: dict[int, tuple[int, int, int]], keys: dict[int, tuple]) -> Layout:
        """Layers grouped by their capacity, ``shape`` (KV heads, head dim of keys, of values) and
        ``keys`` (what else their admission shares)."""
        groups: dict[tuple, list[int]] = {}
        for layer in sorted(capacity):
            groups.setdefault((capacity[layer], *shape[layer], *keys[layer]), []).append(layer)
        sizes = (tuple(k[i] for k in groups) for i in range(4))
        return cls(tuple(tuple(g) for g in groups.values()), *sizes)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.where))

    def layer_capacity(self, layer: int) -> int:
        return self.capacity[self.where[layer][0]]

    def names(self, prefix: str = "") -> list[str]:
        return [f"{prefix}{name}.{g}" for g in range(len(self.groups)) for name in Slots._fields]

    def empty(self, batch: int, dtype=torch.float32, device=None) -> list[Tensor]:
        return [
            t
            for layers, c, h, d, dv in zip(
                self.groups, self.capacity, self.kv_heads, self.head_dim, self.value_dim, strict=True
            )
            for t in Slots.empty((len(layers), batch, h), c, d, dtype, device, dv)
        ]

    def split(self, tables) -> list[Slots]:
        """The flat list of tables as one :class:`Slots` per group."""
        n = len(Slots._fields)
        if len(tables) != n * len(self.groups):
            raise ValueError(f"this layout has {n * len(self.groups)} tables, got {len(tables)}")
        return [Slots(*tables[g * n : (g + 1) * n]) for g in range(len(self.groups))]


# --- one layer ----------------------------------------------------------------------------------
def prefill(
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
    keep: int | None = None,
    sinks: Tensor | None = None,
    probe: int = 0,
) -> Tensor:
    """Attend the chunk (``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``, ``pos [B, T]``, -1 = padding)
    over the layer's ``slots`` and itself (with ``sinks [H]``, each head's sink logit, if given);
    the best ``keep`` (default: all ``C``) of the ``C + T`` candidates become its slots (written in
    place). The last ``probe`` tokens are the policy's probe (:meth:`Policy.probe`): they attend
    like the others and reach the policy's score, but are not candidates. Returns the attention output."""
    B, Hkv, _, D = k.shape
    C = slots.capacity
    gate = chunk_keep = None
    if policy.gated:  # keep probabilities first: a token flagged out is hidden from the chunk's later queries
        args = (k, v, slots.keys, slots.values, slots.valid, slots.pos, pos, scale, window, 0.0, 1)
        gate = policy.keep_prob(layer, q, k, v, lambda a: attend_reference(a, *args)[0])
        chunk_keep = ~policy.drops(gate) | (pos < policy.sink_tokens)[:, None, :]
    out, mass = attend_attention(
        q, k, v, slots.keys, slots.values, slots.valid, slots.pos, pos, scale, window, softcap, policy.obs,
        policy.mass_entropy_k, policy.mass_by_value, chunk_keep, policy.window, sinks,
    )  # fmt: skip
    seen = None
    if probe:
        T = k.shape[2] - probe
        seen = Probe(q[:, :, T:], k[:, :, T:], pos[:, T:], scale)
        k, v, pos, mass = k[:, :, :T], v[:, :, :T], pos[:, :T], mass[..., : C + T]
    chunk = Chunk(slots.score, k, v, pos, mass, slots.pos, gate, slots.keys, seen, slots.valid)
    score = policy.score(chunk)
    cand_pos, cand_valid, rank = rank_candidates(policy, score, slots.pos, slots.valid, pos, window)
    best = rank.topk(C, dim=-1).indices  # [B, Hkv, C], best first
    kept = cand_valid.gather(-1, best)
    if keep is not None and keep < C:
        kept = kept & (torch.arange(C, device=k.device) < keep)
    rows = best[..., None].expand(B, Hkv, C, D)
    new = (
        torch.cat([slots.keys, k], dim=2).gather(2, rows),
        torch.cat([slots.values, v], dim=2).gather(2, best[..., None].expand(B, Hkv, C, v.shape[-1])),
        cand_pos.gather(-1, best),
        score.gather(-1, best),
        kept,
    )
    for table, value in zip(slots, new, strict=True):
        table.copy_(value)
    return out


def decode(
    policy: Policy, q, k, v, pos, slots: Slots, scale: float, window=0, softcap=0.0, sinks: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A decoded token (``q [B, H, 1, D]``, ``k, v [B, Hkv, 1, D]``, ``pos [B, 1]``) attends over the
    layer's slots and its own key; returns ``(out, mass [B, Hkv, C + 1])``. The slots are only read:
    :func:`admit` writes the token later."""
    return decode_attention(
        q, slots.keys, slots.values, slots.valid, slots.pos, pos, scale, window, softcap, policy.mass_entropy_k,
        policy.mass_by_value, k, v, sinks,
    )  # fmt: skip


def admit(
    policy: Policy,
    layers: int | tuple[int, ...],
    group: Slots,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    mass: Tensor,
    scale: float,
    window: int = 0,
) -> None:
    """Admit the decoded tokens of ``layers`` into their tables, ``group`` (``[L, B, Hkv, C, ...]``,
    written in place); ``q, k, v, pos, mass`` are those layers' rows one after the other (``L * B``).

    Each token takes the place of its head's lowest-ranked slot (the first, on ties), unless it
    ranks lowest itself or may not stay; slots that may not stay (dropped by the policy, or out of
    the next query's window) leave. One batch for all the layers: a few operations per step, not
    per layer, and a compiled step writes one slot per layer and KV head."""
    L, B, Hkv, C = group.pos.shape
    flat = Slots(*(t.flatten(0, 1) for t in group))  # [L * B, Hkv, C, ...]: views, only read
    gate = None
    if policy.gated:  # the gate queries attend over what the token saw: the slots and itself
        args = (flat.keys, flat.values, flat.valid, flat.pos, pos, scale, window, 0.0, 0, False, k, v)
        gate = policy.keep_prob(layers, q, k, v, lambda a: decode_attention(a, *args)[0])
    score = policy.score(Chunk(old=flat.score, keys=k, values=v, pos=pos, mass=mass, slot_pos=flat.pos, gate=gate))
    cand_pos, cand_valid, rank = rank_candidates(policy, score, flat.pos, flat.valid, pos, window)
    dest = rank.argmin(dim=-1)  # [L * B, Hkv]; C: the token itself
    put = (dest < C).view(L, B, Hkv)
    at = (
        torch.arange(L, device=k.device)[:, None, None],
        torch.arange(B, device=k.device)[None, :, None],
        torch.arange(Hkv, device=k.device)[None, None, :],
        dest.clamp(max=C - 1).view(L, B, Hkv),
    )  # index the stacked tables themselves: a compiled step updates them in place
    group.valid.copy_(cand_valid[..., :C].view(L, B, Hkv, C))
    group.score.copy_(score[..., :C].view(L, B, Hkv, C))
    new = (
        k.view(L, B, Hkv, -1),
        v.view(L, B, Hkv, -1),
        cand_pos[..., C].view(L, B, Hkv),
        score[..., C].view(L, B, Hkv),
        cand_valid[..., C].view(L, B, Hkv),
    )
    for table, value in zip(group, new, strict=True):
        hit = put if value.dim() == 3 else put[..., None]
        old = table[at]
        table[at] = (hit & value) | (~hit & old) if value.dtype == torch.bool else torch.where(hit, value, old)
        # (onnxruntime has no Where on booleans)


def rank_candidates(
    policy: Policy, score: Tensor, slot_pos: Tensor, slot_valid: Tensor, pos: Tensor, window: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """A step's candidates -- the slots, then the new tokens (``pos [B, T]``) -- as ``[B, Hkv, C + T]``:
    their positions, which of them may stay (valid, visible to the next query, not dropped by the
    policy) and what they are ranked by (``score`` as the policy ranks it; protected +inf; those
    that may not stay -inf)."""
    B, Hkv, _ = slot_pos.shape
    T = pos.shape[1]
    cand_pos = torch.cat([slot_pos, pos[:, None, :].expand(B, Hkv, T)], dim=-1)
    cand_valid = torch.cat([slot_valid, (pos >= 0)[:, None, :].expand(B, Hkv, T)], dim=-1)
    newest = cand_pos.amax(dim=(1, 2))  # [B]
    if window:  # the next query (newest + 1) sees positions > newest + 1 - window; the rest is dead
        cand_valid = cand_valid & (cand_pos > newest[:, None, None] + 1 - window)
    drop = policy.drops(score)
    if drop is not None:  # in-context eviction: dropped at once, unless protected
        cand_valid = cand_valid & ~(drop & ~policy.protected(cand_pos, newest))
    rank = torch.where(policy.protected(cand_pos, newest), torch.inf, policy.rank(score, cand_pos, newest))
    return cand_pos, cand_valid, torch.where(cand_valid, rank, -torch.inf)


# --- the model ----------------------------------------------------------------------------------
class Call(NamedTuple):
    """One step's context, fixed for the step: the policy, the tables (one :class:`Slots` per group
    of ``layout``), the mode (:mod:`kvpass.runtime.plan`), per layer the slots a prefill keeps
    (None: all), how many of a prefill's last tokens are the policy's probe, and where the sites
    leave their decoded tokens for the step to admit."""

    policy: Policy
    groups: list[Slots]
    layout: Layout
    decoding: bool
    keep: dict[int, int] | None
    probe: int
    pending: dict[int, tuple[Tensor, ...]]


class Exchange:
    """Where a step hands each attention site its :class:`Call` (a plain object holding one field:
    dynamo traces its use; export snapshots module attributes that are containers of tensors)."""

    def __init__(self) -> None:
        self.call: Call | None = None

    def attend(self, site, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sinks: Tensor | None = None) -> Tensor:
        """What the site of ``site.layer`` computes: its output; its tables updated (prefill) or its
        token kept for admission (decode)."""
        call = self.call
        if call is None:
            raise RuntimeError("a kvpass attention ran outside a kvpass step (no cache tables are bound)")
        layer = site.layer
        g, i = call.layout.where[layer]
        slots = call.groups[g].layer(i)
        if call.decoding:
            out, mass = decode(call.policy, q, k, v, pos, slots, site.scale, site.window, site.softcap, sinks)
            call.pending[layer] = (q, k, v, pos, mass)
            return out
        keep = None if call.keep is None else call.keep[layer]
        return prefill(
            call.policy, layer, q, k, v, pos, slots, site.scale, site.window, site.softcap, keep, sinks, call.probe
        )


class Step(nn.Module):
    """``forward(input_ids [B, T], positions [B, T], *tables, layout, mode, keep=None, rows=1) -> logits``.

    ``positions``: true positions, -1 for padding. ``tables``: ``layout.names()`` in order, updated
    in place. ``mode``: the span's (:mod:`kvpass.runtime.plan`), a decoded token or a prefill chunk.
    ``keep``: per layer, how many slots a prefill keeps (default all). ``rows``: logits for the last
    ``rows`` columns (0: all). ``probe`` (a prefill, for a policy that probes): ``"chunk"`` appends
    the policy's probe of the chunk; ``"none"`` reads the chunk without it (into a buffer probed
    later); ``"only"``: the input is context already read, and only its probe runs, placed after
    position ``after [B]``, over the tables (it scores them; nothing is admitted; no logits).
    ``decode`` and ``prefill`` are the two modes as separate entry points for ``torch.compile``.
    """

    def __init__(self, graph: nn.Module, head: nn.Module | None, policy: Policy, io: Exchange) -> None:
        super().__init__()
        self.body, self.head, self.policy, self.io = graph, head, policy, io
        self.sites = {m.layer: m for m in graph.modules() if isinstance(m, KVAttention)}
        if not self.sites:
            raise ValueError("this graph has no rewritten attention")

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        *tables: Tensor,
        layout: Layout,
        mode: str,
        keep: dict[int, int] | None = None,
        rows: int = 1,
        probe: str = "chunk",
        after: Tensor | None = None,
    ) -> Tensor:
        if mode not in (PREFILL, DECODE):
            raise ValueError(f"a step's mode is {PREFILL!r} or {DECODE!r}, got {mode!r}")
        if probe not in ("chunk", "none", "only"):
            raise ValueError(f"a step's probe is 'chunk', 'none' or 'only', got {probe!r}")
        decoding = mode == DECODE
        if decoding and input_ids.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per row, got {input_ids.shape[1]}")
        T = input_ids.shape[1]
        extra = None if decoding or probe == "none" else self.policy.probe(input_ids, positions, after)
        if probe == "only":
            if extra is None:
                raise ValueError(f"policy {self.policy.name!r} has no probe to run over a buffer")
            input_ids, positions, T = extra[0], extra[1], 0
        elif extra is not None:
            input_ids, positions = torch.cat([input_ids, extra[0]], dim=1), torch.cat([positions, extra[1]], dim=1)
        call = Call(
            self.policy, layout.split(tables), layout, decoding, keep, 0 if extra is None else extra[0].shape[1], {}
        )
        self.io.call = call
        try:
            hidden = self.body(input_ids, positions)
            if decoding:
                for group, layers in zip(call.groups, layout.groups, strict=True):
                    q, k, v, pos, mass = (torch.cat(t) for t in zip(*(call.pending[i] for i in layers), strict=True))
                    site = self.sites[layers[0]]
                    admit(self.policy, layers, group, q, k, v, pos, mass, site.scale, site.window)
        finally:
            self.io.call = None
        hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
        hidden = hidden[:, :T] if extra is not None else hidden
        hidden = hidden[:, -rows:] if rows else hidden
        return hidden if self.head is None else self.head(hidden)

    def decode(self, input_ids: Tensor, positions: Tensor, *tables: Tensor, layout: Layout) -> Tensor:
        return self(input_ids, positions, *tables, layout=layout, mode=DECODE)

    def prefill(
        self, input_ids, positions, *tables, layout: Layout, keep=None, rows: int = 1, probe="chunk", after=None
    ) -> Tensor:
        return self(
            input_ids, positions, *tables, layout=layout, mode=PREFILL, keep=keep, rows=rows, probe=probe, after=after
        )

    def layout(self, capacity: dict[int, int]) -> Layout:
        """The layout of tables with ``capacity`` slots per layer (capped by a layer's sliding window)."""
        sites = self.sites
        cap = {i: min(c, sites[i].window) if sites[i].window else c for i, c in capacity.items()}
        shape = {i: (s.kv_heads, s.head_dim, s.value_dim) for i, s in sites.items()}
        return Layout.build(cap, shape, {i: (s.window, s.scale) for i, s in sites.items()})


class PureStep(nn.Module):
    """What exported engines contain: ``forward(input_ids, positions, *tables) -> (logits [B, 1, V]
    (fp32) of the last column, *new tables)``, the :class:`Step` of a transformed model at a fixed
    ``capacity`` (slots per layer and KV head), evicting at every step. It copies the tables it is
    given before the step writes them, so the exported graph is a function. Weights are shared."""

    def __init__(self, model: nn.Module, capacity: int | None = None) -> None:
        super().__init__()
        capacity = export_capacity(model, capacity)
        self.policy = model.kvpass_policy
        self.chunk: int = model.kvpass_options["chunk"]
        self.step = model.kvpass_step
        self.layout = self.step.layout({i: self.policy.layer_slots(capacity, i) for i in self.step.sites})

    def forward(self, input_ids: Tensor, positions: Tensor, *tables: Tensor) -> tuple[Tensor, ...]:
        tables = [t.clone() for t in tables]
        mode = mode_of(input_ids.shape[1])  # the planner's rule: an engine's graphs branch on the length
        logits = self.step(input_ids, positions, *tables, layout=self.layout, mode=mode)
        return (logits.float(), *tables)


def export_capacity(model: nn.Module, capacity: int | None) -> int:
    """The slots per layer and KV head of an exported ``model``: ``capacity``, or the policy's
    budget where that is a number of slots. An engine's shapes are fixed, so it evicts at every step."""
    policy = getattr(model, "kvpass_policy", None)
    if policy is None:
        raise ValueError("export a model returned by kvpass.transform (this one has no kvpass attention)")
    if not model.kvpass_options["evict_during_decode"]:
        raise ValueError(
            "an exported engine evicts at every step (its shapes are fixed); transform the model with "
            "evict_during_decode=True"
        )
    if capacity is None:
        if not policy.evicts or isinstance(policy.budget, float):
            raise ValueError(
                f"policy {policy.name!r} with budget {policy.budget!r} has no fixed number of slots; pass capacity= "
                "(slots per layer and KV head: an exported engine's cache has fixed shapes)"
            )
        capacity = policy.budget
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
        raise ValueError(f"capacity must be a positive number of slots, got {capacity!r}")
    if policy.evicts:
        policy.check_fits(capacity)
    return capacity
