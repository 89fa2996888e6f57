"""Token-by-token generation for transformed models that bring no ``generate()`` of their own
(hand-written models: nanoGPT, gpt-fast...). Hugging Face models keep using theirs."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Prompt followed by up to ``max_new_tokens`` tokens, greedy or sampled (``temperature``, ``top_k``).

    ``model`` is a kvpass-transformed model: the prompt is prefilled into a fresh evicting cache
    sized for ``max_new_tokens`` more, then each new token is fed alone. Rows that produced
    ``eos_token_id`` keep producing it.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    cache = model.kvpass_new_cache(decode_reserve=max(max_new_tokens, 1))
    out, nxt = input_ids, input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model.kvpass_forward(nxt, cache, logits_to_keep=1)[0][:, -1].float()
        if do_sample:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        if eos_token_id is not None:
            nxt = torch.where(done[:, None], eos_token_id, nxt)
            done |= nxt[:, 0] == eos_token_id
        out = torch.cat([out, nxt], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return out
