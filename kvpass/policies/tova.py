from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Chunk, Policy


@dataclass
class TOVA(Policy):
    """Token Omission Via Attention: keep the tokens the newest query attends to most.

    score_j = sum over the query heads of the KV head of softmax(q_t k^T / sqrt(d))_j, for the
    newest query t only, recomputed at every step (no accumulation).
    Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104.
    """

    name = "tova"
    obs = 1

    def score(self, chunk: Chunk) -> Tensor:
        return chunk.mass
