"""The real default model (SmolLM2-135M-Instruct from the embedded GGUF). Slow: kept few."""

import time

import pytest
import torch
from transformers import DynamicCache

import kvpass
from kvpass.data.passkey import passkey_prompt
from kvpass.runtime import hf

pytestmark = pytest.mark.slow


def test_loads_from_the_converted_copy_quickly(default_model):
    model, _ = default_model
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    t = time.perf_counter()
    kvpass.load_default_model()
    assert time.perf_counter() - t < 10  # the GGUF conversion (~20 s) happened once, before


@pytest.mark.hf
def test_full_budget_reproduces_logits_and_tokens(default_model):
    model, tok = default_model
    prompt, key = passkey_prompt(tok, 1100, seed=5, depth=0.3)
    ids = tok(prompt, return_tensors="pt").input_ids
    small = kvpass.transform(model, policy="h2o", budget=4096, chunk=512)
    assert len(small.kvpass_sites) == 30

    def steps(m, cache):
        out, cache = hf.call(m, ids, cache)
        logits = [out]
        for _ in range(32):
            out, cache = hf.call(m, out[:, -1:].argmax(-1), cache)
            logits.append(out)
        return torch.cat(logits, 1)

    diff = (steps(small, None) - steps(model, DynamicCache(config=model.config))).abs().max()
    assert diff <= 2e-4, diff  # fp32 rounding (logits up to ~38): softmax sums over the capacity, not the prompt
    full = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(small.generate(ids, max_new_tokens=12, do_sample=False), full)
    assert key in tok.decode(full[0, ids.shape[1] :])


def test_long_prompt_kv_bytes_are_the_budget(default_model):
    model, tok = default_model
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 420
    ids = tok(text, return_tensors="pt").input_ids[:, :4096]
    small = kvpass.transform(model, policy="tova", budget=512)
    small(input_ids=ids, logits_to_keep=1)
    stats = kvpass.cache_stats(small)
    per_slot = 2 * 3 * 64 * 4  # keys + values x 3 KV heads x head dim 64 x fp32
    assert stats.tokens_seen == 4096
    assert stats.kv_bytes == 30 * 512 * per_slot  # exactly the budget
    assert all(layer.held == 3 * 512 for layer in stats.layers)


def test_shipped_gate_runs_without_arguments_and_evicts_in_context(default_model):
    """`policy="gate"` on the default model uses the shipped gate nearest the budget; tokens it flags
    leave once out of its window, so layers hold fewer entries than the budget allows."""
    model, tok = default_model
    prompt, _ = passkey_prompt(tok, 1000, seed=7, depth=0.5)
    ids = tok(prompt, return_tensors="pt").input_ids
    small = kvpass.transform(model, policy="gate", budget=0.5)
    assert small.kvpass_policy.gates is not None
    out = small.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    cache = small.kvpass_cache
    newest = cache.seen - 1
    window = small.kvpass_policy.window
    assert window == 32  # the window the shipped gate was trained with
    for s in cache.slots.values():
        old = s.valid & (s.pos <= newest - window)
        assert bool((s.score[old] >= 0.5).all())  # beyond the window, only what the gate kept holds a slot
    held = sum(int(s.valid.sum()) for s in cache.slots.values())
    assert held < 0.9 * 30 * 3 * cache.capacity  # in-context eviction, not only overflow
    # the 50 % gate was trained with per-layer budgets, and brings them: some layers hold more, in all the same
    sizes = [s.capacity for s in cache.slots.values()]
    assert max(sizes) > cache.capacity > min(sizes) and sum(sizes) <= 30 * (cache.capacity + 1)  # shares round up
