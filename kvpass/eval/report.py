"""Write evaluation records as JSON, a Markdown table and a plot (score vs budget, one line per policy)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from kvpass.eval.evaluate import ALLOC, Record

PPL = "perplexity"


def table(records: list[Record]) -> tuple[list[str], list[list[str]]]:
    """Rows of mean scores (x100): one per (policy, budget), one column per task, then the average
    and its standard error (from each task's sample variance: sqrt(sum_t s_t^2 / n_t) / tasks;
    blank with fewer than 2 samples of a task), the paired difference from the full cache (see
    :func:`_vs_full`), and, where measured, the mean perplexity (not a score, not averaged in)."""
    task_names = sorted({r.task for r in records} - {PPL})
    has_ppl = any(r.task == PPL for r in records)
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        cells[(r.policy, r.budget)][r.task].append(r.score)
        runs[(r.policy, r.budget)].append(r)
    full = {_case(r): r.score for r in records if r.policy == "full" and r.task != PPL}
    order = sorted(cells, key=lambda k: (k[0] != "full", k[0], -(k[1] or 1.0)))
    header = ["policy", "budget", *task_names, "average", "± s.e.", "vs full (s.e.)", *([PPL] if has_ppl else [])]
    rows = []
    for policy, budget in order:
        means = [100 * sum(v) / len(v) for t in task_names if (v := cells[(policy, budget)][t])]
        per_task = [f"{100 * sum(v) / len(v):.1f}" if (v := cells[(policy, budget)][t]) else "" for t in task_names]
        kept = "100 %" if budget is None else f"{budget:.0%}"
        avg = f"{sum(means) / len(means):.1f}" if means else ""
        ppl = [f"{sum(v) / len(v):.2f}" if (v := cells[(policy, budget)][PPL]) else ""] if has_ppl else []
        se = _standard_error([cells[(policy, budget)][t] for t in task_names])
        vs = "" if policy == "full" else _vs_full(runs[(policy, budget)], full)
        rows.append([policy, kept, *per_task, avg, se, vs, *ppl])
    return header, rows


def _case(r: Record) -> tuple:
    return r.task, r.tokens, r.seed, r.mode


def _vs_full(records: list[Record], full: dict[tuple, float]) -> str:
    """A policy's average minus the full cache's on the same cases (x100): per task the mean of the
    per-case differences, averaged over tasks, and its standard error from each task's sample
    variance of those differences. Cases are paired by task, length, seed and mode (a case without
    a full-cache run is left out); blank where a task has fewer than 2 pairs. Where a policy's
    scores follow the full cache's from case to case, pairing takes how hard each case is out of
    the noise, and this s.e. is smaller than the averages' own."""
    diffs: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.task != PPL and _case(r) in full:
            diffs[r.task].append(r.score - full[_case(r)])
    if not diffs or any(len(v) < 2 for v in diffs.values()):
        return ""
    mean = sum(sum(v) / len(v) for v in diffs.values()) / len(diffs)
    return f"{100 * mean:+.1f} ({_standard_error(list(diffs.values()))})"


def _standard_error(per_task: list[list[float]]) -> str:
    """The standard error (x100) of the average over tasks of the per-task mean scores."""
    if not per_task or any(len(v) < 2 for v in per_task):
        return ""
    var = sum(sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1) / len(v) for v in per_task)
    return f"{100 * var**0.5 / len(per_task):.1f}"


def markdown(records: list[Record]) -> str:
    header, rows = table(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(records: list[Record], path: Path, title: str = "") -> None:
    """Average score vs budget, one line per policy; the full cache as a dashed reference. A policy's
    variants share its colour: the peer's rows (``kvpress:``) dotted, per-layer budgets (``+alloc``) dashed."""
    from kvpass.extras import need

    need("matplotlib", "Plotting").use("Agg")
    import matplotlib.pyplot as plt

    per: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.task != PPL:
            per[r.policy][r.budget if r.budget is not None else 1.0].append(100 * r.score)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    bases = sorted({_base(p) for p in per} - {"full"})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    for policy in sorted(per):
        xs = sorted(per[policy])
        ys = [sum(per[policy][x]) / len(per[policy][x]) for x in xs]
        if policy == "full":
            ax.axhline(ys[0], color="black", linestyle="--", label="full cache")
            continue
        peer, alloc = policy.startswith("kvpress:"), policy.endswith(ALLOC)
        style = {
            "linestyle": ":" if peer else "--" if alloc else "-",
            "marker": "s" if peer else "^" if alloc else "o",
            "color": colors[_base(policy)],
        }
        ax.plot([100 * x for x in xs], ys, label=policy, **style)
    ax.set_xlim(0, 105)
    ax.set_xlabel("KV cache kept (% of the prompt)")
    ax.set_ylabel("score (average over tasks)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _base(policy: str) -> str:
    return policy.removeprefix("kvpass:").removeprefix("kvpress:").removesuffix(ALLOC)


def write(records: list[Record], out: Path, meta: dict) -> dict[str, Path]:
    """``results.json`` (meta + every record), ``results.md`` and ``results.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "records": [r.to_dict() for r in records]}, indent=1))
    paths["markdown"].write_text(markdown(records))
    plot(records, paths["plot"], title=meta.get("title", ""))
    return paths
