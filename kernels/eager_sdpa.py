"""Attention with what ``scaled_dot_product_attention`` lacks: logit soft-capping (Gemma 2,
``c * tanh(x / c)`` of the scaled logits) and attention sinks (GPT-OSS: one learned logit per
query head joins each row's softmax, and its probability is dropped, so a row may attend to
"nothing").

The eager-attention pass canonicalises such attention into this op; it is what the graph
computes when such a site is left unrewritten (e.g. a bidirectional one). Torch reference only:
rewritten sites run through ``kvpass::attend`` / ``kvpass::decode``, which do both themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("kvpass::eager_sdpa", mutates_args=())
def eager_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float, sinks: Tensor | None = None
) -> Tensor:
    """``q [B, H, T, D]``, ``k, v [B, H, S, D]``; ``mask``: boolean (True = seen) or additive, to
    ``[..., T, S]``; ``softcap``: 0 for none; ``sinks [H]``: each head's sink logit, or None."""
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probs = logits.softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)


@eager_sdpa.register_fake
def _(q, k, v, mask, scale, softcap, sinks=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
