"""Which implementation the dispatching entry points run: Triton kernels on CUDA, torch references elsewhere."""

from __future__ import annotations

import importlib.util

from torch import Tensor

BACKEND = "auto"  # "triton": the kernels for any tensors (CPU ones under TRITON_INTERPRET=1); "torch": the references


def use_triton(t: Tensor, values: Tensor | None = None) -> bool:
    """The Triton kernels run for ``t`` (a query) if ``BACKEND`` says so, or on CUDA when left on "auto",
    where Triton is installed, the head dim is a power of two >= 16 and ``values`` (if given) have
    the same head dim."""
    wanted = BACKEND == "triton" or (BACKEND == "auto" and t.is_cuda)
    D = t.shape[-1]
    same = values is None or values.shape[-1] == D
    return wanted and same and D >= 16 and D & (D - 1) == 0 and TRITON


TRITON = importlib.util.find_spec("triton") is not None  # looked up once: Dynamo does not trace find_spec
