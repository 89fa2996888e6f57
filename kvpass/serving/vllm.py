"""kvpass on vLLM: a model whose evicting tables are vLLM per-request state (docs/serving-vllm.md).

vLLM keeps a fixed-size state per request for Mamba-like layers (``MambaBase``): shapes the layer
declares, allocated once per admitted request and addressed by the request's state index.
kvpass's tables are such a state: all of one request's tables (every layer's ``pos``, ``keys``,
``values``, ``score``, ``valid``, budget-sized) are one state, one flat tensor per dtype, so layers
of different sizes (per-layer budgets) make one block of one size. Each engine step runs kvpass's
step over the scheduled requests' tables (:mod:`kvpass.serving.rows`: a prompt's in place, a decode
batch's copied in and written back where they changed) -- each prompt on its own, in kvpass's
chunks; all decoding requests together, one token each -- and returns each request's
last token. The step's model is vLLM's own model class for the architecture where vLLM has one
(:mod:`kvpass.serving.native`), else the transformers model as ``kvpass.transform`` rewrote it.

A model directory for it is a Hugging Face checkpoint whose ``config.json`` names
``KvpassForCausalLM`` and carries ``kvpass`` = {"architecture", "policy", "budget", "chunk",
"knobs"}. Registered through the ``vllm.general_plugins`` entry point (:func:`register`).

The vLLM APIs relied on (the same in vLLM 0.32 and 0.34), and the test that notices when one
moves (in ``tests/serving/test_vllm.py``; ``test_the_vllm_surface`` names each missing one):

- registration: ``ModelRegistry.register_model`` and ``get_supported_archs``, and
  ``MODELS_CONFIG_MAP`` (``verify_and_update_config``), where the plugin sets
  ``cache_config.enable_prefix_caching``, ``mamba_cache_mode``, ``mamba_block_size`` and
  ``scheduler_config.enable_chunked_prefill``, ``max_num_batched_tokens``: every test;
- per-request state: ``MambaBase`` (``get_state_shape``, ``get_state_dtype``, ``mamba_type``,
  ``MambaAttentionBackendEnum.LINEAR``, the bound ``kv_cache``), ``HasInnerState``,
  ``IsAttentionFree`` and the class methods ``get_mamba_state_shape_from_config`` and
  ``..._dtype_from_config``: ``test_each_request_holds_its_tables_bytes_whatever_max_model_len``;
- each step's batch, ``get_forward_context().attn_metadata[layer]`` (``LinearAttentionMetadata``:
  ``query_start_loc``, ``seq_lens``, ``state_indices_tensor``): the greedy and isolation tests;
- vLLM's own model: ``ModelRegistry.resolve_model_cls``; ``Attention`` layers called as
  ``attn(q, k, v)``, with ``num_heads``, ``num_kv_heads``, ``head_size``, ``head_size_v``,
  ``sliding_window``, ``has_sink``, ``layer_name``, ``impl.scale``, registered in
  ``compilation_config.static_forward_context``; a model's ``forward(input_ids, positions)``,
  ``compute_logits``, ``load_weights``, ``embed_input_ids``: the greedy tests (which check with
  ``LLM.apply_model`` whose modules ran).
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from kvpass.runtime.attention import KVAttention
from kvpass.runtime.plan import DECODE, plan
from kvpass.runtime.step import Layout, PureStep, Step
from kvpass.serving.native import Native
from kvpass.serving.rows import Plan, Rows

ARCH = "KvpassForCausalLM"
STATE = "layers.0.kvpass"  # the one state layer (vLLM reads a layer index from the name)


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, f"{__name__}:KvpassForCausalLM")
    MODELS_CONFIG_MAP.setdefault(ARCH, EngineDefaults)


class EngineDefaults:
    """What the engine needs for kvpass's tables, set when vLLM builds its config: one state block
    per request (as long as the longest request; the tables inside it are budget-sized), no prefix
    caching (a compressed prefix is not a prefix another request can share), whole prompts per
    step (kvpass cuts a prompt into its own chunks from the prompt's end, which needs the whole
    prompt; the activations stay chunk-sized all the same), and eager execution (vLLM would
    compile its model's forward for its own attention metadata; kvpass's step runs as it is)."""

    @classmethod
    def verify_and_update_model_config(cls, model_config) -> None:
        pass

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        cache = vllm_config.cache_config
        cache.enable_prefix_caching = False
        cache.mamba_cache_mode = "none"
        longest = vllm_config.model_config.max_model_len
        if cache.mamba_block_size is None:
            cache.mamba_block_size = longest
        vllm_config.model_config.enforce_eager = True  # (read after this hook, where vLLM sets compilation)
        scheduler = vllm_config.scheduler_config
        scheduler.enable_chunked_prefill = False
        scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, longest)


def _build(model_config):
    """The transformed Hugging Face model and its pure step, from the directory's config."""
    import copy
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    import kvpass

    hf_config = model_config.hf_config
    spec = dict(hf_config.kvpass)
    knobs = dict(spec.get("knobs", {}))
    if knobs.get("checkpoint"):  # stored inside the directory
        knobs["checkpoint"] = str(Path(model_config.model) / knobs["checkpoint"])
    config = copy.deepcopy(hf_config)
    config.architectures = [spec["architecture"]]
    del config.kvpass
    # the directory's weights, not random ones: a policy may read them when it binds (a gate checks
    # that it was trained for this model by its embedding); vLLM's load_weights then copies the same
    model = AutoModelForCausalLM.from_pretrained(model_config.model, config=config, dtype=torch.float32)
    small = kvpass.transform(
        model, spec["policy"], spec["budget"], chunk=spec["chunk"], evict_during_decode=True, **knobs
    )
    return small, PureStep(small)


MODULES = "KVPASS_VLLM_MODULES"  # "transformers": serve with transformers' modules where vLLM has its own


def _native(vllm_config, small, prefix: str) -> Native | None:
    """vLLM's own model class for the directory's architecture, its attention kvpass's; None where
    there is none (vLLM does not know the architecture, the model has recurrent layers, or
    ``KVPASS_VLLM_MODULES=transformers``), or it does not match kvpass's rewrite (logged, with why)."""
    from vllm.logger import init_logger
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.utils import maybe_prefix

    arch = vllm_config.model_config.hf_config.kvpass["architecture"]
    if os.environ.get(MODULES, "vllm") == "transformers" or small.kvpass_step.mixers:
        return None
    try:
        cls, found = ModelRegistry.resolve_model_cls([arch], vllm_config.model_config)
    except ValueError:
        return None
    if found != arch:  # (vLLM's transformers back end)
        return None
    context = vllm_config.compilation_config.static_forward_context
    before = set(context)
    model = cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "native"))
    rewritten = [s for s in small.kvpass_sites if s.action == "rewrite"]
    tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    io = small.kvpass_step.io
    sites = [KVAttention(_share(s, tp, rank), io) for s in rewritten]  # this worker's heads of each layer
    if tp > 1:  # a score summed over a layer's KV heads sums every worker's
        alone = small.kvpass_policy.across_heads
        small.kvpass_policy.across_heads = lambda x: tensor_model_parallel_all_reduce(alone(x))
    names = [s.module for s in rewritten]
    try:
        body = Native(model, sites, names, context)
        init_logger(__name__).info("kvpass: %s served with vLLM's modules", arch)
        return body
    except ValueError as e:
        init_logger(__name__).warning("kvpass: %s served with transformers' modules: %s", arch, e)
        for name in set(context) - before:  # no paged KV for the dropped model's layers
            if isinstance(context[name], AttentionLayerBase):
                del context[name]
        return None


def modules(model: KvpassForCausalLM) -> str:
    """Whose modules a served model runs, ``"vllm"`` or ``"transformers"`` (``LLM.apply_model(modules)``)."""
    return "transformers" if model.native is None else "vllm"


def _share(site, tp: int, rank: int):
    """Worker ``rank``'s share of an attention site: its query and KV heads (and their ALiBi slopes)."""
    heads = site.heads // tp
    alibi = site.alibi[rank * heads : (rank + 1) * heads]
    return dataclasses.replace(site, heads=heads, kv_heads=site.kv_heads // tp, alibi=alibi)


class Tables(MambaBase, nn.Module):
    """A request's tables as vLLM state: one flat tensor per dtype (``shapes``, ``dtypes``)."""

    def __init__(self, shapes, dtypes, vllm_config) -> None:
        super().__init__()
        self.shapes, self.dtypes = tuple(shapes), tuple(dtypes)
        ctx = vllm_config.compilation_config.static_forward_context
        if STATE in ctx:
            raise ValueError(f"duplicate layer name {STATE}")
        ctx[STATE] = self
        self.kv_cache = (torch.tensor([]),)

    def get_state_shape(self):
        return self.shapes

    def get_state_dtype(self):
        return self.dtypes

    @property
    def mamba_type(self):
        return MambaAttentionBackendEnum.LINEAR


_STATES: dict[tuple, tuple] = {}


def _states(vllm_config) -> tuple:
    """A model directory's state (``Plan.states``) on one worker, built once per process for vLLM's
    two questions (each build loads the directory's weights)."""
    import json

    model_config = vllm_config.model_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    key = (str(model_config.model), json.dumps(model_config.hf_config.kvpass, sort_keys=True), tp, model_config.dtype)
    if key not in _STATES:
        _STATES[key] = Plan.of(_layout(_build(model_config)[1], tp), model_config.dtype).states
    return _STATES[key]


def _layout(pure: PureStep, tp: int) -> Layout:
    """The tables of one of ``tp`` workers: its share of each layer's KV heads, as tensor parallelism
    splits vLLM's attention (a KV head's slots, scores and eviction are its own, so the split is
    exact for policies that keep a budget per KV head)."""
    layout = pure.layout
    if tp == 1:
        return layout
    why = (
        f"{layout.kv_heads} KV heads do not split over {tp} workers" if any(h % tp for h in layout.kv_heads)
        else f"policy {pure.policy.name!r} shares a layer's slots among its KV heads (share={pure.policy.share!r}); "
        "transform with share='head'" if any(layout.pooled)
        else f"policy {pure.policy.name!r}'s gates are not split by KV head yet" if pure.policy.gated
        else "a hybrid's recurrent state is not split yet" if layout.states
        else ""
    )  # fmt: skip
    if why:
        raise ValueError(f"kvpass: tensor parallelism {tp}: {why}")
    return dataclasses.replace(layout, kv_heads=tuple(h // tp for h in layout.kv_heads))


class KvpassForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    """A kvpass model in vLLM. Natively where vLLM has the architecture's own model class: vLLM's
    modules with kvpass's attention (:mod:`kvpass.serving.native`); else the transformers model's
    own step (its modules, as ``kvpass.transform`` rewrote them). Either way the step is kvpass's
    :class:`~kvpass.runtime.step.Step`, over the tables of one state per request."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        small, pure = _build(vllm_config.model_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        self.chunk = pure.chunk
        self.layout = _layout(pure, tp)
        self.plan = Plan.of(self.layout, vllm_config.model_config.dtype)  # keys and values in vLLM's dtype
        self.tables = Tables(*zip(*self.plan.states, strict=True), vllm_config)
        body = _native(vllm_config, small, prefix)
        if body is None:  # transformers' modules: the step's head gives the logits
            if tp > 1:
                raise ValueError(f"kvpass: tensor parallelism needs vLLM's own model class for {type(small).__name__}")
            self.small, self.native = small, None
            object.__setattr__(self, "step", pure.step)
            empty = self.layout.empty(1, torch.float32)  # (the transformers model runs in fp32)
            self.out = (vllm_config.model_config.hf_config.vocab_size, torch.float32)  # logits
        else:  # vLLM's: the step gives hidden states, vLLM's head the logits (the transformers model is dropped)
            self.native = body.model
            object.__setattr__(self, "step", Step(body, None, pure.policy, pure.step.io))
            empty = self.layout.empty(1, vllm_config.model_config.dtype)
            self.out = (vllm_config.model_config.hf_config.hidden_size, vllm_config.model_config.dtype)  # hidden
            capacity = {i: self.layout.layer_capacity(i) for i in self.layout.layers}
            if self.step.layout(capacity) != self.layout:  # (its sites are this worker's share)
                raise ValueError(f"kvpass: this worker's attention is not the layout's: {self.step.layout(capacity)}")
        self.rows = Rows(self.plan.spans, empty, self.layout.slot_tables, {})  # the step's tables over the state rows

    # vLLM asks the class (before building it) for the state's shapes, then for its dtypes
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        return tuple(shape for shape, _ in _states(vllm_config))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        return tuple(dtype for _, dtype in _states(vllm_config))

    def embed_input_ids(self, input_ids):
        if self.native is not None:
            return self.native.embed_input_ids(input_ids)
        return self.small.get_input_embeddings()(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        out = torch.zeros(input_ids.shape[0], self.out[0], dtype=self.out[1])
        md = get_forward_context().attn_metadata
        md = md.get(STATE) if isinstance(md, dict) else None
        if md is None:  # vLLM's profiling run
            return out
        starts = md.query_start_loc.tolist()
        index = md.state_indices_tensor.flatten().tolist()
        seen = md.seq_lens.tolist()  # tokens read so far, this step's included
        lengths = [b - a for a, b in itertools.pairwise(starts)]
        spans = [plan(n, self.chunk) for n in lengths]  # kvpass's own cutting of each request's tokens
        decoding = [r for r, s in enumerate(spans) if s[0].mode == DECODE]
        # PureStep's step, without PureStep's copy of the tables: the step writes them in place (views
        # of the state, or copies that self.rows writes back)
        state = self.tables.kv_cache
        if decoding:  # one token each: one batched step over their tables
            at = torch.tensor([starts[r] for r in decoding])
            ids, pos = input_ids[at][:, None], positions[at][:, None].long()
            with self.rows.tables(state, [index[r] for r in decoding], [seen[r] == 1 for r in decoding]) as tables:
                logits = self.step(ids, pos, *tables, layout=self.layout, mode=DECODE)
            out[at] = logits[:, -1]
        for r in sorted(set(range(len(lengths))) - set(decoding)):  # prompts, one at a time
            a, b = starts[r], starts[r + 1]
            ids, pos = input_ids[a:b][None], positions[a:b][None].long()
            with self.rows.tables(state, [index[r]], [seen[r] == b - a]) as tables:  # nothing read before: new
                for s, e, mode, _ in spans[r]:
                    logits = self.step(ids[:, s:e], pos[:, s:e], *tables, layout=self.layout, mode=mode)
            out[b - 1] = logits[0, -1]
        return out

    def train(self, mode: bool = True):
        # vLLM calls eval(); the transformed model's exported graph refuses train(), and is always in eval
        self.training = mode
        return self

    def compute_logits(self, hidden_states):
        return hidden_states if self.native is None else self.native.compute_logits(hidden_states)

    def load_weights(self, weights):
        if self.native is not None:  # vLLM's own loader (its stacked projections), under our name for it
            return {f"native.{name}" for name in self.native.load_weights(weights)}
        params = dict(self.small.named_parameters())
        ours = {id(p): name for name, p in self.named_parameters()}  # vLLM checks these names
        loaded = set()
        for name, w in weights:
            if name in params:
                params[name].data.copy_(w)
                loaded.add(ours[id(params[name])])
        return loaded
