"""Canonicalise eager attention into one attention node, so one matcher serves both.

Recognised (every piece optional unless said):

- scores (required): ``matmul(q, k.transpose(-2, -1))``, ``einsum("bhqd,bhkd->bhqk", q, k)``, or
  ``bmm`` / ``baddbmm(zeros, ...)`` of ``[B*H, T, D]`` reshapes of ``[B, H, T, D]`` tensors;
- a scale by a constant (``mul`` or ``div`` by a number or a 0-dim constant tensor, in place or
  not; ``baddbmm``'s ``alpha``);
- logit soft-capping ``c * tanh(x / c)`` (Gemma 2);
- an additive mask (``add``) or a boolean fill (``masked_fill(cond, -inf)``);
- ``softmax(-1)`` (required; also computed in fp32 and cast back), ``dropout`` in eval mode;
- the product with ``v`` (required), by the same kind of op as the scores.

Without soft-capping the result is ``aten.scaled_dot_product_attention``; with it,
``kvpass.softcap_sdpa`` (SDPA has no soft-capping argument). Anything else is left alone, and
the token-mixing check later refuses it if it stays in the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from kvpass.kernels import softcap_sdpa  # noqa: F401  (registers torch.ops.kvpass.softcap_sdpa)

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor}
_DIV = {aten.div.Tensor, aten.div_.Tensor}
_RESHAPE = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
SOFTCAP_SDPA = torch.ops.kvpass.softcap_sdpa.default


@dataclass
class Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | tuple | None
    scale: float
    softcap: float
    out: fx.Node
    batched: bool  # 3-D ``bmm`` form: the result is ``[B*H, T, D]``


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _const(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scalar(x) -> float | None:
    """``x`` as a number, if it is one or a 0-dim constant tensor (``torch.full([], c)``)."""
    if _const(x):
        return float(x)
    if _call(x, aten.full.default) and list(x.args[0]) == [] and _const(x.args[1]):
        return float(x.args[1])
    if _call(x, aten.scalar_tensor.default) and _const(x.args[0]):
        return float(x.args[0])
    return None


def _rank(n: fx.Node) -> int:
    return len(n.meta["val"].shape)


def _unbatch(n: fx.Node) -> fx.Node | None:
    """The ``[B, H, T, D]`` tensor a ``[B*H, T, D]`` bmm operand was reshaped from."""
    if _call(n, *_RESHAPE) and _rank(n.args[0]) == 4:
        return n.args[0]
    return None


def _scores(x: fx.Node):
    """``(q, k, kind, scale)`` if ``x`` is the ``q @ k^T`` of an attention."""
    if _call(x, aten.matmul.default) and _call(x.args[1], aten.transpose.int):
        kt = x.args[1]
        if _rank(x) == 4 and sorted(d % 4 for d in kt.args[1:]) == [2, 3]:
            return x.args[0], kt.args[0], "matmul", 1.0
    if _call(x, aten.einsum.default) and len(x.args[1]) == 2:
        ins, out = x.args[0].replace(" ", "").split("->")
        a, b = ins.split(",")
        if len(a) == len(b) == 4 and a[:2] == b[:2] == out[:2] and a[3] == b[3] and out[2:] == a[2] + b[2]:
            return *x.args[1], "einsum", 1.0
    bmm = _call(x, aten.bmm.default)
    zeros = _call(x, aten.baddbmm.default) and _call(x.args[0], aten.zeros.default) and x.kwargs.get("beta", 1) != 0
    if bmm or zeros:
        q, kt = x.args[1:3] if zeros else x.args
        if (
            _call(kt, aten.transpose.int)
            and sorted(d % 3 for d in kt.args[1:]) == [1, 2]
            and (q4 := _unbatch(q))
            and (k4 := _unbatch(kt.args[0]))
        ):
            return q4, k4, "bmm", float(x.kwargs.get("alpha", 1.0))
    return None


def _values(out: fx.Node, probs: fx.Node, kind: str) -> fx.Node | None:
    if kind == "matmul" and _call(out, aten.matmul.default) and out.args[0] is probs:
        return out.args[1]
    if kind == "einsum" and _call(out, aten.einsum.default) and out.args[1][0] is probs:
        ins, res = out.args[0].replace(" ", "").split("->")
        a, b = ins.split(",")
        if len(a) == len(b) == 4 and a[:2] == b[:2] == res[:2] and a[3] == b[2] and res[2:] == a[2] + b[3]:
            return out.args[1][1]
    if kind == "bmm" and _call(out, aten.bmm.default) and out.args[0] is probs:
        return _unbatch(out.args[1])
    return None


def _match(softmax: fx.Node) -> Match | None:
    if softmax.args[1] not in (-1, 3):
        return None
    x, mask, scale, softcap = softmax.args[0], None, 1.0, 0.0
    if _call(x, aten.add.Tensor) and isinstance(x.args[1], fx.Node):
        x, mask = x.args[0], x.args[1]
    elif _call(x, aten.masked_fill.Scalar) and x.args[2] == -math.inf:
        x, mask = x.args[0], ("not", x.args[1])
    # c * tanh(x / c)
    if _call(x, *_MUL) and _const(x.args[1]) and _call(x.args[0], aten.tanh.default):
        inner = x.args[0].args[0]
        if _call(inner, *_DIV) and inner.args[1] == x.args[1] and x.args[1] > 0:
            x, softcap = inner.args[0], float(x.args[1])
    if _call(x, *_MUL) and _scalar(x.args[1]) is not None:
        x, scale = x.args[0], _scalar(x.args[1])
    elif _call(x, *_DIV) and _scalar(x.args[1]):
        x, scale = x.args[0], 1.0 / _scalar(x.args[1])
    found = _scores(x)
    if found is None:
        return None
    q, k, kind, alpha = found
    if kind == "bmm" and isinstance(mask, fx.Node) and _rank(mask) > 2:
        return None  # a per-(batch x head) mask: not expressible on [B, H, T, T] without its sizes
    probs = softmax
    while (user := _only_user(probs)) is not None and (
        _call(user, aten.to.dtype, aten._to_copy.default) or (_call(user, aten.dropout.default) and not user.args[2])
    ):
        probs = user
    out = _only_user(probs)
    v = _values(out, probs, kind) if out is not None else None
    if v is None:
        return None
    return Match(q, k, v, mask, scale * alpha, softcap, out, kind == "bmm")


def eager_to_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite every recognised eager attention of ``gm`` into one attention node; return how many."""
    found = 0
    for softmax in [n for n in gm.graph.nodes if _call(n, *_SOFTMAX)]:
        m = _match(softmax)
        if m is None:
            continue
        g = gm.graph
        with g.inserting_before(m.out):
            mask = g.call_function(aten.logical_not.default, (m.mask[1],)) if isinstance(m.mask, tuple) else m.mask
            if m.softcap:
                node = g.call_function(SOFTCAP_SDPA, (m.q, m.k, m.v, mask, m.scale, m.softcap))
            else:
                node = g.call_function(
                    aten.scaled_dot_product_attention.default, (m.q, m.k, m.v), {"attn_mask": mask, "scale": m.scale}
                )
            node.meta = dict(m.out.meta)
            q, v = m.q.meta["val"], m.v.meta["val"]
            node.meta["val"] = q.new_empty((*q.shape[:-1], v.shape[-1]))  # fake, like the rest of the meta
            result = g.call_function(aten.flatten.using_ints, (node, 0, 1)) if m.batched else node
        result.meta = dict(m.out.meta)
        m.out.replace_all_uses_with(result)
        found += 1
    if found:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return found
