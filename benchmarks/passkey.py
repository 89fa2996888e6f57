"""Does the default model still find the passkey once its cache is compressed? Every policy at 50 %
and 25 % of the context, the full cache beside them, in both modes: the question inside the
compressed prompt (``aware``), or asked after the context was compressed (``agnostic``: compress
once, ask anything). Each sample hides a 5-digit key at a random depth of ~``--tokens`` tokens of
filler (``kvpass.data.tasks.passkey``). Prints a Markdown table: the fraction found, and the paired
difference from the full cache on the same samples, in points, with its standard error.

    python benchmarks/passkey.py --tokens 2450 --samples 16 --budgets 0.25

``--peer kvpress`` adds kvpress's presses (in an environment where kvpress is installed);
``--allocation`` (files from ``kvpass calibrate``) adds every policy with per-layer budgets
(``NAME+alloc``); ``--out F.json`` keeps every record.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import kvpass
from kvpass.cli import reading_tokens
from kvpass.eval import report
from kvpass.eval.evaluate import MODES, evaluate
from kvpass.runtime import allocation
from kvpass.runtime.cache import READING


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2450)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="first sample's seed (fresh seeds: a new range)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--policies", nargs="+", default=[p for p in kvpass.policies() if p != "full"])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reading", type=reading_tokens, default=READING, help="tokens read, then compressed; or 'prompt'")
    ap.add_argument("--peer", choices=["kvpress"])
    ap.add_argument("--allocation", nargs="+", default=[], help="kvpass calibrate files: also NAME+alloc rows")
    ap.add_argument("--out", help="write every record here (JSON)")
    args = ap.parse_args()

    calibrations = [allocation.load(f) for f in args.allocation]  # a bad file fails before the model loads
    torch.set_grad_enabled(False)
    model, tok = kvpass.load_default_model()
    start = time.time()
    records = []
    for mode in args.modes:
        records += evaluate(
            model, tok, task_names=["passkey"], lengths=[args.tokens], policies=args.policies, budgets=args.budgets,
            samples=args.samples, mode=mode, max_new_tokens=12, chunk=args.chunk, reading=args.reading, seed=args.seed,
            peer=args.peer, calibrations=calibrations,
        )  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump([r.to_dict() for r in records], f, indent=1)

    reading = "prompt" if args.reading is None else args.reading
    print(
        f"\nPasskey retrieval, SmolLM2-135M-Instruct, ~{args.tokens}-token contexts, {args.samples} samples "
        f"(seeds {args.seed}-{args.seed + args.samples - 1}), chunk {args.chunk}, reading {reading}, greedy; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.time() - start:.0f} s\n"
    )
    tables = {}  # mode -> (policy, kept) -> (found, vs full)
    for mode in args.modes:
        header, rows = report.table([r for r in records if r.mode == mode])
        at = header.index("average"), header.index("vs full (s.e.)")
        tables[mode] = {(row[0], row[1]): (f"{float(row[at[0]]) / 100:.2f}", row[at[1]]) for row in rows}
    print("| policy | kept | " + " | ".join(f"{m}: found | {m}: vs full, points (s.e.)" for m in args.modes) + " |")
    print("|---|---|" + "---|---|" * len(args.modes))
    for key in tables[args.modes[0]]:
        print(f"| {key[0]} | {key[1]} | " + " | ".join(" | ".join(tables[m][key]) for m in args.modes) + " |")


if __name__ == "__main__":
    main()
