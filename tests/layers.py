"""Driving :mod:`kvpass.runtime.step`'s layer functions directly, as a model's step does, for tests that
work out which slots survive (brute force, or by hand)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvpass.runtime import step
from kvpass.runtime.step import Slots


class Layers:
    """Slot tables for ``layers`` layers of one group, ``[L, B, Hkv, C, ...]`` (``pooled``: one pool
    per layer, ``[L, B, 1, Hkv * C, ...]``), fed chunks or decoded tokens."""

    def __init__(
        self, policy, batch: int, kv_heads: int, head_dim: int, capacity: int, layers: int = 1, pooled=False
    ) -> None:
        self.policy = policy
        heads, slots = (1, kv_heads * capacity) if pooled else (kv_heads, capacity)
        self.group = Slots.empty((layers, batch, heads), slots, head_dim)

    def slots(self, layer: int = 0) -> Slots:
        return self.group.layer(layer)

    def __call__(self, q, k, v, pos, scale, window=0, *, layer=0, keep=None, admit=True, probe=0) -> Tensor:
        """One layer's step: a prefill chunk when ``T > 1`` or ``keep`` is given (it keeps ``keep``
        slots, default all; its last ``probe`` tokens are the policy's probe), else a decoded token,
        admitted at once unless ``admit=False`` (then :meth:`admit` takes it later, with others).
        Returns the attention output."""
        if k.shape[2] > 1 or keep is not None:
            s = self.slots(layer)
            return step.prefill(self.policy, layer, q, k, v, pos, s, scale, window, keep=keep, probe=probe)
        out, mass = step.decode(self.policy, q, k, v, pos, self.slots(layer), scale, window)
        self.pending = {**getattr(self, "pending", {}), layer: (q, k, v, pos, mass)}
        if admit:
            self.admit([layer], scale, window)
        return out

    def admit(self, layers, scale, window=0) -> None:
        """Admit the pending tokens of ``layers`` (consecutive) in one batch, as a step does."""
        lo, hi = layers[0], layers[-1] + 1
        q, k, v, pos, mass = (torch.cat(t) for t in zip(*(self.pending.pop(i) for i in layers), strict=True))
        group = Slots(*(t[lo:hi] for t in self.group))
        step.admit(
            self.policy, tuple(layers) if len(layers) > 1 else layers[0], group, q, k, v, pos, mass, scale, window
        )


def kept_positions(s: Slots, kv_heads: int | None = None) -> dict[tuple[int, int], list[int]]:
    """Per (row, KV head), the positions it holds (of a pool shared by ``kv_heads``: those it owns)."""
    s = step.per_head(s, kv_heads or s.pos.shape[1])
    B, Hkv = s.pos.shape[:2]
    return {(b, h): sorted(s.pos[b, h][s.valid[b, h]].tolist()) for b in range(B) for h in range(Hkv)}
