"""What a rewritten attention site calls: one opaque op that attends over, and updates, its
layer's slots in the cache the model is currently running with.

The op (``torch.ops.kvpass.cache_attend``) hides the cache's bookkeeping (eviction, Python-side
policy logic, growing tables) from ``torch.compile``: dynamo sees one node with a fixed output
shape per layer, so a compiled step graph needs no guards on the cache and is not recompiled as
generation proceeds. Which cache to use is found through a small integer handle, since an op's
arguments are tensors and numbers only.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor, nn

from kvpass.cache import EvictingCache
from kvpass.passes import Site

_BINDINGS: weakref.WeakValueDictionary[int, Binding] = weakref.WeakValueDictionary()
_IDS = itertools.count()


class Binding:
    """The cache a transformed model is running with, shared by all its attention modules."""

    def __init__(self) -> None:
        self.cache: EvictingCache | None = None
        self.id = next(_IDS)
        _BINDINGS[self.id] = self


@torch.library.custom_op("kvpass::cache_attend", mutates_args=())
def cache_attend(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, binding: int, layer: int, scale: float, window: int, softcap: float
) -> Tensor:
    """Attend ``q`` over layer ``layer``'s kept slots and the chunk ``k, v``, then update the slots."""
    return _step(q, k, v, pos, binding, layer, scale, window, softcap)


def _run(q, k, v, pos, binding, layer, scale, window, softcap):
    cache = _BINDINGS[binding].cache
    if cache is None:
        raise RuntimeError("a kvpass attention ran outside a kvpass forward (no cache is bound)")
    return cache.step(layer, q, k, v, pos, scale, window, softcap).contiguous()  # the layout the fake promises


_step = torch.compiler.disable(_run)  # the cache's bookkeeping stays eager even inside a compiled graph


@cache_attend.register_fake
def _(q, k, v, pos, binding, layer, scale, window, softcap):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


class KVAttention(nn.Module):
    """One rewritten attention site."""

    def __init__(self, site: Site, binding: Binding) -> None:
        super().__init__()
        self.layer, self.scale, self.softcap = site.layer, site.scale, site.softcap
        self.window = site.sliding_window or 0
        self.binding = binding.id
        self._binding = binding  # keeps the handle alive as long as the module

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        args = (q, k, v, pos, self.binding, self.layer, self.scale, self.window, self.softcap)
        if torch.compiler.is_compiling():  # compile and export see the opaque op
            return cache_attend(*args)
        return _run(*args)  # eager: the op's body directly (the dispatcher costs ~0.2 ms a call)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, scale={self.scale:.4g}, window={self.window}, softcap={self.softcap}"
