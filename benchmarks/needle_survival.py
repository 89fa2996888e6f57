"""Which tokens of the needle survive compression, per layer and KV head? For each policy, the
passkey context (the question not yet asked: query-agnostic) is read into a cache at ``--budget``;
then, per layer, the share of (KV head x key-digit token) entries still held, and the share of
the needle sentence's tokens. Prints one Markdown row per layer, one column per policy.

    python benchmarks/needle_survival.py --policies gate kvzip tova --budget 0.25 --samples 4
"""

from __future__ import annotations

import argparse
import re

import torch

import kvpass
from kvpass import policies as kvpass_policies
from kvpass.data import tasks
from kvpass.data.passkey import needle
from kvpass.eval.evaluate import read, render


def spans(tokenizer, text: str, parts: list[str]) -> list[list[int]]:
    """For each of ``parts``, the indices of the tokens of ``text`` that overlap any occurrence of it."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for part in parts:
        chars = [(m.start(), m.end()) for m in re.finditer(re.escape(part), text)]
        out.append([i for i, (a, b) in enumerate(enc.offset_mapping) if any(a < e and b > s for s, e in chars)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", nargs="+", default=["gate", "kvzip", "tova"])
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=2450)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    model, tok = kvpass.load_default_model()
    held: dict[str, dict[int, list[float]]] = {p: {} for p in args.policies}
    for s in range(args.samples):
        case = tasks.make("passkey", tok, args.tokens, args.seed + s)
        context = render(tok, case, "agnostic")[0]
        text = tok.decode(context[0])
        key = case.answers[0]
        digits, sentence = spans(tok, text, [key, needle(key).strip()])
        for p in args.policies:
            knobs = kvpass_policies.text_knobs(p, tok)
            small = kvpass.transform(model, p, args.budget, chunk=args.chunk, evict_during_decode=False, **knobs)
            cache = read(small, context, 16).cache
            for layer, slots in cache.slots.items():
                kept = [set(slots.pos[0, h][slots.valid[0, h]].tolist()) for h in range(slots.pos.shape[1])]
                d = sum(i in k for k in kept for i in digits) / (len(kept) * len(digits))
                n = sum(i in k for k in kept for i in sentence) / (len(kept) * len(sentence))
                held[p].setdefault(layer, []).append((d, n))
    print(
        f"\nNeedle tokens held after reading ~{args.tokens}-token passkey contexts at {args.budget:.0%}, "
        f"{args.samples} samples (seeds {args.seed}-), chunk {args.chunk}: key digits / needle sentence\n"
    )
    print("| layer | " + " | ".join(args.policies) + " |")
    print("|---|" + "---|" * len(args.policies))
    for layer in sorted(held[args.policies[0]]):
        cells = []
        for p in args.policies:
            rows = held[p][layer]
            cells.append(f"{sum(r[0] for r in rows) / len(rows):.2f} / {sum(r[1] for r in rows) / len(rows):.2f}")
        print(f"| {layer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
