from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Chunk, Policy, accumulated


@dataclass
class Observed(Policy):
    """Observed attention: keep the tokens with the highest *mean* attention from the queries that saw them.

    score_j = (1 / n_j) * sum over the queries i that saw token j, and over the query heads of the
    KV head, of softmax(q_i k^T / sqrt(d))_j, where n_j = t - pos_j + 1 counts the queries since
    token j arrived (every one of them saw it while it was kept; t is the newest position). H2O's
    raw sum favours early tokens, which more queries have seen; the mean does not. This is the
    score of kvpress's ObservedAttentionPress (there computed once over the whole prompt), after
    H2O: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", NeurIPS 2023, arXiv 2306.14048.
    """

    name = "observed"

    def score(self, chunk: Chunk) -> Tensor:
        return accumulated(chunk)  # the sum is what accumulates; ``rank`` divides by the count

    def rank(self, score: Tensor, pos: Tensor, newest: Tensor) -> Tensor:
        return score / (newest.view(-1, 1, 1) - pos + 1).clamp_min(1)
