"""kvpass.transform end to end on a tiny random Llama: full budget is exact, small budgets are bounded."""

import math

import pytest
import torch
from transformers import DynamicCache

import kvpass
from kvpass.runtime import hf
from kvpass.runtime.step import per_head
from tests.conftest import tiny_llama
from tests.models import SDPAModel

pytestmark = pytest.mark.hf


def prompt(seed, B=1, T=40, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)


def step_logits(model, ids, steps, cache):
    """Prefill ``ids``, then feed ``steps`` greedy tokens one at a time; all logits, concatenated."""
    out, cache = hf.call(model, ids, cache)
    logits = [out]
    for _ in range(steps):
        out, cache = hf.call(model, out[:, -1:].argmax(-1), cache)
        logits.append(out)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(
    "policy,chunk,share",
    [
        ("h2o", 16, "head"),
        ("full", 7, "head"),
        ("tova", 512, "head"),
        ("kvzip", 16, "head"),
        ("tova", 16, "layer"),
        ("tova", 16, "model"),
        ("kvzip", 16, "model"),
    ],
)
def test_full_budget_reproduces_logits(llama, policy, chunk, share):
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2)
    knobs = {"repeat": (5, 6, 7)} if policy == "kvzip" else {}  # its probe must leave the logits as they were
    if policy != "full":
        knobs["share"] = share
    small = kvpass.transform(llama, policy=policy, budget=None if policy == "full" else 200, chunk=chunk, **knobs)
    ref = step_logits(llama, ids, 32, DynamicCache(config=llama.config))
    got = step_logits(small, ids, 32, None)
    assert (got - ref).abs().max() <= 1e-4
    torch.testing.assert_close(
        small.generate(ids, max_new_tokens=32, do_sample=False), llama.generate(ids, max_new_tokens=32, do_sample=False)
    )


def test_original_model_is_untouched(llama):
    ids = prompt(1)
    before = llama(ids).logits
    cls = type(llama)
    small = kvpass.transform(llama, policy="streaming", budget=8, sink_tokens=2)
    small.generate(ids, max_new_tokens=4, do_sample=False)
    assert type(llama) is cls and not hasattr(llama, "kvpass_policy")
    torch.testing.assert_close(llama(ids).logits, before)
    assert small.lm_head.weight is llama.lm_head.weight  # weights shared, not copied


def test_small_budget_stays_bounded(llama):
    ids = prompt(2, B=2, T=300)
    small = kvpass.transform(llama, policy="h2o", budget=24, window=4, chunk=64)
    assert small(ids[:, :100], logits_to_keep=3).logits.shape == (2, 3, 97)
    out = small.generate(ids, max_new_tokens=40, do_sample=False)
    assert out.shape == (2, 340)
    stats = kvpass.cache_stats(small)
    per_slot = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head dim 16, fp32
    assert stats.tokens_seen == 339  # the last token is generated, never fed
    assert len(stats.layers) == 2
    for layer in stats.layers:
        assert layer.capacity == 24
        assert layer.kv_bytes == 2 * 24 * per_slot  # batch 2: exactly the budget
        assert layer.held == 2 * 2 * 24
        assert layer.evicted == 2 * 2 * (339 - 24)
    assert stats.kv_bytes == 2 * 2 * 24 * per_slot


@pytest.mark.parametrize("policy", ["snapkv", "kvzip"])
def test_kv_heads_sharing_a_pool_hold_the_same_bytes_in_unequal_shares(policy):
    """``share="layer"``: a layer's KV heads share one pool of budget x KV heads slots; each head's
    share of the prompt follows its scores (unequal), the bytes held are the equal shares' exactly,
    and a long generation stays within them."""
    model = tiny_llama(seed=3, layers=2, heads=6, kv_heads=3)
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=150)
    knobs = {"window": 4} if policy == "snapkv" else {"repeat": (5, 6, 7)}
    shares = []
    for share in ("head", "layer"):
        small = kvpass.transform(model, policy, 20, chunk=32, share=share, **knobs)
        small.generate(ids, max_new_tokens=1)  # the prompt, compressed
        for s in small.kvpass_cache.slots.values():
            counts = per_head(s, 3).valid.sum(-1)  # [2, 3]: each KV head's entries
            shares += counts.flatten().tolist() if share == "layer" else []
            assert (counts >= 4 if policy == "snapkv" else counts > 0).all()  # the window's floor
        small.generate(ids, max_new_tokens=60, do_sample=False, min_new_tokens=60)
        for s in small.kvpass_cache.slots.values():
            assert s.pos.shape == ((2, 1, 3 * 20) if share == "layer" else (2, 3, 20))
            assert int(s.valid.sum()) == 2 * 3 * 20  # full, and no more
        stats = kvpass.cache_stats(small)
        assert stats.kv_bytes == 2 * (2 * 2 * 3 * 20 * 16 * 4)  # 2 layers, batch 2, K + V, fp32, head dim 16
        assert stats.meta_bytes == 2 * 2 * 3 * 20 * (8 + 4 + 1 + 1)  # positions, scores, flags, owners
    assert set(shares) != {20}, "the shares should follow the scores"


def test_chunked_prefill_feeds_the_graph_chunk_by_chunk(llama):
    small = kvpass.transform(llama, policy="tova", budget=16, chunk=32)
    lengths = []
    small.kvpass_graph.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    small(prompt(3, T=100), logits_to_keep=1)
    assert lengths == [4, 32, 32, 32]  # cut from the end: the last chunk (the question) is a whole one


def test_left_padded_batch_matches_each_row_alone(llama):
    a, b = prompt(4, T=12), prompt(5, T=20)
    ids = torch.cat([torch.zeros(1, 8, dtype=torch.long), a], dim=1)  # left padding with pad id 0
    ids = torch.cat([ids, b])
    mask = (torch.arange(20) >= torch.tensor([[8], [0]])).long()
    small = kvpass.transform(llama, policy="tova", budget=64)
    out = small.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, alone in ((0, a), (1, b)):
        ref = llama.generate(alone, max_new_tokens=12, do_sample=False)
        torch.testing.assert_close(out[row, 20:], ref[0, -12:])
    held = kvpass.cache_stats(small).layers[0].held
    assert held == 2 * (12 + 11) + 2 * (20 + 11)  # per KV head: real tokens only, no padding


def test_a_probing_policy_evicts_each_row_as_alone(llama):
    # KVzip's probe (appended to every prefill chunk) follows each row's own positions and padding
    a, b = prompt(14, T=30), prompt(15, T=41)
    ids = torch.cat([torch.cat([torch.zeros(1, 11, dtype=torch.long), a], dim=1), b])
    mask = (torch.arange(41) >= torch.tensor([[11], [0]])).long()
    small = kvpass.transform(llama, policy="kvzip", budget=12, chunk=16, repeat=(9, 8, 7))
    out = small.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    batch = small.kvpass_cache.slots
    for row, alone in ((0, a), (1, b)):
        ref = small.generate(alone, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(out[row, 41:], ref[0, -6:])
        for layer, s in small.kvpass_cache.slots.items():
            got = batch[layer].pos[row][batch[layer].valid[row]].sort().values
            torch.testing.assert_close(got, s.pos[0][s.valid[0]].sort().values)


def test_padding_never_enters_a_small_cache(llama):
    ids = torch.cat([torch.zeros(1, 30, dtype=torch.long), prompt(6, T=10)], dim=1)
    mask = torch.cat([torch.zeros(1, 30), torch.ones(1, 10)], dim=1).long()
    small = kvpass.transform(llama, policy="tova", budget=16)
    small.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    for s in small.kvpass_cache.slots.values():
        assert (s.pos[s.valid] >= 0).all() and int(s.valid.sum()) == 2 * 12


def test_sampling_matches_original_at_full_budget(llama):
    ids = prompt(7, B=2)
    small = kvpass.transform(llama, policy="tova", budget=128)
    torch.manual_seed(11)
    ref = llama.generate(ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.8)
    torch.manual_seed(11)
    got = small.generate(ids, max_new_tokens=16, do_sample=True, top_k=20, temperature=0.8)
    torch.testing.assert_close(got, ref)


def test_prefill_only_eviction(llama):
    ids = prompt(8, T=100)
    small = kvpass.transform(llama, policy="tova", budget=0.25, evict_during_decode=False)
    small.generate(ids, max_new_tokens=10, do_sample=False)
    cache = small.kvpass_cache
    assert cache.budget == 25 and cache.capacity == 35
    assert kvpass.cache_stats(small).layers[0].held == 2 * (25 + 9)


def test_float_budget_capacity(llama):
    small = kvpass.transform(llama, policy="snapkv", budget=0.3, window=4)
    small(prompt(9, T=70), logits_to_keep=1)
    assert kvpass.cache_stats(small).layers[0].capacity == math.ceil(0.3 * 70)


def test_hand_written_model_with_sliding_window():
    torch.manual_seed(0)
    model = SDPAModel(form="bool_mask", window=6).eval()
    small = kvpass.transform(model, policy="full")
    ids, pos = prompt(10, T=30, vocab=50), torch.arange(30)[None]
    torch.testing.assert_close(small(ids).logits, model(ids, pos), rtol=1e-5, atol=1e-5)


def test_bad_inputs(llama):
    with pytest.raises(ValueError, match="valid policies"):
        kvpass.transform(llama, policy="magic")
    for budget in (0, -1, 1.5, "10", True):
        with pytest.raises(ValueError, match="budget"):
            kvpass.transform(llama, policy="tova", budget=budget)
    with pytest.raises(ValueError, match="chunk"):
        kvpass.transform(llama, policy="tova", budget=8, chunk=0)
    small = kvpass.transform(llama, policy="tova", budget=8)
    with pytest.raises(ValueError, match="already transformed"):
        kvpass.transform(small, policy="tova", budget=8)
    with pytest.raises(TypeError, match="EvictingCache"):
        small(prompt(1), past_key_values=DynamicCache(config=llama.config))
    with pytest.raises(ValueError, match="inputs_embeds"):
        small(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="cache_stats"):
        kvpass.cache_stats(llama)
    with pytest.raises(ValueError, match="share must be one of"):
        kvpass.transform(llama, policy="tova", budget=8, share="rows")
    with pytest.raises(ValueError, match="not comparable across KV heads"):
        kvpass.transform(llama, policy="knorm", budget=8, share="layer")


def test_knobs_in_the_policy_name(llama):
    ids = prompt(int(torch.randint(0, 2**31, ())))
    named = kvpass.transform(llama, "streaming:sink_tokens=2,window=5", 12, chunk=8)
    given = kvpass.transform(llama, "streaming", 12, chunk=8, sink_tokens=2, window=5)
    default = kvpass.transform(llama, "streaming", 12, chunk=8)
    assert named.kvpass_policy == given.kvpass_policy != default.kvpass_policy
    out = named.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, given.generate(ids, max_new_tokens=6, do_sample=False))


def test_other_shapes_of_gqa():
    for heads, kv_heads in ((4, 4), (6, 2), (8, 1)):
        model = tiny_llama(seed=heads, heads=heads, kv_heads=kv_heads)
        ids = prompt(12, T=24)
        small = kvpass.transform(model, policy="h2o", budget=64, chunk=10)
        assert kvpass.find_attention(model)[0].kv_heads == kv_heads
        torch.testing.assert_close(small(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
