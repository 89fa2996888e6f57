from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Chunk, Policy, accumulated


@dataclass
class H2O(Policy):
    """Heavy-Hitter Oracle: keep the tokens that have received the most attention, plus a recent window.

    score_j = sum over every query i that has seen token j, and over the query heads of the KV
    head, of softmax(q_i k^T / sqrt(d))_j. Scores accumulate across chunks and decode steps.
    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models", NeurIPS 2023, arXiv 2306.14048.
    """

    window: int = 32
    name = "h2o"

    def score(self, chunk: Chunk) -> Tensor:
        return accumulated(chunk)
