"""End to end on a GPU: a Llama-3-8B-shaped model with random bf16 weights, decode throughput of
the original (transformers ``StaticCache`` + ``torch.compile``, CUDA graphs) against kvpass
compiled (``model.compile(mode=...)``), side by side in one run, at a long context.

    python benchmarks/gpu_e2e.py --context 32768 --budget 0.25 --batch 1 8 --new 32

Random weights make the text meaningless but the work real: the same shapes, bytes and kernels
as the trained model. Each row: prefill seconds (timed once) and decode tokens/s (all rows of
the batch) over ``new`` greedy steps after a warm-up that compiles. ``--layers`` shortens the
model (a smoke run); ``--modes`` are kvpass's compile modes to measure (``none``: no CUDA graphs).
Prints one Markdown block.
"""

from __future__ import annotations

import argparse

import torch

import kvpass
from kvpass.eval.greedy import greedy
from kvpass.runtime import hf

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
)  # fmt: skip


def random_model(layers: int, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA3_8B, num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
        for m in model.modules():  # norms at one
            if hasattr(m, "variance_epsilon"):
                m.weight.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its tables, not random
    return model.eval()


def run(model, ids, new: int, cache=None) -> tuple[float, float]:
    greedy(model, ids, 4, cache=cache)  # warm up: compiles prefill and decode at these shapes
    torch.cuda.synchronize() if ids.is_cuda else None
    r = greedy(model, ids, new, cache=cache)
    return r.prefill_s, r.decode_tok_s * ids.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--modes", nargs="+", default=["reduce-overhead", "none"])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(args.layers, device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"Llama-3-8B shapes, {args.layers} layers, random {dtype}, {name}, torch {torch.__version__}")
    print(f"context {args.context}, budget {args.budget:g} ({args.policy}), {args.new} greedy decode steps\n")
    print("| batch | model | prefill s | decode tok/s | vs original |")
    print("|---|---|---|---|---|")
    from transformers import StaticCache

    original = torch.compile(model.forward, fullgraph=True, dynamic=False, mode="reduce-overhead")
    for B in args.batch:
        ids = torch.randint(0, LLAMA3_8B["vocab_size"], (B, args.context), device=device)
        cache = StaticCache(config=model.config, max_cache_len=args.context + args.new + 8)
        hf.call(model, ids[:, :1], cache)  # its tensors made eagerly, not as outputs of a CUDA graph
        plain = model.forward
        model.forward = original
        try:
            pre, tok_s = run(model, ids, args.new, cache)
        finally:
            model.forward = plain
        del cache
        print(f"| {B} | original, static cache + torch.compile (CUDA graphs) | {pre:.2f} | {tok_s:.1f} | 1.00 |")
        for mode in args.modes:
            small = kvpass.transform(model, args.policy, args.budget)
            small.compile(mode=None if mode == "none" else mode)
            k_pre, k_tok = run(small, ids, args.new)
            print(f"| {B} | kvpass {args.policy} @ {args.budget:g}, compiled ({mode}) | {k_pre:.2f} | {k_tok:.1f} | "
                  f"{k_tok / tok_s:.2f} |")  # fmt: skip
            del small
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
