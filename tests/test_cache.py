"""Eviction (:mod:`kvpass.runtime.step`) checked against brute force on random inputs, and the cache's state."""

import itertools
import math

import pytest
import torch

import kvpass
from kvpass import policies
from kvpass.kernels import attend
from kvpass.policies import gate_network as gates
from kvpass.policies.base import Chunk
from kvpass.runtime import step
from kvpass.runtime.cache import EvictingCache
from kvpass.runtime.plan import DECODE, PREFILL, cuts, plan
from tests.conftest import tiny_llama
from tests.layers import Layers, kept_positions


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def feed(cache, g, B, Hkv, G, T, D, start, pad_rows=()):
    q = torch.randn(B, Hkv * G, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    pos = (start + torch.arange(T)).repeat(B, 1)
    for r in pad_rows:
        pos[r, : T // 2] = -1
    return q, k, v, pos


def brute_force_keep(policy, s, q, k, v, pos, scale, target, pooled=False):
    """Per (row, KV head): the positions of the top-``target`` candidates by (protected, score);
    ``pooled``: the top ``target`` x KV heads of the row's candidates of every head."""
    p = policy
    s = step.per_head(s, k.shape[1])
    options = (p.obs, p.mass_entropy_k, p.mass_by_value)
    _, mass = attend(q, k, v, s.keys, s.values, s.valid, s.pos, pos, scale, 0, 0.0, *options)
    score = p.score(Chunk(s.score.clone(), k, v, pos, mass, s.pos.clone()))
    B, Hkv, T = k.shape[:3]
    cand_pos = torch.cat([s.pos, pos[:, None].expand(B, Hkv, T)], -1)
    cand_ok = torch.cat([s.valid, (pos >= 0)[:, None].expand(B, Hkv, T)], -1)
    newest = int(cand_pos.max())
    score = p.rank(score, cand_pos, torch.full((B,), newest))
    keep = {}
    for b in range(B):
        pool = []
        for h in range(Hkv):
            entries = []
            for j in range(cand_pos.shape[-1]):
                if cand_ok[b, h, j]:
                    p = int(cand_pos[b, h, j])
                    prot = p < policy.sink_tokens or p > newest - policy.window
                    entries.append((prot, float(score[b, h, j]), p, h))
            entries.sort(reverse=True)
            keep[b, h] = sorted(p for _, _, p, _ in entries[:target])
            least = math.ceil(policy.floor * target)  # a head's best stay in a pool, whatever the others'
            pool += [(prot or i < least, score, p, h) for i, (prot, score, p, h) in enumerate(entries)]
        if pooled:
            pool.sort(reverse=True)
            for h in range(Hkv):
                keep[b, h] = sorted(p for _, _, p, owner in pool[: target * Hkv] if owner == h)
    return keep, k, v


SELECTION = ["h2o", "observed", "tova", "snapkv", "knorm", "aha"]


@pytest.mark.parametrize(
    "policy, pooled", [(p, False) for p in SELECTION] + [(p, True) for p in SELECTION if p != "knorm"]
)
def test_selection_matches_brute_force(policy, pooled):
    """Prefill chunks and decoded tokens keep the best candidates: per KV head, or (``pooled``) over
    the layer's pool, each entry ranked by its own head's score."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G, D, C = 2, 3, 2, 4, 6
    knobs = {"snapkv": {"window": 2}, "aha": {"window": 1, "recent": 3, "k": 2}}.get(policy, {"window": 1})
    pol = policies.get(policy, budget=C, **({"share": "layer", "floor": 0.5} if pooled else {}), **knobs)
    layers = Layers(pol, B, Hkv, D, C, pooled=pooled)
    ptr = None
    history = {}  # (row, head, pos) -> key, to check that stored keys belong to their positions
    start = 0
    shares = set()
    for T in (4, 4, 3, 1, 1, 2, 1, 1):
        q, k, v, pos = feed(None, g, B, Hkv, G, T, D, start, pad_rows=(1,) if start == 0 else ())
        if pooled:  # KV head 0 attends sharply: few high scores, the rest near 0 (the floor keeps its share)
            q[:, :G] *= 8
        prefilling = start < 11
        want, _, _ = brute_force_keep(pol, layers.slots(), q, k, v, pos, 0.5, C, pooled)
        layers(q, k, v, pos, 0.5, keep=C if prefilling else None)
        s = layers.slots()
        for b in range(B):
            for h in range(Hkv):
                for t in range(T):
                    history[b, h, int(pos[b, t])] = k[b, h, t]
        kept = kept_positions(s, Hkv)
        if start:
            assert kept == want, f"seed {seed}, step at {start}"
        shares |= {len(p) for p in kept.values()}
        assert ptr is None or s.keys.data_ptr() == ptr, "slot tables must be updated in place"
        ptr = s.keys.data_ptr()
        assert not s.valid[s.pos < 0].any(), "padding must never occupy a slot"
        heads = step.per_head(s, Hkv)
        for b, h in kept:
            for j in range(heads.capacity):
                if heads.valid[b, h, j]:
                    torch.testing.assert_close(heads.keys[b, h, j], history[b, h, int(heads.pos[b, h, j])])
        start += T
    assert s.keys.shape[1:3] == ((1, Hkv * C) if pooled else (Hkv, C))  # exactly the budget's slots
    assert len({tuple(p) for p in kept.values()}) > 1, f"heads should keep different tokens (seed {seed})"
    if pooled:  # the heads' shares follow their scores (over 8 steps x 2 rows, never all equal)
        assert shares != {C}, f"seed {seed}"


def test_decode_fast_path_equals_general_path():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G, D, C = 2, 2, 2, 4, 5
    caches = [Layers(policies.get("h2o", budget=C, window=1), B, Hkv, D, C) for _ in range(2)]
    steps = [feed(None, g, B, Hkv, G, 8 if i == 0 else 1, D, 0 if i == 0 else 7 + i) for i in range(12)]
    for i, (q, k, v, pos) in enumerate(steps):
        for j, c in enumerate(caches):  # cache 1 always takes the general (top-k) path
            c(q, k, v, pos, 0.5, keep=C if i == 0 or j == 1 else None)
        a, b = caches[0].slots(), caches[1].slots()
        assert kept_positions(a) == kept_positions(b), f"seed {seed}, step {i}"


def _policy(name, seed, **knobs):
    """A policy by name; ``gate`` with random gates for 3 layers of 6 heads, 2 KV heads, head dim 4
    (readout scaled up so that some tokens are dropped and some kept)."""
    if name != "gate":
        return policies.get(name, **knobs)
    pol = policies.get("gate", **knobs)
    pol.gates = gates.Gates(3, 6, 2, 4, seed=seed)
    with torch.no_grad():
        pol.gates.readout.mul_(4)
        pol.gates.bias.zero_()
    return pol


@pytest.mark.parametrize("policy", ["h2o", "tova", "streaming", "full", "gate"])
def test_deferred_batched_admission_equals_layer_by_layer(policy):
    """A step admits decoded tokens at its end, all layers of a group in one batch: the same
    outputs and slots as admitting each layer right after its attention."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G, D, C, L = 2, 2, 3, 4, 5, 3
    knobs = {} if policy == "full" else {"budget": C, "window": 1 if policy != "streaming" else 0}
    pol = _policy(policy, seed, **knobs)
    capacity = 8 + 10 if policy == "full" else C  # full: room for every token
    caches = [Layers(pol, B, Hkv, D, capacity, layers=L) for _ in range(2)]
    for i in range(10):
        T = 8 if i == 0 else 1
        start = 0 if i == 0 else 7 + i
        steps = [feed(None, g, B, Hkv, G, T, D, start) for _ in range(L)]
        outs = []
        for j, c in enumerate(caches):
            keep = capacity if i == 0 else None
            outs.append(
                [
                    c(q, k, v, pos, 0.5, layer=layer, keep=keep, admit=j == 1)
                    for layer, (q, k, v, pos) in enumerate(steps)
                ]
            )
            if j == 0 and i:
                c.admit(list(range(L)), 0.5)
        for layer in range(L):
            torch.testing.assert_close(outs[0][layer], outs[1][layer], rtol=0, atol=0)
            a, b = caches[0].slots(layer), caches[1].slots(layer)
            assert kept_positions(a) == kept_positions(b), f"seed {seed}, step {i}, layer {layer}"
            for f in ("keys", "values", "pos", "score", "valid"):
                tol = 1e-6 if f == "score" and policy == "gate" else 0  # gate: batched vs per-layer products
                torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=tol, atol=tol)
    if policy == "gate":  # beyond the window, only tokens the gate kept hold slots (scores: keep probabilities)
        s = caches[0].slots(0)
        old = s.valid & (s.pos < int(s.pos.max()))  # window 1: the newest token may be flagged out
        assert s.valid.any() and bool((s.score[old] >= 0.5).all())


def small_step():
    return kvpass.transform(tiny_llama(), "tova", 8).kvpass_step


def test_evicted_count_and_capacity():
    cache = EvictingCache(policies.get("streaming", budget=4, sink_tokens=1))
    cache.begin(1, 10, small_step(), torch.float32, torch.device("cpu"))
    assert [s.capacity for s in cache.slots.values()] == [4, 4]
    s = cache.slots[0]
    g = torch.Generator().manual_seed(fresh_seed())
    layers = Layers(cache.policy, 1, 2, 16, 4)
    layers.group = kvpass.runtime.step.Slots(*(t[:1] for t in cache.layout.split(cache.tables)[0]))
    q, k, v, pos = feed(None, g, 1, 2, 1, 10, 16, 0)
    layers(q, k, v, pos, 0.5, keep=4)
    cache.lengths += 10
    assert cache.evicted(0) == 2 * 6 and int(s.valid.sum()) == 2 * 4 and cache.evicted(1) == 2 * 10
    assert s.kv_bytes == 2 * (1 * 2 * 4 * 16 * 4)  # K and V, 2 KV heads, 4 slots, D 16, fp32


def test_prefill_only_eviction_keeps_room_for_decoding():
    cache = EvictingCache(policies.get("tova", budget=4), evict_during_decode=False, decode_reserve=3)
    cache.begin(1, 10, small_step(), torch.float32, torch.device("cpu"))
    assert cache.capacity == 7 and cache.keep() == {0: 4, 1: 4}
    g = torch.Generator().manual_seed(fresh_seed())
    layers = Layers(cache.policy, 1, 1, 4, 7)
    layers(*feed(None, g, 1, 1, 1, 10, 4, 0)[:3], torch.arange(10)[None], 0.5, keep=4)
    assert int(layers.slots().valid.sum()) == 4
    for i in range(3):  # the reserve takes the generated tokens without evicting
        layers(*feed(None, g, 1, 1, 1, 1, 4, 0)[:3], torch.tensor([[10 + i]]), 0.5)
    assert int(layers.slots().valid.sum()) == 7
    layers(*feed(None, g, 1, 1, 1, 1, 4, 0)[:3], torch.tensor([[13]]), 0.5)
    assert int(layers.slots().valid.sum()) == 7


def test_float_budget_is_a_fraction_of_the_prompt():
    cache = EvictingCache(policies.get("tova", budget=0.25))
    cache.begin(2, 101, small_step(), torch.float32, torch.device("cpu"))
    assert cache.capacity == 26 and cache.tables[0].shape == (2, 2, 2, 26, 16)
    with pytest.raises(ValueError, match="window"):
        EvictingCache(policies.get("h2o", budget=0.1, window=8)).begin(
            1, 50, small_step(), torch.float32, torch.device("cpu")
        )


def test_bad_chunk():
    with pytest.raises(ValueError):
        EvictingCache(policies.get("tova"), chunk=0)


def test_prompts_are_cut_from_the_end_and_never_into_a_lone_token():
    assert cuts(100, 32) == [(0, 4), (4, 36), (36, 68), (68, 100)]
    assert cuts(64, 32) == [(0, 32), (32, 64)]
    assert cuts(33, 32) == [(0, 33)]  # not (0, 1), (1, 33): a lone first token would be decoded
    assert cuts(65, 32) == [(0, 33), (33, 65)]
    assert cuts(5, 32) == [(0, 5)]
    assert cuts(3, 1) == [(0, 1), (1, 2), (2, 3)]
    for n in range(1, 70):  # contiguous, covering, all but the first whole, the first of 2..17 tokens
        spans = cuts(n, 16)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert all(e - s == 16 for s, e in spans[1:])
        assert (n == 1) == (spans[0][1] - spans[0][0] == 1) and spans[0][1] - spans[0][0] <= 17


def test_a_span_is_decoded_exactly_when_it_is_one_token():
    assert [s.mode for s in plan(1, 8)] == [DECODE]
    assert [s.mode for s in plan(9, 8)] == [PREFILL]
    assert [s.mode for s in plan(3, 1)] == [DECODE] * 3
    assert all(s.mode == PREFILL for n in range(2, 60) for s in plan(n, 8))


def test_the_reading_buffer_is_compressed_when_full_and_after_the_prompt():
    # room 20, budget 6, chunks of 8 from the end of 40 tokens: 8 | 8 (16) | 8 (24 > 20: compress to 6) | 8 (14) | last
    assert [s.compress for s in plan(40, 8, room=20, budget=6)] == [False, False, True, False, True]
    assert [s.compress for s in plan(40, 8, room=6, budget=6)] == [True] * 5  # room = budget: every chunk
    assert [s.compress for s in plan(40, 8, room=40, budget=6)] == [False] * 4 + [True]  # once, when read
    assert not any(s.compress for s in plan(40, 8))  # after the prompt: nothing is compressed


def _prompt(seed: int, T: int) -> torch.Tensor:
    return torch.randint(3, 97, (2, T), generator=torch.Generator().manual_seed(seed))


def test_reading_the_prompt_defers_eviction_until_it_is_read():
    """With the whole prompt in the reading buffer, nothing is evicted while it is read: every
    prompt position gets the full model's logits, the tables grow to the prompt and then shrink
    to the budget."""
    seed = fresh_seed()
    model, ids = tiny_llama(seed=3), _prompt(seed, 70)
    want = model(ids).logits
    small = kvpass.transform(model, "tova", 12, chunk=16, reading=None)
    logits, cache = small.kvpass_forward(ids)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    per_slot = sum(t[:, :, :, :1].nbytes for t in cache.tables)  # one slot of every layer and table
    assert cache.peak_bytes == 70 * per_slot  # the whole prompt, held while reading
    assert [s.capacity for s in cache.slots.values()] == [12, 12]  # then the budget
    assert all(int(s.valid.sum(-1).max()) == 12 for s in cache.slots.values())


@pytest.mark.parametrize("policy", ["tova", "h2o", "snapkv", "knorm"])
def test_reading_in_chunks_keeps_what_one_whole_chunk_keeps(policy):
    """Compressing after reading ranks the whole prompt at once: read in chunks of 16 into the
    buffer, a prompt keeps the slots (and then generates the tokens) that reading it as one chunk
    keeps -- for policies whose scores add up over chunks or come from the last queries."""
    seed = fresh_seed()
    model, ids = tiny_llama(seed=4), _prompt(seed, 61)
    knobs = {"snapkv": {"window": 4}, "h2o": {"window": 4}}.get(policy, {})
    whole = kvpass.transform(model, policy, 20, chunk=64, **knobs)  # one chunk, evicted once
    read = kvpass.transform(model, policy, 20, chunk=16, reading=None, **knobs)
    want = whole.generate(ids, max_new_tokens=6, do_sample=False)
    got = read.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want), f"seed {seed}"


def test_a_bounded_buffer_compresses_when_full_and_holds_no_more():
    """``reading`` bounds the tables while the prompt is read: budget + chunk is eviction after
    every chunk (the tables never exceed the budget), a larger buffer holds up to reading - chunk."""
    seed = fresh_seed()
    model, ids = tiny_llama(seed=5), _prompt(seed, 100)
    per_slot = None
    for reading, most in ((12 + 16, 12), (60, 44), (None, 100)):
        small = kvpass.transform(model, "h2o", 12, chunk=16, reading=reading, window=2)
        _, cache = small.kvpass_forward(ids)
        per_slot = per_slot or sum(t[:, :, :, :1].nbytes for t in cache.tables)
        assert cache.peak_bytes == most * per_slot, (reading, seed)
        assert sum(t.nbytes for t in cache.tables) == 12 * per_slot
    with pytest.raises(ValueError, match="reading"):
        kvpass.transform(model, "tova", 12, reading=-1)
