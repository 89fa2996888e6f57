"""Peak memory of prefill on the default model: the original (full cache) vs kvpass at a fixed
budget, for growing prompts. Each case runs in a fresh process; peak = growth of the process's
maximum resident set during the prefill, after the model is loaded and warmed up.

    python benchmarks/memory.py --tokens 2048 4096 8192 --budget 512
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

MiB = 2**20


def measure(kind: str, n: int, budget: int, policy: str) -> dict:
    import torch

    import kvpass
    from kvpass.greedy import kv_bytes

    torch.set_grad_enabled(False)
    model, tok = kvpass.load_default_model()
    if kind == "kvpass":
        model = kvpass.transform(model, policy=policy, budget=budget)
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * (n // 10)
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    model(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)  # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak": peak, "kv": kv_bytes(out.past_key_values), "seconds": seconds, "tokens": ids.shape[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(measure(args.case[0], int(args.case[1]), args.budget, args.policy)))
        return

    rows = []
    for n in args.tokens:
        res = {}
        for kind in ("full", "kvpass"):
            cmd = [
                sys.executable,
                __file__,
                "--case",
                kind,
                str(n),
                "--budget",
                str(args.budget),
                "--policy",
                args.policy,
            ]
            res[kind] = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
        rows.append((n, res))
        print(f"done {n}", file=sys.stderr)

    print(
        f"\nPrefill peak memory, SmolLM2-135M-Instruct fp32, kvpass {args.policy} at budget {args.budget} "
        f"(chunk 512); {platform.machine()}, {platform.python_version()}\n"
    )
    columns = ["prompt", "full: peak MiB", "full: KV MiB", "kvpass: peak MiB", "kvpass: KV MiB"]
    columns += ["peak ratio", "KV ratio", "prefill time ratio"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for _, r in rows:
        f, k = r["full"], r["kvpass"]
        cells = [f["tokens"], f"{f['peak'] / MiB:.0f}", f"{f['kv'] / MiB:.1f}", f"{k['peak'] / MiB:.0f}"]
        cells += [f"{k['kv'] / MiB:.1f}", f"{k['peak'] / f['peak']:.2f}", f"{k['kv'] / f['kv']:.3f}"]
        cells += [f"{k['seconds'] / f['seconds']:.2f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
