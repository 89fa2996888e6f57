"""The ``torch.compile`` backend ``"kvpass"``: compile a transformed model's step graphs with Inductor.

    model = kvpass.transform(model, policy="tova", budget=512)
    model.compile(backend="kvpass")          # in place: generate() runs compiled steps
    # or: compiled = torch.compile(model, backend="kvpass")  (compiled(...) runs compiled steps)

Dynamo never sees the runtime around the steps (chunking, positions, the cache's bookkeeping):
that frame runs eagerly and only the step graph and the LM head are captured. In the step graph,
each attention site is one opaque ``kvpass::cache_attend`` node with a fixed output shape, so the
graph needs no guards on the cache: a decode step is compiled once, and prompt lengths become a
dynamic dimension after the first recompilation, whatever the number of tokens generated.

On each graph it is given, the backend runs the kvpass passes that apply to a dynamo graph: it
drops no-op nodes, and refuses a graph that still holds attention kvpass has not rewritten (an
untransformed model -- compiling that would keep its full cache, silently). ``options`` are
Inductor's (``torch._inductor.config`` patches), as for ``backend="inductor"``.
"""

from __future__ import annotations

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
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ATTENTION]
    if left:
        raise ValueError(
            f"the graph torch.compile gave the kvpass backend still has {len(left)} attention call(s) kvpass has not "
            "rewritten, so it would run with a full KV cache. Transform the model first: "
            "model = kvpass.transform(model, policy=..., budget=...); model.compile(backend='kvpass')"
        )
    drop_noops(gm)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=options or None)


def register() -> None:
    """Make ``backend="kvpass"`` known to ``torch.compile`` on ``import kvpass``.

    The package also declares it as a ``torch_dynamo_backends`` entry point, which works without
    the import; when dynamo has found that entry point, it registers the backend itself.
    """
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "kvpass" not in _COMPILER_FNS and _BACKENDS.get("kvpass") is None:
        register_backend(kvpass_backend, name="kvpass")
