"""A gpt-fast-style Llama, written by hand (not from transformers), made to evict its KV cache.

``F.scaled_dot_product_attention`` with ``is_causal``, a fused ``wqkv`` projection, grouped-query
attention by ``repeat_interleave``, RoPE from a precomputed real-valued ``freqs_cis`` table
indexed by ``input_pos``, RMSNorm and a SwiGLU feed-forward, in the shape of PyTorch's gpt-fast.
It has no KV cache of its own: kvpass provides an evicting one.

python examples/gpt_fast.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = 8  # KV heads
    dim: int = 4096
    intermediate_size: int = 14336
    rope_base: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float) -> Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # [seq_len, n_elem / 2, 2]


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """``x [B, T, H, D]``, ``freqs_cis [B, T, D/2, 2]``."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.unsqueeze(2)
    out = torch.stack(
        [xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1], xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        total = (args.n_head + 2 * args.n_local_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, total, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x: Tensor, freqs_cis: Tensor) -> Tensor:
        B, T, _ = x.shape
        kv = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_local_heads, self.head_dim)
        v = v.view(B, T, self.n_local_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k = k.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_local_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis(args.block_size, args.head_dim, args.rope_base), persistent=False
        )

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        """Logits for ``idx [B, T]`` at positions ``input_pos [B, T]``."""
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs_cis)
        return self.output(self.norm(x))


def main() -> None:
    import kvpass

    torch.manual_seed(0)
    args = ModelArgs(
        block_size=4096, vocab_size=512, n_layer=4, n_head=8, n_local_heads=2, dim=256, intermediate_size=512
    )
    model = Transformer(args).eval()
    for site in kvpass.find_attention(model):
        print(site.layer, site.module, site.heads, "heads,", site.kv_heads, "KV heads:", site.action)
    ids = torch.randint(0, 512, (1, 600))
    exact = kvpass.transform(model, policy="full")
    ref = model(ids, torch.arange(600)[None])
    print("full cache, max |logit diff|:", (exact(ids).logits - ref).abs().max().item())
    small = kvpass.transform(model, policy="tova", budget=128)
    out = small.generate(ids, max_new_tokens=32)
    print(f"generated {out.shape[1] - ids.shape[1]} tokens;", kvpass.cache_stats(small))


if __name__ == "__main__":
    main()
