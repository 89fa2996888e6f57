"""Canonicalise eager attention into one attention node, so one matcher serves both.

Recognised (every piece optional unless said):

- scores (required): ``matmul(q, k.transpose(-2, -1))`` (or ``k.permute(0, 1, 3, 2)``), an
  ``einsum`` of two 4-D operands in any layout and with any letters (``"bhqd,bhkd->bhqk"``,
  ``"bqhd,bkhd->bhqk"``, ``"ntjd,nsjd->njts"``...: two letters shared by both operands and the
  result, one summed, one of each operand's own), or ``bmm`` / ``baddbmm(bias, ...)`` of
  ``[B*H, T, D]`` reshapes of ``[B, H, T, D]`` tensors (BLOOM's ALiBi is ``baddbmm``'s bias: it
  joins the additive mask);
- a scale by a constant (``mul`` or ``div`` by a number or a 0-dim constant tensor, in place or
  not; ``baddbmm``'s ``alpha``);
- logit soft-capping ``c * tanh(x / c)`` (Gemma 2);
- attention sinks (GPT-OSS): a per-head logit concatenated to the scores before the softmax,
  whose column is sliced off after it; or the same written after attention (GraniteSWA):
  ``out * sigmoid(logsumexp(scores) - sink)``;
- additive masks or biases (``add``), boolean fills (``masked_fill(cond, -inf or most negative)``)
  and selections (``where(cond, scores, most negative)``, GPT-Neo), in any order: they become one
  mask, the sum of the additive terms where every condition lets a key be seen, ``-inf`` elsewhere
  (a bias in it is measured later: :mod:`.find_attention`);
- ``softmax(-1)`` (required; also computed in fp32, or on scores cast to it, and cast back),
  ``dropout`` in eval mode;
- the product with ``v`` (required), by the same kind of op as the scores (an einsum's letters
  need not match the scores' ones; ``bmm`` scores viewed as ``[B, H, T, T]`` may be viewed back).

Operands in another layout are permuted to ``[B, H, T, D]`` around the attention node.

Without soft-capping or sinks the result is ``aten.scaled_dot_product_attention``; with them,
``kvpass.eager_sdpa`` (SDPA has neither argument). Anything else is left alone, and
the token-mixing check later refuses it if it stays in the graph.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from kvpass.kernels import eager_sdpa  # noqa: F401  (registers torch.ops.kvpass.eager_sdpa)

from .find_attention import _same, _shape

aten = torch.ops.aten
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor}
_DIV = {aten.div.Tensor, aten.div_.Tensor}
_RESHAPE = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
EAGER_SDPA = torch.ops.kvpass.eager_sdpa.default


_CANON = (0, 1, 2, 3)


@dataclass
class Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: tuple  # (additive terms, conditions): each condition a node and whether a key is seen where it holds
    scale: float
    softcap: float
    out: fx.Node
    batched: bool  # 3-D ``bmm`` form: the result is ``[B*H, T, D]``
    sinks: fx.Node | None = None  # ``[H]``: each head's sink logit
    perms: tuple = (_CANON,) * 5  # q, k, scores (and mask), v: to [B, H, T, D]; output: from it


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
    """``(q, k, kind, scale, bias)`` if ``x`` is the ``q @ k^T`` of an attention; ``bias``:
    ``baddbmm``'s input times its ``beta`` (``[B*H, T or 1, S]``, or None)."""
    if _call(x, aten.matmul.default) and _call(x.args[1], aten.transpose.int):
        kt = x.args[1]
        if _rank(x) == 4 and sorted(d % 4 for d in kt.args[1:]) == [2, 3]:
            return x.args[0], kt.args[0], "matmul", 1.0, None
    if _call(x, aten.matmul.default) and _call(x.args[1], aten.permute.default) and _rank(x) == 4:
        if [d % 4 for d in x.args[1].args[1]] == [0, 1, 3, 2]:
            return x.args[0], x.args[1].args[0], "matmul", 1.0, None
        if [d % 4 for d in x.args[1].args[1]] == [0, 2, 3, 1]:  # k^T straight from [B, T, H, D] (OpenAI GPT)
            return x.args[0], x.args[1].args[0], "matmul_bthd", 1.0, None
    if _call(x, aten.einsum.default) and len(x.args[1]) == 2 and _score_roles(x):
        return *x.args[1], "einsum", 1.0, None
    bmm = _call(x, aten.bmm.default)
    added = _call(x, aten.baddbmm.default) and _const(x.kwargs.get("beta", 1))
    if bmm or added:
        q, kt = x.args[1:3] if added else x.args
        bias, beta = (x.args[0], x.kwargs.get("beta", 1)) if added else (None, 0)
        if _call(bias, aten.zeros.default) or beta == 0:
            bias = None
        if (
            _call(kt, aten.transpose.int)
            and sorted(d % 3 for d in kt.args[1:]) == [1, 2]
            and (q4 := _unbatch(q))
            and (k4 := _unbatch(kt.args[0]))
        ):
            return q4, k4, "bmm", float(x.kwargs.get("alpha", 1.0)), None if bias is None else (bias, float(beta))
    if _call(x, *_RESHAPE) and _rank(x) == 4 and _rank(x.args[0]) == 3:  # bmm scores viewed as [B, H, T, T]
        found = _scores(x.args[0])
        if found is not None and found[2] == "bmm":
            return *found[:2], "bmm4", *found[3:]  # softmax (and maybe the product with v) then in 4-D
    return None


def _equation(node: fx.Node) -> tuple[str, str, str] | None:
    ins, out = node.args[0].replace(" ", "").split("->")
    a, b = ins.split(",")
    ok = len(a) == len(b) == len(out) == 4 and len(set(a)) == len(set(b)) == len(set(out)) == 4
    return (a, b, out) if ok else None


def _score_roles(node: fx.Node) -> dict | None:
    """Which letter of a scores einsum is batch, heads, query, key and the summed head dim (``b, h,
    q, k, d``), with the operands' and result's letters (``a``, ``b_``, ``z``); None if it is not
    one. Of the two letters shared by everything, the batch is the one of dynamic size."""
    eq = _equation(node)
    if eq is None:
        return None
    a, b, z = eq
    shared = [c for c in a if c in b and c in z]
    summed = [c for c in a if c in b and c not in z]
    own_q, own_k = [c for c in a if c not in b], [c for c in b if c not in a]
    if [len(shared), len(summed), len(own_q), len(own_k)] != [2, 1, 1, 1]:
        return None
    size = node.args[1][0].meta["val"].shape
    if isinstance(size[a.index(shared[1])], torch.SymInt) and not isinstance(size[a.index(shared[0])], torch.SymInt):
        shared.reverse()
    return {"b": shared[0], "h": shared[1], "q": own_q[0], "k": own_k[0], "d": summed[0], "a": a, "b_": b, "z": z}


def _einsum_perms(scores: fx.Node, out: fx.Node) -> tuple | None:
    """The permutations that take an einsum attention's q, k, scores and v to ``[B, H, T, D]`` and
    the attention's result back to ``out``'s layout; None if ``out`` is no product with v."""
    r, eq = _score_roles(scores), _equation(out)
    if r is None or eq is None:
        return None
    p, v, o = eq
    zrole = {r[n]: n for n in "bhqk"}
    by = {zrole[r["z"][i]]: p[i] for i in range(4)}  # role -> the probs operand's letter
    new = [c for c in v if c not in p]
    if len(new) != 1 or {*v} != {by["b"], by["h"], by["k"], *new} or {*o} != {by["b"], by["h"], by["q"], *new}:
        return None
    canon = {**by, "e": new[0]}
    role = {letter: n for n, letter in canon.items()}
    q_perm = tuple(r["a"].index(r[n]) for n in "bhqd")
    k_perm = tuple(r["b_"].index(r[n]) for n in "bhkd")
    s_perm = tuple(r["z"].index(r[n]) for n in "bhqk")
    v_perm = tuple(v.index(canon[n]) for n in "bhke")
    o_perm = tuple("bhqe".index(role[c]) for c in o)
    return q_perm, k_perm, s_perm, v_perm, o_perm


def _values(out: fx.Node, probs: fx.Node, kind: str) -> fx.Node | None:
    if kind in ("matmul", "bmm4") and _call(out, aten.matmul.default) and out.args[0] is probs:
        return out.args[1]
    if kind == "einsum" and _call(out, aten.einsum.default) and out.args[1][0] is probs:
        return out.args[1][1]
    if kind in ("bmm", "bmm4") and _call(out, aten.bmm.default) and out.args[0] is probs:
        return _unbatch(out.args[1])
    return None


def _unstable(x: fx.Node) -> fx.Node:
    """``x`` without a subtracted row maximum (``x - x.max(-1, keepdim=True)``, which softmax does itself)."""
    if _call(x, aten.sub.Tensor) and _call(x.args[1], operator.getitem) and x.args[1].args[1] == 0:
        m = x.args[1].args[0]
        if _call(m, aten.max.dim) and m.args[0] is x.args[0] and m.args[1] in (-1, _rank(x) - 1):
            return x.args[0]
    if _call(x, aten.sub.Tensor) and _call(x.args[1], aten.amax.default) and x.args[1].args[0] is x.args[0]:
        return x.args[0]
    return x


def _floored(x: fx.Node) -> fx.Node:
    """``x`` without ``max(x, finfo.min)`` (which keeps masked rows finite and changes no probability)."""
    if _call(x, aten.max.other) and _call(x.args[1], aten.full.default) and x.args[1].args[1] <= -1e30:
        return x.args[0]
    return x


def _sink_source(s: fx.Node) -> fx.Node | None:
    """The ``[H]`` sink logits a ``[B, H, T, 1]`` column was broadcast from (reshapes, expands, casts)."""
    while _call(s, *_RESHAPE, aten.expand.default, aten.unsqueeze.default, aten.to.dtype, aten._to_copy.default):
        if _rank(s.args[0]) == 1:
            return s.args[0]
        s = s.args[0]
    return None


def _casts(n: fx.Node | None) -> fx.Node | None:
    """``n``'s only user past dtype casts (or None)."""
    n = _only_user(n) if n is not None else None
    while n is not None and _call(n, aten.to.dtype, aten._to_copy.default):
        n = _only_user(n)
    return n


def _scaled_by_sinks(scores: fx.Node, out: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """Sinks applied after attention, ``out * sigmoid(logsumexp(scores) - sink)`` (the sink's
    share of an extra softmax logit, GraniteSWA): ``(the product, the [H] sink logits)``, or None."""
    lse = [u for u in scores.users if _call(u, aten.logsumexp.default)]
    if len(lse) != 1 or [d % _rank(scores) for d in lse[0].args[1]] != [_rank(scores) - 1]:
        return None
    sub = _only_user(lse[0])
    if not (_call(sub, aten.sub.Tensor) and sub.args[0] is lse[0] and isinstance(sub.args[1], fx.Node)):
        return None
    sinks, sig = _sink_source(sub.args[1]), _casts(sub)
    if sinks is None or not _call(sig, aten.sigmoid.default):
        return None
    unsq = _only_user(sig)
    if not (_call(unsq, aten.unsqueeze.default) and unsq.args[1] in (-1, _rank(out) - 1)):
        return None
    mul = _casts(unsq)
    if not (_call(mul, *_MUL) and out in mul.args[:2] and _only_user(out) is mul):
        return None
    return mul, sinks


def _fill_value(gm: fx.GraphModule, n) -> float | None:
    """The number a 0-dim constant node holds (through export's lift/detach/clone), or None."""
    while _call(n, aten.detach_.default, aten.detach.default, aten.lift_fresh_copy.default, aten.clone.default):
        n = n.args[0]
    if isinstance(n, fx.Node) and n.op == "get_attr":
        try:
            t = operator.attrgetter(n.target)(gm)
        except AttributeError:
            return None
        return float(t) if isinstance(t, torch.Tensor) and t.dim() == 0 else None
    return _scalar(n)


def _mask_terms(x: fx.Node, gm: fx.GraphModule | None) -> tuple[fx.Node, list, list]:
    """Peel what is added to or masks the scores off ``x``: ``(scores, additive terms, conditions)``,
    each condition ``(node, seen)``: a key is seen where the node equals ``seen``."""
    adds, conds = [], []
    while True:
        x = _floored(x)
        if _call(x, aten.add.Tensor) and isinstance(x.args[1], fx.Node):
            adds.append(x.args[1])
            x = x.args[0]
        elif _call(x, aten.masked_fill.Scalar) and _const(x.args[2]) and x.args[2] <= -1e30:
            conds.append((x.args[1], False))
            x = x.args[0]
        elif _call(x, aten.where.self) and gm is not None and ((_fill_value(gm, x.args[2]) or 0.0) <= -1e4):
            conds.append((x.args[0], True))  # where(cond, scores, most negative): GPT-Neo's own mask
            x = x.args[1]
        elif _call(x, *_MUL) and isinstance(x.args[1], fx.Node) and any(_penalty(a, x.args[1]) for a in adds):
            conds.append((x.args[1], True))  # scores * b + c * (1 - b), c most negative: OpenAI GPT's mask
            x = x.args[0]
        else:
            return x, adds, conds


def _penalty(term, b: fx.Node) -> bool:
    """Whether ``term`` is ``c * (1 - b)`` with ``c <= -1e4``: where ``b`` is 0, a product ``scores * b``
    plus it leaves a key no probability (and where ``b`` is 1 it adds 0)."""
    if not (_call(term, *_MUL) and (_scalar(term.args[1]) or 0.0) <= -1e4):
        return False
    one_minus = term.args[0]
    return _call(one_minus, aten.rsub.Scalar) and one_minus.args[0] is b and one_minus.args[1] == 1


def _match(softmax: fx.Node, gm: fx.GraphModule | None = None) -> Match | None:
    if _rank(softmax) not in (3, 4):
        return None
    x, sinks = _unstable(softmax.args[0]), None
    if _call(x, aten.cat.default) and len(x.args[0]) == 2 and (x.args[1] if len(x.args) > 1 else 0) in (-1, 3):
        x, sinks = x.args[0][0], _sink_source(x.args[0][1])
        if sinks is None:
            return None
    while _call(x, aten.to.dtype, aten._to_copy.default):  # scores cast (to fp32) for the softmax
        x = x.args[0]
    scale, softcap, mask4 = 1.0, 0.0, False
    x = _floored(x)
    inner = _floored(x.args[0]) if _call(x, *_RESHAPE) else None
    if _rank(x) == 3 and _call(inner, aten.add.Tensor) and _rank(inner) == 4:
        # [B*H, T, T] scores viewed as [B, H, T, T] to add the mask, and back
        if _call(inner.args[0], *_RESHAPE) and _rank(inner.args[0].args[0]) == 3 and isinstance(inner.args[1], fx.Node):
            x, adds, conds, mask4 = inner.args[0].args[0], [inner.args[1]], [], True
        else:
            return None
    else:
        x, adds, conds = _mask_terms(x, gm)
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
    q, k, kind, alpha, bias = found
    k_perm = (0, 2, 1, 3) if kind == "matmul_bthd" else _CANON  # k to [B, H, T, D]
    kind = "matmul" if kind == "matmul_bthd" else kind
    if bias is not None and (softcap or not isinstance(_shape(q)[1], int)):
        return None  # a bias under the soft-cap, or heads of unknown number: not one mask
    key_dim = _score_roles(x)["z"].index(_score_roles(x)["k"]) if kind == "einsum" else _rank(softmax) - 1
    if softmax.args[1] % _rank(softmax) != key_dim:
        return None
    if kind == "bmm" and any(_rank(a) > 2 for a in adds) and not mask4:
        return None  # a per-(batch x head) mask: not expressible on [B, H, T, T] without its sizes
    probs = softmax
    while (user := _only_user(probs)) is not None and (
        _call(user, aten.to.dtype, aten._to_copy.default, *_RESHAPE)
        or (_call(user, aten.dropout.default) and not user.args[2])
    ):
        probs = user
    batched = kind == "bmm"
    if kind == "bmm4" and _rank(probs) == 3 and _rank(softmax) == 4:  # viewed back to [B*H, T, S] for a bmm
        batched = True
    elif not _same(_shape(probs), _shape(softmax)):  # reshapes that come back to the probabilities' shape only
        return None
    if sinks is not None:  # the sink's column sliced off
        user = _only_user(probs)
        if not (
            _call(user, aten.slice.Tensor) and user.args[1] in (-1, 3) and user.args[2] == 0 and user.args[3] == -1
        ):
            return None
        probs = user
        while (user := _only_user(probs)) is not None and (
            _call(user, aten.to.dtype, aten._to_copy.default)
            or (_call(user, aten.dropout.default) and not user.args[2])
        ):
            probs = user
    out = _only_user(probs)
    v = _values(out, probs, kind) if out is not None else None
    if v is None:
        return None
    if sinks is None and kind in ("matmul", "einsum") and (after := _scaled_by_sinks(softmax.args[0], out)):
        out, sinks = after
    if bias is not None:
        adds = [*adds, ("bias", *bias, _shape(q)[1])]
    match = Match(q, k, v, (adds, conds), scale * alpha, softcap, out, batched, sinks)
    match.perms = (_CANON, k_perm, _CANON, _CANON, _CANON)
    if kind == "einsum":
        perms = _einsum_perms(x, out)
        if perms is None:
            return None
        match.perms = perms
    return match


def _permute(g: fx.Graph, x: fx.Node, perm: tuple) -> fx.Node:
    if perm == _CANON:
        return x
    node = g.call_function(aten.permute.default, (x, list(perm)))
    node.meta = {**x.meta, "val": x.meta["val"].permute(perm)}
    return node


def _to_rank4(g: fx.Graph, x: fx.Node) -> fx.Node:
    while _rank(x) < 4:
        x0 = x
        x = g.call_function(aten.unsqueeze.default, (x, 0))
        x.meta = {**x0.meta, "val": x0.meta["val"].unsqueeze(0)}
    return x


def _node(g: fx.Graph, target, args: tuple) -> fx.Node:
    """A new node of ``g``, its fake value computed from its arguments' (shapes stay symbolic)."""
    node = g.call_function(target, args)
    fake = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    node.meta = {"val": target(*fake)}
    return node


def _one_mask(g: fx.Graph, adds: list, conds: list) -> fx.Node | None:
    """One mask for SDPA: the additive terms summed (a ``baddbmm`` bias ``[B*H, ., S]`` viewed as
    ``[B, H, ., S]`` and scaled by its ``beta``) where every condition lets a key be seen, ``-inf``
    elsewhere; a boolean mask if there is no additive term."""
    total = None
    for a in adds:
        if isinstance(a, tuple):  # ("bias", node, beta, heads)
            _, bias, beta, heads = a
            a = _node(g, aten.unflatten.int, (bias, 0, [-1, heads]))
            if beta != 1:
                a = _node(g, aten.mul.Tensor, (a, beta))
        total = a if total is None else _node(g, aten.add.Tensor, (total, a))
    seen = None
    for cond, when in conds:
        if cond.meta["val"].dtype != torch.bool:  # a 0/1 multiplier
            cond = _node(g, aten.ne.Scalar, (cond, 0))
        c = cond if when else _node(g, aten.logical_not.default, (cond,))
        seen = c if seen is None else _node(g, aten.logical_and.default, (seen, c))
    if seen is None or total is None:
        return seen if total is None else total
    return _node(g, aten.where.ScalarOther, (seen, total, -math.inf))


def eager_to_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite every recognised eager attention of ``gm`` into one attention node; return how many."""
    found = 0
    for softmax in [n for n in gm.graph.nodes if _call(n, *_SOFTMAX)]:
        m = _match(softmax, gm)
        if m is None:
            continue
        g = gm.graph
        qp, kp, sp, vp, op = m.perms
        with g.inserting_before(m.out):
            mask = _one_mask(g, *m.mask)
            q, k, v = _permute(g, m.q, qp), _permute(g, m.k, kp), _permute(g, m.v, vp)
            if isinstance(mask, fx.Node) and sp != _CANON:
                mask = _permute(g, _to_rank4(g, mask), sp)
            if m.softcap or m.sinks is not None:
                node = g.call_function(EAGER_SDPA, (q, k, v, mask, m.scale, m.softcap, m.sinks))
            else:
                node = g.call_function(
                    aten.scaled_dot_product_attention.default, (q, k, v), {"attn_mask": mask, "scale": m.scale}
                )
            node.meta = dict(m.out.meta)
            qv, vv = q.meta["val"], v.meta["val"]
            node.meta["val"] = qv.new_empty((*qv.shape[:-1], vv.shape[-1]))  # fake, like the rest of the meta
            result = g.call_function(aten.flatten.using_ints, (node, 0, 1)) if m.batched else _permute(g, node, op)
        result.meta = dict(m.out.meta)
        m.out.replace_all_uses_with(result)
        found += 1
    if found:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return found
