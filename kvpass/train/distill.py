"""Training Attention-Gates on a frozen model: self-distillation under in-context eviction.

Each step runs a sequence twice through the frozen model: once as it is (the teacher), once with
every attention layer replaced by :func:`gated_attention`, in which the layer's gate flags each
token per KV head and flagged-out tokens are hidden from all later queries of that head
(:mod:`kvpass.train.in_context`). The flags are hard in the forward pass; their gradient is the keep
probability's (straight-through).

    loss = KL(teacher || student) + rate_weight * mean_layers (keep rate - target)^2
           [+ hindsight_weight * hindsight]

The KL is averaged over positions, those predicting the answer of a retrieval sample weighted
``answer_weight`` times: they are the few whose prediction needs a distant fact. The optional
hindsight term says directly which tokens those positions need: with a_j the teacher's attention
from them to context token j (per layer and KV head, summed over the group's heads, the first
``SINKS`` tokens and the ``window`` before them left out, normalised to sum 1), it is the
a-weighted negative log keep probability, ``-sum_j a_j log p_j``, averaged over layers and heads.
It pulls the keep probability of what the answer reads up; the rate term pulls every token down.

Only the gates learn. Checkpoints (gates, optimizer state, step, log) are safetensors, so a run
resumes where it stopped; ``loss.png`` plots the curves.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AttentionInterface

from kvpass.data import corpus
from kvpass.policies import gate_network as gates
from kvpass.train.in_context import in_context_attention

ATTENTION = "kvpass_gate"


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: Tensor, threshold: float) -> Tensor:
        return (p >= threshold).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def hard_flags(p: Tensor, threshold: float) -> Tensor:
    """Exactly 0/1 flags ``p >= threshold`` whose gradient is the one of ``p`` (straight-through)."""
    return _StraightThrough.apply(p, threshold)


@dataclass
class _Gating:
    gates: gates.Gates | None = None
    threshold: float = 0.5
    window: int = 0
    rates: list[Tensor] = field(default_factory=list)
    probs: list[Tensor] = field(default_factory=list)


_ACTIVE = _Gating()


def gated_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: the layer's gate, then in-context eviction (unpadded input)."""
    g = _ACTIVE.gates
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    p = g(module.layer_idx, query, key, value, scale)
    flags = hard_flags(p, _ACTIVE.threshold)
    _ACTIVE.rates.append(flags.mean())
    _ACTIVE.probs.append(p)
    out = in_context_attention(query, key, value, flags, scale, _ACTIVE.window)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gated(model: nn.Module, g: gates.Gates, threshold: float = 0.5, window: int = 0):
    """Within the block, ``model``'s attention runs through ``g`` (see :func:`gated_attention`)."""
    AttentionInterface.register(ATTENTION, gated_attention)  # here, not on import: no global change until used
    before = model.config._attn_implementation
    _ACTIVE.gates, _ACTIVE.threshold, _ACTIVE.window, _ACTIVE.rates, _ACTIVE.probs = g, threshold, window, [], []
    model.set_attn_implementation(ATTENTION)
    try:
        yield _ACTIVE.rates
    finally:
        model.set_attn_implementation(before)
        _ACTIVE.gates = None


def distill_loss(student: Tensor, teacher: Tensor, weight: Tensor | None = None) -> Tensor:
    """KL(teacher || student) per position from logits ``[B, T, V]``, averaged with ``weight [B, T]``."""
    s = F.log_softmax(student.float(), dim=-1)
    t = F.log_softmax(teacher.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() if weight is None else (kl * weight).sum() / weight.sum()


SINKS = 4  # the first tokens: kept by every policy's logic anyway, they would swamp the hindsight weights


def hindsight_weights(attentions, rows: int, window: int, kv_heads: int) -> Tensor:
    """From per-layer attention probabilities ``[1, H, T, T]``: how much the last ``rows`` queries
    attend to each context token ``j < T - rows - window`` (``j >= SINKS``), per layer and KV head,
    normalised to sum 1 -- ``[layers, kv_heads, C]``."""
    T = attentions[0].shape[-1]
    C = T - rows - window
    if C <= SINKS:
        raise ValueError(f"no context token to weigh: {T} tokens, {rows} rows, window {window}")
    a = torch.stack([x[0, :, -rows:, :C].sum(1) for x in attentions]).float()  # [L, H, C]
    a = a.unflatten(1, (kv_heads, -1)).sum(2)
    a[..., :SINKS] = 0
    return a / a.sum(-1, keepdim=True)


@torch.no_grad()
def teacher_with_hindsight(model, ids: Tensor, rows: int, window: int, kv_heads: int) -> tuple[Tensor, Tensor]:
    """The frozen model's logits on ``ids [1, T]`` and :func:`hindsight_weights` from its attention."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the one that returns attention probabilities
    try:
        out = model(ids, use_cache=False, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return out.logits, hindsight_weights(out.attentions, rows, window, kv_heads)


def hindsight_loss(probs: list[Tensor], weights: Tensor) -> Tensor:
    """``-sum_j w_j log p_j`` per layer and KV head (``probs``: per layer ``[1, Hkv, T]``), averaged."""
    C = weights.shape[-1]
    logp = torch.stack([p[0, :, :C].clamp_min(1e-6).log() for p in probs])  # [L, Hkv, C]
    return -(weights * logp).sum(-1).mean()


@torch.no_grad()
def teacher_targets(scorer: nn.Module, ids: Tensor, rates: float | Tensor, share: str = "head") -> Tensor:
    """A teacher's keep set for ``ids [1, T]``, ``[layers, kv_heads, T]`` (0/1): per layer and KV
    head, the ``rates`` share (one, or one per layer) of the tokens the ``scorer`` scores highest;
    ``share="model"``: the ``rates`` share of all layers' and KV heads' entries together, ranked
    as one (the policy's ``share="model"``; the scores must be comparable across layers, as
    KVzip's attention probabilities are). ``scorer``: a transformed model that keeps every token
    (budget 1.0), so its slots hold the policy's score of each (e.g. KVzip's, from reconstructing
    the sequence); its first ``sink_tokens`` are kept."""
    cache = scorer.kvpass_new_cache(decode_reserve=0)
    scorer.kvpass_forward(ids, cache, logits_to_keep=1)
    T = ids.shape[1]
    scores = []
    for _, s in sorted(cache.slots.items()):
        order = s.pos[0].argsort(dim=-1)  # [Hkv, T]: by position
        scores.append(s.score[0].gather(-1, order))
    score = torch.stack(scores).float()  # [L, Hkv, T]
    score[..., : scorer.kvpass_policy.sink_tokens] = torch.inf
    if share == "model":
        flat = score.flatten()
        keep = min(flat.numel(), math.ceil(float(rates) * flat.numel()))
        return torch.zeros_like(flat).scatter_(0, flat.topk(keep).indices, 1.0).view_as(score)
    rates = torch.as_tensor(rates, dtype=torch.float32, device=score.device).expand(score.shape[0])
    keep = (rates * T).ceil().long().clamp(1, T)  # [L]
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = highest
    return (rank < keep[:, None, None]).float()


def teacher_loss(probs: list[Tensor], keep: Tensor) -> Tensor:
    """Binary cross-entropy of the keep probabilities (per layer ``[1, Hkv, T]``) against a
    teacher's keep set ``[layers, kv_heads, T]``, averaged."""
    p = torch.stack([x[0, :, : keep.shape[-1]] for x in probs]).clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(p, keep)


@torch.enable_grad()
def train_step(
    model,
    g: gates.Gates,
    opt,
    ids: Tensor,
    target: float | Tensor,
    rate_weight: float,
    threshold: float,
    window: int = 0,
    weight: Tensor | None = None,
    hindsight: tuple[float, int] | None = None,
    keep: tuple[float, Tensor] | None = None,
    share: str = "head",
) -> dict:
    """One optimisation step on ``ids [B, T]`` (``weight [B, T]``: of each position's KL; ``target``:
    the keep rate, or one per layer; ``hindsight``: (its weight, the rows it is read from), B = 1;
    ``keep``: (its weight, a teacher's keep set from :func:`teacher_targets`), B = 1); returns
    the losses and the mean keep rate. ``share="model"``: the rate penalty is on the mean over
    layers only, so layers keep what the teacher's model-wide keep set asks of each."""
    with torch.no_grad():
        if hindsight is None:
            teacher = model(ids, use_cache=False).logits
        else:
            teacher, weights = teacher_with_hindsight(model, ids, hindsight[1], window, g.kv_heads)
    with gated(model, g, threshold, window) as rates:
        student = model(ids, use_cache=False).logits
        kl = distill_loss(student, teacher, weight)
        rate = torch.stack(rates)
        penalty = (rate - target).square().mean() if share == "head" else (rate.mean() - target).square()
        loss = kl + rate_weight * penalty
        if hindsight is not None:
            seen = hindsight_loss(_ACTIVE.probs, weights)
            loss = loss + hindsight[0] * seen
        if keep is not None:
            taught = teacher_loss(_ACTIVE.probs, keep[1])
            loss = loss + keep[0] * taught
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    row = {name: float(t.detach()) for name, t in (("loss", loss), ("kl", kl), ("keep", rate.mean()))}
    row |= {"hindsight": float(seen.detach())} if hindsight is not None else {}
    return row | ({"teacher": float(taught.detach())} if keep is not None else {})


def train_gates(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    *,
    target: float = 0.5,
    steps: int = 200,
    seq_len: int = 512,
    lr: float = 1e-2,
    rate_weight: float = 100.0,
    threshold: float = 0.5,
    window: int = 32,
    answer_weight: float = 20.0,
    hindsight_weight: float = 0.0,
    teacher: str | None = None,
    teacher_weight: float = 1.0,
    retrieval: tuple[str, ...] = ("lockers",),
    seed: int = 0,
    allocation: tuple[float, ...] | list[float] | None = None,
    share: str = "head",
    save_every: int = 25,
    resume: bool = True,
    progress: bool = True,
) -> gates.Gates:
    """Train gates for ``model`` (frozen) and write them to ``out`` (safetensors); return them.

    ``window``: a token the gate flags out stays visible to the ``window`` queries after it (the
    policy's ``window`` at inference); ``threshold``: keep when p >= threshold; ``answer_weight``:
    the KL weight of the positions that predict a retrieval answer (1 elsewhere); ``hindsight_weight``:
    of the hindsight term on retrieval samples (module docstring; 0: none); ``retrieval``: the kinds
    of retrieval chat trained on (:mod:`kvpass.data.corpus`), in turn with documentation text. ``teacher``:
    a policy whose keep set the gate learns to predict on every sample (``teacher_weight``: of that
    binary cross-entropy; :func:`teacher_targets`), e.g. ``"kvzip"``, so a one-pass gate learns what a
    query-agnostic scorer that reads the context twice would keep. ``allocation``:
    per-layer multiples of the budget (:mod:`kvpass.runtime.allocation`): layer i is trained to keep
    ``min(1, target * allocation[i])``, and the policy then gives each layer that share of the budget.
    ``share="model"``: trained for one budget over the whole model (the policy's ``share="model"``,
    which the checkpoint then sets by default): the keep rate is held to ``target`` over all layers
    together and the teacher's keep set is its best ``target`` share model-wide.

    An existing ``out`` from an earlier run is resumed (``resume=False``: start over). Beside it:
    ``<out>.optim.safetensors`` (optimizer state), ``<out>.log.json`` (every step) and ``<out>.png``
    (loss and keep rate).
    """
    from kvpass.transform import sites_of

    if not 0.0 < target < 1.0:
        raise ValueError(f"target keep rate must be in (0, 1), got {target}")
    out = Path(out)
    model.eval().requires_grad_(False)
    base = gates.BaseModel.of(model, sites_of(model)[1])
    if share not in ("head", "model"):
        raise ValueError(f"share must be 'head' or 'model' for training, got {share!r}")
    if share == "model" and allocation is not None:
        raise ValueError("share='model' learns each layer's share itself; train it without an allocation")
    if allocation is not None and len(allocation) != base.layers:
        raise ValueError(f"allocation has {len(allocation)} multipliers, this model has {base.layers} attention layers")
    g = gates.Gates(base.layers, base.heads, base.kv_heads, base.head_dim, seed=seed)
    opt = torch.optim.Adam(g.parameters(), lr=lr)
    info = {"target": target, "threshold": threshold, "window": window, "seq_len": seq_len}
    info |= {"lr": lr, "rate_weight": rate_weight, "answer_weight": answer_weight}
    if hindsight_weight:
        info["hindsight_weight"] = hindsight_weight
    if teacher:
        info |= {"teacher": teacher, "teacher_weight": teacher_weight}
    if tuple(retrieval) != ("lockers",):
        info["retrieval"] = list(retrieval)
    if allocation is not None:
        info["allocation"] = [float(a) for a in allocation]
    if share != "head":
        info["share"] = share
    log: list[dict] = []
    spent = 0.0
    if resume and out.is_file():
        loaded, before, _ = gates.load(out, base)
        if changed := [f"{k} {before.get(k)} -> {v}" for k, v in info.items() if before.get(k) != v]:
            raise ValueError(
                f"{out} was trained with other settings ({', '.join(changed)}); start over: --restart (resume=False)"
            )
        g.load_state_dict(loaded.state_dict())
        opt.load_state_dict(_optimizer_state(opt, load_file(str(out.with_suffix(".optim.safetensors")))))
        logfile = out.with_suffix(".log.json")
        log = json.loads(logfile.read_text())[: before["step"]] if logfile.is_file() else []
        spent = before.get("seconds", 0.0)
    device = next(model.parameters()).device
    targets = target if allocation is None else torch.tensor([min(1.0, target * a) for a in allocation], device=device)
    g.to(device).train()
    scorer = None
    if teacher:
        from kvpass import policies
        from kvpass.transform import transform

        knobs = policies.text_knobs(teacher, tokenizer)
        # each KV head its own table of every token's score (the teacher's keep set is ranked here)
        scorer = transform(model, teacher, 1.0, chunk=seq_len, evict_during_decode=False, share="head", **knobs)
    data = corpus.samples(tokenizer, seq_len, seed, tuple(retrieval))
    for _ in range(len(log)):  # the samples already seen
        next(data)
    started = time.perf_counter()
    bar = tqdm(range(len(log), steps), initial=len(log), total=steps, disable=not progress, desc="train gates")
    for step in bar:
        tokens, answer = next(data)
        ids = torch.tensor([tokens], device=device)
        weight = torch.ones(ids.shape, device=device)
        if answer:  # the positions that predict the answer's tokens
            weight[0, -answer - 1 : -1] = answer_weight
        hindsight = (hindsight_weight, answer + 1) if hindsight_weight and answer else None
        taught = (teacher_weight, teacher_targets(scorer, ids, targets, share)) if scorer is not None else None
        row = train_step(model, g, opt, ids, targets, rate_weight, threshold, window, weight, hindsight, taught, share)
        log.append({"step": step + 1, **row})
        bar.set_postfix(kl=f"{row['kl']:.3f}", keep=f"{row['keep']:.2f}")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            seconds = spent + time.perf_counter() - started
            _save(out, g, opt, base, {**info, "step": step + 1, "seconds": round(seconds, 1)}, log)
    return g.eval().requires_grad_(False)


def _save(out: Path, g: gates.Gates, opt, base: gates.BaseModel, info: dict, log: list[dict]) -> None:
    state = opt.state_dict()["state"]
    optim = {f"optim.{i}.{name}": t for i, s in state.items() for name, t in s.items() if torch.is_tensor(t)}
    save_file(optim, str(out.with_suffix(".optim.safetensors")))
    gates.save(g, out, base, info)
    out.with_suffix(".log.json").write_text(json.dumps(log))
    _plot(out.with_suffix(".png"), log)


def _optimizer_state(opt, extra: dict[str, Tensor]) -> dict:
    state = opt.state_dict()
    n = len(state["param_groups"][0]["params"])
    names = ("exp_avg", "exp_avg_sq", "step")
    state["state"] = {i: {k: extra[f"optim.{i}.{k}"] for k in names if f"optim.{i}.{k}" in extra} for i in range(n)}
    state["state"] = {i: s for i, s in state["state"].items() if s}
    return state


def _plot(path: Path, log: list[dict]) -> None:
    from kvpass.extras import need

    need("matplotlib", "Plotting").use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [r["kl"] for r in log], label="KL(teacher || gated)")
    a.plot(steps, [r["loss"] for r in log], label="loss", alpha=0.6)
    if seen := [(r["step"], r["hindsight"]) for r in log if "hindsight" in r]:
        a.plot(*zip(*seen, strict=True), label="hindsight (retrieval steps)", alpha=0.6)
    a.set_xlabel("step")
    a.set_yscale("log")
    a.legend()
    b.plot(steps, [r["keep"] for r in log])
    b.set_xlabel("step")
    b.set_ylabel("mean keep rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
