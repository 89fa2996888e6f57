"""Two eval runs on the same cases, paired: how many answers are the same, and each policy and
budget's score difference (run B minus run A), averaged over tasks, with its paired standard error.

    python benchmarks/same_cases.py benchmarks/results/eval-1024-aware-s4 docs/results/eval-1024-aware-s4-step

What a change to the runtime must show when it claims not to change what is kept: the same answers,
or a difference within the noise of the same cases.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from kvpass.eval.report import _standard_error


def load(run: Path) -> dict[tuple, dict]:
    records = json.loads((run / "results.json").read_text())["records"]
    return {(r["task"], r["tokens"], r["seed"], r["mode"], r["policy"], r["budget"]): r for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="the run before (a directory with results.json)")
    ap.add_argument("b", type=Path, help="the run after")
    args = ap.parse_args()
    a, b = load(args.a), load(args.b)
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
