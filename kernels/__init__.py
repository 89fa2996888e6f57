"""kvpass kernels: attention and scoring over the evicting cache (torch references; Triton on CUDA later)."""

from .attend import attend, visible

__all__ = ["attend", "visible"]
