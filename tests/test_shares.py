"""One budget for the model (``share="model"``, :mod:`kvpass.runtime.shares`) against brute force, and
end to end: the memory is the equal shares', the layers' shares follow their scores."""

import math

import pytest
import torch

import kvpass
from kvpass import policies
from kvpass.runtime import shares
from kvpass.runtime.step import Slots, export_capacity
from tests.conftest import tiny_llama
from tests.layers import kept_positions
from tests.test_cache import fresh_seed


def pool(g, B, Hkv, S, D, filled):
    """A layer's pool ``[B, 1, S]`` of ``filled`` random entries per row (distinct positions, random
    owners and scores), the rest empty; keys say which position they hold."""
    s = Slots.empty((B, 1), S, D)
    for b in range(B):
        n = filled[b]
        s.pos[b, 0, :n] = torch.randperm(200, generator=g)[:n]
        s.owner[b, 0, :n] = torch.randint(0, Hkv, (n,), generator=g, dtype=torch.uint8)
        s.valid[b, 0, :n] = True
    s.score.copy_(torch.rand(s.score.shape, generator=g))
    s.keys.copy_(s.pos[..., None].float() + torch.rand(B, 1, S, 1, generator=g) / 10)
    s.values.normal_(generator=g)
    return s


def brute_force(policy, pools, most):
    """Per row, the (layer, head, position) entries that stay: each layer's candidates ranked by
    (protected or among its head's best ceil(floor x share), score), its best ``most`` x KV heads
    eligible, then the best ``total`` of all layers."""
    B = next(iter(pools.values()))[0].pos.shape[0]
    total = sum(h * c for _, h, c in pools.values())
    keep = {}
    for b in range(B):
        everything = []
        for layer, (s, Hkv, share) in pools.items():
            ok = s.valid[b, 0]
            newest = int(s.pos[b, 0][ok].max())
            entries = []
            for h in range(Hkv):
                mine = []
                for j in range(s.capacity):
                    if ok[j] and int(s.owner[b, 0, j]) == h:
                        p = int(s.pos[b, 0, j])
                        mine.append((p < policy.sink_tokens or p > newest - policy.window, float(s.score[b, 0, j]), p))
                mine.sort(reverse=True)
                least = max(1, math.ceil(policy.floor * share))  # the head's best, protected ones first
                entries += [(prot or i < least, score, layer, h, p) for i, (prot, score, p) in enumerate(mine)]
            entries.sort(reverse=True)
            everything += entries[: most * Hkv] if most is not None else entries
        everything.sort(reverse=True)
        for _, _, layer, h, p in everything[:total]:
            keep.setdefault((layer, b, h), []).append(p)
    return {key: sorted(v) for key, v in keep.items()}


@pytest.mark.parametrize("most", [None, 7])
def test_the_layers_keep_the_best_entries_of_the_model(most):
    """The entries that stay are the best of all layers' (each head's floor first), each pool's best
    first; keys move with their positions; what is left over is empty."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D, share = 2, 3, 2, 4
    pol = policies.get("tova", budget=share, share="model", floor=0.3, sink_tokens=1, window=2)
    pools = {}
    for layer, filled in enumerate(([30, 25], [12, 30], [30, 9])):
        pools[layer] = (pool(g, B, Hkv, 30, D, filled), Hkv, share)
    want = brute_force(pol, pools, most)
    kept = shares.compress(pol, pools, most)
    for layer, (s, _, _) in pools.items():
        got = kept_positions(s, Hkv)
        for (b, h), positions in got.items():
            assert positions == want.get((layer, b, h), []), f"seed {seed}, layer {layer}, row {b}, head {h}"
        n = kept[layer]
        assert (s.valid.sum(-1)[:, 0] == n).all() and all(s.valid[b, 0, : n[b]].all() for b in range(B))
        assert (s.pos[~s.valid] == -1).all()
        held = s.valid
        torch.testing.assert_close(s.keys[held][:, 0].floor(), s.pos[held].float())  # keys moved with positions
        if most is not None:
            assert (n <= most * Hkv).all()
    counts = torch.stack(list(kept.values()))  # [layers, B]
    assert (counts.sum(0) == 3 * Hkv * share).all(), f"seed {seed}: every row keeps the model's budget"
    assert len(set(counts.flatten().tolist())) > 1, f"seed {seed}: the layers' shares should differ"


def test_capacities_hold_the_equal_shares_slots():
    kept = {0: torch.tensor([20, 22]), 1: torch.tensor([5, 4]), 2: torch.tensor([11, 10])}
    cap = shares.capacities(kept, {0: 3, 1: 3, 2: 3}, {0: 4, 1: 4, 2: 4})
    assert sum(cap.values()) == 12 and cap == {0: 7, 1: 2, 2: 3}  # 7, 1.5, 3.5 slots per head: 7, 2, 3
    short = shares.capacities({0: torch.tensor([2]), 1: torch.tensor([4])}, {0: 2, 1: 2}, {0: 8, 1: 8})
    assert short == {0: 8, 1: 8}  # a prompt shorter than the budget: the rest is spread evenly


@pytest.mark.parametrize("policy", ["snapkv", "kvzip"])
def test_one_budget_for_the_model_holds_the_equal_shares_bytes(policy):
    """``share="model"``: the layers' pools are sized by their scores at compression; the bytes held
    are the equal shares' (both rows, both layers' KV heads), and a long generation stays within them."""
    model = tiny_llama(seed=3, layers=3, heads=6, kv_heads=3)
    ids = torch.randint(3, 97, (2, 150), generator=torch.Generator().manual_seed(fresh_seed()))
    knobs = {"window": 4} if policy == "snapkv" else {"repeat": (5, 6, 7)}
    small = kvpass.transform(model, policy, 20, chunk=64, reading=None, share="model", **knobs)
    small.generate(ids, max_new_tokens=1)
    slots = small.kvpass_cache.slots
    sizes = [s.pos.shape[-1] for s in slots.values()]
    assert sum(sizes) == 3 * 3 * 20 and len(set(sizes)) > 1, sizes
    small.generate(ids, max_new_tokens=60, do_sample=False, min_new_tokens=60)
    stats = kvpass.cache_stats(small)
    assert stats.kv_bytes == 2 * 3 * 2 * 3 * 20 * 16 * 4  # K + V, 3 layers, batch 2, 3 KV heads, fp32
    assert sum(int(s.valid.sum()) for s in small.kvpass_cache.slots.values()) == 2 * 3 * 3 * 20  # full, no more


def test_a_bounded_reading_buffer_holds_at_most_the_buffer_per_layer():
    """Between two compressions a layer keeps at most its reading buffer (here the budget:
    ``reading=0``), so its tables never hold more than the buffer and the chunk in flight."""
    model = tiny_llama(seed=5, layers=3, heads=4, kv_heads=2)
    ids = torch.randint(3, 97, (1, 300), generator=torch.Generator().manual_seed(fresh_seed()))
    small = kvpass.transform(model, "tova", 16, chunk=32, reading=0, share="model")
    seen, cache = [], small.kvpass_new_cache()
    hook = small.kvpass_graph.register_forward_pre_hook(
        lambda m, a: seen.append([int(s.valid.sum()) for s in cache.slots.values()])
    )
    small.kvpass_forward(ids, cache)
    hook.remove()
    assert len(seen) == 10 and max(max(n) for n in seen) <= 2 * 16  # before each chunk: KV heads x the budget
    assert sum(s.pos.shape[-1] for s in cache.slots.values()) == 3 * 2 * 16
    assert cache.peak_bytes <= 3 * 2 * (16 + 32) * (2 * 16 * 4 + 14)  # the buffer and a chunk, per layer and KV head


def test_engines_refuse_a_budget_shared_by_the_model(llama):
    small = kvpass.transform(llama, "tova", 16, share="model")
    with pytest.raises(ValueError, match="share='layer'"):
        export_capacity(small, None)
