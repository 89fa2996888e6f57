"""Transform and compile time of the default model, and decode speed of the original model, the
eager transformed model and the compiled (``backend="kvpass"``) one, side by side in one run.

    python benchmarks/compile.py --tokens 1024 4096 --budget 512 --new 64

Decode tokens/s are measured after a warm-up generation (which, for the compiled model, is
where compilation happens), greedy, batch 1, the same prompt for all three.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import kvpass
from kvpass.greedy import greedy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per measurement")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    model, tok = kvpass.load_default_model()
    t = time.perf_counter()
    eager = kvpass.transform(model, policy=args.policy, budget=args.budget)
    transform_s = time.perf_counter() - t
    compiled = kvpass.transform(model, policy=args.policy, budget=args.budget)
    compiled.compile(backend="kvpass")

    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * (max(args.tokens) // 10)
    all_ids = tok(text, return_tensors="pt").input_ids
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"default model, policy {args.policy}, budget {args.budget}, greedy, batch 1, {args.new} new tokens")
    print(f"transform: {transform_s:.1f} s")
    header = f"{'prompt':>7} {'original':>10} {'eager':>10} {'compiled':>10} {'eager/orig':>11} {'comp/orig':>10}"
    rows = []
    for i, n in enumerate(args.tokens):
        ids = all_ids[:, :n]
        if i == 0:
            t = time.perf_counter()
            greedy(compiled, ids, args.new)  # compiles: prefill chunk, decode step, head
            first = time.perf_counter() - t
            t = time.perf_counter()
            greedy(eager, ids, args.new)
            print(f"compile (first compiled generation minus an eager one): {first - (time.perf_counter() - t):.1f} s")
        speeds = {}
        for name, m in (("original", model), ("eager", eager), ("compiled", compiled)):
            greedy(m, ids[:, :64], 4)  # warm up
            speeds[name] = greedy(m, ids, args.new).decode_tok_s
        o = speeds["original"]
        rows.append(
            f"{n:>7} {o:>10.1f} {speeds['eager']:>10.1f} {speeds['compiled']:>10.1f} "
            f"{speeds['eager'] / o:>11.2f} {speeds['compiled'] / o:>10.2f}"
        )
    print("decode tokens/s")
    print("\n".join([header, *rows]))


if __name__ == "__main__":
    main()
