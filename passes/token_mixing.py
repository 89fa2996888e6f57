"""Prove that, apart from the rewritten attention, a graph keeps tokens apart.

kvpass runs a rewritten graph one chunk at a time (prefill in chunks, then one token per step):
that computes the same thing as running the whole sequence at once only if the attention modules
are the only places where one token's computation reads another's. This pass checks it from the
graph alone, with the symbolic shapes ``torch.export`` records: a dimension *carries tokens* when
its size depends on the sequence length of the input. Every node must then be one of

- elementwise (``torch.Tag.pointwise``, or a cast / ``where`` / ``masked_fill``), shape-only
  (views, permutes, expands, copies), or a per-token lookup (``embedding``);
- a contraction (``linear``, ``matmul``, ``bmm``, ``einsum``...), a reduction (``sum``, ``mean``,
  ``softmax``, norms...), a slice, an index, a concatenation or a split, *not* along a dimension
  that carries tokens;
- a tensor factory that does not depend on positions within the chunk (``zeros``, ``full``, but
  not ``arange`` over the sequence, which makes positions from the chunk rather than the input);

or it is refused with its name, where it came from, and why.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten


class TokenMixingError(ValueError):
    """A node outside the attention sites combines information from different tokens (``where``: the
    path of the module it is in, if known)."""

    where: str = ""


_SHAPE_ONLY = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "numpy_T", "unsqueeze", "squeeze", "expand",
    "expand_as", "broadcast_to", "flatten", "unflatten", "contiguous", "clone", "alias", "detach", "lift_fresh_copy",
    "_to_copy", "to", "type_as", "view_as", "repeat_interleave", "repeat", "movedim", "stack", "reshape_as",
    "view_as_complex", "view_as_real",
}  # fmt: skip
_ELEMENTWISE = {"where", "masked_fill", "clamp", "clamp_min", "clamp_max", "dropout", "type_as", "copy", "fill"}
_ELEMENTWISE |= {"multiply", "polar", "complex"}  # pointwise, without the tag
_FACTORIES = {"zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like", "scalar_tensor"}
_FACTORIES |= {"new_zeros", "new_ones", "new_full", "new_empty", "sym_size", "sym_numel", "sym_stride"}
_REDUCE_DIM = {  # name -> index of the ``dim`` argument
    "sum": 1, "mean": 1, "amax": 1, "amin": 1, "max": 1, "min": 1, "prod": 1, "var": 1, "std": 1, "logsumexp": 1,
    "norm": 2, "linalg_vector_norm": 2, "softmax": 1, "_softmax": 1, "log_softmax": 1, "_log_softmax": 1,
    "cumsum": 1, "cumprod": 1, "argmax": 1, "argmin": 1, "any": 1, "all": 1, "topk": 2, "sort": 1, "var_mean": 1,
    "cat": 1, "concat": 1, "concatenate": 1, "split": 2, "split_with_sizes": 2, "chunk": 2, "unbind": 1,
    "select": 1, "slice": 1, "narrow": 1, "index_select": 1, "gather": 1, "scatter": 1, "roll": 2, "flip": 1,
}  # fmt: skip


def check_token_local(
    gm: fx.GraphModule,
    tokens: str = "input_ids",
    positions: str = "position_ids",
    exempt: set[fx.Node] = frozenset(),
    row_wise: set[str] = frozenset(),
) -> None:
    """Raise :class:`TokenMixingError` naming the first node (other than ``exempt``) that mixes tokens.

    ``tokens`` names the ``[batch, sequence]`` input whose sequence length defines which
    dimensions carry tokens (as does ``positions``, the ``[batch, sequence]`` positions).
    ``row_wise`` names modules (by path in the model) known to compute each output row from the
    same row of their inputs, however they do it inside (a mixture of experts' dispatch sorts and
    gathers rows by expert): their nodes are not checked one by one.
    """
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == tokens), None)
    if ids is None or not hasattr(ids.meta.get("val"), "shape") or len(ids.meta["val"].shape) != 2:
        raise TokenMixingError(f"the graph has no [batch, sequence] input named {tokens!r} to check against")
    seq = _symbols(ids.meta["val"].shape[1])
    pos = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == positions), None)
    if pos is not None and len(getattr(pos.meta.get("val"), "shape", ())) == 2:
        seq |= _symbols(pos.meta["val"].shape[1])  # the same length, a symbol of its own when unused
    if not seq:
        raise TokenMixingError("the graph was captured with a fixed sequence length; kvpass needs it dynamic")
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or node in exempt or _inside(node, row_wise):
            continue
        if _uniform_slice(gm, node):
            continue
        why = _mixes(node, seq)
        if why:
            error = TokenMixingError(
                f"kvpass cannot rewrite this model safely: node {node.name!r} ({_target(node)}"
                f"{', in ' + _where(node) if _where(node) else ''}) {why}. Running the model a chunk or a token at a "
                "time would change its result, so nothing was rewritten."
            )
            error.where = _where(node)
            raise error


def _symbols(x) -> set:
    return set(x.node.expr.free_symbols) if isinstance(x, torch.SymInt) else set()


def _token_dims(val, seq: set) -> list[int]:
    if not isinstance(val, torch.Tensor):
        return []
    return [i for i, d in enumerate(val.shape) if _symbols(d) & seq]


def _target(node: fx.Node) -> str:
    t = node.target
    return str(t) if not callable(t) or isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]).removeprefix("model.") if stack else ""


def _uniform_slice(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A slice of a constant buffer whose entries are all one value (BERT-style models' buffered
    ``token_type_ids``, zeros, cut to the input's length): the same at every position."""
    if not (node.op == "call_function" and node.target == aten.slice.Tensor):
        return False
    src = node.args[0]
    while (
        isinstance(src, fx.Node)
        and src.op == "call_function"
        and src.target in (aten.slice.Tensor, aten.expand.default)
    ):
        src = src.args[0]
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return False
    t = operator.attrgetter(src.target)(gm)
    return isinstance(t, torch.Tensor) and t.numel() > 0 and bool((t == t.flatten()[0]).all())


def _inside(node: fx.Node, modules: set[str]) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return bool(modules) and any(str(path).removeprefix("model.") in modules for path, _ in stack.values())


def _name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__.rstrip("_") if t._overloadpacket.__name__ != "_" else "_"
    return getattr(t, "__name__", "")


def _dims(arg, rank: int) -> list[int]:
    if arg is None:
        return list(range(rank))
    dims = [arg] if isinstance(arg, int) else list(arg)
    return [d % rank for d in dims] if rank else []


def _mixes(node: fx.Node, seq: set) -> str:
    """Why ``node`` mixes tokens, or ``""`` if it provably does not."""
    if node.op == "call_module":
        return "" if node.target == "_guards_fn" else "is a module call kvpass cannot see into"  # export's shape guards
    if node.target is operator.getitem:
        return ""
    name = _name(node)
    ins = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    in_tokens = {a: _token_dims(a.meta["val"], seq) for a in ins}
    out = node.meta.get("val")
    outs = out if isinstance(out, (list, tuple)) else [out]
    out_tokens = any(_token_dims(o, seq) for o in outs)
    if not any(in_tokens.values()):
        if not out_tokens:
            return ""  # weights, constants, per-batch values: no tokens involved
        if name in _FACTORIES:
            return ""
        return (
            "makes a tensor along the sequence from the chunk's length (e.g. positions by arange); "
            "pass positions as an input instead"
        )
    op = node.target
    if isinstance(op, torch._ops.OpOverload) and (torch.Tag.pointwise in op.tags or name in _ELEMENTWISE):
        return ""
    if name in _SHAPE_ONLY or name in _FACTORIES or name == "embedding":
        return ""
    if name in ("scaled_dot_product_attention", "eager_sdpa"):
        return "is attention that kvpass did not rewrite (not causal self-attention; `kvpass inspect` says why)"
    x = node.args[0] if node.args else None
    xt = in_tokens.get(x, []) if isinstance(x, fx.Node) else []
    rank = len(x.meta["val"].shape) if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor) else 0
    if name in ("linear", "layer_norm", "rms_norm", "native_layer_norm"):
        n = len(node.args[1]) if name != "linear" and isinstance(node.args[1], (list, tuple)) else 1
        return _along(set(range(rank - n, rank)) & set(xt), "normalises over" if "norm" in name else "contracts")
    if name in ("matmul", "mm", "bmm", "addmm", "baddbmm"):
        a, b = (node.args[1], node.args[2]) if name in ("addmm", "baddbmm") else (node.args[0], node.args[1])
        ra, rb = (len(t.meta["val"].shape) for t in (a, b))
        hit = (ra - 1) in in_tokens.get(a, []) or (rb >= 2 and (rb - 2) in in_tokens.get(b, []))
        return "contracts a dimension that carries tokens (attention kvpass did not rewrite?)" if hit else ""
    if name == "einsum":
        inputs, result = node.args[0].replace(" ", "").split("->")
        for letters, t in zip(inputs.split(","), node.args[1], strict=True):
            if any(letters[i] not in result for i in in_tokens.get(t, [])):
                return "sums over a dimension that carries tokens (attention kvpass did not rewrite?)"
        return ""
    if name in ("index", "index_put"):  # x[..., idx, ...] (= y): fine if no index lands on a token dimension
        return _along(_indexed_dims(node.args[1]) & set(xt), "indexes")
    if name in _REDUCE_DIM:
        i = _REDUCE_DIM[name]
        if name in ("cat", "concat", "concatenate"):
            tensors = node.args[0]
            rank = len(tensors[0].meta["val"].shape)
            xt = sorted({d for t in tensors for d in in_tokens.get(t, [])})
        arg = node.args[i] if len(node.args) > i else node.kwargs.get("dim", _DEFAULT_DIM.get(name))
        if name == "slice" and _same_shape(node.meta.get("val"), x.meta["val"]):
            return ""  # the whole dimension
        if name in ("slice", "narrow", "select") and arg % max(rank, 1) in xt:
            return "takes part of the sequence (picks tokens by their place in the chunk)"
        return _along(set(_dims(arg, rank)) & set(xt), "reduces or rearranges")
    return "is an operation kvpass cannot show to keep tokens apart"


# where ``dim`` is optional: its default (None: every dimension)
_DEFAULT_DIM = {
    "cat": 0,
    "concat": 0,
    "concatenate": 0,
    "slice": 0,
    "split": 0,
    "split_with_sizes": 0,
    "chunk": 0,
    "unbind": 0,
    "topk": -1,
    "sort": -1,
}


def _indexed_dims(indices) -> set[int]:
    """The dimensions an advanced index reads: a boolean index spans as many as it has."""
    dims, d = set(), 0
    for ix in indices:
        val = ix.meta.get("val") if isinstance(ix, fx.Node) else None
        n = val.dim() if isinstance(val, torch.Tensor) and val.dtype == torch.bool else 1
        if ix is not None:
            dims |= set(range(d, d + n))
        d += n
    return dims


def _same_shape(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and len(a.shape) == len(b.shape)
        and all(str(x) == str(y) for x, y in zip(a.shape, b.shape, strict=True))
    )


def _along(dims: set, verb: str) -> str:
    return f"{verb} along a dimension that carries tokens" if dims else ""
