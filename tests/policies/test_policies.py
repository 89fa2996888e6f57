"""Which slots survive, for each policy, on small cases worked out by hand.

The step's layer functions are driven directly with one layer, one batch row and one KV head (head dim 1), so
attention is controlled by the key values: with query 1 and scale 1, a key of +8 draws nearly
all attention, keys of 0 share what is left.
"""

import math

import pytest
import torch

from kvpass import policies
from kvpass.policies.base import Chunk
from kvpass.policies.snapkv import pool_by_position
from tests.layers import Layers


def run(policy, keys, *, chunk, prompt=None, queries=None, values=None):
    """Feed ``keys`` (one float per token) in pieces of ``chunk``; return the kept positions, sorted."""
    n = len(keys)
    layers = Layers(policy, 1, 1, 1, policy.capacity(prompt or n))
    k_all = torch.tensor(keys, dtype=torch.float32).view(1, 1, n, 1)
    q_all = torch.ones(1, 1, n, 1) if queries is None else torch.tensor(queries, dtype=torch.float32).view(1, 1, n, 1)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        keep = layers.slots().capacity if end <= (prompt or n) else None  # the prompt: a prefill
        pos = torch.arange(start, end)[None]
        v = torch.randn(1, 1, end - start, 1) if values is None else torch.tensor(values[start:end]).view(1, 1, -1, 1)
        layers(q_all[:, :, start:end], k_all[:, :, start:end], v, pos, 1.0, keep=keep)
    s = layers.slots()
    return sorted(s.pos[0, 0][s.valid[0, 0]].tolist()), layers


def test_streaming_keeps_sinks_and_most_recent():
    kept, _ = run(policies.get("streaming", budget=4, sink_tokens=1), [0.0] * 9, chunk=1)
    assert kept == [0, 6, 7, 8]
    kept, _ = run(policies.get("streaming", budget=4, sink_tokens=2), [0.0] * 9, chunk=3)
    assert kept == [0, 1, 7, 8]


def test_h2o_keeps_heavy_hitters_and_window():
    # token 2 has a large key: every later query attends to it; the window protects the last token.
    keys = [0, 0, 8, 0, 0, 0, 0]
    kept, _ = run(policies.get("h2o", budget=3, window=1), keys, chunk=1)
    # the heavy hitter, the newest token, and the token that accumulated most of the rest: token 0
    # (seen by every query while the others were seen by fewer)
    assert kept == [0, 2, 6]


def test_observed_ranks_by_mean_attention_not_by_sum():
    # token 4 (key 1.5) draws ~half of the attention of the two queries that see it: mean 0.50;
    # token 1 is seen by five queries, less each: sum 1.31 > token 4's 1.00, but mean 0.26.
    keys = [0, 0, 0, 0, 1.5, 0]
    assert run(policies.get("h2o", budget=2, window=0), keys, chunk=6)[0] == [0, 1]
    assert run(policies.get("observed", budget=2), keys, chunk=6)[0] == [0, 4]


def test_aha_recent_accumulation_removes_the_early_token_bias():
    # token 4 (key 1) draws 0.41 and 0.35 of the last two queries' attention; token 0 gets 0.15 and
    # 0.13 from them, but 2.08 more from the four queries before: H2O's sum keeps it.
    keys = [0, 0, 0, 0, 1, 0]
    plain = {"k": 0, "value_norms": False}
    assert run(policies.get("aha", budget=1, recent=0, **plain), keys, chunk=6)[0] == [0]
    assert run(policies.get("aha", budget=1, recent=2, **plain), keys, chunk=6)[0] == [4]


def test_aha_value_refinement():
    # uniform attention; token 1's value has norm^2 9: 9 x (1/2 + 1/3 + 1/4) = 9.75 > token 0's 2.08
    keys, values = [0.0] * 4, [1.0, 3.0, 1.0, 1.0]
    plain = {"recent": 0, "k": 0}
    assert run(policies.get("aha", budget=1, value_norms=False, **plain), keys, chunk=4, values=values)[0] == [0]
    assert run(policies.get("aha", budget=1, value_norms=True, **plain), keys, chunk=4, values=values)[0] == [1]


def test_aha_adaptive_scale():
    from kvpass.kernels.attend import mass_scale

    seen = torch.tensor([64, 6, 4, 1])
    got = mass_scale(seen, head_dim=8, scale=0.3, k=4)
    # sqrt(2 ln(64/4) / 8) = 0.8326; sqrt(2 ln(6/4) / 8) = 0.3183; 4 and 1 keys: the model's 0.3
    torch.testing.assert_close(got, torch.tensor([0.8326, 0.3183, 0.3, 0.3]), rtol=0, atol=1e-4)
    # in the cache: 8 keys seen, k = 1, d = 1 -> scale sqrt(2 ln 8) = 2.04 instead of 1, a sharper
    # scoring softmax: the most attended key gains mass from the newest query, the others lose
    keys = [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]

    def scores(k):  # by position (slot order means nothing)
        s = run(policies.get("aha", budget=8, recent=1, k=k, value_norms=False), keys, chunk=8)[1].slots()
        return s.score[0, 0][s.pos[0, 0].argsort()]

    low, high = scores(0), scores(1)
    e = math.exp
    torch.testing.assert_close(low[1].item(), e(0.5) / (7 + e(0.5)), rtol=1e-5, atol=0)
    lam = math.sqrt(2 * math.log(8))
    torch.testing.assert_close(high[1].item(), e(0.5 * lam) / (7 + e(0.5 * lam)), rtol=1e-5, atol=0)
    assert high[0] < low[0]


def test_aha_knobs_are_checked():
    with pytest.raises(ValueError, match="recent"):
        policies.get("aha", recent=-1)
    with pytest.raises(ValueError, match="k must"):
        policies.get("aha", k=1.5)


def test_tova_follows_the_newest_query():
    # last query is negative: it prefers the *smallest* keys, so token 1 (key -8) is kept over token 3 (+8)
    keys = [0, -8, 0, 8, 0]
    queries = [1, 1, 1, 1, -1]
    kept, _ = run(policies.get("tova", budget=2), keys, chunk=5, queries=queries)
    assert kept == [1, 4]


def test_snapkv_window_and_pooling():
    # window of 2 keeps tokens 6, 7; the heavy token 2 and, by pooling, its neighbours win the rest
    keys = [0, 0, 8, 0, 0, 0, 0, 0]
    kept, _ = run(policies.get("snapkv", budget=5, window=2, kernel_size=3), keys, chunk=8)
    assert kept == [1, 2, 3, 6, 7]


def test_pool_by_position_uses_position_order():
    x = torch.tensor([[0.0, 3.0, 0.0, 6.0]])
    pos = torch.tensor([[3, 0, -1, 1]])  # order by position: x[1] (0), x[3] (1), x[0] (3); x[2] is empty
    pooled = pool_by_position(x, pos, 3)
    # position 0: mean(3, 6) = 4.5; position 1: mean(3, 6, 0) = 3; position 3: mean(6, 0) = 3
    torch.testing.assert_close(pooled[0, [1, 3, 0]], torch.tensor([4.5, 3.0, 3.0]))
    # the maximum: position 0: max(3, 6); 1: max(3, 6, 0); 3: max(6, 0); the empty entry keeps its value
    x = torch.tensor([[0.5, 3.0, 9.0, 6.0]])
    torch.testing.assert_close(pool_by_position(x, pos, 3, how="max"), torch.tensor([[6.0, 6.0, 9.0, 6.0]]))
    with pytest.raises(ValueError, match="how"):
        pool_by_position(x, pos, 3, how="min")


def test_knorm_keeps_smallest_keys():
    keys = [5, -1, 3, 0.5, -4, 2]
    kept, _ = run(policies.get("knorm", budget=3), keys, chunk=2)
    assert kept == [1, 3, 5]  # |k| = 1, 0.5, 2


def kvzip_chunk(layers, keys, queries, start, probe_keys, probe_queries):
    """One prefill chunk (``keys``, at positions from ``start``) and KVzip's probe after it, as a
    step feeds a layer: one head, head dim 1, scale 1."""
    T, P = len(keys), len(probe_keys)
    k = torch.tensor(keys + probe_keys, dtype=torch.float32).view(1, 1, -1, 1)
    q = torch.tensor(queries + probe_queries, dtype=torch.float32).view(1, 1, -1, 1)
    pos = torch.arange(start, start + T + P)[None]
    layers(q, k, torch.randn(1, 1, T + P, 1), pos, 1.0, keep=layers.slots().capacity, probe=P)
    s = layers.slots()
    return {int(p): float(x) for p, x, ok in zip(s.pos[0, 0], s.score[0, 0], s.valid[0, 0], strict=True) if ok}


def softmax(logits):
    z = sum(math.exp(x) for x in logits)
    return [math.exp(x) / z for x in logits]


def test_kvzip_keeps_what_reconstruction_reads_most():
    # chunk keys 1, 0, 2, -1; the probe's queries +1, +1, -1 (keys 0) see the chunk and the probe
    # causally. A token scores the most attention any probe query gives it: token 3 is kept for
    # the last query alone (a sum over the queries would keep token 0 instead).
    layers = Layers(policies.get("kvzip", budget=2, sink_tokens=0), 1, 1, 1, 2)
    rows = [softmax([q * k for k in (1, 0, 2, -1)] + [0] * (i + 1)) for i, q in enumerate((1, 1, -1))]
    want = [max(r[j] for r in rows) for j in range(4)]
    assert want[3] > want[0] and sum(r[0] for r in rows) > sum(r[3] for r in rows)
    kept = kvzip_chunk(layers, [1, 0, 2, -1], [0.3] * 4, 0, [0, 0, 0], [1, 1, -1])
    assert sorted(kept) == [2, 3]
    assert kept == pytest.approx({2: want[2], 3: want[3]}, rel=1e-5)
    # the next chunk: its probe sees the chunk and itself, not the older slots; they keep their scores
    kept = kvzip_chunk(layers, [3, 0], [0.0, 0.0], 4, [0], [1])
    assert kept == pytest.approx({4: softmax([3, 0, 0])[0], 2: want[2]}, rel=1e-5)


def test_kvzip_probe_of_a_buffer_scores_every_entry_over_the_whole_buffer():
    # keys 1, 0, 2, -1 read into a buffer without their probe (they wait at score 0), then a probe
    # of the buffer (queries +1, -1; keys 0) that sees all of it and itself, causally: every entry
    # scores the most attention a probe query gives it, the softmax over the buffer and the probe,
    # and the probe's last piece keeps the best two
    layers = Layers(policies.get("kvzip", budget=2, sink_tokens=0), 1, 1, 1, 4)
    keys = [1, 0, 2, -1]
    layers(torch.full((1, 1, 4, 1), 0.3), torch.tensor(keys, dtype=torch.float32).view(1, 1, 4, 1),
           torch.randn(1, 1, 4, 1), torch.arange(4)[None], 1.0)  # fmt: skip
    assert layers.slots().score[0, 0].tolist() == [0.0] * 4
    rows = [softmax([q * k for k in keys] + [0] * (i + 1)) for i, q in enumerate((1, -1))]
    want = [max(r[j] for r in rows) for j in range(4)]
    q, k = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)
    layers(q, k, torch.randn(1, 1, 2, 1), torch.tensor([[10, 11]]), 1.0, keep=2, probe=2)
    s = layers.slots()
    kept = {int(p): float(x) for p, x, ok in zip(s.pos[0, 0], s.score[0, 0], s.valid[0, 0], strict=True) if ok}
    best = sorted(range(4), key=lambda j: -want[j])[:2]
    assert kept == pytest.approx({j: want[j] for j in best}, rel=1e-5)


def test_kvzip_probe_sees_the_sinks_and_decoded_tokens_come_first():
    layers = Layers(policies.get("kvzip", budget=3, sink_tokens=1), 1, 1, 1, 3)
    kvzip_chunk(layers, [1, 0, 2, -1], [0.3] * 4, 0, [0, 0, 0], [1, 1, -1])
    kept = kvzip_chunk(layers, [3, 0], [0.0, 0.0], 4, [0], [1])
    sink_seen = softmax([1, 3, 0, 0])  # the sink (key 1) joins the probe's softmax
    assert sorted(kept) == [0, 2, 4] and kept[4] == pytest.approx(sink_seen[1], rel=1e-5)
    layers(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.randn(1, 1, 1, 1), torch.tensor([[6]]), 1.0)
    s = layers.slots()
    assert sorted(s.pos[0, 0][s.valid[0, 0]].tolist()) == [0, 4, 6]  # token 2 (lowest) gave way


def test_kvzip_probe_follows_each_rows_positions():
    kvzip = policies.get("kvzip", budget=8, repeat=(1, 2))
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    pos = torch.tensor([[-1, -1, 0, 1], [3, 4, 5, 6]])
    probe_ids, probe_pos = kvzip.probe(ids, pos)
    assert probe_ids.tolist() == [[1, 2, 0, 0, 5, 6], [1, 2, 7, 8, 9, 10]]
    assert probe_pos.tolist() == [[2, 3, -1, -1, 4, 5], [7, 8, 9, 10, 11, 12]]
    _, after = kvzip.probe(ids, pos, after=torch.tensor([20, 30]))  # a piece of a buffer: after its end
    assert after.tolist() == [[21, 22, -1, -1, 23, 24], [31, 32, 33, 34, 35, 36]]
    with pytest.raises(ValueError, match="repeat"):
        policies.get("kvzip", budget=8, repeat="Repeat!")


def test_random_is_seeded_and_bounded():
    a, _ = run(policies.get("random", budget=3, seed=7), [0.0] * 10, chunk=2)
    b, _ = run(policies.get("random", budget=3, seed=7), [0.0] * 10, chunk=2)
    c, _ = run(policies.get("random", budget=3, seed=8), [0.0] * 40, chunk=2)
    assert a == b and len(a) == 3 and len(c) == 3


def test_full_never_evicts_and_grows():
    import kvpass
    from tests.conftest import tiny_llama

    model = kvpass.transform(tiny_llama(), "full", chunk=3)
    model.generate(torch.randint(3, 97, (2, 5)), max_new_tokens=7, do_sample=False)
    cache = model.kvpass_cache
    assert cache.seen == 11 and cache.capacity >= 11
    for layer, s in cache.slots.items():
        assert cache.evicted(layer) == 0 and s.capacity == cache.capacity
        assert sorted(s.pos[0, 0][s.valid[0, 0]].tolist()) == list(range(11))


def test_sink_tokens_are_protected_in_every_policy():
    for name in ("h2o", "tova", "knorm", "random"):
        kept, _ = run(policies.get(name, budget=3, sink_tokens=2, window=0), [1, 2, 0, 0, 0, 0, 3, 0], chunk=2)
        assert {0, 1} <= set(kept), name


def test_scores_are_pure_functions_of_their_inputs():
    B, Hkv, C, T = 1, 2, 3, 2
    chunk = Chunk(
        old=torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]),
        keys=torch.ones(B, Hkv, T, 4),
        values=torch.ones(B, Hkv, T, 4),
        pos=torch.tensor([[5, 6]]),
        mass=torch.arange(10.0).view(B, Hkv, C + T),
        slot_pos=torch.tensor([[[0, 1, 2], [0, 3, 4]]]),
    )
    h2o = policies.get("h2o", budget=4, window=1).score(chunk)
    torch.testing.assert_close(h2o, torch.tensor([[[1.0, 3.0, 5.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0]]]))
    tova = policies.get("tova", budget=4).score(chunk)  # the paper's: all heads' attention, same for every head
    torch.testing.assert_close(tova, torch.tensor([[[5.0, 7, 9, 11, 13], [5, 7, 9, 11, 13]]]))
    torch.testing.assert_close(policies.get("tova", budget=4, per_head=True).score(chunk), chunk.mass)
    knorm = policies.get("knorm", budget=4).score(chunk)
    torch.testing.assert_close(knorm[..., C:], torch.full((B, Hkv, T), -2.0))
    stream = policies.get("streaming", budget=4, sink_tokens=1).score(chunk)
    torch.testing.assert_close(stream, torch.tensor([[[0.0, 1, 2, 5, 6], [0, 3, 4, 5, 6]]]))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(budget=0),
        dict(budget=-3),
        dict(budget=1.5),
        dict(budget=0.0),
        dict(budget="big"),
        dict(budget=True),
        dict(budget=8, window=-1),
        dict(budget=8, sink_tokens=4, window=4),
    ],
)
def test_bad_knobs(kwargs):
    with pytest.raises(ValueError):
        policies.get("h2o", **kwargs)


def test_unknown_policy_lists_names():
    with pytest.raises(ValueError, match="streaming"):
        policies.get("nonsense")
    with pytest.raises(ValueError, match=r"knob|unexpected"):
        policies.get("tova", budget=8, kernel_size=3)
    names = ["full", "streaming", "h2o", "observed", "tova", "snapkv", "knorm", "kvzip", "aha", "gate", "random"]
    assert policies() == sorted(names)


def test_knobs_written_in_the_name():
    assert policies.parse("tova") == ("tova", {})
    want = {"k": 64, "value_norms": False, "window": 8}
    assert policies.parse("aha:k=64, value_norms=False,window=8") == ("aha", want)
    assert policies.parse("gate:checkpoint=/tmp/a b.safetensors,threshold=0.05") == (
        "gate",
        {"checkpoint": "/tmp/a b.safetensors", "threshold": 0.05},
    )
    assert policies.get("aha:k=64,value_norms=False", budget=16) == policies.get(
        "aha", budget=16, k=64, value_norms=False
    )
    assert policies.get("aha:k=64", budget=16) != policies.get("aha", budget=16)
    for bad in ("aha:k", "aha:=3", "aha:k=1,k=2", "aha:2k=1"):
        with pytest.raises(ValueError, match="knob"):
            policies.get(bad, budget=16)
    with pytest.raises(ValueError, match="both"):
        policies.get("aha:k=64", budget=16, k=32)
    with pytest.raises(ValueError, match="unexpected"):
        policies.get("tova:kernel_size=3", budget=16)
    with pytest.raises(ValueError, match="valid policies"):
        policies.get("tovaa:window=3", budget=16)


def test_tova_heads_keep_the_same_tokens_in_the_same_slots():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    layers = Layers(policies.get("tova", budget=6), 2, 2, 8, 6)
    for start in range(0, 24, 4):
        T = 4 if start < 20 else 1
        q, k, v = (torch.randn(2, h, T, 8, generator=g) for h in (6, 2, 2))
        layers(q, k, v, torch.arange(start, start + T).expand(2, T), 0.35, keep=6 if start < 20 else None)
    s = layers.slots()
    assert s.valid.sum() == 2 * 2 * 6
    assert torch.equal(s.pos[:, 0], s.pos[:, 1]) and torch.equal(s.valid[:, 0], s.valid[:, 1])
