"""vLLM's own model code as a kvpass step's body: its fused linear layers, rotary embedding and
logits, with kvpass's attention where its attention layers were (docs/serving-vllm.md).

vLLM builds the architecture's own model class (``LlamaForCausalLM`` of ``vllm.model_executor``,
not transformers'); every one of its ``Attention`` layers is replaced by an :class:`Attend`, which
reshapes vLLM's token-major ``q, k, v [N, heads * dim]`` into kvpass's ``[B, H, T, D]`` and calls
the rewritten site of the same layer (:class:`~kvpass.runtime.attention.KVAttention`, from
``kvpass.transform`` of the transformers model): the site's own scale, window, soft-cap and ALiBi,
and the step's policy, tables and eviction. :class:`Native` is the body a
:class:`~kvpass.runtime.step.Step` runs (``forward(input_ids [B, T], positions [B, T]) -> hidden
[B, T, E]``), so chunking, probes, decoding and admission are the step's, as for every other front
door. The replaced layers leave vLLM's forward context: vLLM allocates no paged KV for them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from kvpass.runtime.attention import KVAttention


class Shape:
    """The step's current batch: ``(B, T)`` and the positions ``[B, T]`` (a plain object, shared by
    the body and its attention layers, not a module)."""

    def __init__(self) -> None:
        self.batch, self.tokens, self.positions = 0, 0, None


class Attend(nn.Module):
    """What replaces one of vLLM's ``Attention`` layers: ``forward(q, k, v) -> out [N, H * Dv]``."""

    def __init__(self, site: KVAttention, heads: int, shape: Shape) -> None:
        super().__init__()
        self.site, self.heads, self.shape = site, heads, shape

    def forward(self, q: Tensor, k: Tensor, v: Tensor, output_shape=None, output_dtype=None) -> Tensor:
        B, T, s = self.shape.batch, self.shape.tokens, self.site
        q = q.reshape(B, T, self.heads, s.head_dim).transpose(1, 2)
        k = k.reshape(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.reshape(B, T, s.kv_heads, s.value_dim).transpose(1, 2)
        out = s(q, k, v, self.shape.positions)  # [B, H, T, Dv]
        out = out.transpose(1, 2).reshape(B * T, self.heads * s.value_dim)
        return out if output_dtype is None else out.to(output_dtype)


class Native(nn.Module):
    """vLLM's model with kvpass's attention: ``forward(input_ids, positions) -> hidden [B, T, E]``."""

    def __init__(self, model: nn.Module, sites: list[KVAttention], modules: list[str], context: dict) -> None:
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        self.model, self.shape = model, Shape()
        attention = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]
        refuse = f"vLLM's {type(model).__name__} has {len(attention)} attention layers, kvpass rewrote {len(sites)}"
        if len(attention) != len(sites):
            raise ValueError(refuse)
        for (name, attn), site, module in zip(attention, sites, modules, strict=True):
            if _layer(name) != _layer(module):  # the same decoder layer, by the index in its name
                raise ValueError(f"{refuse}: {name} is not {module}")
            theirs = (attn.num_kv_heads, attn.head_size, attn.head_size_v, attn.sliding_window or 0)
            ours = (site.kv_heads, site.head_dim, site.value_dim, site.window)
            if theirs != ours or not torch.isclose(torch.tensor(attn.impl.scale), torch.tensor(site.scale)):
                raise ValueError(
                    f"{name}: vLLM's attention (KV heads, head dim, value dim, window {theirs}, scale "
                    f"{attn.impl.scale}) is not the one kvpass rewrote ({ours}, scale {site.scale})"
                )
            if attn.has_sink:
                raise ValueError(f"{name}: attention sinks are not served natively yet")
            model.set_submodule(name, Attend(site, attn.num_heads, self.shape))
            context.pop(attn.layer_name, None)  # no paged KV for it

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        B, T = input_ids.shape
        self.shape.batch, self.shape.tokens, self.shape.positions = B, T, positions
        hidden = self.model(input_ids.reshape(-1), positions.reshape(-1).clamp(min=0))
        return hidden.view(B, T, -1)


def _layer(name: str) -> int | None:
    """The decoder layer a module's name is in (``model.layers.3.self_attn.attn`` -> 3)."""
    found = re.findall(r"\.(\d+)\.", f".{name}.")
    return int(found[0]) if found else None
