"""Sweep every causal-LM architecture of the installed transformers through kvpass.

Each architecture is built from its own config class with tiny random weights (:func:`tiny_config`:
2 layers, hidden size 64, 4 query heads over 2 KV heads where the config has grouped-query
attention, vocabulary 128; what a family needs beyond that is one entry of :data:`KNOBS`), then

- inspected (the attention sites kvpass finds: heads, KV heads, head dim, window, soft-cap);
- transformed at full budget: logits over a 40-token prefill (in chunks of 16) and 16 decode steps
  against the original model run on the whole sequence at once (fp32), and the greedy tokens of
  ``generate()`` against the original's;
- transformed with a small budget (``tova``, 8 slots for 56 tokens): it generates, and every layer
  holds at most its budget;
- where asked (``paths``, ``kvpass sweep --compile --onnx``), the small-budget model compiled
  (``backend="kvpass"``) and exported to an ONNX engine gives the eager greedy tokens: the row's
  *paths* say which passed (``compile``, ``onnx``) and why any other did not.

Outcome: **exact**, **refused** (kvpass said why before doing anything), **wrong** (it ran but the
full-budget logits or tokens differ: a defect) or **crashed** (an error that is not a refusal: a
defect); or, not counted, **original fails** (the original model errs at this size) and **not
built** (no tiny config of the family yet). Architectures that are not decoder-only text models
with attention are out of scope, each with its reason (:data:`OUT_OF_SCOPE`).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field

import torch

TOLERANCE = 1e-4  # max |logit difference|, fp32
PROMPT, STEPS, CHUNK, BUDGET = 40, 16, 16, 8

# model type -> why kvpass does not apply
OUT_OF_SCOPE = {
    "mamba": "state-space model: no attention, no KV cache",
    "mamba2": "state-space model: no attention, no KV cache",
    "falcon_mamba": "state-space model: no attention, no KV cache",
    "rwkv": "recurrent model: no attention, no KV cache",
    "xlstm": "recurrent model: no attention, no KV cache",
    "reformer": "LSH and local attention over fixed chunks, not a KV cache of past tokens",
    "musicgen": "audio codebooks, not a text model",
    "musicgen_melody": "audio codebooks, not a text model",
    "moshi": "speech model with audio codebooks, not a text model",
    "moss_transcribe_diarize": "speech transcription (audio encoder-decoder), not a text model",
    "whisper": "the decoder of a speech encoder-decoder: it needs the audio encoder's states",
    "trocr": "the decoder of an image encoder-decoder: it needs the image encoder's states",
    "xlnet": "permutation language model with two attention streams, not a causal LM",
    "xlm": "masked/translation language model: causal only by configuration of a cross-lingual encoder",
    "prophetnet": "n-stream decoder of an encoder-decoder (predicts several future tokens at once)",
}

# model type -> config fields beyond the generic tiny ones (what a family needs to be small and valid)
KNOBS: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_theta": 10000.0, "rope_type": "default"}}},
    "dots1": {"n_shared_experts": 1},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "codegen": {"rotary_dim": 8},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "gptj": {"rotary_dim": 8},
}


@dataclass
class Row:
    model_type: str
    model_class: str
    outcome: str  # exact / refused / wrong / crashed / out of scope
    reason: str = ""
    sites: int = 0
    heads: str = ""  # "4/2x16": query heads / KV heads x head dim
    windows: str = ""
    softcap: float = 0.0
    max_diff: float | None = None
    same_tokens: bool | None = None
    bounded: bool | None = None
    seconds: float = 0.0
    paths: str = ""  # the paths beyond eager that gave the eager tokens, and why any other did not
    extra: dict = field(default_factory=dict)


_SIZES = {  # generic field -> tiny value
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
    "max_position_embeddings": 512,
    "decoder_layers": 2,  # the decoders of encoder-decoder families, sized apart from their encoders
    "encoder_layers": 2,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "kv_lora_rank": 32,  # multi-head latent attention (DeepSeek)
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "n_group": 1,  # grouped expert routing over the tiny number of experts
    "topk_group": 1,
    "linear_num_key_heads": 2,  # hybrids' recurrent layers (Gated DeltaNet, Mamba-2)
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "moe_shared_expert_intermediate_size": 32,
}


def _fields(config_cls) -> dict:
    return {f.name: f for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else {}


def tiny_config(model_type: str):
    """The config of ``model_type`` shrunk to a tiny random model (see the module docstring)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    return cls(**_tiny_kwargs(cls, cls(), KNOBS.get(model_type, {})))


def _tiny_kwargs(cls, default, knobs: dict) -> dict:
    """Constructor arguments that shrink ``cls`` (whose default instance is ``default``); sub-configs
    (a multimodal model's text and vision configs) are shrunk the same way."""
    from transformers import PreTrainedConfig

    names = set(_fields(cls)) | set(vars(default))
    own = getattr(cls, "attribute_map", {})  # generic name -> the config's own
    kwargs = {}

    def put(name, value):
        name = name if name in names else own.get(name)
        if name is not None and name in names:
            kwargs[name] = value

    def get(name):
        try:
            return getattr(default, name, None)
        except Exception:  # a per-layer attribute read globally (Gemma 4)
            return None

    for name, value in _SIZES.items():
        put(name, value)
    types = get("layer_types")
    if isinstance(types, list) and len(set(types)) > 1:  # one layer of each kind (hybrids: attention too)
        kinds = list(dict.fromkeys(types))
        put("layer_types", kinds)
        put("num_hidden_layers", len(kinds))
    if "num_key_value_heads" in names or "num_key_value_heads" in own:  # grouped queries (not under MLA)
        put("num_key_value_heads", 4 if "kv_lora_rank" in names else 2)
    put("head_dim", _SIZES["qk_rope_head_dim"] if "qk_rope_head_dim" in names else 16)  # MLA: the rotary part
    if get("sliding_window"):
        put("sliding_window", 8)
    for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        put(name, 4)
    for name in ("num_experts_per_tok", "moe_topk"):
        put(name, 2)
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"):
        put(name, 32)
    if get("is_decoder") is not None or "is_decoder" in names:
        put("is_decoder", True)  # encoder families that are causal LMs only as decoders
    put("pad_token_id", 0)
    put("bos_token_id", 1)
    put("eos_token_id", 2)
    for name in names:
        sub = get(name)
        if isinstance(sub, PreTrainedConfig):
            kwargs[name] = _tiny_kwargs(type(sub), sub, knobs.get(name, {}))
    kwargs.update({k: v for k, v in knobs.items() if not isinstance(v, dict) or k not in kwargs})
    return kwargs


def build(model_type: str, seed: int = 0):
    """A tiny random model of ``model_type`` (eval mode, fp32) and its class name."""
    from transformers.models.auto import modeling_auto

    config = tiny_config(model_type)
    cls = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING._load_attr_from_module(
        model_type, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    )
    if not isinstance(config, cls.config_class):  # a text model registered under its multimodal config
        config = config.get_text_config()
    torch.manual_seed(seed)
    try:
        model = cls._from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):  # no SDPA attention in this family
        model = cls._from_config(config, attn_implementation="eager")
    languages = getattr(config, "languages", None)
    for m in model.modules():  # X-MOD's adapters are per language: pick one
        if languages and hasattr(m, "set_default_language"):
            m.set_default_language(next(iter(languages)))
    return model.float().eval(), cls.__name__


def check(model_type: str, paths: tuple[str, ...] = ()) -> Row:
    """Build, inspect, and run ``model_type`` through kvpass; one :class:`Row`. ``paths``: also
    check these of :data:`PATHS` on an exact row."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as NAMES

    row = Row(model_type, NAMES[model_type], "crashed")
    if model_type in OUT_OF_SCOPE:
        row.outcome, row.reason = "out of scope", OUT_OF_SCOPE[model_type]
        return row
    start = time.perf_counter()
    try:
        _check(model_type, row, paths)
    except Exception as e:
        row.outcome, row.reason = "crashed", f"{type(e).__name__}: {_short(str(e))}"
        row.extra["traceback"] = traceback.format_exc()
    row.seconds = time.perf_counter() - start
    return row


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


PATHS = ("compile", "onnx")


def _check(model_type: str, row: Row, paths: tuple[str, ...] = ()) -> None:
    import kvpass
    from kvpass.passes import TokenMixingError

    try:
        model, row.model_class = build(model_type)
    except Exception as e:  # the sweep's limit, not kvpass's: no tiny config of this family yet (see KNOBS)
        row.outcome, row.reason = "not built", f"{type(e).__name__}: {_short(str(e))}"
        return
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(sum(map(ord, model_type)))
    ids = torch.randint(3, vocab, (2, PROMPT), generator=g)
    try:
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)
            ref = reference_logits(model, want)
    except Exception as e:
        row.outcome, row.reason = "original fails", f"{type(e).__name__}: {_short(str(e))}"
        return
    try:
        sites = kvpass.find_attention(model)
        exact = kvpass.transform(model, policy="full", chunk=CHUNK)
    except (ValueError, TokenMixingError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "could not capture" not in str(e) and "probe" not in str(e):
            raise
        row.outcome, row.reason = "refused", _short(str(e), 400)
        return
    rewritten = [s for s in exact.kvpass_sites if s.action == "rewrite"]
    row.sites = len(rewritten)
    row.heads = ", ".join(sorted({_heads(s) for s in rewritten}))
    row.windows = ", ".join(_mask(s) for s in sites)
    row.softcap = max(s.softcap for s in sites)
    with torch.no_grad():
        got = exact.generate(ids, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)
        row.same_tokens = bool(torch.equal(got, want))
        row.max_diff = float((kvpass_logits(exact, want, PROMPT) - ref).abs().max())
    small = kvpass.transform(model, policy="tova", budget=BUDGET, chunk=CHUNK)
    small.generate(ids[:, :PROMPT], max_new_tokens=STEPS, do_sample=False)
    stats = kvpass.cache_stats(small)
    row.bounded = all(layer.capacity <= BUDGET for layer in stats.layers)
    ok = row.same_tokens and row.max_diff <= TOLERANCE and row.bounded
    row.outcome = "exact" if ok else "wrong"
    if ok and paths:
        row.paths = ", ".join(_paths(model, ids[:, :PROMPT], paths))
    if not ok:
        row.reason = (
            f"max |logit diff| {row.max_diff:.2e}, same tokens {row.same_tokens}, small budget bounded {row.bounded}"
        )


def _paths(model, ids: torch.Tensor, paths: tuple[str, ...]) -> list[str]:
    """The small-budget model (``tova``, :data:`BUDGET` slots) compiled and exported, against its
    eager greedy tokens: each path's name where it gives them, else what happened."""
    import tempfile
    from pathlib import Path

    import numpy as np

    import kvpass

    greedy = dict(max_new_tokens=STEPS, do_sample=False, use_cache=True, eos_token_id=None)
    small = kvpass.transform(model, policy="tova", budget=BUDGET, chunk=CHUNK)
    with torch.no_grad():
        want = small.generate(ids, **greedy)
    done = []
    for path in paths:
        try:
            if path == "compile":
                torch._dynamo.reset()  # one worker checks several models: start each from no compiled graphs
                compiled = kvpass.transform(model, policy="tova", budget=BUDGET, chunk=CHUNK)
                compiled.compile()
                with torch.no_grad():
                    same = torch.equal(compiled.generate(ids, **greedy), want)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, Path(tmp) / "model.onnx"))
                    same = np.array_equal(engine.generate(ids.numpy(), STEPS), want.numpy())
            done.append(path if same else f"{path}: other tokens")
        except ValueError as e:  # refused, with kvpass's reason
            done.append(f"{path} refused: {_short(str(e), 160)}")
        except Exception as e:  # a defect, shown as such
            done.append(f"{path} crashed: {type(e).__name__}: {_short(str(e), 160)}")
    return done


def _mask(site) -> str:
    """A site's mask in the table: its sliding window, ``chunk c`` (chunked attention) or ``-``,
    and ``ALiBi`` where a bias is added."""
    mask = str(site.sliding_window) if site.sliding_window else f"chunk {site.chunked}" if site.chunked else "-"
    return f"{mask} ALiBi" if site.alibi else mask


def _heads(site) -> str:
    values = f" (values {site.value_dim})" if site.value_dim not in (0, site.head_dim) else ""
    return f"{site.heads}/{site.kv_heads}x{site.head_dim}{values}"


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The original model's logits for ``ids``, all at once (fp32)."""
    return model(ids, **_positions(model, ids), use_cache=False).logits.float()


@torch.no_grad()
def kvpass_logits(exact, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """A transformed model's logits for ``ids``: the first ``prompt`` tokens prefilled, then the
    rest fed one at a time (fp32)."""
    out, cache = exact.kvpass_forward(ids[:, :prompt])
    logits = [out]
    for t in range(prompt, ids.shape[1]):
        out, cache = exact.kvpass_forward(ids[:, t : t + 1], cache)
        logits.append(out)
    return torch.cat(logits, 1).float()


def _positions(model, ids: torch.Tensor) -> dict:
    """``position_ids`` as ``generate()`` makes them (from the attention mask), where the forward
    takes them: some families make other default positions (RoBERTa's start after the padding
    index), and kvpass, like ``generate()``, feeds the true positions."""
    import inspect

    if "position_ids" not in inspect.signature(model.forward).parameters:
        return {}
    return {"position_ids": torch.arange(ids.shape[1]).expand_as(ids)}


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep(
    types: list[str], workers: int = 2, timeout: float = 300.0, progress=None, paths: tuple[str, ...] = ()
) -> list[Row]:
    """:func:`check` every model type (and ``paths`` on the exact ones), ``workers`` processes at a
    time (one torch thread each); a check running past ``timeout`` seconds is recorded as crashed."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,), maxtasksperchild=8) as pool:
        pending = [(t, pool.apply_async(check, (t, paths))) for t in types]
        rows = []
        for t, result in pending:
            try:
                rows.append(result.get(timeout))
            except mp.TimeoutError:
                rows.append(Row(t, "", "crashed", f"took more than {timeout:.0f} s"))
            if progress:
                progress(rows[-1])
    return rows


IN_SCOPE_OUTCOMES = ("exact", "refused", "wrong", "crashed")


def render(rows: list[Row], command: str, machine: str) -> str:
    """``docs/supported-models.md`` from the sweep's rows."""
    import platform

    import transformers

    others = ("original fails", "not built", "out of scope")
    counts = {o: sum(r.outcome == o for r in rows) for o in (*IN_SCOPE_OUTCOMES, *others)}
    scope = sum(counts[o] for o in IN_SCOPE_OUTCOMES)
    exact = counts["exact"]
    lines = [
        "# Supported models",
        "",
        f"Every causal-LM architecture of transformers {transformers.__version__} "
        f"(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: {len(rows)} model types), built tiny and random and run "
        "through kvpass by `kvpass sweep` (what is checked: `kvpass/eval/sweep.py`). Generated by",
        "",
        "```bash",
        command,
        "```",
        "",
        f"on {machine} (torch {torch.__version__}, Python {platform.python_version()}).",
        "",
        f"**{exact} of {scope} architectures in scope are exact ({100 * exact / max(scope, 1):.1f} %)**: at full "
        f"budget, logits within {TOLERANCE:g} of the original (fp32, a {PROMPT}-token prefill in chunks of "
        f"{CHUNK} and {STEPS} decode steps, batch 2) and the same greedy tokens from `generate()`; with "
        f"`tova` at {BUDGET} slots, every layer holds at most {BUDGET}. "
        f"{counts['refused']} are refused with the reason kvpass gave, {counts['wrong']} are wrong, "
        f"{counts['crashed']} crashed. Not counted: {counts['original fails']} whose original model itself "
        f"fails at this size, {counts['not built']} the sweep could not build a tiny config for (its limit, "
        f"not kvpass's), and {counts['out of scope']} out of scope (no attention over a KV cache of the text, "
        "or not a decoder of text alone).",
        "",
        "Columns: *sites* is the number of attention layers rewritten, *heads* query heads / KV heads x head "
        "dim, *paths* those beyond eager that gave the eager greedy tokens at a small budget (`--compile`, "
        "`--onnx`; empty where not checked), *windows* each layer's sliding window (- for none; *chunk c*: "
        "chunked attention in blocks of c positions; *ALiBi*: the scores take ALiBi's bias), *max diff* the "
        "largest logit difference at full budget.",
        "",
        "| model type | class | outcome | paths | sites | heads | windows | soft-cap | max diff | reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.model_type):
        diff = f"{r.max_diff:.1e}" if r.max_diff is not None else ""
        cap = f"{r.softcap:g}" if r.softcap else ""
        reason = r.reason.replace("|", "\\|")
        lines.append(
            f"| {r.model_type} | {r.model_class} | {r.outcome} | {r.paths.replace('|', '/')} | {r.sites or ''} "
            f"| {r.heads} | {r.windows} "
            f"| {cap} | {diff} | {reason} |"
        )
    return "\n".join(lines) + "\n"


def run(
    types: list[str], out: str | None, workers: int, timeout: float, command: str, paths: tuple[str, ...] = ()
) -> list[Row]:
    """The sweep as ``kvpass sweep`` runs it: progress on the terminal, the table to ``out``."""
    import platform
    from pathlib import Path

    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("sweeping", total=len(types))

        def step(row: Row) -> None:
            bar.update(task, advance=1, description=f"{row.model_type}: {row.outcome}")
            if row.outcome in ("wrong", "crashed"):
                bar.console.print(f"[red]{row.model_type}: {row.outcome}[/red] {row.reason}")

        rows = sweep(types, workers, timeout, step, paths)
    if out:
        machine = f"{platform.machine()} {platform.system()} ({torch.get_num_threads()} threads)"
        Path(out).write_text(render(rows, command, machine))
    return rows
