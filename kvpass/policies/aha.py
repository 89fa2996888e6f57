from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Chunk, Policy, accumulated


@dataclass
class AhaKV(Policy):
    """AhaKV: accumulated attention without its positional bias, refined by value norms.

    H2O's score sum_i a_ij favours early tokens: token j is summed over the n - j queries after it.
    AhaKV's corrections, each a knob (off = the plain part):

    - recent accumulation (``recent = r``): score_j = sum over the last r queries of a_ij, so every
      token is scored by the same queries. A prefill chunk of T >= r tokens rescores every candidate
      with its last r queries; a shorter chunk, and each decoded token, slides the window: the stored
      scores decay by (1 - T / r) before the new mass is added (an exponential window -- our
      reading: it needs no per-query history). ``recent=0``: the sum over every query (H2O).
    - adaptive scale (``k``): for scoring only, a query that sees n keys uses the softmax scale
      lambda = sqrt(2 ln(n / k) / d) in place of 1/sqrt(d), holding the scoring distribution's
      expected entropy near ln k at any context length; never flatter than the model's own scale.
      ``k=0``: the model's scale.
    - value refinement (``value_norms``): a_ij is weighted by gamma_j = ||v_j||^2 / max_m ||v_m||^2;
      the max is common to a head's tokens at a step and is left out (it does not change the rank).

    From the paper: the bias analysis, recent accumulation over the last r rows, an entropy-driven
    softmax scale, and value-norm refinement. Our reading (its constants could not be confirmed
    from its text): the scale's exact form and clamp, the exponential window while decoding, and
    the defaults r = 32, k = 32. Gu et al., "AhaKV: Adaptive Holistic Attention-Driven KV Cache
    Eviction for Efficient Inference of Large Language Models", arXiv 2506.03762.
    """

    recent: int = 32
    k: int = 32
    value_norms: bool = True
    name = "aha"

    def __post_init__(self) -> None:
        super().__post_init__()
        for knob in ("recent", "k"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"aha: {knob} must be a non-negative int, got {value!r}")

    @property
    def obs(self) -> int:  # type: ignore[override]
        return self.recent or 1 << 30

    @property
    def mass_entropy_k(self) -> int:  # type: ignore[override]
        return self.k

    @property
    def mass_by_value(self) -> bool:  # type: ignore[override]
        return self.value_norms

    def score(self, chunk: Chunk) -> Tensor:
        if not self.recent:
            return accumulated(chunk)
        T, C = chunk.keys.shape[2], chunk.old.shape[-1]
        keep = torch.sym_max(0.0, 1.0 - T / self.recent)  # how much of the window the older queries still fill
        return torch.cat([chunk.old * keep + chunk.mass[..., :C], chunk.mass[..., C:]], dim=-1)
