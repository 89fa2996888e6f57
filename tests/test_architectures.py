"""The architecture matrix: for every model, full budget reproduces the original logits through
chunked prefill and decoding, and a small budget runs with its cache bounded."""

import numpy as np
import pytest
import torch
import transformers
from transformers import DynamicCache

import kvpass
from tests.architectures import ARCHITECTURES, build
from tests.test_transform import prompt, step_logits

pytestmark = pytest.mark.hf

# name -> (KV heads per site, sliding window per site, soft-cap per site)
EXPECTED = {
    "llama": (2, [None, None], 0.0),
    "mistral": (2, [8, 8], 0.0),
    "qwen2": (2, [None, None], 0.0),
    "qwen3": (2, [None, None], 0.0),
    "phi3": (2, [None, None], 0.0),
    "gemma2": (2, [8, None], 50.0),
    "gemma3": (2, [8, None], 0.0),
    "gpt2": (4, [None, None], 0.0),
    "gpt_neox": (4, [None, None], 0.0),
    "opt": (4, [None, None], 0.0),
    "falcon": (2, [None, None], 0.0),  # K/V repeated before RoPE: found by measuring
    "bloom": (4, [None, None], 0.0),  # ALiBi
    "mpt": (4, [None, None], 0.0),  # ALiBi
    "llama4": (2, [None, None], 0.0),  # chunked attention in layer 0
}
ALIBI = {"bloom", "mpt"}
CHUNKED = {"llama4": [8, 0]}  # attention chunk per site (chunked attention), where not all 0


OLD_TRANSFORMERS = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 3)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request):
    if request.param == "falcon" and OLD_TRANSFORMERS:
        pytest.skip("transformers 5.2 builds Falcon's mask with vmap, which its exported graph cannot run")
    return request.param, build(request.param)


def test_sites_are_described(arch):
    name, model = arch
    kv_heads, windows, softcap = EXPECTED[name]
    sites = kvpass.find_attention(model)
    assert [s.action for s in sites] == ["rewrite", "rewrite"]
    assert [s.kv_heads for s in sites] == [kv_heads] * 2
    assert [s.sliding_window for s in sites] == windows
    assert [s.softcap for s in sites] == [softcap] * 2
    assert all(bool(s.alibi) == (name in ALIBI) for s in sites)
    assert [s.chunked for s in sites] == CHUNKED.get(name, [0, 0])


def test_full_budget_reproduces_logits(arch):
    name, model = arch
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=40)
    exact = kvpass.transform(model, policy="full", chunk=16)
    ref = step_logits(model, ids, 12, DynamicCache(config=model.config))
    got = step_logits(exact, ids, 12, None)
    assert (got - ref).abs().max() <= 1e-4, name
    windows = EXPECTED[name][1]
    stats = kvpass.cache_stats(exact)
    for layer, window, block in zip(stats.layers, windows, CHUNKED.get(name, [0, 0]), strict=True):
        local = window or block  # a window layer holds its window, a chunked one its block
        assert layer.capacity == local if local else layer.capacity >= 40 + 12


def test_full_budget_generates_the_same_tokens(arch):
    """transformers' generate() on the transformed model: the original's greedy tokens, batch of two."""
    name, model = arch
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=30)
    exact = kvpass.transform(model, policy="tova", budget=64, chunk=16)
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(
        exact.generate(ids, max_new_tokens=12, do_sample=False), want, msg=lambda m: f"{name}: {m}"
    )


def test_small_budget_runs_bounded(arch):
    name, model = arch
    ids = prompt(7, B=2, T=60)
    small = kvpass.transform(model, policy="tova", budget=12, chunk=16)
    out = small.generate(ids, max_new_tokens=10, do_sample=False)
    assert out.shape == (2, 70)
    kv_heads, windows, _ = EXPECTED[name]
    stats = kvpass.cache_stats(small)
    for layer, window, block in zip(stats.layers, windows, CHUNKED.get(name, [0, 0]), strict=True):
        cap = min(12, window or 12, block or 12)
        assert layer.capacity == cap and 0 < layer.held <= 2 * kv_heads * cap


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_left_padding_with_learned_positions(name):
    """Padding tokens carry position -1 to the attention; position tables read them clamped at 0."""
    model = build(name)
    ids = prompt(11, B=2, T=24)
    mask = torch.ones_like(ids)
    ids[0, :7], mask[0, :7] = 0, 0
    exact = kvpass.transform(model, policy="full", chunk=8)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(exact.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), want)


@pytest.mark.parametrize("name,impl", [("llama", "eager"), ("qwen2", "eager"), ("gpt2", "eager"), ("falcon", "sdpa")])
def test_other_attention_implementation(name, impl):
    if name == "falcon" and OLD_TRANSFORMERS:
        pytest.skip("transformers 5.2 builds Falcon's mask with vmap, which its exported graph cannot run")
    model = build(name, attn_implementation=impl)
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=40)
    exact = kvpass.transform(model, policy="full", chunk=16)
    ref = step_logits(model, ids, 6, DynamicCache(config=model.config))
    assert (step_logits(exact, ids, 6, None) - ref).abs().max() <= 1e-4
    assert [s.kv_heads for s in exact.kvpass_sites] == [EXPECTED[name][0]] * 2


@pytest.mark.skipif(not OLD_TRANSFORMERS, reason="the failure is transformers 5.2's")
def test_falcon_on_old_transformers_is_a_clear_error():
    with pytest.raises(RuntimeError, match="fails when run on a 16-token probe"):
        kvpass.find_attention(build("falcon"))


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_windows_longer_than_the_probe_are_read_from_the_model(name):
    """A 24-token window: longer than the probe that measures masks, so it comes from the attention
    module's declaration; at full budget, a 70-token prompt is still the original."""
    config_cls, model_cls, kwargs, impl = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = config_cls(vocab_size=97, pad_token_id=0, **{**kwargs, "sliding_window": 24}, attn_implementation=impl)
    model = model_cls(config).eval()
    assert [s.sliding_window for s in kvpass.find_attention(model)] == [24, 24 if name == "mistral" else None]
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=70)
    exact = kvpass.transform(model, policy="full", chunk=16)
    ref = step_logits(model, ids, 8, DynamicCache(config=model.config))
    assert (step_logits(exact, ids, 8, None) - ref).abs().max() <= 1e-4


def test_chunked_attention_longer_than_the_probe_is_declared():
    """Llama 4's attention chunk of 64 positions: longer than the probe that measures masks, so it
    comes from the config's layer types; at full budget, a 150-token prompt (blocks crossed while
    prefilling and while decoding) is still the original, and a small budget holds at most the block."""
    config_cls, model_cls, kwargs, impl = ARCHITECTURES["llama4"]
    torch.manual_seed(0)
    kwargs = {**kwargs, "attention_chunk_size": 64}
    config = config_cls(vocab_size=97, pad_token_id=0, **kwargs, attn_implementation=impl)
    model = model_cls(config).eval()
    assert [s.chunked for s in kvpass.find_attention(model)] == [64, 0]
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=150)
    exact = kvpass.transform(model, policy="full", chunk=16)
    ref = step_logits(model, ids, 8, DynamicCache(config=model.config))
    assert (step_logits(exact, ids, 8, None) - ref).abs().max() <= 1e-4


def test_a_declared_chunk_the_probe_contradicts_is_refused():
    """A site whose measured blocks are not the ones its config declares is skipped, not guessed."""
    from kvpass.passes import PROBE_LEN
    from kvpass.runtime.hf import declare_windows

    model = build("llama4")
    sites = kvpass.find_attention(model)
    assert sites[0].chunked == 8
    sites[0].chunked = 4  # as if the probe had measured blocks of 4
    declare_windows(model, sites, PROBE_LEN)
    assert sites[0].action == "skip" and "chunked attention declared" in sites[0].reason
    assert sites[1].action == "rewrite"


@pytest.mark.parametrize("name", [*sorted(ALIBI), *CHUNKED])
def test_position_rules_with_left_padding(name):
    """ALiBi's bias and chunked attention's blocks come from the positions kvpass keeps per slot: a
    left-padded batch gets the original's tokens at full budget."""
    model = build(name)
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=40)
    mask = torch.ones_like(ids)
    ids[0, :9], mask[0, :9] = 0, 0
    exact = kvpass.transform(model, policy="full", chunk=16)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(exact.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), want)


@pytest.mark.parametrize("name", [*sorted(ALIBI), *CHUNKED])
def test_position_rules_compile_and_export(name, tmp_path):
    """ALiBi and chunked attention, decided from slot positions, at a small budget: the compiled step
    and the ONNX engine give the eager tokens (Llama 4's rotary embedding is complex-valued, which
    torch's ONNX exporter lacks: refused with the reason). (MPT's config says ``use_cache=False``:
    generate() would feed the whole sequence each step, a fresh prompt; the comparison is of
    decoding on the cache.)"""
    model = build(name)
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=40)
    small = kvpass.transform(model, policy="tova", budget=12, chunk=16)
    want = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    compiled = kvpass.transform(model, policy="tova", budget=12, chunk=16)
    compiled.compile()
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True), want)
    if name == "llama4":
        with pytest.raises(ValueError, match="complex numbers"):
            kvpass.export_onnx(small, tmp_path / f"{name}.onnx")
        return
    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, tmp_path / f"{name}.onnx"))
    assert np.array_equal(engine.generate(ids.numpy(), 8), want.numpy())
