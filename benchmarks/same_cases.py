"""Two eval runs on the same cases, paired: how many answers are the same, and each policy and
budget's score difference (run B minus run A), averaged over tasks, with its paired standard error.

    python benchmarks/same_cases.py benchmarks/results/eval-1024-aware-s4 docs/results/eval-1024-aware-s4-step

``--pair A B`` pairs policy ``A`` of the first run with policy ``B`` of the second (two policies,
or one policy under two settings, on the same cases); a run is a directory with results.json or
such a file.

What a change to the runtime must show when it claims not to change what is kept: the same answers,
or a difference within the noise of the same cases.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from kvpass.eval.report import _standard_error


def load(run: Path, policy: str | None = None) -> dict[tuple, dict]:
    """A run's records by case; with ``policy``, that policy's only, keyed as ``"paired"``."""
    records = json.loads((run / "results.json" if run.is_dir() else run).read_text())["records"]
    if policy is not None:
        records = [{**r, "policy": "paired"} for r in records if r["policy"] == policy]
    return {(r["task"], r["tokens"], r["seed"], r["mode"], r["policy"], r["budget"]): r for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="the run before (a directory with results.json)")
    ap.add_argument("b", type=Path, help="the run after")
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="policy A of the first run against B of the second")
    args = ap.parse_args()
    a, b = (load(args.a), load(args.b)) if not args.pair else (load(args.a, args.pair[0]), load(args.b, args.pair[1]))
    rows: dict[tuple, dict] = defaultdict(lambda: {"same": 0, "n": 0, "diffs": defaultdict(list)})
    for key in sorted(a.keys() & b.keys(), key=str):
        task, policy, budget = key[0], key[4], key[5]
        row = rows[policy, budget]
        row["n"] += 1
        row["same"] += a[key]["output"] == b[key]["output"]
        row["diffs"][task].append(b[key]["score"] - a[key]["score"])
    print(f"{args.a} -> {args.b}: cases paired by task, length, seed, mode, policy and budget\n")
    print("| policy | budget | cases | same answer | score B - A (x100) | paired s.e. |")
    print("|---|---|---|---|---|---|")
    for (policy, budget), row in rows.items():
        per_task = list(row["diffs"].values())
        mean = sum(sum(v) / len(v) for v in per_task) / len(per_task)
        label = "100 %" if budget is None else f"{budget:g}"
        se = _standard_error(per_task) or "-"
        print(f"| {policy} | {label} | {row['n']} | {row['same']} | {100 * mean:+.1f} | {se} |")


if __name__ == "__main__":
    main()
