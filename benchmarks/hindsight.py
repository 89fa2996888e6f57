"""Eviction with hindsight: how well could a policy do at a budget on this model, if it knew which
context tokens the model will look at?

For each case of the evaluation suite (``kvpass eval``'s tasks, aware mode), the unmodified model
answers with the full cache. Then its attention is read (eager attention, the prompt and that answer
in one pass) and, per layer and KV head, the context tokens with the most attention from the chosen
rows are kept -- ``question``: the question's tokens (what a query-aware policy can see),
``answer``: the question's and the answer's (hindsight) -- so that the cache holds ``budget`` x the
prompt's tokens, the question included. The model answers again with the other context tokens hidden
from the question and the answer (the context itself was prefilled whole). Not a policy: an upper
reference for what per-head selection can reach on this model.

    python benchmarks/hindsight.py --samples 4 --budgets 0.5 0.25
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from tqdm import tqdm
from transformers import AttentionInterface

import kvpass
from kvpass.data import tasks
from kvpass.eval.evaluate import answer, render, score

ROWS = ("question", "answer")
_HIDDEN: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (context length, keep [Hkv, context])


def _attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention in which queries after the context see only its kept tokens (per KV head)."""
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    G = H // k.shape[1]
    qpos = torch.arange(Tk - Tq, Tk)[:, None]
    seen = (torch.arange(Tk)[None, :] <= qpos).expand(H, Tq, Tk).clone()
    if module.layer_idx in _HIDDEN:
        C, keep = _HIDDEN[module.layer_idx]
        seen[:, :, :C] &= keep.repeat_interleave(G, 0)[:, None, :] | (qpos < C)[None]
    logits = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * (scaling or q.shape[-1] ** -0.5)
    probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)
    return (probs @ v.repeat_interleave(G, 1)).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvpass_hindsight", _attention)


def keep_sets(attentions, C: int, T: int, budget: float, rows: str, G: int) -> dict[int, tuple[int, torch.Tensor]]:
    """Per layer, the ``budget * T - (T - C)`` context tokens each KV head's rows attend to most."""
    n = int(budget * T) - (T - C)
    if n < 1:
        raise ValueError(f"budget {budget} leaves no context token (prompt {T}, question {T - C})")
    out = {}
    for layer, a in enumerate(attentions):
        mass = a[0, :, C : (T if rows == "question" else None), :C].sum(1)  # [H, C]
        mass = mass.view(-1, G, C).sum(1)
        keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(1, mass.topk(n, dim=1).indices, True)
        out[layer] = (C, keep)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="first sample's seed (kvpass eval's default: 0)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    model, tok = kvpass.load_default_model()
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    cases = [
        tasks.make(t, tok, args.tokens, args.seed + i)
        for t in tasks.TASKS
        if t != "passkey"
        for i in range(args.samples)
    ]
    scores: dict[tuple[str, float | None], dict[str, list[float]]] = {}

    def record(rows, budget, case, ids):
        out = tok.decode(ids, skip_special_tokens=True)
        scores.setdefault((rows, budget), {}).setdefault(case.task, []).append(score(out, case.answers))

    started = time.perf_counter()
    for case in tqdm(cases, desc="hindsight"):
        context, question = render(tok, case, "agnostic")
        ids = torch.cat([context, question], dim=1)
        C, T = context.shape[1], ids.shape[1]
        _HIDDEN.clear()
        model.set_attn_implementation("sdpa")
        full = answer(model, [ids], args.new_tokens, tok.eos_token_id)
        record("full", None, case, full)
        model.set_attn_implementation("eager")
        attentions = model(torch.cat([ids, full[None]], dim=1), output_attentions=True, use_cache=False).attentions
        model.set_attn_implementation("kvpass_hindsight")
        if not torch.equal(answer(model, [ids], args.new_tokens, tok.eos_token_id), full):
            raise RuntimeError("the masking attention, hiding nothing, does not reproduce the model's answer")
        for rows in ROWS:
            for budget in args.budgets:
                _HIDDEN.update(keep_sets(attentions, C, T, budget, rows, G))
                record(rows, budget, case, answer(model, [ids], args.new_tokens, tok.eos_token_id))
    _HIDDEN.clear()
    model.set_attn_implementation("sdpa")

    names = sorted(next(iter(scores.values())))
    print(
        f"\n{platform.machine()} CPU, torch {torch.__version__}, {len(cases)} cases of {args.tokens} tokens, "
        f"seeds {args.seed}..{args.seed + args.samples - 1}, {time.perf_counter() - started:.0f} s\n"
    )
    print("| kept by attention from | budget | " + " | ".join(names) + " | average |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for (rows, budget), per in scores.items():
        means = [100 * sum(per[t]) / len(per[t]) for t in names]
        cells = " | ".join(f"{m:.1f}" for m in means)
        label = "- (full cache)" if budget is None else rows
        print(
            f"| {label} | {'100 %' if budget is None else f'{budget:.0%}'} | {cells} | {sum(means) / len(means):.1f} |"
        )


if __name__ == "__main__":
    main()
