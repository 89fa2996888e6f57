"""``kvpass export --format vllm``: a model directory that vLLM serves through kvpass's plugin.

The directory is the model's Hugging Face checkpoint (and tokenizer, if given) with a config that
names ``KvpassForCausalLM`` and carries what to rebuild the transformed model from:
``kvpass = {"architecture", "policy", "budget", "chunk", "knobs"}``. The directory stands alone: an
allocation (``kvpass calibrate`` file) is stored as its per-layer multiples at this budget, and a
gate checkpoint (``kvpass train-gates``) is copied in as ``kvpass/gates.safetensors`` (a folder of
its own: vLLM loads the top folder's weights as the model's). vLLM needs nothing
of kvpass's but the plugin (``pip install "kvpass[vllm]"``) to load it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

ARCH = "KvpassForCausalLM"
GATES = "kvpass/gates.safetensors"  # a gate checkpoint, inside the directory (not beside the model's weights)


def write(model: nn.Module, out, policy: str, budget: int, chunk: int = 512, knobs: dict | None = None,
          tokenizer=None) -> Path:  # fmt: skip
    """Write ``model`` (an unmodified Hugging Face causal LM) to ``out`` for vLLM, served at
    ``budget`` slots per layer and KV head with ``policy``. Checks first that the transform and
    its fixed-shape step can be built (a fractional budget or an unknown policy fails here)."""
    import kvpass
    from kvpass import policies
    from kvpass.runtime import allocation
    from kvpass.runtime.step import export_capacity

    policy, knobs = policies.merge(policy, dict(knobs or {}))  # "gate:checkpoint=..." -> name and knobs
    knobs = allocation.read(knobs, budget)  # a `kvpass calibrate` file: its multiples here
    if knobs.get("allocation") is not None:
        knobs["allocation"] = list(knobs["allocation"])
    small = kvpass.transform(model, policy, budget, chunk=chunk, evict_during_decode=True, **knobs)
    export_capacity(small, None)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    out = Path(out)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if knobs.get("checkpoint"):
        (out / GATES).parent.mkdir(exist_ok=True)
        shutil.copyfile(knobs["checkpoint"], out / GATES)
        knobs["checkpoint"] = GATES
    path = out / "config.json"
    config = json.loads(path.read_text())
    config["kvpass"] = {"architecture": arch, "policy": policy, "budget": budget, "chunk": chunk, "knobs": knobs}
    config["architectures"] = [ARCH]
    path.write_text(json.dumps(config, indent=2))
    return out
