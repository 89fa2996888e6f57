"""Small hand-written models for the pass tests (not from transformers)."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class SDPAModel(nn.Module):
    """One attention layer calling F.scaled_dot_product_attention in a chosen form."""

    def __init__(self, vocab=50, dim=32, heads=4, kv_heads=2, form="causal", window=0):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.form, self.window = heads, kv_heads, dim // heads, form, window
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(512, dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids) + self.pos(position_ids)
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        rep = self.heads // self.kv_heads
        if self.form == "enable_gqa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.2)
        else:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if self.form == "causal":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif self.form == "bool_mask":
                i = torch.arange(T, device=x.device)
                mask = i[:, None] >= i[None, :]
                if self.window:
                    mask = mask & (i[:, None] - i[None, :] < self.window)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif self.form == "additive_mask":
                i = torch.arange(T, device=x.device)
                mask = torch.zeros(T, T).masked_fill(i[:, None] < i[None, :], float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif self.form == "alibi":  # a distance bias under the causal mask, as ALiBi adds it
                i = torch.arange(T, device=x.device)
                bias = -0.5 * (i[:, None] - i[None, :]).float()
                mask = bias.masked_fill(i[:, None] < i[None, :], float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif self.form == "distance_bias":  # a bias on the scores that is not ALiBi's (quadratic in distance)
                i = torch.arange(T, device=x.device)
                bias = -0.1 * (i[:, None] - i[None, :]).float().square()
                mask = bias.masked_fill(i[:, None] < i[None, :], float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif self.form == "bidirectional":
                y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class NoAttention(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids):
        return self.out(self.emb(input_ids))


class NanoGPT(nn.Module):
    """nanoGPT-style: learned absolute positions, explicit matmul / masked_fill / softmax attention."""

    def __init__(self, vocab=50, dim=32, heads=4, layers=2, block=256):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.attn = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers)
        )
        self.ln = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers + 1))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, input_ids, position_ids):
        x = self.wte(input_ids) + self.wpe(position_ids)
        B, T, C = x.shape
        for i, (attn, proj, mlp) in enumerate(zip(self.attn, self.proj, self.mlp, strict=True)):
            q, k, v = attn(self.ln[2 * i](x)).split(C, dim=2)
            q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
            x = x + proj(y)
            x = x + mlp(self.ln[2 * i + 1](x))
        return self.head(self.ln[-1](x))


class Mixer(nn.Module):
    """One causal attention layer plus, before it, an operation that mixes tokens (or not: ``"none"``)."""

    def __init__(self, mix="none", vocab=50, dim=32, heads=4):
        super().__init__()
        self.mix, self.heads, self.hd = mix, heads, dim // heads
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(512, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=2)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids)
        B, T, C = x.shape
        if self.mix == "arange":  # positions made inside the model, not taken from the input
            x = x + self.pos(torch.arange(T, device=x.device))
        elif self.mix == "arange_odd":  # ... and not as arange(T): kvpass cannot say what they stand for
            x = x + self.pos(torch.arange(1, 2 * T, 2, device=x.device))
        else:
            x = x + self.pos(position_ids)
        if self.mix == "cumsum":
            x = x.cumsum(dim=1)
        elif self.mix == "mean":
            x = x - x.mean(dim=1, keepdim=True)
        elif self.mix == "conv":
            x = self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)
        elif self.mix == "shift":  # RWKV-style token shift
            x = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mix == "bidirectional":  # a second, bidirectional attention: found, skipped, and refused
            y = F.scaled_dot_product_attention(y, k, v)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class EagerForms(nn.Module):
    """One eager attention layer written as ``einsum`` (in three layouts), ``matmul`` of a permuted
    key, ``bmm``, ``baddbmm``, soft-capped ``matmul`` or a 0/1 multiplier plus a penalty (OpenAI GPT)."""

    def __init__(self, form, vocab=50, dim=32, heads=4):
        super().__init__()
        self.form, self.heads, self.hd = form, heads, dim // heads
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(512, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, vocab)
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, input_ids, position_ids):
        x = self.emb(input_ids) + self.pos(position_ids)
        B, T, C = x.shape
        H, D = self.heads, self.hd
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        if self.form == "einsum":
            a = torch.einsum("bhqd,bhkd->bhqk", q, k) * D**-0.5
            a = a.masked_fill(future, float("-inf")).softmax(-1)
            y = torch.einsum("bhqk,bhkd->bhqd", a, v)
        elif self.form == "einsum_bthd":  # heads after the sequence, as the projections make them
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            a = torch.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5
            a = a.masked_fill(future, float("-inf")).softmax(-1)
            y = torch.einsum("bhqk,bkhd->bqhd", a, v).transpose(1, 2)
        elif self.form == "einsum_letters":  # other letters, scores as [batch, query, head, key]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            a = torch.einsum("ntjd,nsjd->ntjs", q, k) / D**0.5
            a = a.masked_fill(future[:, None, :], float("-inf")).softmax(dim=3)
            y = torch.einsum("ntjs,nsje->jnte", a, v).permute(1, 0, 2, 3)
        elif self.form == "einsum_keys_first":
            a = torch.einsum("bhkd,bhqd->bhqk", k, q) * D**-0.5
            a = a.masked_fill(future, float("-inf")).softmax(-1)
            y = torch.einsum("bhqk,bhkd->bhqd", a, v)
        elif self.form == "matmul_permute":
            a = torch.matmul(q, k.permute(0, 1, 3, 2)) * D**-0.5
            y = a.masked_fill(future, float("-inf")).softmax(-1) @ v
        elif self.form in ("multiplied", "multiplied_only"):  # OpenAI GPT: keys transposed from [B, T, H, D]
            keep = torch.ones(1, 1, T, T).tril()  # a 0/1 multiplier, and a penalty where it is 0
            a = torch.matmul(q, k.transpose(1, 2).permute(0, 2, 3, 1)) / D**0.5
            a = a * keep + -1e4 * (1 - keep) if self.form == "multiplied" else a * keep  # (the latter: no mask)
            y = a.softmax(-1) @ v
        elif self.form == "bmm_mask4":  # BART-era: the mask added on a [B, H, T, T] view, max-subtracted
            q3, k3, v3 = (t.reshape(B * H, T, D) for t in (q * D**-0.5, k, v))  # queries scaled first
            a = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, T, T)
            a = (a + torch.zeros(B, 1, T, T).masked_fill(future, float("-inf"))).view(B * H, T, T)
            a = a - a.max(dim=-1, keepdim=True).values
            y = torch.bmm(a.softmax(-1), v3).view(B, H, T, D)
        elif self.form in ("bmm", "baddbmm"):
            q3, k3, v3 = (t.reshape(B * H, T, D) for t in (q, k, v))
            if self.form == "bmm":
                a = torch.bmm(q3, k3.transpose(1, 2)) / D**0.5
            else:
                a = torch.baddbmm(torch.zeros(B * H, T, T), q3, k3.transpose(1, 2), alpha=D**-0.5)
            a = a + torch.zeros(T, T).masked_fill(future, float("-inf"))
            y = torch.bmm(a.softmax(-1), v3).view(B, H, T, D)
        elif self.form == "lse_sinks":  # GraniteSWA: sinks applied after attention, as a scale from the log-sum-exp
            a = (q @ k.transpose(-1, -2)) * D**-0.5
            a = a + torch.zeros(T, T).masked_fill(future, float("-inf"))
            scale = (torch.logsumexp(a, dim=-1) - self.sinks.view(1, -1, 1)).sigmoid()
            y = (a.softmax(-1) @ v) * scale.unsqueeze(-1)
        elif self.form == "softcap":
            a = (q @ k.transpose(-1, -2)) * D**-0.5
            a = torch.tanh(a / 2.0) * 2.0
            a = (a + torch.zeros(T, T).masked_fill(future, float("-inf"))).softmax(-1, dtype=torch.float32)
            y = a.to(q.dtype) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class LengthCondition(nn.Module):
    """Attention preceded by a branch on the sequence length (as some MoE routing is written), which
    torch.export keeps as a range of lengths the graph holds for."""

    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.inner = SDPAModel(vocab, dim)

    def forward(self, input_ids, position_ids):
        if input_ids.shape[1] >= 7:
            return self.inner(input_ids, position_ids)
        return self.inner(input_ids, position_ids) * 2
