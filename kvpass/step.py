"""A transformed model as one pure step: ``(input_ids, positions, *tables) -> (logits, *new tables)``.

This is what exported engines contain. The rewritten graph of :func:`kvpass.transform` is reused
as it is; only its attention modules are swapped for ones that run :func:`kvpass.functional.step`
on tables handed in by the step and hand their new tables back, so the whole cache is explicit
input and output -- budget-sized, with the same shapes at every step.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from kvpass import functional
from kvpass.attention import KVAttention
from kvpass.functional import Slots


@dataclass(frozen=True)
class Layout:
    """The cache tables of an exported step: for each rewritten layer, ``Slots`` of
    ``[batch, kv_heads, capacity(, head_dim)]``; ``capacity`` is smaller for sliding-window layers."""

    layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    capacity: tuple[int, ...]

    def names(self, prefix: str = "") -> list[str]:
        return [f"{prefix}{field}.{layer}" for layer in self.layers for field in Slots._fields]

    def empty(self, batch: int, dtype=torch.float32, device=None) -> list[Tensor]:
        return [
            t
            for c in self.capacity
            for t in Slots.empty(batch, self.kv_heads, c, self.head_dim, dtype=dtype, device=device)
        ]


class _Exchange:
    """Where a step hands each layer its tables and takes the new ones back (a plain object, not a
    dict: export snapshots and restores module attributes that are containers of tensors)."""

    def __init__(self) -> None:
        self.slots: dict[int, Slots] = {}


class _SlotAttention(nn.Module):
    """A rewritten site that takes its layer's tables from ``io`` and puts the new ones back."""

    def __init__(self, site: KVAttention, policy, io: _Exchange) -> None:
        super().__init__()
        self.layer, self.scale, self.window, self.softcap = site.layer, site.scale, site.window, site.softcap
        self.policy, self.io = policy, io

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        slots = self.io.slots.pop(self.layer)
        out, self.io.slots[self.layer] = functional.step(
            self.policy, self.layer, q, k, v, pos, slots, self.scale, self.window, self.softcap
        )
        return out


class Step(nn.Module):
    """``forward(input_ids [B, T], positions [B, T], *tables) -> (logits [B, 1, V], *new tables)``.

    ``positions``: true positions, -1 for padding. ``logits``: for the last column only (what
    generation reads). ``tables``: ``layout.names()`` in order. ``capacity``: slots per layer and
    KV head. The model's weights are shared, not copied.
    """

    def __init__(self, model: nn.Module, capacity: int | None = None) -> None:
        super().__init__()
        capacity = export_capacity(model, capacity)
        self.policy = model.kvpass_policy
        self.chunk: int = model.kvpass_options["chunk"]
        self._io = _Exchange()
        # A graph module of its own, holding exactly what the graph reads (each weight under one
        # name: export refuses a parameter reachable under two), with the attention modules swapped.
        source = model.kvpass_graph
        graph = copy.deepcopy(source.graph)
        owned, sites = {}, {}
        for node in graph.nodes:
            if node.op == "get_attr":
                owned[node.target] = operator.attrgetter(node.target)(source)
            elif node.op == "call_module":
                module = source.get_submodule(node.target)
                if isinstance(module, KVAttention):
                    sites[module.layer] = module
                    module = _SlotAttention(module, self.policy, self._io)
                owned[node.target] = module
        if not sites:
            raise ValueError("this transformed model has no rewritten attention to export")
        self.body, self.head = fx.GraphModule(owned, graph), model.kvpass_head
        rewritten = [s for s in model.kvpass_sites if s.action == "rewrite"]
        self.layout = Layout(
            layers=tuple(sorted(sites)),
            kv_heads=rewritten[0].kv_heads,
            head_dim=rewritten[0].head_dim,
            capacity=tuple(_capacity(self.policy.layer_slots(capacity, i), sites[i].window) for i in sorted(sites)),
        )

    def forward(self, input_ids: Tensor, positions: Tensor, *tables: Tensor) -> tuple[Tensor, ...]:
        n = len(Slots._fields)
        self._io.slots = {layer: Slots(*tables[i * n : (i + 1) * n]) for i, layer in enumerate(self.layout.layers)}
        try:
            hidden = self.body(input_ids, positions)
            hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
            last = hidden[:, -1:]
            logits = last if self.head is None else self.head(last)
            return (logits.float(), *(t for layer in self.layout.layers for t in self._io.slots[layer]))
        finally:
            self._io.slots = {}


def _capacity(slots: int, window: int) -> int:
    return min(slots, window) if window else slots


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
