"""``kvpass.export_tensorrt``: a transformed model's step compiled by TensorRT (through torch-tensorrt).

The same step as the ONNX export (:class:`kvpass.runtime.step.PureStep`: the evicting cache as budget-sized
inputs and outputs, eviction in standard operators, so no TensorRT plugin is needed), exported
for one token and for a chunk of 2 to ``chunk`` tokens and compiled by ``torch_tensorrt.dynamo``
into two TensorRT-backed ``ExportedProgram`` files.

Versions that go together (torch-tensorrt pins its torch): torch-tensorrt 2.14 - torch 2.14 -
TensorRT 11.1 - CUDA 13; torch-tensorrt 2.12 - torch 2.12 - TensorRT 10.16 - CUDA 13.0.
Install with ``pip install "kvpass[tensorrt]"`` on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from kvpass.runtime.step import Layout, PureStep


def missing() -> list[str]:
    """What this machine lacks for a TensorRT export (empty: nothing)."""
    lacks = []
    if not torch.cuda.is_available():
        lacks.append("a CUDA GPU (torch.cuda.is_available() is False)")
    for module, package in (("torch_tensorrt", "torch-tensorrt"), ("tensorrt", "tensorrt")):
        if importlib.util.find_spec(module) is None:
            lacks.append(f"the {package} package (pip install 'kvpass[tensorrt]')")
    return lacks


def input_shapes(layout: Layout, T: tuple[int, int, int], batch: tuple[int, int, int]) -> list[tuple]:
    """``(min, opt, max)`` shapes of the step's inputs -- ``input_ids``, ``positions``, then the tables
    in ``layout.names()`` order -- for chunk lengths ``T`` and batch sizes ``batch`` (each min, opt, max)."""
    shapes = [tuple((b, t) for b, t in zip(batch, T, strict=True))] * 2
    for g, (layers, d, dv) in enumerate(zip(layout.groups, layout.head_dim, layout.value_dim, strict=True)):
        table = tuple((len(layers), b, *layout.storage(g)) for b in batch)
        shapes += [tuple((*s, d) for s in table), tuple((*s, dv) for s in table)] + [table] * 4
    return shapes


def export_tensorrt(
    model: nn.Module, path: str | Path, *, capacity: int | None = None, max_batch: int = 8
) -> tuple[Path, Path]:
    """Compile the transformed ``model``'s step with TensorRT; write ``path/decode.ep`` and
    ``path/prefill.ep`` (load with ``torch.export.load``) and return their paths. ``capacity``:
    as in :func:`kvpass.export_onnx`. Raises ``RuntimeError`` naming what is missing on a machine
    without CUDA or TensorRT."""
    step = PureStep(model, capacity)  # bad arguments fail before the machine is checked
    lacks = missing()
    if lacks:
        raise RuntimeError("the TensorRT export needs " + " and ".join(lacks))
    import torch_tensorrt

    param = next(model.parameters())
    if param.device.type != "cuda":
        raise ValueError("move the model to a CUDA device before a TensorRT export (model.cuda())")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtypes = [torch.long, torch.long] + [t.dtype for t in step.layout.empty(1, param.dtype, "meta")]
    batch = (1, 1, max_batch)
    written = []
    for name, T in (("decode", (1, 1, 1)), ("prefill", (2, step.chunk, step.chunk))):
        if name == "prefill" and step.chunk == 1:
            continue
        specs = [
            torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=dtype)
            for (lo, opt, hi), dtype in zip(input_shapes(step.layout, T, batch), dtypes, strict=True)
        ]
        compiled = torch_tensorrt.compile(step, ir="dynamo", inputs=specs, enabled_precisions={param.dtype})
        example = [torch.zeros(spec[1], dtype=dtype, device=param.device) for spec, dtype in
                   zip(input_shapes(step.layout, T, batch), dtypes, strict=True)]  # fmt: skip
        target = path / f"{name}.ep"
        torch_tensorrt.save(compiled, str(target), output_format="exported_program", inputs=example)
        written.append(target)
    return tuple(written)
