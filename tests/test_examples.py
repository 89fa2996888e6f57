"""The hand-written models in examples/ (nanoGPT-style, gpt-fast-style): found, exact at full
budget through chunked prefill and decoding, bounded at a small budget, and generating."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import kvpass

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def nanogpt():
    m = load("nanogpt")
    torch.manual_seed(0)
    model = m.GPT(m.GPTConfig(block_size=256, vocab_size=97, n_layer=2, n_head=4, n_embd=32)).eval()
    return model, lambda ids: model(ids), (4, 4)


def gpt_fast():
    m = load("gpt_fast")
    torch.manual_seed(0)
    args = m.ModelArgs(
        block_size=256, vocab_size=97, n_layer=2, n_head=8, n_local_heads=2, dim=64, intermediate_size=96
    )
    model = m.Transformer(args).eval()
    return model, lambda ids: model(ids, torch.arange(ids.shape[1]).expand_as(ids)), (8, 2)


@pytest.fixture(scope="module", params=[nanogpt, gpt_fast], ids=["nanogpt", "gpt_fast"])
def example(request):
    return request.param()


def greedy_reference(full_logits, ids, n):
    """Greedy decoding by recomputing the whole sequence each step: no cache at all."""
    for _ in range(n):
        ids = torch.cat([ids, full_logits(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def test_sites(example):
    model, _, (heads, kv_heads) = example
    sites = kvpass.find_attention(model)
    assert [(s.heads, s.kv_heads, s.causal, s.action) for s in sites] == [(heads, kv_heads, True, "rewrite")] * 2


def test_full_budget_is_exact(example):
    model, full_logits, _ = example
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    exact = kvpass.transform(model, policy="full", chunk=16)
    torch.testing.assert_close(exact(ids).logits, full_logits(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact.generate(ids, max_new_tokens=12), greedy_reference(full_logits, ids, 12))


def test_small_budget_is_bounded_and_samples(example):
    model, _, (_, kv_heads) = example
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(3))
    small = kvpass.transform(model, policy="h2o", budget=16, window=4, chunk=32)
    g = torch.Generator().manual_seed(0)
    out = small.generate(ids, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=20, generator=g)
    assert out.shape == (2, 100) and torch.equal(out[:, :80], ids)
    for layer in kvpass.cache_stats(small).layers:
        assert layer.capacity == 16 and layer.held == 2 * kv_heads * 16
