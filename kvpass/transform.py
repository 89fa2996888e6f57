"""``kvpass.transform``: capture a causal LM, rewrite its attention onto an evicting cache, and
return a model whose ``forward`` and ``generate()`` run the rewritten graph."""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kvpass import policies
from kvpass.passes import (
    PROBE_LEN,
    RowWise,
    Site,
    TokenMixingError,
    capture,
    check_lengths,
    check_token_local,
    drop_noops,
    eager_to_sdpa,
    find_attention,
    flatten_attrs,
    rewrite,
    rewrite_mixers,
    rewrite_rows,
    split_head,
)
from kvpass.runtime import allocation, hf, recurrent
from kvpass.runtime.attention import KVAttention
from kvpass.runtime.cache import READING, EvictingCache, check_reading
from kvpass.runtime.generate import generate
from kvpass.runtime.plan import DECODE, cuts, plan
from kvpass.runtime.recurrent import KVMixer
from kvpass.runtime.step import Exchange, Step


def sites_of(model: nn.Module) -> tuple[torch.fx.GraphModule, list[Site]]:
    """Capture ``model`` and find its attention sites (with masks measured on a short probe)."""
    vocab = _vocab_size(model)
    mixers = recurrent.mixers_of(model)  # a hybrid's recurrent layers: one node each, carrying their state
    experts = [m for _, m in hf.opaque_experts(model)] if hf.is_hf_model(type(model)) else []
    try:
        gm = capture(model, vocab, [m for _, m in mixers], experts)
    except RuntimeError as e:
        raise recurrent.explain(e, model, [n for n, _ in mixers]) from None
    drop_noops(gm)  # first: export's metadata asserts would hide the eager attention pattern
    eager_to_sdpa(gm)
    rewrite_mixers(gm, lambda i, example: KVMixer(i, mixers[i][1], example, mixers[i][0]))
    rewrite_rows(gm, experts)
    device = next(model.parameters()).device
    probe = (
        torch.randint(0, vocab, (1, PROBE_LEN), device=device),
        torch.arange(PROBE_LEN, device=device)[None],
    )
    sites = find_attention(gm, probe)
    if hf.is_hf_model(type(model)):
        hf.declare_windows(model, sites, PROBE_LEN)
    return gm, sites


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):  # a multimodal model's tokens are its text model's
        config = hf.text_config(config)
    if getattr(config, "vocab_size", None):
        return config.vocab_size
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else 2


def transform(
    model: nn.Module,
    policy: str | policies.Policy = "h2o",
    budget: int | float | None = None,
    *,
    chunk: int = 512,
    reading: int | None = READING,
    evict_during_decode: bool = True,
    **knobs,
) -> nn.Module:
    """Return ``model`` with every causal self-attention rewritten onto an evicting KV cache.

    ``policy``: a name from ``kvpass.policies()`` (knobs may ride along: ``"gate:threshold=0.05"``)
    or a :class:`~kvpass.policies.Policy`.
    ``budget``: KV slots kept per layer and KV head (int), or a fraction of the prompt (float in
    (0, 1]). ``chunk``: prompts are prefilled ``chunk`` tokens at a time (activations stay
    chunk-sized). ``reading``: a prompt is read into a buffer of up to ``reading`` tokens per layer
    and KV head and compressed to the budget once it is read (or whenever the buffer fills), so the
    policy ranks the whole buffer at once; None: the whole prompt; 0 (or anything up to budget +
    chunk): evict after every chunk. ``evict_during_decode=False`` evicts only the prompt, as kvpress does.
    Other keyword arguments are the policy's knobs (``sink_tokens``, ``window``, ...);
    ``allocation`` (per-layer multiples of the budget) may be a ``kvpass calibrate`` file.

    The original model is left as it was; the returned one shares its weights. A multimodal
    transformers model is transformed as its text model (a ``...ForCausalLM`` over its decoder:
    text in, text out).
    """
    if getattr(model, "kvpass_policy", None) is not None:
        raise ValueError("this model is already transformed by kvpass; transform the original model instead")
    if hf.is_hf_model(type(model)):
        model = hf.text_model(model) or model
    if budget is not None:
        knobs["budget"] = budget
    if isinstance(policy, str):  # "NAME:KNOB=VALUE,...": those knobs join the others
        policy, knobs = policies.merge(policy, knobs)
    pol = policies.get(policy, **allocation.read(knobs, budget))  # (a `kvpass calibrate` file read)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    check_reading(reading)
    gm, sites = sites_of(model)
    if not sites:
        raise ValueError(
            f"no attention found in {type(model).__name__}: kvpass looked for scaled_dot_product_attention calls "
            "and eager attention (q @ k^T, scale, mask, softmax, @ v) in its exported forward"
            + (
                f"; it has {n} softmax call(s) in no form kvpass knows"
                if (
                    n := sum(
                        node.target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
                        for node in gm.graph.nodes
                    )
                )
                else ""
            )
            + ". For a transformers model, attn_implementation='sdpa' is the most direct form."
        )
    if not any(s.action == "rewrite" for s in sites):
        raise ValueError(f"no attention site of {type(model).__name__} can be rewritten: {sites[0].reason}")
    pol.bind(model, sites)  # (a gate checkpoint may bring its allocation)
    pol.check_layers(len(sites))
    io = Exchange()
    rewrite(gm, sites, lambda site: KVAttention(site, io))
    opaque = {n: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    opaque = {n: m for n, m in opaque.items() if isinstance(m, (KVMixer, RowWise))}  # mixers, experts
    for m in opaque.values():
        if isinstance(m, KVMixer):
            m.io = io
    row_wise = hf.row_wise_modules(model) if hf.is_hf_model(type(model)) else set()
    exempt = {s.node for s in sites if s.action == "rewrite"} | set(opaque)
    try:
        check_token_local(gm, exempt=exempt, row_wise=row_wise)
    except TokenMixingError as e:
        raise recurrent.explain(e, model) from None
    check_lengths(gm, type(model).__name__)
    flatten_attrs(gm)

    new = copy.copy(model)
    for attr in ("_modules", "_parameters", "_buffers"):
        setattr(new, attr, dict(getattr(model, attr)))
    new.__class__ = _transformed_class(type(model))
    if hf.is_hf_model(type(model)):
        hf.own_generation_config(new)
    new.kvpass_graph = gm
    new.kvpass_head = split_head(gm)  # None: the graph itself returns logits
    new.kvpass_policy = pol
    new.kvpass_sites = sites
    new.kvpass_options = {"chunk": chunk, "reading": reading, "evict_during_decode": evict_during_decode}
    new.kvpass_cache = None
    object.__setattr__(new, "kvpass_step", Step(gm, new.kvpass_head, pol, io))
    new._kvpass_compiled = None
    return new


class StepOutput(NamedTuple):
    """What ``kvpass_forward`` returns (and the forward of a model written by hand; a transformers
    model's forward returns transformers' output: see :mod:`kvpass.runtime.hf`)."""

    logits: Tensor
    cache: EvictingCache


class KVPassMixin:
    """kvpass's own API on a transformed model, the same for every model (mixed in before the
    model's own class, after the front door that gives it ``forward`` and ``generate``:
    :class:`PlainMixin`, or :class:`kvpass.runtime.hf.HFMixin` for a transformers model)."""

    kvpass_cache_class: type[EvictingCache] = EvictingCache

    def kvpass_new_cache(self, decode_reserve: int = 256) -> EvictingCache:
        """A fresh, empty cache for this model's policy and options."""
        return self.kvpass_cache_class(self.kvpass_policy, decode_reserve=decode_reserve, **self.kvpass_options)

    def compile(self, *, backend: str = "kvpass", mode: str | None = None, options: dict | None = None) -> None:
        """Compile this model's step, in place (:mod:`kvpass.runtime.compile`): ``fullgraph``, one decode
        graph for a whole generation. ``mode``: Inductor's (``"reduce-overhead"``: decode steps
        replay as CUDA graphs); ``options``: Inductor's config patches."""
        if backend != "kvpass":
            raise ValueError(
                f"a kvpass model compiles its step with backend='kvpass', got {backend!r} "
                "(Inductor does the work; any other backend would see no kvpass step)"
            )
        from kvpass.runtime.compile import compile_step

        self._kvpass_compiled = compile_step(self.kvpass_step, mode, options)

    @torch.no_grad()
    def kvpass_forward(
        self,
        input_ids: Tensor,
        cache: EvictingCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> StepOutput:
        """``(logits, cache)`` after feeding ``input_ids`` to ``cache`` (a fresh one if None).

        ``attention_mask`` ``[B, seen + T]`` or ``[B, T]`` marks padding (0), which never takes a
        slot; ``position_ids`` overrides the true positions, which are otherwise counted by the
        cache; ``logits_to_keep`` > 0 returns only the last rows.
        """
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        cache, pos = self._kvpass_begin(input_ids, attention_mask, position_ids, cache)
        return StepOutput(self._kvpass_run(input_ids, pos, cache, logits_to_keep), cache)

    @torch.compiler.disable(recursive=False)
    def _kvpass_run(self, input_ids: Tensor, pos: Tensor, cache: EvictingCache, logits_to_keep: int) -> Tensor:
        """The chunk loop: the step (:class:`kvpass.runtime.step.Step`) on each prefill chunk, or on the
        decoded token. Under ``torch.compile`` this frame runs eagerly and the steps it calls are
        compiled, so the bookkeeping around them never becomes graph guards."""
        T = input_ids.shape[1]
        prompt = cache.seen == 0
        step, compiled = self.kvpass_step, self._kvpass_compiled
        logits: list[Tensor] = []
        room = cache.room if prompt and self.kvpass_policy.evicts else None  # a prompt is read, then compressed
        budget = cache.held_after_compression() if room is not None else 0
        whole = prompt and cache.read_whole
        run = compiled.prefill if compiled else step.prefill
        read = 0  # where the tokens read since the last compression start
        for span in plan(T, cache.chunk, room=room, budget=budget):
            start, end = span.start, span.end
            cache.make_room(end - start, step)
            rows = end - start if not logits_to_keep else min(end - start, max(0, end - (T - logits_to_keep)))
            args = (input_ids[:, start:end], pos[:, start:end], *cache.tables)
            if span.mode == DECODE:
                out = (compiled.decode if compiled else step.decode)(*args, layout=cache.layout)
            elif whole:  # read whole; at a compression, the policy's probe repeats what was read, or all
                out = run(*args, layout=cache.layout, rows=max(rows, 1), probe="none")  # layers rank together
                if span.compress:
                    if self.kvpass_policy.probes:
                        self._kvpass_probe(input_ids[:, read:end], pos[:, read:end], pos[:, :end].amax(dim=1), cache)
                    cache.compress(step, last=end == T)
                    read = end
            else:
                keep = cache.keep() if span.compress else None
                out = run(*args, layout=cache.layout, keep=keep, rows=max(rows, 1))
            if rows:
                logits.append(out if compiled is None or not compiled.graphs else out.clone())
            cache.seen += end - start
        if prompt:
            cache.settle(step)
        self.kvpass_cache = cache
        return torch.cat(logits, dim=1) if len(logits) > 1 else logits[0]

    def _kvpass_probe(self, ids: Tensor, pos: Tensor, after: Tensor, cache: EvictingCache) -> None:
        """KVzip's way of compressing a buffer: the policy's probe repeats the context read into it
        (``ids``, ``pos``), a chunk at a time (bounded activations), placed after position ``after``
        and attending over the whole buffer; it scores every entry, and the last piece keeps the best."""
        run = self._kvpass_compiled.prefill if self._kvpass_compiled else self.kvpass_step.prefill
        pieces = cuts(ids.shape[1], cache.chunk)
        for i, (a, b) in enumerate(pieces):
            keep = cache.keep() if i == len(pieces) - 1 else None
            args = (ids[:, a:b], pos[:, a:b], *cache.tables)
            run(*args, layout=cache.layout, keep=keep, rows=0, probe="only", after=after)

    @torch.compiler.disable
    def _kvpass_begin(self, input_ids, attention_mask, position_ids, cache) -> tuple[EvictingCache, Tensor]:
        """Check the inputs, start or continue the cache, and work out the true positions."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("a kvpass model takes input_ids as a [batch, sequence] tensor")
        if cache is not None and not isinstance(cache, EvictingCache):
            raise TypeError(
                f"a kvpass model keeps its KV in an EvictingCache, got {type(cache).__name__}; "
                "pass None (a fresh cache is made) or a cache this model returned"
            )
        cache = cache if cache is not None else self.kvpass_new_cache()
        B, T = input_ids.shape
        if cache.seen == 0:
            dtype = next(self.kvpass_graph.parameters(), torch.empty(0)).dtype
            cache.begin(B, T, self.kvpass_step, dtype, input_ids.device)
        elif cache.lengths.shape[0] != B:
            raise ValueError(f"this cache holds {cache.lengths.shape[0]} sequences, got a batch of {B}")
        pos = _positions(attention_mask, position_ids, cache.lengths, T)
        cache.lengths = cache.lengths + (pos >= 0).sum(dim=1)
        return cache, pos


class PlainMixin:
    """``forward`` and ``generate`` of a transformed model that brings no transformers ``generate()``
    (a model written by hand)."""

    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs) -> Tensor:
        """kvpass's decode loop (:func:`kvpass.runtime.generate.generate`)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    forward = KVPassMixin.kvpass_forward


def _positions(attention_mask: Tensor | None, position_ids: Tensor | None, lengths: Tensor, T: int) -> Tensor:
    """True positions of the ``T`` new columns; -1 marks padding. ``lengths``: real tokens seen per row."""
    if attention_mask is not None:
        mask = attention_mask[:, -T:].to(torch.bool)
        counted = lengths[:, None] + mask.long().cumsum(dim=1) - 1
        pos = position_ids[:, -T:].long() if position_ids is not None else counted
        return torch.where(mask, pos, -1)
    if position_ids is not None:
        return position_ids[:, -T:].long().expand(lengths.shape[0], T)
    return lengths[:, None] + torch.arange(T, device=lengths.device)


@functools.cache
def _transformed_class(cls: type) -> type:
    front = hf.HFMixin if hf.is_hf_model(cls) else PlainMixin
    return type(f"KVPass{cls.__name__}", (front, KVPassMixin, cls), {"__module__": __name__})
