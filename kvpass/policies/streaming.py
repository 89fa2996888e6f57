from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Chunk, Policy


@dataclass
class Streaming(Policy):
    """StreamingLLM: keep the first ``sink_tokens`` (attention sinks) and the most recent tokens.

    score_j = position_j, so the oldest non-sink token goes first.
    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024, arXiv 2309.17453.
    """

    sink_tokens: int = 4
    name = "streaming"
    obs = 1

    def score(self, chunk: Chunk) -> Tensor:
        return chunk.positions().float()
