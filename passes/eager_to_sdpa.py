"""Canonicalise eager attention into ``aten.scaled_dot_product_attention``, so one matcher serves both.

Recognised (every piece optional unless said): ``matmul(q, k.transpose(-2, -1))`` (required),
a scale by a constant (``mul`` or ``div``), an additive mask (``add``) or a boolean fill
(``masked_fill(cond, -inf)``), ``softmax(-1)`` (required; also computed in fp32 and cast back),
``dropout`` in eval mode, then ``matmul(probs, v)`` (required). Anything else is left alone.
"""

from __future__ import annotations

import math

import torch
from torch import fx

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default}


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _match(softmax: fx.Node):
    """``(q, k, v, mask, scale, out)`` for one eager attention, or ``None``."""
    if softmax.args[1] not in (-1, 3):
        return None
    x, mask, scale = softmax.args[0], None, 1.0
    if _call(x, aten.add.Tensor) and isinstance(x.args[1], fx.Node):
        x, mask = x.args[0], x.args[1]
    elif _call(x, aten.masked_fill.Scalar) and x.args[2] == -math.inf:
        x, mask = x.args[0], ("not", x.args[1])
    if _call(x, aten.mul.Tensor) and isinstance(x.args[1], (int, float)):
        x, scale = x.args[0], float(x.args[1])
    elif _call(x, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
        x, scale = x.args[0], 1.0 / float(x.args[1])
    if not _call(x, aten.matmul.default) or not _call(x.args[1], aten.transpose.int):
        return None
    q, kt = x.args
    if sorted(d % 4 for d in kt.args[1:]) != [2, 3]:
        return None
    probs = softmax
    while (user := _only_user(probs)) is not None and (
        _call(user, aten.to.dtype, aten._to_copy.default) or (_call(user, aten.dropout.default) and not user.args[2])
    ):
        probs = user
    out = _only_user(probs)
    if not _call(out, aten.matmul.default) or out.args[0] is not probs:
        return None
    return q, kt.args[0], out.args[1], mask, scale, out


def eager_to_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite every recognised eager attention of ``gm`` into one SDPA node; return how many."""
    found = 0
    for softmax in [n for n in gm.graph.nodes if _call(n, *_SOFTMAX)]:
        match = _match(softmax)
        if match is None:
            continue
        q, k, v, mask, scale, out = match
        with gm.graph.inserting_before(out):
            if isinstance(mask, tuple):
                mask = gm.graph.call_function(aten.logical_not.default, (mask[1],))
            sdpa = gm.graph.call_function(
                aten.scaled_dot_product_attention.default, (q, k, v), {"attn_mask": mask, "scale": scale}
            )
        sdpa.meta = dict(out.meta)
        out.replace_all_uses_with(sdpa)
        found += 1
    if found:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return found
