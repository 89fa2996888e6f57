"""The one module that knows transformers' internals: ``generate()``, the forward's keywords and
the ``Cache`` surface, for every transformers 5.x kvpass supports.

The rest of kvpass talks to a transformed model through its own API (``kvpass_forward``,
``kvpass_new_cache``), so a model written without Hugging Face code never comes here. What is
relied on, and the test that notices when it moves (all in ``tests/test_hf.py`` unless named):

- the name ``generate()`` hands the cache to ``forward`` under (``past_key_values`` up to 5.23,
  ``cache`` from 5.24), read from ``GenerationMixin.prepare_inputs_for_generation``'s signature,
  and the field of ``CausalLMOutputWithPast`` it reads the cache back from:
  ``test_generate_matches_the_original`` and ``test_a_lost_cache_is_an_error``;
- the keywords ``generate()`` passes to ``forward`` (each handled, checked or refused below):
  ``test_unknown_keywords_are_refused`` and every generate test;
- the ``Cache`` members ``generate()`` calls: ``get_seq_length`` (tokens seen, so only new tokens
  are fed), ``is_compileable`` (False: no 4D masks, no auto-compile), ``is_linear`` (5.24: whether
  a continued prompt is sliced), ``reorder_cache`` (beam search); every other member refuses
  loudly instead of walking empty layers: ``test_cache_surface`` and the beam, multi-turn and
  assisted-decoding tests;
- the cache surface of recurrent layers (hybrids), which kvpass offers each mixer rather than
  calls: listed in :mod:`kvpass.runtime.recurrent`, tested in ``tests/test_hybrids.py``;
- ``GenerationConfig`` fields read before generating (``max_new_tokens``, ``max_length``,
  ``use_cache``, ``cache_implementation``, ``prefill_chunk_size``) and
  ``get_generation_mode``: ``test_decode_reserve_follows_max_length`` and the refusal tests.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvpass.runtime.cache import EvictingCache

CACHE_NAMES = ("cache", "past_key_values")  # transformers >= 5.24, <= 5.23


def _cache_name(names) -> str:
    name = next((n for n in CACHE_NAMES if n in names), None)
    if name is None:
        raise ImportError(
            f"transformers {transformers.__version__} takes the KV cache under none of the names kvpass knows "
            f"({', '.join(CACHE_NAMES)}); install a version kvpass supports (pip install 'kvpass' picks one)"
        )
    return name


# Where the installed transformers hands the cache to forward, and where it reads it back.
GENERATE_CACHE = _cache_name(inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters)
OUTPUT_CACHE = _cache_name({f.name for f in dataclasses.fields(CausalLMOutputWithPast)})


def is_hf_model(cls: type) -> bool:
    """Whether a model class brings transformers' ``generate()``."""
    return issubclass(cls, PreTrainedModel) and issubclass(cls, GenerationMixin)


def text_config(config):
    """The text part of a (multimodal) config; the config itself where there is none or several."""
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # several text configs (an encoder's and a decoder's)
        return config


def declare_windows(model: nn.Module, sites: list, probe_len: int) -> None:
    """Give each site the sliding window or attention chunk its model declares where the probe was
    too short to measure it.

    kvpass measures each site's mask on a ``probe_len``-token probe, which shows a window shorter
    than the probe only. A transformers attention module declares its window (``sliding_window``,
    or its layer's entry in ``config.layer_types`` with ``config.sliding_window``; Mistral's
    config alone): a site the probe found plainly causal takes a declared window of at least
    ``probe_len`` (a shorter one the probe would have seen: then the declaration is not what the
    model does, and is ignored). Llama 4's chunked attention (a layer of ``chunked_attention`` in
    ``config.layer_types``: each token sees its own block of ``attention_chunk_size`` positions)
    likewise, checked against what the probe measured: a site whose mask says otherwise is skipped,
    with the reason.
    """
    for site in sites:
        try:
            module = model.get_submodule(site.module)
        except AttributeError:
            continue
        config = getattr(module, "config", None) or getattr(model, "config", None)
        types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
        kind = types[idx] if isinstance(types, list) and isinstance(idx, int) and idx < len(types) else None
        if kind == "chunked_attention":  # Llama 4's local layers: each query sees its block of positions
            chunk = getattr(config, "attention_chunk_size", None)
            if site.causal and not site.sliding_window and isinstance(chunk, int) and chunk > 0:
                if site.chunked in (0, chunk) and (site.chunked or chunk >= probe_len):
                    site.chunked = chunk
                    continue
            site.action = "skip"
            site.reason = f"chunked attention declared (blocks of {chunk} tokens), but the probe measured " + (
                "another mask" if site.causal else "no causal mask"
            )
            continue
        if hasattr(module, "sliding_window"):
            window = module.sliding_window
        elif kind is not None:
            window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
        else:
            window = getattr(config, "sliding_window", None)  # Mistral: every layer
        if site.causal and not site.sliding_window and isinstance(window, int) and window >= probe_len:
            site.sliding_window = window


def text_model(model: nn.Module) -> nn.Module | None:
    """The text causal LM of a multimodal model (``Gemma3ForConditionalGeneration`` -> a
    ``Gemma3ForCausalLM`` over the same decoder and LM head, weights shared), or None where
    ``model`` is a text model or its text model cannot be rebuilt that way."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = getattr(model, "config", None)
    text = text_config(config)
    if text is config or type(text) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return None
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with torch.device("meta"):
        lm = MODEL_FOR_CAUSAL_LM_MAPPING[type(text)](text)
    if (
        type(getattr(lm, "model", None)) is not type(decoder)
        or head is None
        or set(dict(lm.named_children()))
        != {
            "model",
            "lm_head",
        }
    ):
        return None
    lm.model, lm.lm_head = decoder, head
    lm.generation_config = copy.deepcopy(model.generation_config)
    if any(t.is_meta for t in (*lm.parameters(), *lm.buffers())):
        return None
    return lm.eval() if not model.training else lm


def row_wise_modules(model: nn.Module) -> set[str]:
    """Paths of the modules of ``model`` that transformers makes row-wise by contract: the experts
    of a mixture of experts built with ``use_experts_implementation`` (every implementation it
    dispatches to computes output row ``t`` from row ``t`` of the hidden states, expert indices and
    routing weights). Tested by the sweep's MoE architectures at full budget."""
    return {
        path
        for path, m in model.named_modules()
        if getattr(type(m).forward, "__globals__", {}).get("__name__") == "transformers.integrations.moe"
    }


def opaque_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts of a mixture of experts, by transformers' experts contract (``forward(hidden_states,
    top_k_index, top_k_weights)``: output row ``t`` from row ``t`` of the three), that
    :func:`row_wise_modules` does not cover: kvpass runs each as one node, its inside untraced (its
    loop over the experts a chunk uses is data-dependent). Tested by the sweep's DBRX and Ergo rows."""
    known = row_wise_modules(model)
    contract = ["hidden_states", "top_k_index", "top_k_weights"]
    return [
        (path, m)
        for path, m in model.named_modules()
        if path not in known and list(inspect.signature(m.forward).parameters) == contract
    ]


class HFEvictingCache(EvictingCache, Cache):
    """The evicting cache as ``generate()`` sees it: a :class:`transformers.Cache` whose
    ``get_seq_length()`` is the number of tokens *seen*, so ``generate()`` feeds only new tokens.

    Only the members ``generate()`` needs are answered; every other member of the installed
    ``Cache`` (they differ from release to release) raises, naming itself, rather than walking the
    empty list of transformers layers this cache does not have.
    """

    def __init__(self, policy, **options) -> None:
        EvictingCache.__init__(self, policy, **options)  # not Cache.__init__: there are no transformers layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_compileable(self) -> bool:  # keeps generate() from building 4D masks or compiling HF's forward
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen > 0

    @property
    def is_linear(self) -> list[bool]:  # 5.24: a continued prompt is sliced unless every layer is linear
        return [False] * max(1, len(self.slots))

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: each beam continues the cache of the beam it came from."""
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.lengths.shape[0], device=self.lengths.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.select_rows(indices)

    def __len__(self) -> int:  # as transformers counts: layers
        return len(self.slots)

    def crop(self, *args) -> None:
        raise NotImplementedError(
            "the kvpass cache cannot be cropped: tokens it evicted to make room for the ones cropped are gone. "
            "Assisted and speculative decoding (assistant_model=, prompt_lookup_num_tokens=) are not supported"
        )


def _refuse(name: str, is_property: bool):
    def refused(self, *args, **kwargs):
        raise NotImplementedError(
            f"transformers {transformers.__version__} asked the kvpass cache for Cache.{name}, which kvpass does "
            "not provide: its keys and values live in evicting slot tables that only the rewritten attention reads"
        )

    return property(refused) if is_property else refused


for _name in dir(Cache):
    if not _name.startswith("_") and _name not in vars(HFEvictingCache) and not hasattr(EvictingCache, _name):
        setattr(HFEvictingCache, _name, _refuse(_name, isinstance(inspect.getattr_static(Cache, _name), property)))
HFEvictingCache.layers = _refuse("layers", True)  # an instance attribute of Cache, walked by some of its methods

# Keywords a transformers forward may get that kvpass does not act on, and why that is safe.
IGNORED = {
    "cache_position": "kvpass counts positions itself; it is only checked against a cache that starts",
    "is_first_iteration": "generate()'s note that this call is the prompt: kvpass's cache knows",
    "next_sequence_length": "generate()'s note of how many tokens this call feeds: input_ids says",
}


class HFMixin:
    """``forward`` and ``generate`` of a transformed transformers model, in transformers' terms
    (mixed in before :class:`kvpass.transform.KVPassMixin`)."""

    kvpass_cache_class = HFEvictingCache

    def generate(self, inputs: Tensor | None = None, generation_config=None, **kwargs):
        """transformers' ``generate()`` on an evicting cache: greedy, sampling, beam search,
        streamers, left-padded batches, a returned cache continued by a later call; assisted decoding
        and transformers' own cache options are refused."""
        cache = _one_cache(kwargs)
        config = generation_config if generation_config is not None else self.generation_config
        asked = copy.deepcopy(config)
        asked.update(**{k: v for k, v in kwargs.items() if k != "assistant_model"})
        if asked.get_generation_mode(kwargs.get("assistant_model")) == GenerationMode.ASSISTED_GENERATION:
            raise NotImplementedError(
                "assisted and speculative decoding verify drafted tokens and crop the rejected ones from the cache; "
                "an evicting cache cannot un-evict what it dropped for them, so kvpass refuses them"
            )
        if kwargs.get("cache_implementation") is not None:
            raise ValueError("a kvpass model always runs on its evicting cache: drop cache_implementation=")
        if getattr(asked, "prefill_chunk_size", None):
            raise ValueError("kvpass prefills in chunks itself: use kvpass.transform(model, ..., chunk=N)")
        if cache is not None and not isinstance(cache, HFEvictingCache):
            raise TypeError(
                f"a kvpass model generates on its own evicting cache, got {type(cache).__name__}; "
                "pass none (a fresh one is made) or one this model made or returned"
            )
        if cache is None and asked.use_cache is not False:  # (None: transformers' default, a cache; OpenAI GPT)
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            new = asked.max_new_tokens
            if new is None:  # max_length counts the prompt
                new = asked.max_length - (ids.shape[-1] if ids is not None else 0)
            cache = self.kvpass_new_cache(decode_reserve=max(new, 1))
        if cache is not None:
            kwargs[GENERATE_CACHE] = cache
        self._kvpass_generating = cache  # the cache each forward of this generate() must be handed
        try:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        finally:
            self._kvpass_generating = None

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: EvictingCache | None = None,
        past_key_values: EvictingCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """A transformers forward: the cache comes under either name the supported versions use,
        and goes back in the field the installed version reads."""
        cache = _one_cache({"cache": cache, "past_key_values": past_key_values})
        _check_inputs(self, input_ids, attention_mask, cache, cache_position, kwargs, inputs_embeds, labels)
        if output_attentions or output_hidden_states:
            raise ValueError("a kvpass model returns logits only (no attentions or hidden states)")
        logits, cache = self.kvpass_forward(input_ids, cache, attention_mask, position_ids, logits_to_keep)
        config = getattr(self, "config", None)
        use_cache = getattr(config, "use_cache", True) if use_cache is None else use_cache
        out = CausalLMOutputWithPast(logits=logits, **{OUTPUT_CACHE: cache if use_cache else None})
        return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()


def own_generation_config(model: nn.Module) -> None:
    """Give a transformed model a generation config of its own that names no transformers cache
    (some checkpoints name one, e.g. Gemma's "hybrid"; generate() would refuse it next to kvpass's)."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        model.generation_config = copy.deepcopy(config)
        model.generation_config.cache_implementation = None


def _one_cache(kwargs: dict) -> Any:
    """The cache given under any of :data:`CACHE_NAMES` (removed from ``kwargs``); two is an error."""
    given = {n: c for n in CACHE_NAMES if (c := kwargs.pop(n, None)) is not None}
    if len(given) > 1:
        raise ValueError(f"the cache was given twice ({' and '.join(given)}); give it once")
    return next(iter(given.values()), None)


@torch.compiler.disable
def _check_inputs(model, input_ids, attention_mask, cache, cache_position, extra, inputs_embeds, labels) -> None:
    """Refuse what a kvpass model cannot honour, and a forward that lost the cache of the tokens before it."""
    extra = {k for k, v in extra.items() if v is not None and k not in IGNORED}  # None: absent images, audio...
    if extra:
        raise TypeError(
            f"{type(model).__name__}.forward got {', '.join(sorted(extra))}, which a kvpass model does not handle; "
            f"it takes input_ids, attention_mask, position_ids, the cache ({' or '.join(CACHE_NAMES)}), use_cache, "
            f"logits_to_keep, return_dict (and ignores {', '.join(IGNORED)})"
        )
    if input_ids is None or inputs_embeds is not None:
        raise ValueError("a kvpass model takes input_ids (inputs_embeds is not supported)")
    if labels is not None:
        raise ValueError("a kvpass model is for inference; compute losses with the original model")
    seen = cache.seen if isinstance(cache, EvictingCache) else 0
    T = input_ids.shape[-1]
    expected = getattr(model, "_kvpass_generating", None)
    why = None
    if expected is not None and cache is not expected:
        why = "generate() made a cache for this forward, but it was handed " + (
            "none" if cache is None else f"another one ({type(cache).__name__})"
        )
    elif attention_mask is not None and attention_mask.shape[-1] > seen + T:
        why = f"the attention mask covers {attention_mask.shape[-1]} tokens, {T} are new and the cache has seen {seen}"
    elif cache_position is not None and seen == 0 and cache_position.numel() and bool(cache_position[0] != 0):
        why = f"cache_position starts at {int(cache_position[0])}, but no cache has seen the tokens before it"
    if why:
        raise RuntimeError(
            f"kvpass lost its cache: {why}. The likely cause is a transformers version ({transformers.__version__}) "
            f"that hands the cache to forward under a name kvpass does not know (it takes {' or '.join(CACHE_NAMES)}); "
            "without it every step would start an empty cache and generate garbage"
        )


def full_cache(model: nn.Module) -> Cache:
    """The cache a transformers model keeps everything in (the baseline kvpass is compared with)."""
    return DynamicCache(config=getattr(model, "config", None))


def call(
    model: nn.Module, input_ids: Tensor, cache=None, *, position_ids: Tensor | None = None, logits_to_keep: int = 0
) -> tuple[Tensor, Any]:
    """``(logits, cache)`` of one forward of any causal LM on ``cache``: a kvpass model through its
    own API, a transformers model with the cache under the name its forward takes."""
    if hasattr(model, "kvpass_forward"):
        return model.kvpass_forward(input_ids, cache, position_ids=position_ids, logits_to_keep=logits_to_keep)
    name = _forward_cache_name(type(model))
    out = model(
        input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=logits_to_keep, **{name: cache}
    )
    return out.logits, getattr(out, OUTPUT_CACHE)


@functools.cache
def _forward_cache_name(cls: type) -> str:
    """The name a model class's forward takes the cache under (once per class: decode loops call it per step)."""
    params = inspect.signature(cls.forward).parameters
    return next((n for n in CACHE_NAMES if n in params), GENERATE_CACHE)
