"""Optional dependencies. The core install is what ``transform`` + ``generate`` need; the rest
comes with extras, and a missing one is an error that names the install which fixes it."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = {  # module -> the extra that installs it (pyproject.toml)
    "gguf": "default-model",
    "accelerate": "default-model",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "matplotlib": "eval",
}


def need(module: str, purpose: str) -> ModuleType:
    """``module``, imported; else an ImportError saying that ``purpose`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRA[module.split(".")[0]]
        raise ImportError(f'{purpose} needs {module}, which comes with: pip install "kvpass[{extra}]"') from e
