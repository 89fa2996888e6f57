from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Chunk, Policy


@dataclass
class Random(Policy):
    """Evict uniformly at random (a floor for every other policy). score_j ~ U(0, 1), drawn once per token,
    from a generator seeded with ``seed`` so runs repeat."""

    seed: int = 0
    name = "random"
    obs = 1
    _generators: dict = field(default_factory=dict, repr=False, compare=False)

    def score(self, chunk: Chunk) -> Tensor:
        device = chunk.keys.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        new = torch.rand(chunk.keys.shape[:3], generator=self._generators[device], device=device)
        return torch.cat([chunk.old, new], dim=-1)
