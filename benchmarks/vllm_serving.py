"""vLLM at a fixed KV memory: the default model unmodified against the same model served through
kvpass's plugin, in the same vLLM, side by side in one run (in the vLLM environment of
``docs/serving-vllm.md``).

    python benchmarks/vllm_serving.py --prompt-tokens 4096 --new 32 --requests 16 --budget 1024 --kv-gib 1

Each engine gets ``--kv-gib`` GiB for its cache (vLLM's paged blocks for the original; kvpass's
tables, one state block per request, for the plugin) and all ``--requests`` prompts at once
(random token ids, ``--prompt-tokens`` long; ``max_num_seqs`` = the number of requests, so memory
is what limits admission). Printed per engine: the requests the cache holds at once by vLLM's own
accounting; the most requests seen running at once (from each request's scheduled and last-token
times); the wall time of the whole batch, output tokens per second over it, and the mean time per
output token after the first. Prints one Markdown table.

``--model DIR``: a local transformers directory instead of the default model; ``--model
random:llama-1b`` builds one of Llama-3.2-1B's shape with random weights (the GPU row of
``benchmarks/gpu_check.sh``: no hub there). ``--tensor-parallel N`` serves both engines over N workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one time."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def measure(path: Path, args, prompts: list[list[int]]) -> dict:
    import vllm

    longest = args.prompt_tokens + args.new + 16
    llm = vllm.LLM(
        model=str(path), dtype="float32", max_model_len=longest, max_num_seqs=args.requests, enforce_eager=True,
        skip_tokenizer_init=True, disable_log_stats=False, kv_cache_memory_bytes=int(args.kv_gib * 2**30),
        tensor_parallel_size=args.tensor_parallel,
    )  # fmt: skip
    cache = llm.llm_engine.vllm_config.cache_config
    plugin = llm.llm_engine.vllm_config.model_config.architecture == "KvpassForCausalLM"
    tokens = cache.num_gpu_blocks * cache.block_size  # the original's cache, in tokens (vLLM's own count)
    holds = cache.num_gpu_blocks if plugin else tokens // (args.prompt_tokens + args.new)  # plugin: a block each
    params = vllm.SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    spans = [(o.metrics.scheduled_ts, o.metrics.last_token_ts) for o in outs]
    tpot = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (args.new - 1) for o in outs]
    result = dict(
        holds=holds, peak=peak_overlap(spans), wall=wall,
        tok_s=sum(len(o.outputs[0].token_ids) for o in outs) / wall, tpot_ms=1e3 * sum(tpot) / len(tpot),
    )  # fmt: skip
    del llm
    return result


def load(name: str | None, tmp: Path):
    """``(directory, model, vocabulary size, tokenizer or None)`` of the model to serve."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name is None:  # the embedded default model, converted once; its directory is the original
        from kvpass.default_model import cache_dir, load_default_model

        model, tok = load_default_model()
        return cache_dir(), model, len(tok), tok
    if name == "random:llama-1b":  # Llama-3.2-1B's shape, random weights
        config = LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
            tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(tmp / "original")
        return tmp / "original", model, config.vocab_size, None
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return Path(name), model, model.config.vocab_size, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--budget", type=int, default=1024, help="kvpass slots per layer and KV head")
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--kv-gib", type=float, default=1.0, help="cache memory of each engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a transformers directory, or random:llama-1b (default model)")
    ap.add_argument("--tensor-parallel", type=int, default=1)
    args = ap.parse_args()
    import torch

    from kvpass.serving import model_dir

    with tempfile.TemporaryDirectory() as tmp:
        original, model, vocab, tok = load(args.model, Path(tmp))
        gen = torch.Generator().manual_seed(args.seed)
        n = args.requests
        prompts = [torch.randint(100, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(n)]
        served = model_dir.write(model, Path(tmp) / "kvpass", args.policy, args.budget, args.chunk, tokenizer=tok)
        rows = {"original": measure(original, args, prompts)}
        rows[f"kvpass {args.policy}, {args.budget} slots"] = measure(served, args, prompts)
    base = rows["original"]
    print(
        f"\n{args.requests} requests of {args.prompt_tokens} tokens + {args.new} new, {args.kv_gib:g} GiB of KV "
        f"cache per engine, fp32, {args.model or 'SmolLM2-135M-Instruct'}, tensor parallel {args.tensor_parallel}\n"
    )
    print("| engine | requests the cache holds | most running at once | wall s | output tok/s | ms per output token |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['holds']} ({r['holds'] / base['holds']:.1f}x) | {r['peak']} | {r['wall']:.1f} | "
            f"{r['tok_s']:.2f} ({r['tok_s'] / base['tok_s']:.2f}x) | {r['tpot_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
