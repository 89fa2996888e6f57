"""Does the default model still find the passkey? Every policy at 50 % and 25 % budget, the full
cache beside them, on prompts with the key at several depths. Prints a Markdown table.

    python benchmarks/passkey.py --tokens 2048 --depths 0.1 0.5 0.9

``--allocation`` (files from ``kvpass calibrate``): every policy also runs with per-layer budgets
from the calibration nearest each budget (``NAME+alloc``), as ``kvpass eval`` does.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from tqdm import tqdm

import kvpass
from kvpass import allocation
from kvpass.evaluate import ALLOC
from kvpass.passkey import passkey_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--policies", nargs="+", default=[p for p in kvpass.policies() if p != "full"])
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--allocation", nargs="+", default=[], help="kvpass calibrate files")
    args = ap.parse_args()

    calibrations = [allocation.load(f) for f in args.allocation]  # a bad file fails before the model loads
    torch.set_grad_enabled(False)
    model, tok = kvpass.load_default_model()
    prompts = [passkey_prompt(tok, args.tokens, seed=i, depth=d) for i, d in enumerate(args.depths)]
    encoded = [(tok(p, return_tensors="pt"), key) for p, key in prompts]
    runs = [("full", None, None)]
    for p in args.policies:
        for b in args.budgets:
            runs += [(p, b, None)] + ([(p + ALLOC, b, allocation.nearest(calibrations, b))] if calibrations else [])
    rows = []
    start = time.time()
    for name, budget, alloc in tqdm(runs, desc="policies"):
        policy = name.removesuffix(ALLOC)
        small = kvpass.transform(model, policy=policy, budget=budget, chunk=args.chunk, allocation=alloc)
        found = []
        for enc, key in encoded:
            out = small.generate(**enc, max_new_tokens=12, do_sample=False)
            found.append(key in tok.decode(out[0, enc.input_ids.shape[1] :]))
        rows.append((name, "100 %" if budget is None else f"{budget:.0%}", found))

    n = encoded[0][0].input_ids.shape[1]
    print(
        f"\nPasskey retrieval, SmolLM2-135M-Instruct, {n}-token prompts, chunk {args.chunk}, greedy; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {time.time() - start:.0f} s\n"
    )
    print("| policy | budget | " + " | ".join(f"depth {d:g}" for d in args.depths) + " |")
    print("|---|---|" + "---|" * len(args.depths))
    for policy, budget, found in rows:
        print(f"| {policy} | {budget} | " + " | ".join("yes" if f else "no" for f in found) + " |")


if __name__ == "__main__":
    main()
