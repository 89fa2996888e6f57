"""Compiling a transformed model: the whole step, eviction included, with the ``"kvpass"`` backend.

    model = kvpass.transform(model, policy="tova", budget=512)
    model.compile()                          # in place: generate() runs compiled steps
    model.compile(mode="reduce-overhead")    # and replays each decode step as a CUDA graph
    # or: compiled = torch.compile(model, backend="kvpass")  (compiled(...) runs compiled steps)

``model.compile`` captures the step (:class:`kvpass.runtime.step.Step`: attention, scoring, eviction,
admission, the LM head) with ``fullgraph=True``: no graph breaks. A decode step has static shapes
-- the cache's tables at capacity, updated in place -- so it is compiled once for a whole
generation (and again only when the tables change shape: another batch size or budget). Prefill
chunks have their own entry point, whose length becomes dynamic after the first recompilation.
The runtime around the steps (chunking, positions, counting tokens) stays in Python.

On each graph it is given, the backend runs the kvpass passes that apply to a dynamo graph: it
drops no-op nodes, and refuses a graph that still holds attention kvpass has not rewritten (an
untransformed model -- compiling that would keep its full cache, silently). ``options`` are
Inductor's (``torch._inductor.config`` patches), as for ``backend="inductor"``.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

from kvpass.passes import drop_noops

_ATTENTION = {
    torch.ops.aten.scaled_dot_product_attention.default,
    torch._C._nn.scaled_dot_product_attention,
    F.scaled_dot_product_attention,
}
_TRANSFORM_OPTIONS = {"policy", "budget", "chunk", "evict_during_decode"}


def kvpass_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None):
    """``torch.compile(..., backend="kvpass")``."""
    options = dict(options or {})
    if misplaced := _TRANSFORM_OPTIONS & options.keys():
        raise ValueError(
            f"{sorted(misplaced)} are kvpass.transform's arguments, not compile options: "
            "model = kvpass.transform(model, policy=..., budget=...); model.compile(backend='kvpass')"
        )
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ATTENTION and not _ours(n)]
    if left:
        raise ValueError(
            f"the graph torch.compile gave the kvpass backend still has {len(left)} attention call(s) kvpass has not "
            "rewritten, so it would run with a full KV cache. Transform the model first: "
            "model = kvpass.transform(model, policy=..., budget=...); model.compile(backend='kvpass')"
        )
    drop_noops(gm)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=options or None)


@dataclass
class CompiledStep:
    """A step's two entry points, compiled. ``graphs``: decode steps replay as CUDA graphs."""

    decode_fn: object
    prefill: object
    graphs: bool

    def decode(self, *args, **kwargs):
        if self.graphs:  # a new iteration: the previous step's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return self.decode_fn(*args, **kwargs)


def compile_step(step, mode: str | None = None, options: dict | None = None) -> CompiledStep:
    """Compile ``step``'s entry points with the kvpass backend, ``fullgraph=True``: decoding with
    static shapes (and ``mode``'s settings, e.g. ``"reduce-overhead"``: CUDA graphs), prefill
    without CUDA graphs and with a dynamic length."""
    from torch._inductor import list_mode_options

    # Without Inductor's locality reordering, the last layers' reads of the tables stay before the
    # admission that writes them, so the write is done in place (with it, a table is copied per step)
    decode_options = {"reorder_for_locality": False, **(list_mode_options(mode) if mode else {}), **(options or {})}
    prefill_options = {k: v for k, v in decode_options.items() if k != "triton.cudagraphs"}
    return CompiledStep(
        decode_fn=torch.compile(
            step.decode,
            backend=functools.partial(kvpass_backend, options=decode_options),
            fullgraph=True,
            dynamic=False,
        ),
        prefill=torch.compile(
            step.prefill, backend=functools.partial(kvpass_backend, options=prefill_options), fullgraph=True
        ),
        graphs=bool(decode_options.get("triton.cudagraphs")),
    )


def _ours(node: fx.Node) -> bool:
    """An attention call made by kvpass's kernels (they attend over the slots with SDPA)."""
    # the kernels' folder: a module's, not the package's (from a clone its __init__ lies elsewhere: kvpass/kernels)
    folder = Path(importlib.import_module("kvpass.kernels.attend").__file__).resolve().parent
    frames = re.findall(r'File "([^"]+)"', node.meta.get("stack_trace") or "")
    return bool(frames) and Path(frames[-1]).resolve().parent == folder


def register() -> None:
    """Make ``backend="kvpass"`` known to ``torch.compile`` on ``import kvpass``.

    The package also declares it as a ``torch_dynamo_backends`` entry point, which works without
    the import; when dynamo has found that entry point, it registers the backend itself.
    """
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "kvpass" not in _COMPILER_FNS and _BACKENDS.get("kvpass") is None:
        register_backend(kvpass_backend, name="kvpass")
