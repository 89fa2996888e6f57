from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Chunk, Policy


@dataclass
class TOVA(Policy):
    """Token Omission Via Attention: keep the tokens the newest query attends to most.

    score_j = sum over all query heads h of softmax(q_{t,h} k_h^T / sqrt(d))_j, for the newest
    query t only, recomputed at every step (no accumulation). As in the paper, the attention is
    averaged over the layer's heads and every head keeps the same tokens (so slot j holds the
    same token in every KV head, and the sum can be taken slot by slot).
    ``per_head=True`` scores each KV head by its own query heads instead (a kvpass variant).
    Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104.
    """

    name = "tova"
    obs = 1
    per_head: bool = False

    def score(self, chunk: Chunk) -> Tensor:
        return chunk.mass if self.per_head else self.across_heads(chunk.mass).expand_as(chunk.mass)
