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

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kvpass.kernels.attend import attend_attention, attend_reference
from kvpass.kernels.decode import decode_attention
from kvpass.policies.base import Chunk, Policy, Probe
from kvpass.runtime.attention import KVAttention
from kvpass.runtime.plan import DECODE, PREFILL, mode_of
from kvpass.runtime.recurrent import KVMixer, States, StateSpec


class Slots(NamedTuple):
    """Slot tables: keys and values (the model's dtype) ``[..., G, S, D]``, true positions (int64,
    -1 = empty), scores (fp32), valid flags (bool) and the KV head that owns each slot (uint8)
    ``[..., G, S]``. ``G`` is the layer's KV heads, each with its own ``S`` slots (equal shares),
    or 1: one pool of ``S`` slots that the KV heads share (:class:`Layout`). A group's tables lead
    with ``[L, B]``, one layer's (a view) with ``[B]``."""

    keys: Tensor
    values: Tensor
    pos: Tensor
    score: Tensor
    valid: Tensor
    owner: Tensor

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
            owner=torch.arange(lead[-1], dtype=torch.uint8, device=device)[:, None].expand(shape).clone(),
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
        return self.pos.nbytes + self.score.nbytes + self.valid.nbytes + self.owner.nbytes


def per_head(slots: Slots, kv_heads: int) -> Slots:
    """One layer's slots as each of its KV heads sees them, ``[B, Hkv, S, ...]``: a pool's keys and
    values are every head's (views, no copy); to the other heads, a slot is empty (invalid, at
    position -1)."""
    B, G = slots.pos.shape[:2]
    if G == kv_heads:
        return slots
    mine = slots.owner.long() == torch.arange(kv_heads, device=slots.pos.device)[None, :, None]
    wide = Slots(*(t.expand(B, kv_heads, *t.shape[2:]) for t in slots))
    return wide._replace(valid=slots.valid & mine, pos=torch.where(mine, slots.pos, -1))


def candidates(held: Tensor, new: Tensor) -> Tensor:
    """A step's candidates as a layer's tables hold them, ``[B, G, S + Hkv / G * T, ...]``: the ``held``
    slots ``[B, G, S, ...]``, then the new tokens' entries ``new [B, Hkv, T, ...]``, head by head."""
    return torch.cat([held, new.reshape(*held.shape[:2], -1, *new.shape[3:])], dim=2)


def pooled(x: Tensor, owner: Tensor) -> Tensor:
    """Per-head candidates ``x [B, Hkv, S + T]`` (the slots, then the new tokens) as the tables of
    ``owner [B, G, S]`` hold them (:func:`candidates`): a slot's entry is its owner's."""
    G, S = owner.shape[1:]
    held = x[:, :, :S] if G == x.shape[1] else x[:, :, :S].gather(1, owner.long())
    return candidates(held, x[:, :, S:])


@dataclass(frozen=True)
class Layout:
    """How a step's tables are laid out: ``groups`` of layers, each with one ``capacity`` (slots per
    layer and KV head, on average), number of KV heads, head dim of keys and of values, and whether
    its KV heads share one pool of slots (``pooled``: the policy's ``share="layer"``). Six tables
    per group (:class:`Slots`), ``[len(group), batch, G, S(, head_dim or value_dim)]``, in group
    order: ``G, S = kv_heads, capacity``, or pooled ``1, kv_heads * capacity`` -- the same bytes.
    Then a hybrid's recurrent state (:mod:`kvpass.runtime.recurrent`): ``states`` groups the mixers
    that carry the same tensors (their indices, and one :class:`StateSpec` per tensor), one table
    per tensor, ``[len(mixers), batch, *shape]``."""

    groups: tuple[tuple[int, ...], ...]
    capacity: tuple[int, ...]
    kv_heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    value_dim: tuple[int, ...]
    pooled: tuple[bool, ...]
    states: tuple[tuple[tuple[int, ...], tuple[StateSpec, ...]], ...] = ()
    where: dict[int, tuple[int, int]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if max(self.kv_heads, default=0) > 256:
            raise ValueError(f"a slot's KV head is stored in a byte: at most 256 KV heads, got {self.kv_heads}")
        where = {layer: (g, i) for g, layers in enumerate(self.groups) for i, layer in enumerate(layers)}
        object.__setattr__(self, "where", where)

    def __hash__(self) -> int:
        return hash(
            (self.groups, self.capacity, self.kv_heads, self.head_dim, self.value_dim, self.pooled, self.states)
        )

    @classmethod
    def build(
        cls,
        capacity: dict[int, int],
        shape: dict[int, tuple[int, int, int]],
        pooled: bool,
        keys: dict[int, tuple],
        states: dict[int, tuple[StateSpec, ...]] | None = None,
    ) -> Layout:
        """Layers grouped by their capacity, ``shape`` (KV heads, head dim of keys, of values) and
        ``keys`` (what else their admission shares); ``pooled``: their KV heads share their slots.
        ``states``: each recurrent mixer's tensors (grouped where they are the same)."""
        groups: dict[tuple, list[int]] = {}
        for layer in sorted(capacity):
            groups.setdefault((capacity[layer], *shape[layer], *keys[layer]), []).append(layer)
        sizes = (tuple(k[i] for k in groups) for i in range(4))
        mixers: dict[tuple, list[int]] = {}
        for i, specs in sorted((states or {}).items()):
            mixers.setdefault(specs, []).append(i)
        held = tuple((tuple(m), specs) for specs, m in mixers.items())
        return cls(tuple(tuple(g) for g in groups.values()), *sizes, (pooled,) * len(groups), held)

    def storage(self, g: int) -> tuple[int, int]:
        """Group ``g``'s tables' ``(G, S)``: storage heads and slots per storage head."""
        h, c = self.kv_heads[g], self.capacity[g]
        return (1, h * c) if self.pooled[g] else (h, c)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.where))

    def layer_capacity(self, layer: int) -> int:
        return self.capacity[self.where[layer][0]]

    def names(self, prefix: str = "") -> list[str]:
        slots = [f"{prefix}{name}.{g}" for g in range(len(self.groups)) for name in Slots._fields]
        return slots + [f"{prefix}{s.kind}{s.index}.{g}" for g, (_, specs) in enumerate(self.states) for s in specs]

    def empty(self, batch: int, dtype=torch.float32, device=None) -> list[Tensor]:
        tables = []
        for g, (layers, d, dv) in enumerate(zip(self.groups, self.head_dim, self.value_dim, strict=True)):
            heads, slots = self.storage(g)
            tables += Slots.empty((len(layers), batch, heads), slots, d, dtype, device, dv)
        for mixers, specs in self.states:
            tables += [torch.zeros(len(mixers), batch, *s.shape, dtype=s.dtype or dtype, device=device) for s in specs]
        return tables

    @property
    def slot_tables(self) -> int:
        """How many of the tables are KV slots (the rest, recurrent state)."""
        return len(Slots._fields) * len(self.groups)

    def split(self, tables) -> list[Slots]:
        """The flat list of tables as one :class:`Slots` per group."""
        n, count = len(Slots._fields), self.slot_tables + sum(len(specs) for _, specs in self.states)
        if len(tables) != count:  # (counted, not named: every step splits its tables)
            raise ValueError(f"this layout has {count} tables, got {len(tables)}")
        return [Slots(*tables[g * n : (g + 1) * n]) for g in range(len(self.groups))]

    def state_views(self, tables) -> dict[int, dict[tuple[str, int], Tensor]]:
        """Each recurrent mixer's tensors ``(kind, index) -> [B, ...]`` (views of the tables)."""
        views: dict[int, dict[tuple[str, int], Tensor]] = {}
        rest = iter(tables[self.slot_tables :])
        for mixers, specs in self.states:
            for s, table in zip(specs, rest, strict=False):  # (rest: the tables left)
                for j, m in enumerate(mixers):
                    views.setdefault(m, {})[(s.kind, s.index)] = table[j]
        return views


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
    alibi: Tensor | None = None,
    chunked: int = 0,
) -> Tensor:
    """Attend the chunk (``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``, ``pos [B, T]``, -1 = padding)
    over the layer's ``slots`` and itself (with ``sinks [H]``, each head's sink logit, and
    ``alibi [H]``, each head's ALiBi slope, if given; ``chunked``: the block a query sees, if any);
    the best ``keep`` per KV head (default: all the capacity) of the candidates -- the slots and the
    chunk's entries -- become its slots (written in place): per KV head, or over the layer's pool
    (each head's entries ranked by its own scores). The last ``probe`` tokens are the policy's probe
    (:meth:`Policy.probe`): they attend like the others and reach the policy's score, but are not
    candidates. Returns the attention output."""
    B, Hkv, _, D = k.shape
    G, S = slots.pos.shape[1:]
    view = per_head(slots, Hkv)
    gate = chunk_keep = None
    if policy.gated:  # keep probabilities first: a token flagged out is hidden from the chunk's later queries
        args = (k, v, view.keys, view.values, view.valid, view.pos, pos, scale, window, 0.0, 1)
        gate = policy.keep_prob(layer, q, k, v, lambda a: attend_reference(a, *args, chunked=chunked)[0])
        chunk_keep = ~policy.drops(gate) | (pos < policy.sink_tokens)[:, None, :]
    out, mass = attend_attention(
        q, k, v, view.keys, view.values, view.valid, view.pos, pos, scale, window, softcap, policy.obs,
        policy.mass_entropy_k, policy.mass_by_value, chunk_keep, policy.window, sinks, alibi, chunked,
    )  # fmt: skip
    seen = None
    if probe:
        T = k.shape[2] - probe
        seen = Probe(q[:, :, T:], k[:, :, T:], pos[:, T:], scale)
        k, v, pos, mass = k[:, :, :T], v[:, :, :T], pos[:, :T], mass[..., : S + T]
    chunk = Chunk(view.score, k, v, pos, mass, view.pos, gate, view.keys, seen, view.valid)
    score = policy.score(chunk)
    ranked = rank_candidates(policy, score, view.pos, view.valid, pos, window, chunked)
    share = S // Hkv if keep is None else min(keep, S // Hkv)
    rank, cand_pos, cand_valid, score, owner = in_tables(policy, slots.owner, share, *ranked, score)
    best = rank.topk(S, dim=-1).indices  # [B, G, S], best first
    kept = cand_valid.gather(-1, best)
    if keep is not None and keep * Hkv // G < S:  # keep is per KV head; a pool keeps it for each
        kept = kept & (torch.arange(S, device=k.device) < keep * Hkv // G)
    new = (
        candidates(slots.keys, k).gather(2, best[..., None].expand(B, G, S, D)),
        candidates(slots.values, v).gather(2, best[..., None].expand(B, G, S, v.shape[-1])),
        cand_pos.gather(-1, best),
        score.gather(-1, best),
        kept,
        owner.gather(-1, best),
    )
    for table, value in zip(slots, new, strict=True):
        table.copy_(value)
    return out


def decode(
    policy: Policy, q, k, v, pos, slots: Slots, scale: float, window=0, softcap=0.0, sinks=None, alibi=None
) -> tuple[Tensor, Tensor]:
    """A decoded token (``q [B, H, 1, D]``, ``k, v [B, Hkv, 1, D]``, ``pos [B, 1]``) attends over the
    layer's slots and its own key (``sinks``, ``alibi``: as :func:`prefill`'s); returns
    ``(out, mass [B, Hkv, S + 1])`` (per KV head: a pool's slots are every head's, and a head's mass
    is zero on the slots it does not own). The slots are only read: :func:`admit` writes the token
    later. Chunked attention needs no mask here: admission leaves only the next query's block."""
    s = per_head(slots, k.shape[1])
    return decode_attention(
        q, s.keys, s.values, s.valid, s.pos, pos, scale, window, softcap, policy.mass_entropy_k, policy.mass_by_value,
        k, v, sinks, alibi,
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
    chunked: int = 0,
) -> None:
    """Admit the decoded tokens of ``layers`` into their tables, ``group`` (``[L, B, G, S, ...]``,
    written in place); ``q, k, v, pos, mass`` are those layers' rows one after the other (``L * B``).

    Each token takes the place of the lowest-ranked slot of its table (the first, on ties), unless
    it ranks lowest itself or may not stay; slots that may not stay (dropped by the policy, or out
    of the next query's window or block) leave. A pool shared by ``Hkv`` heads admits their tokens one head
    after another, each by the same rule: the pool keeps the best of its slots and the ``Hkv``
    tokens. One batch for all the layers: a few operations per step, not per layer, and a compiled
    step writes one slot per layer and KV head."""
    L, B, G, S = group.pos.shape
    Hkv = k.shape[1]
    flat = Slots(*(t.flatten(0, 1) for t in group))  # [L * B, G, S, ...]: views, only read
    view = per_head(flat, Hkv)
    gate = None
    if policy.gated:  # the gate queries attend over what the token saw: the slots and itself
        args = (view.keys, view.values, view.valid, view.pos, pos, scale, window, 0.0, 0, False, k, v)
        gate = policy.keep_prob(layers, q, k, v, lambda a: decode_attention(a, *args)[0])
    score = policy.score(Chunk(old=view.score, keys=k, values=v, pos=pos, mass=mass, slot_pos=view.pos, gate=gate))
    ranked = rank_candidates(policy, score, view.pos, view.valid, pos, window, chunked)
    rank, cand_pos, cand_valid, score, owner = (
        t.view(L, B, G, -1) for t in in_tables(policy, flat.owner, S // Hkv, *ranked, score)
    )  # [L, B, G, S + Hkv / G]: the slots, then the tokens
    group.valid.copy_(cand_valid[..., :S])
    group.score.copy_(score[..., :S])
    new = (k.reshape(L, B, G, -1, k.shape[-1]), v.reshape(L, B, G, -1, v.shape[-1]), cand_pos, score, cand_valid, owner)
    held = rank[..., :S]
    lead = (
        torch.arange(L, device=k.device)[:, None, None],
        torch.arange(B, device=k.device)[None, :, None],
        torch.arange(G, device=k.device)[None, None, :],
    )
    for j in range(Hkv // G):  # each table's tokens, one at a time
        dest = torch.cat([held, rank[..., S + j, None]], dim=-1).argmin(dim=-1)  # [L, B, G]; S: the token itself
        put = dest < S
        at = (*lead, dest.clamp(max=S - 1))  # index the stacked tables themselves: a compiled step updates in place
        for table, value in zip(group, new, strict=True):
            value = value[..., j, :] if value.dim() == 5 else value[..., S + j]
            hit = put if value.dim() == 3 else put[..., None]
            old = table[at]
            table[at] = (hit & value) | (~hit & old) if value.dtype == torch.bool else torch.where(hit, value, old)
            # (onnxruntime has no Where on booleans)
        if j + 1 < Hkv // G:  # the next token competes with this one where it stayed
            d = at[3][..., None]
            held = held.scatter(-1, d, torch.where(put[..., None], rank[..., S + j, None], held.gather(-1, d)))


def in_tables(
    policy: Policy, owner: Tensor, share: int, cand_pos: Tensor, cand_valid: Tensor, rank: Tensor, score: Tensor
) -> tuple[Tensor, ...]:
    """A step's per-head candidates (:func:`rank_candidates`, and their scores) in the order of the
    tables of ``owner [B, G, S]`` (:func:`pooled`): ``(rank, pos, valid, score, owner)``, each
    ``[B, G, S + Hkv / G * T]``. In a pool the KV heads share, each head's best ``policy.floor`` of
    its ``share`` (slots per head) rank first (:func:`floored`)."""
    Hkv = rank.shape[1]
    if owner.shape[1] < Hkv:
        rank = floored(rank, math.ceil(policy.floor * share))
    heads = torch.arange(Hkv, dtype=owner.dtype, device=owner.device)[None, :, None].expand(rank.shape)
    return tuple(pooled(t, owner) for t in (rank, cand_pos, cand_valid, score, heads))


def floored(rank: Tensor, least: int) -> Tensor:
    """Per-head ranks ``[..., Hkv, N]`` (-inf: may not stay) with each head's best ``least``
    candidates ranked first (+inf, as protected ones): what a head keeps of a shared pool whatever
    the other heads' scores (:attr:`Policy.floor`)."""
    if least <= 0:
        return rank
    best = rank.topk(min(least, rank.shape[-1]), dim=-1).indices
    floor = torch.zeros_like(rank, dtype=torch.bool).scatter(-1, best, True) & (rank > -torch.inf)
    return torch.where(floor, torch.inf, rank)


def rank_candidates(
    policy: Policy, score: Tensor, slot_pos: Tensor, slot_valid: Tensor, pos: Tensor, window: int = 0, chunked: int = 0
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
    if chunked:  # chunked attention: the next query sees its own block only, so a decoded token never
        block = (newest[:, None, None] + 1).div(chunked, rounding_mode="floor")  # meets an older one
        cand_valid = cand_valid & (cand_pos.div(chunked, rounding_mode="floor") == block)
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
    states: dict[int, dict[tuple[str, int], Tensor]]


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
            out, mass = decode(
                call.policy, q, k, v, pos, slots, site.scale, site.window, site.softcap, sinks, site.alibi
            )  # fmt: skip
            call.pending[layer] = (q, k, v, pos, mass)
            return out
        keep = None if call.keep is None else call.keep[layer]
        return prefill(
            call.policy, layer, q, k, v, pos, slots, site.scale, site.window, site.softcap, keep, sinks, call.probe,
            site.alibi, site.chunked,
        )  # fmt: skip

    def mix(self, mixer: KVMixer, x: Tensor, pos: Tensor) -> Tensor:
        """What a recurrent mixer computes in a step: its output, its state carried from the last step
        to the next. The policy's probe (the last ``call.probe`` tokens) reads the state after the
        others and never writes it."""
        call = self.call
        if call is None:
            raise RuntimeError("a kvpass mixer ran outside a kvpass step (no state is bound)")
        state = call.states[mixer.index]
        T = x.shape[1] - call.probe
        out = [mixer.run(x[:, :T], pos[:, :T], States(state))] if T else []
        if call.probe:
            copy = {k: t.clone() for k, t in state.items()}
            out.append(mixer.run(x[:, T:], pos[:, T:], States(copy)))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


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
        self.mixers = {m.index: m for m in graph.modules() if isinstance(m, KVMixer)}

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
        probe_len = 0 if extra is None else extra[0].shape[1]
        call = Call(
            self.policy, layout.split(tables), layout, decoding, keep, probe_len, {}, layout.state_views(tables)
        )
        self.io.call = call
        try:
            hidden = self.body(input_ids, positions)
            if decoding:
                for group, layers in zip(call.groups, layout.groups, strict=True):
                    q, k, v, pos, mass = (torch.cat(t) for t in zip(*(call.pending[i] for i in layers), strict=True))
                    site = self.sites[layers[0]]
                    admit(self.policy, layers, group, q, k, v, pos, mass, site.scale, site.window, site.chunked)
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
        """The layout of tables with ``capacity`` slots per layer (capped by a layer's sliding window,
        or the block of chunked attention)."""
        sites = self.sites
        cap = {i: min(c, sites[i].window or c, sites[i].chunked or c) for i, c in capacity.items()}
        shape = {i: (s.kv_heads, s.head_dim, s.value_dim) for i, s in sites.items()}
        pooled = self.policy.evicts and self.policy.share != "head"
        keys = {i: (s.window, s.chunked, s.scale) for i, s in sites.items()}
        return Layout.build(cap, shape, pooled, keys, {i: m.specs for i, m in self.mixers.items()})


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
    if policy.evicts and policy.share == "model":
        raise ValueError(
            f"policy {policy.name!r} with share='model' (kvzip's default, and a gate's trained for it) sizes "
            "each layer's pool per prompt, and an engine's shapes are fixed: transform the model to export with "
            "share='layer' (the KV heads of a layer share its slots) or share='head', and, for the model-wide "
            f"budget's per-layer sizes, allocation= a `kvpass calibrate --policy {policy.name} --shares` file"
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
