"""``kvpass.export_onnx``: a transformed model as one ONNX model that plain onnxruntime runs.

The model is the step of :mod:`kvpass.runtime.step` (as :class:`~kvpass.runtime.step.PureStep`) --
``(input_ids, positions, *tables) -> (logits, *new tables)`` -- with the evicting cache as
budget-sized inputs and outputs, eviction included, in standard ONNX operators (``torch.export``
decomposes the step, ``torch.onnx`` translates it; no custom operator). Policies score a decoded
token and a prefill chunk differently, so the step is exported twice, for one token and for a chunk
of any length from 2 to ``chunk + 1``, and the two graphs become the branches of one ``If`` on the
input's length (the planner's rule, :func:`kvpass.runtime.plan.mode_of`): one file, each weight
stored once. Batch size is dynamic. The ``kvpass`` metadata entry describes the tables (a hybrid's
recurrent state among them: fixed-size inputs and outputs like the KV)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from kvpass.runtime.recurrent import StateSpec
from kvpass.runtime.step import Layout, PureStep

FORMAT = 3  # the metadata's version: 2 added the owner table and "pooled"; 3 a hybrid's recurrent "states"


def export_onnx(model: nn.Module, path: str | Path, *, capacity: int | None = None, check: bool = True) -> Path:
    """Write the transformed ``model`` (from :func:`kvpass.transform`) to ``path`` (+ ``path.data``,
    its weights). ``capacity``: slots per layer and KV head -- default the policy's budget when it is
    a number of slots; needed when the budget is a fraction (an engine's shapes are fixed).
    ``check``: run ``onnx.checker`` on the result. Returns ``path``."""
    from kvpass.extras import need

    onnx = need("onnx", "ONNX export")
    need("onnxscript", "ONNX export")  # torch.onnx's exporter

    path = Path(path)
    step = PureStep(model, capacity)
    policy, chunk = step.policy, step.chunk
    param = next(model.parameters())
    graphs = {"decode": _to_onnx(step, 1, param, 1)}
    if chunk > 1:
        graphs["prefill"] = _to_onnx(step, min(chunk, 16), param, chunk)
    proto = _branch_on_length(graphs["decode"], graphs.get("prefill"))
    meta = {
        "format": FORMAT,
        "policy": policy.name,
        "chunk": chunk,
        "groups": [list(g) for g in step.layout.groups],
        "kv_heads": list(step.layout.kv_heads),
        "head_dim": list(step.layout.head_dim),
        "value_dim": list(step.layout.value_dim),
        "capacity": list(step.layout.capacity),
        "pooled": list(step.layout.pooled),
        "states": [
            [list(mixers), [[sp.kind, sp.index, list(sp.shape), _dtype(sp.dtype)] for sp in specs]]
            for mixers, specs in step.layout.states
        ],
        "dtype": str(param.dtype).removeprefix("torch."),
        "evicts": policy.evicts,
    }
    proto.metadata_props.add(key="kvpass", value=json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return path


def layout_of(meta: dict) -> Layout:
    """The table layout an exported model's ``kvpass`` metadata describes."""
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"this model was exported by another version of kvpass (format {meta.get('format')!r}, this one reads "
            f"{FORMAT}): export it again"
        )
    groups = tuple(tuple(g) for g in meta["groups"])
    states = tuple(
        (
            tuple(mixers),
            tuple(StateSpec(k, i, tuple(shape), dtype and getattr(torch, dtype)) for k, i, shape, dtype in specs),
        )
        for mixers, specs in meta["states"]
    )
    sizes = (tuple(meta[k]) for k in ("capacity", "kv_heads", "head_dim", "value_dim", "pooled"))
    return Layout(groups, *sizes, states)


def _dtype(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _to_onnx(step: PureStep, T: int, param: torch.Tensor, chunk: int):
    """The step as an ONNX ModelProto, traced with ``T`` tokens: for exactly one token (``T = 1``),
    else for any length from 2 to ``chunk + 1``."""
    B = 2
    tables = step.layout.empty(B, dtype=param.dtype, device=param.device)
    ids = torch.zeros(B, T, dtype=torch.long, device=param.device)
    pos = torch.arange(T, device=param.device).expand(B, T).contiguous()
    D = torch.export.Dim.DYNAMIC
    tokens = {0: D} if T == 1 else {0: D, 1: D}
    dims = (tokens, tokens, tuple({1: D} for _ in tables))  # tables: [L, batch, ...]
    with torch.no_grad():
        program = torch.export.export(step, (ids, pos, *tables), dynamic_shapes=dims, strict=False)
    _check_guards(program, step.layout, chunk)
    _check_real(program)
    names = ["input_ids", "positions", *step.layout.names()]
    onnx_program = torch.onnx.export(
        program, input_names=names, output_names=["logits", *step.layout.names("new.")], dynamo=True, verbose=False
    )
    return onnx_program.model_proto


def _check_real(program) -> None:
    """Refuse a graph that computes with complex numbers: torch's ONNX exporter has no complex
    tensors (it fails deep inside with an unhelpful message)."""
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_complex():
            where = (node.meta.get("nn_module_stack") or {}).values()
            module = str(list(where)[-1][0]) if where else "the model"
            raise ValueError(
                f"the model computes with complex numbers (node {node.name!r}, in {module}; e.g. Llama 4's rotary "
                "embedding), which torch's ONNX exporter does not support: run it eager or with torch.compile"
            )


def _check_guards(program, layout: Layout, chunk: int) -> None:
    """Refuse a graph that is right only for some chunk lengths or batch sizes.

    ``torch.export`` turns a Python branch on a dynamic size (``if T < 32``) into a *guard*: the
    graph holds only where the guard does. ONNX has no guards, so an engine would silently compute
    the wrong branch elsewhere. Every guard is evaluated here for the lengths and batch sizes an
    engine feeds."""
    guards = getattr(program, "_guards_code", None) or []  # private in torch 2.11-2.14: checked where present
    compiled = [(g, compile(g, "<guard>", "eval")) for g in guards]
    n = len(layout.names())
    for batch in (1, 2, 3):
        for T in range(1 if chunk == 1 else 2, chunk + 2):  # (a lone first token joins a chunk)
            L = {
                "input_ids": _Shape((batch, T)),
                "positions": _Shape((batch, T)),
                "tables": [_Shape((1, batch)) for _ in range(n)],
            }
            for guard, code in compiled:
                if not eval(code, {"L": L, "min": min, "max": max}):  # torch's own guard text
                    raise ValueError(
                        f"the exported step is valid only where `{guard}` holds, not for batch {batch} and "
                        f"chunk length {T}: the model or policy branches on a size; kvpass does not export a "
                        "graph that would be silently wrong for other lengths (a recurrent layer's scan branches on "
                        "whether a chunk fills its own chunks: an engine whose chunk is below the scan's holds)"
                    )


class _Shape:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def size(self):
        return self.shape


def _branch_on_length(decode, prefill):
    """One model running ``decode`` when the input holds one token per row, else ``prefill``:
    an ``If`` whose branches are the two graphs. Tensors the two graphs hold alike (the weights,
    also those the exporter folded into new constants, e.g. transposed) move to the outer graph
    under one name each, so the file and the session hold them once."""
    if prefill is None:
        return decode
    from onnx import TensorProto, helper

    inputs = {i.name for i in prefill.graph.input}
    in_decode = {_digest(t): t.name for t in decode.graph.initializer}
    outer, renames = [], ({}, {})  # per branch: its name -> the outer name
    for t in prefill.graph.initializer:
        other = in_decode.get(_digest(t))
        if other is not None:
            name = t.name if t.name == other else f"shared.{len(outer)}.{t.name}"
            renames[1][t.name], renames[0][other] = name, name
            outer.append(TensorProto())
            outer[-1].CopyFrom(t)
            outer[-1].name = name
    one = helper.make_tensor("kvpass.one", TensorProto.INT64, [], [1])
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["kvpass.length"], start=1, end=2),
        helper.make_node("Equal", ["kvpass.length", "kvpass.one"], ["kvpass.is_one"]),
        helper.make_node("Squeeze", ["kvpass.is_one"], ["kvpass.decoding"]),
        helper.make_node(
            "If",
            ["kvpass.decoding"],
            [o.name for o in prefill.graph.output],
            then_branch=_as_branch(decode.graph, "decode/", inputs, renames[0]),
            else_branch=_as_branch(prefill.graph, "prefill/", inputs, renames[1]),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "kvpass_step",
        inputs=list(prefill.graph.input),
        outputs=list(prefill.graph.output),
        initializer=[*outer, one],
    )
    return helper.make_model(graph, opset_imports=list(prefill.opset_import), ir_version=prefill.ir_version)


def _digest(t) -> bytes:
    """What a tensor holds, whatever its name."""
    import hashlib

    h = hashlib.blake2b(f"{t.data_type}:{list(t.dims)}:".encode())
    if t.raw_data:
        h.update(t.raw_data)
    else:
        from onnx import TensorProto

        c = TensorProto()
        c.CopyFrom(t)
        c.name = ""
        h.update(c.SerializeToString())
    return h.digest()


def _as_branch(graph, prefix: str, inputs: set[str], shared: dict[str, str]):
    """``graph`` as a subgraph: no inputs of its own (it reads the outer ``inputs`` and the
    ``shared`` tensors, renamed, from the outer scope); every other name prefixed so that the two
    branches and the outer graph never share one."""
    import onnx

    def rename(name: str) -> str:
        if not name or name in inputs:
            return name
        return shared.get(name) or prefix + name

    g = onnx.GraphProto()
    g.CopyFrom(graph)
    g.name = prefix.strip("/")
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"unexpected subgraph in exported node {node.name} ({node.op_type})")
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
        node.name = prefix + node.name
    own = [t for t in g.initializer if t.name not in shared]
    del g.initializer[:]
    for t in own:
        t.name = rename(t.name)
    g.initializer.extend(own)
    del g.input[:]
    for info in (*g.output, *g.value_info):
        info.name = rename(info.name)
    return g
