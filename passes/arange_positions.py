"""Give positions made by ``arange`` over the chunk their true values.

Models that take no position argument make their positions as ``torch.arange(T)`` plus the
length of their own cache (BART's and Pegasus's decoders), which the captured graph, run without
a cache, sees as ``arange(T)``. Run a chunk at a time, that would restart at 0 on every chunk.
Had the model seen the whole sequence at once, ``arange`` would have given each token its
position in the sequence: that is what this pass puts in its place, ``positions.amax(0)`` (the
true positions of the chunk's columns; padding, -1, never exceeds a real position, so a
left-padded batch gets transformers' own positions, which ignore padding too). Only an
``arange(0, T, 1)`` whose length is the input's sequence length is replaced.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
_ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}


def arange_positions(gm: fx.GraphModule, tokens: str = "input_ids", positions: str = "position_ids") -> int:
    """Replace every ``arange`` over the sequence by the true positions; return how many."""
    holders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    ids, pos = holders.get(tokens), holders.get(positions)
    if ids is None or pos is None:
        return 0
    seq = ids.meta["val"].shape[1]
    found = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ARANGE]:
        args = list(node.args)
        start, end, step = (0, args[0], 1) if node.target == aten.arange.default else ([*args, 1][:3])
        if not (start == 0 and step == 1 and _same(end, seq)):
            continue
        with gm.graph.inserting_before(node):
            true = gm.graph.call_function(aten.amax.default, (pos, [0]))
            if node.kwargs.get("dtype") not in (None, torch.int64):
                true = gm.graph.call_function(aten._to_copy.default, (true,), {"dtype": node.kwargs["dtype"]})
        true.meta = dict(node.meta)
        node.replace_all_uses_with(true)
        gm.graph.erase_node(node)
        found += 1
    if found:
        gm.graph.lint()
        gm.recompile()
    return found


def _same(x, seq) -> bool:
    if isinstance(x, fx.Node):
        x = x.meta.get("val")
    return isinstance(x, torch.SymInt) and isinstance(seq, torch.SymInt) and str(x) == str(seq)
