"""A rewritten attention site: the module the rewrite pass puts where the model attended.

It holds what the site's attention needs (layer, scale, sliding window or attention chunk,
soft-cap, ALiBi slopes) and hands the rest to the step it runs in
(:class:`kvpass.runtime.step.Exchange`), which gives it its layer's cache tables. Nothing here is
opaque to ``torch.compile``: a compiled step traces through it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kvpass.passes import Site


class KVAttention(nn.Module):
    """One rewritten attention site."""

    def __init__(self, site: Site, io) -> None:
        super().__init__()
        self.layer, self.scale, self.softcap = site.layer, site.scale, site.softcap
        self.kv_heads, self.head_dim, self.value_dim = site.kv_heads, site.head_dim, site.value_dim or site.head_dim
        self.window = site.sliding_window or 0
        self.chunked = site.chunked  # chunked attention: a query sees its block of this many positions (0: none)
        self.io = io
        self.alibi: Tensor | None  # [H]: each query head's ALiBi slope (a buffer: it follows the model's device)
        self.register_buffer("alibi", torch.tensor(site.alibi) if site.alibi else None, persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sinks: Tensor | None = None) -> Tensor:
        return self.io.attend(self, q, k, v, pos, sinks)

    def extra_repr(self) -> str:
        extra = (", alibi" if self.alibi is not None else "") + (f", chunked={self.chunked}" if self.chunked else "")
        return f"layer={self.layer}, scale={self.scale:.4g}, window={self.window}, softcap={self.softcap}{extra}"
