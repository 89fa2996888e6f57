"""What every eviction policy shares: the budget, the keep rule, and the scoring interface."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class Chunk:
    """What a policy may score with, for one layer and one step.

    ``old``: the slots' stored scores ``[B, Hkv, C]``; ``keys``, ``values``: the new tokens
    ``[B, Hkv, T, D]`` (after RoPE); ``pos``: their true positions ``[B, T]`` (-1 = padding);
    ``mass``: attention probability each key (slots, then the chunk) received from the chunk's
    last ``policy.obs`` queries, summed over the query heads of its KV head ``[B, Hkv, C + T]``;
    ``slot_pos``: the slots' positions ``[B, Hkv, C]``; ``gate``: the chunk's keep probabilities
    ``[B, Hkv, T]`` (gated policies only).
    """

    old: Tensor
    keys: Tensor
    values: Tensor
    pos: Tensor
    mass: Tensor
    slot_pos: Tensor
    gate: Tensor | None = None


@dataclass
class Policy:
    """An eviction policy. Subclasses set ``name`` and implement :meth:`score`.

    ``budget``: slots per layer and KV head (int), or a fraction of the prompt length (float in
    (0, 1]). ``sink_tokens``: the first positions, never evicted. ``window``: the most recent
    positions, never evicted.
    """

    budget: int | float = 512
    sink_tokens: int = 0
    window: int = 0

    name: ClassVar[str] = ""
    obs: ClassVar[int] = 1 << 30  # how many of a chunk's last queries feed ``mass``
    evicts: ClassVar[bool] = True
    mass_entropy_k: ClassVar[int] = 0  # > 0: ``mass`` at AhaKV's adaptive softmax scale (kvpass::attend)
    mass_by_value: ClassVar[bool] = False  # ``mass`` weighted by each key's squared value norm
    gated: ClassVar[bool] = False  # computes keep probabilities before attention (``keep_prob``)

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget must be an int (slots) or a float in (0, 1] (fraction of the prompt), got {b!r}")
        if isinstance(b, float) and not 0.0 < b <= 1.0:
            raise ValueError(f"a float budget is a fraction of the prompt and must be in (0, 1], got {b}")
        if isinstance(b, int) and b <= 0:
            raise ValueError(f"budget must be a positive number of slots, got {b}")
        for knob in ("sink_tokens", "window"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{knob} must be a non-negative int, got {value!r}")
        if isinstance(b, int) and self.evicts:
            self.check_fits(b)

    def check_fits(self, slots: int) -> None:
        """The keep rule must leave room to choose: protected positions must be fewer than the slots."""
        if self.sink_tokens + self.window >= slots:
            raise ValueError(
                f"policy {self.name!r}: sink_tokens ({self.sink_tokens}) + window ({self.window}) must be smaller "
                f"than the budget ({slots} slots); lower them or raise the budget"
            )

    def capacity(self, prompt_len: int) -> int:
        """Slots per layer and KV head for a sequence whose first input has ``prompt_len`` tokens."""
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * prompt_len))
        return self.budget

    def bind(self, model, sites) -> None:
        """Called by ``transform`` with the model and its attention sites (a learned policy loads here)."""

    def keep_prob(self, layer: int | tuple[int, ...], q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        """A gated policy's keep probabilities ``[B, Hkv, T]`` for the chunk, before the layer attends:
        ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``; ``attend(a)`` runs queries ``a [B, Hkv, T, D]`` over
        what the layer can see (kept slots, then the chunk causally) and returns their output. A tuple
        of layers: the rows are those layers' batches, one after the other (decode, all layers at once)."""
        raise NotImplementedError

    def drops(self, score: Tensor) -> Tensor | None:
        """Which new tokens leave at once, whatever room is left (in-context eviction); None: none."""
        return None

    def score(self, chunk: Chunk) -> Tensor:
        """Scores ``[B, Hkv, C + T]`` (slots, then the chunk); the lowest are evicted first."""
        raise NotImplementedError

    def rank(self, score: Tensor, pos: Tensor, newest: Tensor) -> Tensor:
        """What candidates are ranked by, from their stored ``score`` and positions ``pos [B, Hkv, N]``
        (``newest [B]``: the newest position); the score itself unless a policy says otherwise."""
        return score

    def protected(self, pos: Tensor, newest: Tensor) -> Tensor:
        """Which positions the keep rule protects: sinks and the recent window. ``newest``: ``[B]``."""
        keep = pos < self.sink_tokens
        if self.window:
            keep = keep | (pos > newest.view(-1, *[1] * (pos.dim() - 1)) - self.window)
        return keep & (pos >= 0)


def accumulated(chunk: Chunk) -> Tensor:
    """The slots' stored scores plus the attention mass they just received, then the chunk's own mass."""
    C = chunk.old.shape[-1]
    return torch.cat([chunk.old + chunk.mass[..., :C], chunk.mass[..., C:]], dim=-1)
