"""Attention with logit soft-capping (Gemma 2): ``softmax(c * tanh(q k^T * scale / c) + mask) v``.

``scaled_dot_product_attention`` has no soft-capping argument, so the eager-attention pass
canonicalises soft-capped attention into this op instead; it is what the graph computes when
such a site is left unrewritten (e.g. a bidirectional one). Torch reference only: rewritten
sites run through ``kvpass::attend``, which soft-caps itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("kvpass::softcap_sdpa", mutates_args=())
def softcap_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float) -> Tensor:
    """``q [..., T, D]``, ``k, v [..., S, D]``; ``mask``: boolean (True = seen) or additive, to ``[..., T, S]``."""
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return (logits.softmax(dim=-1) @ v.float()).to(q.dtype)


@softcap_sdpa.register_fake
def _(q, k, v, mask, scale, softcap):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
