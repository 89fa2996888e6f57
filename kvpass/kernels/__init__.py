"""kvpass kernels: attention and scoring over the evicting cache (torch references; Triton on CUDA).

The package ``kvpass.kernels`` is its modules, kept in the repository's top-level ``kernels/`` folder
(``[tool.setuptools.package-dir]``), and this file, its ``__init__``, kept here: that folder has no
``__init__.py`` on purpose. Where the repository root is on ``sys.path`` (pytest, ``python -m`` from a
clone) the folder is then only a namespace portion, which any installed ``kernels`` (Hugging Face's,
a dependency of transformers >= 5.25) beats in Python's import resolution; a regular package there
would hide it and break ``import transformers``. The wheel ships this file as package data beside the
modules (one regular package, ``kvpass/kernels/``); an editable install finds it on ``kvpass``'s path
and the modules through setuptools' mapping.
"""

from .attend import attend, attend_attention, attend_reference, visible
from .decode import decode, decode_attention, decode_reference
from .eager_sdpa import eager_sdpa

__all__ = [
    "attend",
    "attend_attention",
    "attend_reference",
    "decode",
    "decode_attention",
    "decode_reference",
    "eager_sdpa",
    "visible",
]
