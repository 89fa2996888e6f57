from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Chunk, Policy, accumulated


@dataclass
class SnapKV(Policy):
    """SnapKV: score tokens by the attention of an observation window of the latest queries,
    smoothed by pooling over neighbouring positions; the window itself is kept.

    Prefill chunk: score_j = avgpool_k( sum over the last ``window`` queries of the chunk and the
    query heads of the KV head of softmax(q_i k^T / sqrt(d))_j ), pooled over positions
    (``kernel_size``), recomputed for every candidate. Decoding (one query per step; our reading,
    the paper compresses only the prompt): scores accumulate the new query's attention, as H2O.
    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469.
    """

    window: int = 64
    kernel_size: int = 5
    name = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"snapkv kernel_size must be a positive odd number, got {self.kernel_size}")

    @property
    def obs(self) -> int:  # type: ignore[override]
        return self.window

    def score(self, chunk: Chunk) -> Tensor:
        if chunk.keys.shape[2] == 1:
            return accumulated(chunk)
        return pool_by_position(chunk.mass, chunk.positions(), self.kernel_size)


def pool_by_position(x: Tensor, pos: Tensor, kernel_size: int, how: str = "mean") -> Tensor:
    """Average (``how="max"``: the maximum, for ``x >= 0``) of ``x [..., N]`` over each entry's
    ``kernel_size`` neighbours in position order (``pos [..., N]``; entries with ``pos < 0`` are
    empty: neither pooled nor counted)."""
    if how not in ("mean", "max"):
        raise ValueError(f"pool_by_position: how must be 'mean' or 'max', got {how!r}")
    if kernel_size <= 1:
        return x
    real = pos >= 0
    order = torch.where(real, pos, torch.iinfo(pos.dtype).max).argsort(dim=-1)
    w = real.gather(-1, order).to(x.dtype)
    xs = x.gather(-1, order) * w
    if how == "max":  # empty entries and the padding are 0, which no x >= 0 loses to
        r, N = kernel_size // 2, x.shape[-1]
        padded = F.pad(xs, (r, r))  # shifted slices, not max_pool1d: that fixes N when exported
        pooled = torch.stack([padded[..., i : i + N] for i in range(kernel_size)]).amax(dim=0)
        return torch.where(real, torch.empty_like(x).scatter_(-1, order, pooled), x)
    flat = torch.stack([xs, w], dim=-2).reshape(-1, 2, x.shape[-1])
    sums = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2).reshape(*x.shape[:-1], 2, x.shape[-1])
    pooled = sums[..., 0, :] / sums[..., 1, :].clamp_min(1e-12)
    return torch.empty_like(x).scatter_(-1, order, pooled)
