"""Sweep every causal-LM architecture of the installed transformers through kvpass.

Each architecture is built from its own config class with tiny random weights (:func:`tiny_config`:
2 layers, hidden size 64, 4 query heads over 2 KV heads where the config has grouped-query
attention, vocabulary 128; what a family needs beyond that is one entry of :data:`KNOBS`), then

- inspected (the attention sites kvpass finds: heads, KV heads, head dim, window, soft-cap);
- transformed at full budget: logits over a 40-token prefill (in chunks of 16) and 16 decode steps
  against the original model run on the whole sequence at once (fp32), and the greedy tokens of
  ``generate()`` against the original's;
- transformed with a small budget (``tova``, 8 slots for 56 tokens): it generates, and every layer
  holds at most its budget.

Outcome: **exact**, **refused** (kvpass said why before doing anything), **wrong** (it ran but the
full-budget logits or tokens differ: a defect) or **crashed** (an error that is not a refusal: a
defect). Architectures that are not decoder-only text models with attention are out of scope,
each with its reason (:data:`OUT_OF_SCOPE`).
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
    if "num_key_value_heads" in names or "num_key_value_heads" in own:
        put("num_key_value_heads", 2)
    put("head_dim", 16)
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
    return model.float().eval(), cls.__name__


def check(model_type: str) -> Row:
    """Build, inspect, and run ``model_type`` through kvpass; one :class:`Row`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as NAMES

    row = Row(model_type, NAMES[model_type], "crashed")
    if model_type in OUT_OF_SCOPE:
        row.outcome, row.reason = "out of scope", OUT_OF_SCOPE[model_type]
        return row
    start = time.perf_counter()
    try:
        _check(model_type, row)
    except Exception as e:
        row.outcome, row.reason = "crashed", f"{type(e).__name__}: {_short(str(e))}"
        row.extra["traceback"] = traceback.format_exc()
    row.seconds = time.perf_counter() - start
    return row


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _check(model_type: str, row: Row) -> None:
    import kvpass
    from kvpass.passes import TokenMixingError

    try:
        model, row.model_class = build(model_type)
    except Exception as e:
        raise RuntimeError(f"the sweep could not build a tiny {model_type}: {e}") from e
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(sum(map(ord, model_type)))
    ids = torch.randint(3, vocab, (2, PROMPT), generator=g)
    try:
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)
            ref = model(want, **_positions(model, want), use_cache=False).logits.float()
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
    row.heads = ", ".join(sorted({f"{s.heads}/{s.kv_heads}x{s.head_dim}" for s in rewritten}))
    row.windows = ", ".join(str(s.sliding_window or "-") for s in sites)
    row.softcap = max(s.softcap for s in sites)
    with torch.no_grad():
        got = exact.generate(ids, max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS)
        row.same_tokens = bool(torch.equal(got, want))
        out, cache = exact.kvpass_forward(want[:, :PROMPT])
        logits = [out]
        for t in range(PROMPT, want.shape[1]):
            out, cache = exact.kvpass_forward(want[:, t : t + 1], cache)
            logits.append(out)
        row.max_diff = float((torch.cat(logits, 1).float() - ref).abs().max())
    small = kvpass.transform(model, policy="tova", budget=BUDGET, chunk=CHUNK)
    small.generate(ids[:, :PROMPT], max_new_tokens=STEPS, do_sample=False)
    stats = kvpass.cache_stats(small)
    row.bounded = all(layer.capacity <= BUDGET for layer in stats.layers)
    ok = row.same_tokens and row.max_diff <= TOLERANCE and row.bounded
    row.outcome = "exact" if ok else "wrong"
    if not ok:
        row.reason = (
            f"max |logit diff| {row.max_diff:.2e}, same tokens {row.same_tokens}, small budget bounded {row.bounded}"
        )


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


def sweep(types: list[str], workers: int = 2, timeout: float = 300.0, progress=None) -> list[Row]:
    """:func:`check` every model type, ``workers`` processes at a time (one torch thread each);
    a check running past ``timeout`` seconds is recorded as crashed."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,), maxtasksperchild=8) as pool:
        pending = [(t, pool.apply_async(check, (t,))) for t in types]
        rows = []
        for t, result in pending:
            try:
                rows.append(result.get(timeout))
            except mp.TimeoutError:
                rows.append(Row(t, "", "crashed", f"took more than {timeout:.0f} s"))
            if progress:
                progress(rows[-1])
    return rows


if __name__ == "__main__":
    import sys

    def show(r):
        print(
            f"{r.model_type:28s} {r.outcome:12s} {r.seconds:6.1f}s {r.heads:10s} {r.max_diff} {r.reason[:300]}",
            flush=True,
        )

    sweep(sys.argv[1:] or model_types(), progress=show)
