from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Chunk, Policy


@dataclass
class Full(Policy):
    """No eviction: the cache grows with the sequence. The reference every other policy is measured against."""

    name = "full"
    obs = 1
    evicts = False

    def score(self, chunk: Chunk) -> Tensor:
        return torch.zeros_like(chunk.mass)
