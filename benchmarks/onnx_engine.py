"""The exported ONNX engine against the torch path on the default model, side by side in one run:
same greedy tokens, decode tokens/s, and the engine's KV memory at the budget vs a full cache.

    python benchmarks/onnx_engine.py --lengths 1024 4096 --budget 0.25 --new 32 --out benchmarks/results/onnx

For each prompt length (a passkey prompt): the policy at ``budget`` x length slots and the full
cache (policy ``full``, room for the prompt and the new tokens), each exported and loaded into
onnxruntime (CPU provider). Decode time: ``--new`` single-token steps after the prompt, greedy,
the same steps in both paths (torch: the transformed model with its evicting cache).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import kvpass
from kvpass.data.passkey import passkey_prompt


def torch_decode(model, ids: torch.Tensor, new: int) -> tuple[list[int], float]:
    """Greedy tokens and seconds for ``new`` decode steps after prefilling ``ids``."""
    cache = model.kvpass_new_cache(decode_reserve=new)
    logits, _ = model.kvpass_forward(ids, cache, logits_to_keep=1)
    tokens, start = [], time.perf_counter()
    for _ in range(new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        logits, _ = model.kvpass_forward(nxt, cache, logits_to_keep=1)
    return tokens, time.perf_counter() - start


def engine_decode(engine: kvpass.OnnxEngine, ids: np.ndarray, new: int) -> tuple[list[int], float]:
    tables = engine.new_cache(1)
    T = ids.shape[1]
    pos = np.arange(T)[None]
    for s in range(0, T, engine.chunk):
        logits, tables = engine.step(ids[:, s : s + engine.chunk], pos[:, s : s + engine.chunk], tables)
    tokens, start = [], time.perf_counter()
    for i in range(new):
        nxt = logits[:, -1].argmax(-1)
        tokens.append(int(nxt[0]))
        logits, tables = engine.step(nxt[:, None], np.array([[T + i]]), tables)
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt kept")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/onnx")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = kvpass.load_default_model()
    rows = []
    for n in args.lengths:
        prompt, key = passkey_prompt(tok, n)
        ids = tok(prompt, return_tensors="pt").input_ids
        T = ids.shape[1]
        for policy, slots in ((args.policy, math.ceil(args.budget * T)), ("full", T + args.new)):
            small = kvpass.transform(model, policy, slots if policy != "full" else None)
            t = time.perf_counter()
            path = kvpass.export_onnx(small, out / f"{policy}-{n}.onnx", capacity=slots)
            exported = time.perf_counter() - t
            engine = kvpass.OnnxEngine(path)
            ref, torch_s = torch_decode(small, ids, args.new)
            got, onnx_s = engine_decode(engine, ids.numpy(), args.new)
            rows.append(
                {
                    "prompt": T,
                    "policy": policy,
                    "slots": slots,
                    "same_tokens": ref == got,
                    "answer": tok.decode(got, skip_special_tokens=True).strip(),
                    "passkey": key,
                    "torch_tok_s": args.new / torch_s,
                    "onnx_tok_s": args.new / onnx_s,
                    "cache_mib": engine.cache_bytes(1) / 2**20,
                    "export_s": exported,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            for f in (path, path.with_name(path.name + ".data")):
                f.unlink()  # hundreds of MB each: the numbers are what we keep
    lines = [
        f"# ONNX engine vs torch path -- {platform.machine()} {platform.processor() or ''}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}",
        "",
        f"`python benchmarks/onnx_engine.py --lengths {' '.join(map(str, args.lengths))} --policy {args.policy} "
        f"--budget {args.budget} --new {args.new}`; SmolLM2-135M-Instruct fp32, greedy, {args.new} decode steps.",
        "",
        "| prompt | policy | slots | same tokens | answer | torch tok/s | onnxruntime tok/s | ratio | KV MiB "
        "| export s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt']} | {r['policy']} | {r['slots']} | {'yes' if r['same_tokens'] else 'NO'} | "
            f"{r['answer']!r} (key {r['passkey']}) | {r['torch_tok_s']:.1f} | {r['onnx_tok_s']:.1f} | "
            f"{r['onnx_tok_s'] / r['torch_tok_s']:.2f} | {r['cache_mib']:.1f} | {r['export_s']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
