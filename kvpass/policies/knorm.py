from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Chunk, Policy


@dataclass
class KNorm(Policy):
    """Keep the tokens whose keys have the *smallest* L2 norm (they tend to draw the most attention).

    score_j = -||k_j||_2 (after RoPE), fixed when the token arrives.
    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
    EMNLP 2024, arXiv 2406.11430.
    Key norms differ in scale from one KV head to another, so the heads of a layer cannot share a
    pool by them (``share="head"`` only).
    """

    name = "knorm"
    shares_heads = False
    obs = 1

    def score(self, chunk: Chunk) -> Tensor:
        return torch.cat([chunk.old, -chunk.keys.float().norm(dim=-1)], dim=-1)
