"""What the Attention-Gate costs on the default model: parameters, multiply-adds per decoded token,
and decode time against the same evicting cache without a gate, side by side in one run.

    python benchmarks/gate_overhead.py --tokens 1024 --budget 0.25 --new 64 --repeats 3

The baseline is ``streaming`` at the same budget: the same slot tables, decode op and batched
admission, with the cheapest possible score, so the difference is the gate (its attention over
the slots, its projections and readout, and the drop rule). Runs alternate to spread noise.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

import kvpass
from kvpass.eval.greedy import greedy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    model, tok = kvpass.load_default_model()
    gated = kvpass.transform(model, policy="gate", budget=args.budget)
    plain = kvpass.transform(model, policy="streaming", budget=args.budget)
    g = gated.kvpass_policy.gates
    L, Hkv, GD, D = g.query.shape
    slots = round(args.budget * args.tokens)
    gate_macs = L * Hkv * (GD * D + 2 * (slots + 1) * D + g.readout.shape[-1])
    model_macs = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)  # weights read per token
    attn_macs = L * (Hkv * GD // D) * 2 * (slots + 1) * D

    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * (args.tokens // 10)
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    speeds: dict[str, list[float]] = {"streaming": [], "gate": []}
    for m in (plain, gated):
        greedy(m, ids[:, :256], 4)  # warm up
    for _ in range(args.repeats):
        for name, m in (("streaming", plain), ("gate", gated)):
            speeds[name].append(greedy(m, ids, args.new).decode_tok_s)
    s, gt = statistics.median(speeds["streaming"]), statistics.median(speeds["gate"])
    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"default model fp32, prompt {ids.shape[1]} tokens, budget {args.budget:g} ({slots} slots), {args.new} new")
    print(f"gate parameters: {sum(p.numel() for p in g.parameters()):,} ({L} layers x {Hkv} KV heads)")
    share = gate_macs / (model_macs + attn_macs)
    print(
        f"multiply-adds per decoded token: gate {gate_macs / 1e6:.2f} M, model weights {model_macs / 1e6:.1f} M, "
        f"model attention over the slots {attn_macs / 1e6:.2f} M -> gate = {share:.1%} of the model's"
    )
    print(f"decode tok/s (median of {args.repeats}): streaming {s:.2f}, gate {gt:.2f} (runs: {speeds})")
    print(f"gate decode-time overhead: {s / gt - 1:+.1%}")


if __name__ == "__main__":
    main()
