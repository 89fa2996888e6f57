"""What the reading buffer trades: quality against peak memory, per ``reading`` value.

A prompt is read into a buffer of up to ``reading`` tokens (per layer and KV head) and compressed
to the budget once it is read, or whenever the buffer fills. For each value this prints the KV
bytes the tables held at their peak while one prompt of ``--tokens`` was read, the bytes held
after it was compressed (both measured: ``EvictingCache.peak_bytes`` and the tables' size), and
each policy's score on the chosen tasks, with its paired difference from the full cache on the
same cases (points, standard error).

    python benchmarks/reading.py --tasks niah_single niah_multikey --tokens 1024 --samples 12 \\
        --seed 3000 --budget 0.25 --policies kvzip tova --readings 0 1024 prompt --mode agnostic

``--readings 0`` is eviction after every chunk (any value up to budget + chunk is), ``prompt`` the
whole prompt read before it is compressed.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import kvpass
from kvpass.cli import reading_tokens
from kvpass.data import tasks
from kvpass.eval import report
from kvpass.eval.evaluate import MODES, evaluate, render


def table_bytes(model, tok, tokens: int, policy: str, budget: float, reading, chunk: int) -> tuple[int, int]:
    """(peak, after) bytes of the cache tables while one ``tokens``-token prompt is read."""
    small = kvpass.transform(model, policy, budget, chunk=chunk, reading=reading)
    ids = render(tok, tasks.make("niah_single", tok, tokens, 0), "aware")[0]
    _, cache = small.kvpass_forward(ids, logits_to_keep=1)
    return cache.peak_bytes, sum(t.nbytes for t in cache.tables)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--seed", type=int, default=3000, help="first sample's seed")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--policies", nargs="+", default=["kvzip", "tova"])
    ap.add_argument("--readings", type=reading_tokens, nargs="+", default=[0, 1024, None], metavar="N")
    ap.add_argument("--mode", choices=MODES, default="agnostic")
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    model, tok = kvpass.load_default_model()
    start = time.time()
    records, memory = [], {}
    for i, reading in enumerate(args.readings):
        runs = evaluate(
            model, tok, task_names=args.tasks, lengths=[args.tokens], policies=args.policies, budgets=[args.budget],
            samples=args.samples, mode=args.mode, chunk=args.chunk, reading=reading, seed=args.seed,
        )  # fmt: skip
        name = "prompt" if reading is None else reading
        records += [r for r in runs if i == 0 or r.policy != "full"]
        for r in runs:
            if r.policy != "full":
                r.policy = f"{r.policy}, reading {name}"
        memory[name] = table_bytes(model, tok, args.tokens, args.policies[0], args.budget, reading, args.chunk)
    print(
        f"\nReading buffer, SmolLM2-135M-Instruct, {'/'.join(args.tasks)}, {args.tokens} tokens, {args.samples} "
        f"samples per task (seeds {args.seed}-{args.seed + args.samples - 1}), {args.mode}, keep {args.budget:.0%}, "
        f"chunk {args.chunk}; {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.time() - start:.0f} s\n"
    )
    print("| reading | tables at peak while reading, MiB | after compression, MiB |")
    print("|---|---|---|")
    for name, (peak, after) in memory.items():
        print(f"| {name} | {peak / 2**20:.1f} | {after / 2**20:.1f} |")
    header, rows = report.table(records)
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
