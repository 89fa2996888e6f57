"""``kvpass bench``: memory and speed of each policy against the full cache, measured side by side.

For every prompt length, the unmodified model and each policy run in a fresh process (so one
case's allocations never count in another's peak): one warm-up, then a timed prefill of the
prompt and ``new`` greedy decode steps. Reported per case: the KV bytes the cache physically
holds, the peak memory growth during prefill and decoding (process resident set on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), prefill seconds and decode tokens/s -- and each as a
ratio against the full cache of the same length, in the same run. A policy named ``NAME+compiled``
is the transformed model compiled with the ``kvpass`` backend (warmed up at the prompt's length,
so compilation is not timed); ``full+static`` is the original with transformers' ``StaticCache``
and ``torch.compile`` (the fastest decoding a transformers user has without kvpass).

Each case also measures its decode step's *weight-reading floor* at its batch size: the model's
linear layers' weights pushed through ``F.linear`` alone (no attention, no cache, no Python
between layers), the least time a decode step of this model can take on this machine.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from kvpass.data.passkey import FILLER

MiB = 2**20


@dataclass
class Case:
    tokens: int
    policy: str  # "full": the unmodified model
    budget: float | None
    kv_bytes: int
    peak_bytes: int
    prefill_s: float
    decode_tok_s: float  # decode steps per second (each step makes one token per batch row)
    device: str
    batch: int = 1
    floor_s: float = float("nan")  # the step's weight-reading floor


def weight_floor(model: torch.nn.Module, batch: int, device: torch.device, reps: int = 20) -> float:
    """Seconds to push ``batch`` rows through every linear layer of ``model`` with ``F.linear``
    (the median of ``reps``): the weights a decode step must read, read the fastest way torch has."""
    import statistics
    import time

    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, w.shape[1], dtype=w.dtype, device=device) for w in weights]
    times = []
    for _ in range(reps + 3):
        _sync(device)
        t = time.perf_counter()
        for w, x in zip(weights, xs, strict=True):
            F.linear(x, w)
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    tokens: int,
    policy: str,
    budget: float | None,
    new: int,
    chunk: int = 512,
    model_name: str = "default",
    batch: int = 1,
) -> Case:
    """One case, in this process: load, (transform,) warm up, then time prefill and decoding."""
    import kvpass
    from kvpass.default_model import load_model
    from kvpass.eval.greedy import greedy

    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(model_name)
    model = model.to(device)
    floor = weight_floor(model, batch, device)
    press = cache = None
    if policy == "full+static":
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=tokens + new + 8)
        model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    elif policy.startswith("kvpress:"):
        from kvpass.eval import peers

        press = peers.press(policy.removeprefix("kvpress:"), budget)
    elif policy != "full":
        budget_arg = int(budget) if budget is not None and budget > 1 else budget
        name = policy.removesuffix("+compiled")
        knobs = kvpass.policies.text_knobs(name, tok)
        model = kvpass.transform(model, policy=name, budget=budget_arg, chunk=chunk, **knobs)
        if policy.endswith("+compiled"):
            model.compile(backend="kvpass")
    ids = tok(FILLER * (tokens // 20 + 1), return_tensors="pt").input_ids[:, :tokens].to(device)
    if ids.shape[1] < tokens:
        raise ValueError(f"could not build a {tokens}-token prompt")
    ids = ids.expand(batch, -1).contiguous()
    for n in (80, 160, 320, 640):  # warm up allocator and kernels, as short as the policy allows
        if cache is not None:
            break
        try:
            greedy(model, ids[:, :n], 3, press=press)
            break
        except ValueError:  # a fractional budget too small for the policy's window: longer
            continue
    if policy.endswith(("+compiled", "+static")):  # compile for this prompt length too
        greedy(model, ids, 3, cache=cache)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _peak(device) if device.type == "cpu" else torch.cuda.memory_allocated(device)
    run = greedy(model, ids, new, press=press, cache=cache)
    _sync(device)
    peak = _peak(device) - before
    return Case(tokens, policy, budget, run.kv_bytes, peak, run.prefill_s, run.decode_tok_s, str(device), batch, floor)


def run_all(
    lengths: list[int],
    policies: list[str],
    budget: float,
    new: int,
    chunk: int = 512,
    peer: str | None = None,
    compiled: bool = False,
    model: str = "default",
    batches: tuple[int, ...] = (1,),
    static: bool = False,
) -> list[Case]:
    """Every (length, batch size, policy) plus the full cache, each in a fresh process; with
    ``peer="kvpress"``, kvpress's counterpart of each policy too (``budget`` must then be a fraction
    of the prompt); with ``compiled``, each policy compiled with the ``kvpass`` backend too; with
    ``static``, the original with a static cache and ``torch.compile`` too."""
    from tqdm import tqdm

    from kvpass.eval import peers

    if peer is not None:
        if peer != "kvpress":
            raise ValueError(f"unknown peer {peer!r}; the one known is kvpress")
        for p in policies:
            peers.press(p, budget)  # a clear error now (not installed, no counterpart, budget not a fraction)
    names = ["full", *(["full+static"] if static else []), *policies]
    names += [f"{p}+compiled" for p in policies] if compiled else []
    names += [f"kvpress:{p}" for p in policies] if peer else []
    cases = [(n, b, p) for n in lengths for b in batches for p in names]
    out = []
    for n, b, p in tqdm(cases, desc="bench"):
        cmd = [sys.executable, "-m", "kvpass.eval.bench", str(n), p, str(budget), str(new), str(chunk), model, str(b)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench case {n} tokens x {b} / {p} failed:\n{done.stderr[-2000:]}")
        out.append(Case(**json.loads(done.stdout.splitlines()[-1])))
    return out


def table(cases: list[Case]) -> str:
    """Markdown: one row per case, with ratios against the original (full cache, eager) at the same
    length and batch size, and the decode step as a multiple of its weight-reading floor."""
    full = {(c.tokens, c.batch): c for c in cases if c.policy == "full"}
    batches = len({c.batch for c in cases}) > 1
    head = ["prompt", *(["batch"] if batches else []), "cache", "KV MiB", "KV ratio", "peak MiB", "peak ratio"]
    head += ["prefill s", "prefill ratio", "decode tok/s", "decode ratio", "step / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        f = full[c.tokens, c.batch]
        if c.policy.startswith("full"):
            name = "original, static cache + torch.compile" if c.policy == "full+static" else "full (original)"
        else:
            name = f"{c.policy.removesuffix('+compiled')} @ {c.budget:g}"
            name += ", compiled" if c.policy.endswith("+compiled") else ""
        cells = [c.tokens, *([c.batch] if batches else []), name]
        cells += [f"{c.kv_bytes / MiB:.1f}", f"{c.kv_bytes / f.kv_bytes:.3f}"]
        cells += [f"{c.peak_bytes / MiB:.0f}", f"{c.peak_bytes / f.peak_bytes:.2f}"]
        cells += [f"{c.prefill_s:.2f}", f"{c.prefill_s / f.prefill_s:.2f}"]
        cells += [f"{c.decode_tok_s * c.batch:.1f}", f"{c.decode_tok_s / f.decode_tok_s:.2f}"]
        cells += [f"{1 / c.decode_tok_s / c.floor_s:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def to_json(cases: list[Case]) -> str:
    return json.dumps([asdict(c) for c in cases], indent=1)


if __name__ == "__main__":  # one case: tokens policy budget new chunk model batch -> a JSON line
    n, p, b, k, ch, m, batch = sys.argv[1:8]
    budget = None if p.startswith("full") else float(b)
    print(json.dumps(asdict(measure(int(n), p, budget, int(k), int(ch), m, int(batch)))))
