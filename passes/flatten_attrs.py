"""Give every parameter the graph reads a flat name on the graph module itself.

An exported graph reads each weight through its module path (``self.model.layers[3].mlp.up_proj
.weight``): ~7 µs of Python per read, every step -- ~2 ms of a ~55 ms decode step on the default
model. Registered on the root under one flat name, the same ``Parameter`` object is one attribute
lookup. Weights stay shared with the original model, and since ``.to()`` / ``.half()`` keep a
parameter's identity, they stay in step. Buffers are left on their path (``.to()`` replaces them).
"""

from __future__ import annotations

import operator

from torch import fx, nn


def flatten_attrs(gm: fx.GraphModule) -> int:
    """Point every ``get_attr`` of a nested parameter at a root-level alias; return how many."""
    moved = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        obj = operator.attrgetter(node.target)(gm)
        if not isinstance(obj, nn.Parameter):
            continue
        name = "flat_" + node.target.replace(".", "_")
        if name not in gm._parameters:
            gm.register_parameter(name, obj)
        node.target = name
        moved += 1
    gm.recompile()
    return moved
