"""Recurrent token mixers as single nodes: capture sees each as one opaque op, and the rewrite binds
it to a module that carries its state.

A hybrid model mixes tokens in two ways: attention, over a KV cache that grows, and recurrent
layers (a causal convolution, linear attention, a selective scan), over a fixed-size state. The
recurrent layers' own code (chunked scans with Python loops over the sequence) is not what the
graph should see: while capturing, each known mixer's ``forward`` is one ``kvpass::mixer`` op over
its input, the same shape out; after capture, :func:`rewrite_mixers` puts a module in its place,
called with the input and the token positions. Which modules are mixers, and what carries their
state, is the runtime's knowledge (:mod:`kvpass.runtime.recurrent`); this pass only moves nodes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, fx, nn


@torch.library.custom_op("kvpass::mixer", mutates_args=())
def mixer(x: Tensor, index: int) -> Tensor:
    raise RuntimeError(
        "a recurrent mixer's placeholder ran: kvpass captured the model with its mixers as placeholders, "
        "and the rewrite (rewrite_mixers) puts the mixer back"
    )


@mixer.register_fake
def _(x: Tensor, index: int) -> Tensor:
    return torch.empty_like(x)


@contextlib.contextmanager
def opaque(modules: list[nn.Module], probe: Callable[[], object] | None = None) -> Iterator[None]:
    """Within: each of ``modules``' forward is one ``kvpass::mixer`` op over its input (numbered by
    place in the list), whatever else it is called with (its cache, its mask). ``probe`` (a short
    forward of the model) shows what each returns: a tensor, or a tuple whose first item is the
    output (the rest, which the model ignores, become None)."""
    arity: dict[int, int] = {}
    if probe is not None and modules:
        hooks = [
            m.register_forward_hook(
                lambda _m, _a, out, i=i: arity.__setitem__(i, len(out) if isinstance(out, tuple) else 0)
            )
            for i, m in enumerate(modules)
        ]
        try:
            probe()
        finally:
            for h in hooks:
                h.remove()
    with _forwards(modules, lambda i: functools.partial(_placeholder, i, arity.get(i, 0))):
        yield


@contextlib.contextmanager
def _forwards(modules: list[nn.Module], forward_of: Callable[[int], Callable]) -> Iterator[None]:
    """Within: module ``i``'s forward is ``forward_of(i)`` (an instance attribute shadows the class's)."""
    for i, m in enumerate(modules):
        m.forward = forward_of(i)
    try:
        yield
    finally:
        for m in modules:
            vars(m).pop("forward", None)


def _placeholder(index: int, arity: int, hidden_states: Tensor, *args, **kwargs) -> Tensor | tuple:
    out = torch.ops.kvpass.mixer(hidden_states, index)
    return (out, *(None,) * (arity - 1)) if arity else out


def rewrite_mixers(
    gm: fx.GraphModule, make_module: Callable[[int, Tensor], nn.Module], positions: str = "position_ids"
) -> list[fx.Node]:
    """Replace each ``kvpass::mixer`` node by a call of ``make_module(index, example)(x, positions)``
    (``example``: the input's fake value, its shape and dtype), with ``positions`` the graph input of
    true positions (-1: padding). Returns the new nodes."""
    pos = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == positions), None)

    def call_of(node: fx.Node) -> fx.Node:
        if pos is None:
            raise ValueError(f"the captured graph has no input named {positions!r} to feed token positions from")
        x, index = node.args
        gm.add_submodule(f"kvpass_mix_{index}", make_module(index, x.meta["val"]))
        call = gm.graph.call_module(f"kvpass_mix_{index}", (x, pos))
        call.meta["kvpass_positions"] = True  # padding (-1) stays visible to it (rewrite clamps the others)
        return call

    return _put_back(gm, torch.ops.kvpass.mixer.default, call_of)


def _put_back(gm: fx.GraphModule, op, call_of: Callable[[fx.Node], fx.Node]) -> list[fx.Node]:
    """Each node of ``op`` replaced by ``call_of(node)`` (made where the node was)."""
    g = gm.graph
    calls = []
    for node in [n for n in g.nodes if n.target is op]:
        with g.inserting_before(node):
            call = call_of(node)
        call.meta = {**node.meta, **call.meta}
        node.replace_all_uses_with(call)
        g.erase_node(node)
        calls.append(call)
    g.lint()
    gm.recompile()
    return calls


@torch.library.custom_op("kvpass::rows", mutates_args=())
def rows(xs: list[Tensor], index: int) -> Tensor:
    raise RuntimeError("a row-wise module's placeholder ran: rewrite_rows puts the module back")


@rows.register_fake
def _(xs: list[Tensor], index: int) -> Tensor:
    return torch.empty_like(xs[0])


class RowWise(nn.Module):
    """A module kvpass runs as it is, whose output row ``t`` depends only on row ``t`` of its inputs
    (by the contract it is written to), put back where its placeholder was."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *xs: Tensor) -> Tensor:
        return self.module(*xs)


@contextlib.contextmanager
def opaque_rows(modules: list[nn.Module]) -> Iterator[None]:
    """Within: each of ``modules``' forward (called with tensors only, positionally) is one
    ``kvpass::rows`` op over them: capture does not trace its inside (a mixture of experts' loop
    over the experts a chunk happens to use)."""
    with _forwards(modules, lambda i: functools.partial(_rows_placeholder, i)):
        yield


def _rows_placeholder(index: int, *args: Tensor, **kwargs) -> Tensor:
    if kwargs or not all(isinstance(a, Tensor) for a in args):
        raise TypeError("kvpass runs a row-wise module as one node only when it is called with tensors, positionally")
    return torch.ops.kvpass.rows(list(args), index)


def rewrite_rows(gm: fx.GraphModule, modules: list[nn.Module]) -> list[fx.Node]:
    """Replace each ``kvpass::rows`` node by a call of :class:`RowWise` over ``modules[index]``."""

    def call_of(node: fx.Node) -> fx.Node:
        xs, index = node.args
        if not hasattr(gm, f"kvpass_rows_{index}"):
            gm.add_submodule(f"kvpass_rows_{index}", RowWise(modules[index]))
        return gm.graph.call_module(f"kvpass_rows_{index}", tuple(xs))

    return _put_back(gm, torch.ops.kvpass.rows.default, call_of)
