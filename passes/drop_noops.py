"""Remove nodes that compute nothing: export's tensor-metadata assertions, full-range slices,
casts to the dtype a tensor already has, and dropout in eval mode (which, being random in
principle, dead-code elimination would otherwise keep alive along with everything feeding it).
Every node costs a dispatch at each decode step; on the default model this removes ~380 of
~2,100 ops (~4 ms of a ~55 ms step on the dev CPU)."""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_FULL = 2**62  # export writes an open slice end as sys.maxsize


def _is_noop(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target == aten.slice.Tensor:
        args = [*n.args, None, 0, None, 1][:5] if len(n.args) < 5 else list(n.args)
        start, end, step = args[2], args[3], args[4]
        return start in (0, None) and (end is None or (isinstance(end, int) and end >= _FULL)) and step == 1
    if n.target == aten.dropout.default:
        return n.args[2] is False or n.args[1] == 0
    if n.target == aten.to.dtype and len(n.args) == 2 and not n.kwargs:
        val = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        return val is not None and val.dtype == n.args[1]
    return False


def drop_noops(gm: fx.GraphModule) -> int:
    """Drop the no-op nodes of ``gm`` in place; return how many were removed."""
    removed = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target == aten._assert_tensor_metadata.default:
            gm.graph.erase_node(n)
        elif _is_noop(n):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
        else:
            continue
        removed += 1
    gm.graph.lint()
    gm.recompile()
    return removed
