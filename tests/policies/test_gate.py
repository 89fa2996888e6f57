"""Attention-Gate: in-context eviction semantics, the gate network, training and checkpoints."""

import math

import pytest
import torch

import kvpass
from kvpass.policies import AttentionGate, Chunk
from kvpass.policies import gate_network as gates
from kvpass.train import distill as train
from kvpass.train import in_context
from kvpass.transform import sites_of
from tests.conftest import tiny_llama


def brute_in_context(q, k, v, keep, scale, window=0):
    """Per head and query, softmax over exactly the keys it may see: itself, earlier kept tokens, and
    flagged-out tokens at most ``window`` positions back."""
    B, H, T, _ = q.shape
    G = H // k.shape[1]
    out = torch.full_like(q, float("nan"))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                seen = [j for j in range(i) if keep[b, h // G, j] or i - j <= window] + [i]
                w = torch.softmax(torch.stack([q[b, h, i] @ k[b, h // G, j] * scale for j in seen]), dim=0)
                out[b, h, i] = sum(wj * v[b, h // G, j] for wj, j in zip(w, seen, strict=True))
    return out


@pytest.mark.parametrize("G, window", [(1, 0), (3, 0), (3, 2)])
@pytest.mark.parametrize("attention", [in_context.reference, in_context.in_context_attention])
def test_in_context_attention_hides_flagged_tokens_per_head(attention, G, window):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, Hkv, T, D = 2, 2, 7, 4
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    k, v = torch.randn(B, Hkv, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    keep = torch.rand(B, Hkv, T, generator=gen) > 0.5
    keep[0, 0, :] = False  # a head that keeps nothing: every query sees only itself
    out = attention(q, k, v, keep.float(), 0.5, window)
    torch.testing.assert_close(out, brute_in_context(q, k, v, keep, 0.5, window))
    if not window:
        torch.testing.assert_close(out[0, :G], v[0, :1].expand(G, T, D))  # head 0 of row 0: each token itself


@pytest.mark.parametrize(
    "G, window, block, soft", [(1, 0, 3, False), (3, 0, 4, True), (3, 2, 5, False), (2, 3, 64, True)]
)
def test_blockwise_in_context_attention_and_its_gradients_match_the_reference(G, window, block, soft):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, Hkv, T, D = 2, 2, 13, 4
    q = torch.randn(B, Hkv * G, T, D, generator=gen, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, generator=gen, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, generator=gen, requires_grad=True)
    keep = torch.rand(B, Hkv, T, generator=gen)
    keep = (keep if soft else (keep > 0.5).float()).requires_grad_()
    grad = torch.randn(B, Hkv * G, T, D, generator=gen)
    inputs = (q, k, v, keep)
    with torch.enable_grad():
        want = in_context.reference(q, k, v, keep, 0.5, window)
        got = in_context.in_context_attention(q, k, v, keep, 0.5, window, block)
        want_grads = torch.autograd.grad(want, inputs, grad)
        got_grads = torch.autograd.grad(got, inputs, grad)
    torch.testing.assert_close(got, want)
    for name, a, b in zip("qkvf", got_grads, want_grads, strict=True):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, msg=name)


def test_flag_gradients_flow_straight_through():
    torch.manual_seed(1)
    g = gates.Gates(layers=1, heads=4, kv_heads=2, head_dim=8)
    with torch.no_grad():
        g.bias.zero_()
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    p = g(0, q, k, v, 0.35)
    flags = train.hard_flags(p, 0.5)
    assert torch.equal(flags.detach(), (p >= 0.5).float())  # hard in the forward pass
    assert 0 < int(flags.sum()) < flags.numel()
    with torch.enable_grad():
        p = g(0, q, k, v, 0.35)
        train.in_context_attention(q, k, v, train.hard_flags(p, 0.5), 0.35).square().sum().backward()
    for name, param in g.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_gate_starts_as_the_mean_query_of_its_group():
    torch.manual_seed(2)
    g = gates.Gates(layers=2, heads=6, kv_heads=2, head_dim=4)
    q = torch.randn(1, 6, 5, 4)
    torch.testing.assert_close(g.queries(1, q), q.view(1, 2, 3, 5, 4).mean(dim=2))


def _bound_gate(model, **knobs):
    """A gate policy bound to ``model`` with fresh random gates (readout scaled up: mixed flags)."""
    torch.manual_seed(3)
    base = gates.BaseModel.of(model, sites_of(model)[1])
    net = gates.Gates(base.layers, base.heads, base.kv_heads, base.head_dim)
    with torch.no_grad():
        net.readout.mul_(8)
        net.bias.zero_()
    policy = AttentionGate(**knobs)
    policy.gates = net.requires_grad_(False)
    return policy, net


@pytest.mark.parametrize("window", [0, 3])
def test_inference_matches_the_training_forward(llama, window):
    """One prefill chunk through the evicting cache gives the same logits as the training forward with
    hard flags: the cache hides flagged tokens exactly as training does."""
    policy, net = _bound_gate(llama, budget=1.0, window=window)
    small = kvpass.transform(llama, policy=policy, chunk=64)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    with torch.no_grad(), train.gated(llama, net, window=window) as rates:
        expected = llama(ids, use_cache=False).logits
    kept = torch.stack(rates)
    assert 0.2 < float(kept.mean()) < 0.8  # the test exercises eviction, not a trivial gate
    out = small(ids)
    torch.testing.assert_close(out.logits, expected, atol=2e-4, rtol=2e-4)
    valid = small.kvpass_cache.slots[0].valid
    if not window:
        assert abs(float(valid.float().mean()) - float(rates[0])) < 1e-6  # layer 0 holds what its gate kept


def test_dropped_decode_tokens_never_take_a_slot(llama):
    policy, net = _bound_gate(llama, budget=64)
    with torch.no_grad():
        net.readout.zero_()
        net.bias[:, 0] = -5.0  # KV head 0 drops everything, head 1 keeps everything
        net.bias[:, 1] = 5.0
    small = kvpass.transform(llama, policy=policy)
    ids = torch.randint(3, 97, (1, 10))
    out = small.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == 16
    for s in small.kvpass_cache.slots.values():
        assert int(s.valid[0, 0].sum()) == 0 and int(s.valid[0, 1].sum()) == 15  # the last token is not fed yet


def test_a_training_step_lowers_the_loss_and_resume_continues(tmp_path):
    model = tiny_llama(seed=4)
    tok = _CharTokenizer()
    path = tmp_path / "g.safetensors"
    kw = dict(target=0.5, seq_len=48, lr=3e-2, save_every=2, progress=False)
    train.train_gates(model, tok, path, steps=2, **kw)
    g = train.train_gates(model, tok, path, steps=4, **kw)  # resumes at step 2
    straight = train.train_gates(model, tok, tmp_path / "h.safetensors", steps=4, **kw)
    for a, b in zip(g.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"other settings \(target 0.5 -> 0.25\)"):
        train.train_gates(model, tok, path, steps=6, **{**kw, "target": 0.25})
    # on one fixed sequence, steps lower the loss
    torch.manual_seed(5)
    net = gates.Gates(2, 4, 2, 16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    ids = torch.randint(3, 97, (1, 48))
    losses = [train.train_step(model, net, opt, ids, 0.5, 10.0, 0.5)["loss"] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses


class _CharTokenizer:
    """Enough of a tokenizer for the training corpus on a 97-token model."""

    def __call__(self, text, add_special_tokens=False):
        return type("E", (), {"input_ids": [3 + ord(c) % 94 for c in text]})()

    def apply_chat_template(self, chat, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in chat)


def test_checkpoints_name_their_model(tmp_path, llama):
    base = gates.BaseModel.of(llama, sites_of(llama)[1])
    net = gates.Gates(base.layers, base.heads, base.kv_heads, base.head_dim)
    path = tmp_path / "gate.safetensors"
    gates.save(net, path, base, {"target": 0.5})
    loaded, info, _ = gates.load(path, base)
    assert info == {"target": 0.5}
    for a, b in zip(loaded.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)
    other = tiny_llama(seed=9)  # same shapes, other weights
    with pytest.raises(ValueError, match="different weights"):
        gates.load(path, gates.BaseModel.of(other, sites_of(other)[1]))
    bigger = tiny_llama(layers=3)
    with pytest.raises(ValueError, match="layers 2 vs 3"):
        gates.load(path, gates.BaseModel.of(bigger, sites_of(bigger)[1]))
    with pytest.raises(ValueError, match="another model"):
        kvpass.transform(bigger, policy="gate", checkpoint=str(path))
    with pytest.raises(ValueError, match="has a trained gate only for the default model"):
        kvpass.transform(bigger, policy="gate")
    with pytest.raises(ValueError, match="these gates have shape"):
        kvpass.transform(bigger, policy=AttentionGate(gates=net))


def test_bad_gate_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        gates.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(64))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        gates.load(corrupt)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a kvpass gate"):
        gates.load(tmp_path / "other.safetensors")
    path = tmp_path / "truncated.safetensors"
    base = gates.BaseModel("X", 1, 2, 1, 4, 8, (1.0,) * 8)
    gates.save(gates.Gates(1, 2, 1, 4), path, base, {})
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a readable"):
        gates.load(path)


def test_gate_knobs_and_unbound_use():
    with pytest.raises(ValueError, match="threshold"):
        AttentionGate(threshold=1.0)
    with pytest.raises(ValueError, match="target"):
        AttentionGate(target=0.0)
    for bad in (-0.1, float("nan"), float("inf"), True, "0.3"):
        with pytest.raises(ValueError, match="attention"):
            AttentionGate(attention=bad)
    for bad in (2, -1, True, 3.0):
        with pytest.raises(ValueError, match="pool"):
            AttentionGate(pool=bad)
    with pytest.raises(RuntimeError, match="not bound"):
        AttentionGate().keep_prob(0, *[torch.ones(1, 1, 1, 1)] * 3, None)


def _chunk(T: int, mass: list[list[float]]) -> Chunk:
    return Chunk(
        old=torch.tensor([[[0.9, 0.1], [0.2, 0.8]]]),
        keys=torch.randn(1, 2, T, 4),
        values=torch.randn(1, 2, T, 4),
        pos=torch.arange(2, 2 + T)[None],
        mass=torch.tensor([mass]),
        slot_pos=torch.tensor([[[0, 1], [0, 1]]]),
        gate=torch.tensor([[[0.3, 0.6], [0.5, 0.4]]])[..., :T],
    )


def test_the_attention_term_adds_what_the_newest_query_reads():
    # per KV head, 3 candidates seen: head 0 reads [0.2, 0, 1.0, 0.8] (sum 2) -> min(1, 3 a_j / 2) =
    # [0.3, 0, 1, 1]; head 1 reads [0.2, 0, 0.6, 0.2] (sum 1) -> [0.6, 0, 1, 0.6]; times beta 0.5
    chunk = _chunk(2, [[0.2, 0.0, 1.0, 0.8], [0.2, 0.0, 0.6, 0.2]])
    got = AttentionGate(budget=4, attention=0.5).score(chunk)
    torch.testing.assert_close(got, torch.tensor([[[1.05, 0.1, 0.8, 1.1], [0.5, 0.8, 1.0, 0.7]]]))
    # a head's slot i holds its own token: another head's attention to its slot i is not added
    other = _chunk(2, [[0.2, 0.0, 1.0, 0.8], [0.9, 0.0, 0.1, 0.3]])
    torch.testing.assert_close(AttentionGate(budget=4, attention=0.5).score(other)[:, 0], got[:, 0])
    p = torch.cat([chunk.old, chunk.gate], dim=-1)
    torch.testing.assert_close(AttentionGate(budget=4).score(chunk), p)  # 0: the gate alone
    decoded = _chunk(1, [[0.2, 0.0, 1.0], [0.3, 0.0, 0.5]])  # a decoded token: no term
    torch.testing.assert_close(
        AttentionGate(budget=4, attention=0.5).score(decoded), torch.cat([decoded.old, decoded.gate], dim=-1)
    )


def test_pooling_lifts_the_neighbours_of_what_the_query_reads():
    # one KV head, slots at positions 5 and 0, chunk at 2, 3, 4 (so position order is slot 1, chunk 0-2,
    # slot 0); the query reads position 3 most (read 1), positions 0, 2 and 5 less (2/3), and does not
    # see position 4 (a = 0: neither pooled nor pooled into)
    chunk = Chunk(
        old=torch.tensor([[[0.9, 0.1]]]),
        keys=torch.randn(1, 1, 3, 4),
        values=torch.randn(1, 1, 3, 4),
        pos=torch.tensor([[2, 3, 4]]),
        mass=torch.tensor([[[0.1, 0.1, 0.1, 0.3, 0.0]]]),  # 4 seen, mean 0.15: read = [2/3, 2/3, 2/3, 1, 0]
        slot_pos=torch.tensor([[[5, 0]]]),
        gate=torch.tensor([[[0.3, 0.6, 0.5]]]),
    )
    p = torch.cat([chunk.old, chunk.gate], dim=-1)
    plain = AttentionGate(budget=4, attention=0.5).score(chunk)
    torch.testing.assert_close(plain, p + 0.5 * torch.tensor([[[2 / 3, 2 / 3, 2 / 3, 1.0, 0.0]]]))
    # k = 3 in position order 0, 2, 3, [4 unseen], 5: position 0 -> max(read 0, 2) = 2/3; 2 -> max(0, 2, 3) = 1;
    # 3 -> max(2, 3, 5) = 1; 4 stays 0; 5 -> max(3, 5) = 1
    got = AttentionGate(budget=4, attention=0.5, pool=3).score(chunk)
    torch.testing.assert_close(got, p + 0.5 * torch.tensor([[[1.0, 2 / 3, 1.0, 1.0, 0.0]]]))
    decoded = Chunk(
        chunk.old,
        chunk.keys[:, :, :1],
        chunk.values[:, :, :1],
        chunk.pos[:, :1],
        chunk.mass[..., :3],
        chunk.slot_pos,
        chunk.gate[..., :1],
    )
    torch.testing.assert_close(AttentionGate(budget=4, attention=0.5, pool=3).score(decoded), p[..., :3])


def test_shipped_gates_cover_half_and_quarter():
    found = {round(gates._target_of(p), 2) for p in gates.SHIPPED.glob("*.safetensors")}
    assert {0.5, 0.25} <= found
    assert gates.shipped(0.3).name.endswith("keep25.safetensors")
    for p in gates.SHIPPED.glob("*.safetensors"):
        assert p.stat().st_size < 3 * 2**20  # a few MB at most
        _, info, base = gates.load(p)
        assert base.architecture == "LlamaForCausalLM" and base.layers == 30
        assert math.isclose(info["target"], gates._target_of(p))


def test_per_layer_keep_targets_train_and_travel_with_the_checkpoint(tmp_path):
    model = tiny_llama(seed=6)
    path = tmp_path / "g.safetensors"
    kw = dict(target=0.4, seq_len=48, lr=3e-2, save_every=2, progress=False)
    with pytest.raises(ValueError, match="3 multipliers, this model has 2 attention layers"):
        train.train_gates(model, _CharTokenizer(), path, steps=2, allocation=[1.0, 1.0, 1.0], **kw)
    train.train_gates(model, _CharTokenizer(), path, steps=2, allocation=[1.5, 0.5], **kw)
    assert gates.load(path)[1]["allocation"] == [1.5, 0.5]
    small = kvpass.transform(model, "gate", 0.4, checkpoint=path)
    assert small.kvpass_policy.allocation == (1.5, 0.5)  # the budgets the gates were trained for
    assert kvpass.transform(model, "gate", 0.4, checkpoint=path, allocation=[1.0, 1.0]).kvpass_policy.allocation == (
        1.0,
        1.0,
    )
    # each layer is pushed to its own keep rate: 0.6 and 0.2
    torch.manual_seed(7)
    net = gates.Gates(2, 4, 2, 16)
    opt = torch.optim.Adam(net.parameters(), lr=5e-2)
    ids = torch.randint(3, 97, (1, 48))
    targets = torch.tensor([0.6, 0.2])
    for _ in range(40):
        train.train_step(model, net, opt, ids, targets, 100.0, 0.5)
    with train.gated(model, net, 0.5) as rates:
        model(ids, use_cache=False)
    torch.testing.assert_close(torch.stack(rates).detach(), targets, atol=0.12, rtol=0)


def test_hindsight_weights_are_the_answer_rows_attention_per_kv_head():
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    L, H, Hkv, T, rows, window = 3, 6, 2, 20, 4, 3
    att = [torch.rand(1, H, T, T).softmax(-1) for _ in range(L)]
    w = train.hindsight_weights(att, rows, window, Hkv)
    C = T - rows - window
    assert w.shape == (L, Hkv, C)
    for layer in range(L):
        for g in range(Hkv):
            heads, queries = range(g * 3, g * 3 + 3), range(T - rows, T)
            mass = [sum(float(att[layer][0, h, i, j]) for h in heads for i in queries) for j in range(C)]
            mass[: train.SINKS] = [0.0] * train.SINKS
            torch.testing.assert_close(w[layer, g], torch.tensor(mass) / sum(mass))
    probs = [torch.rand(1, Hkv, T) for _ in range(L)]
    loss = train.hindsight_loss(probs, w)
    expected = -sum(float((w[i, g] * probs[i][0, g, :C].log()).sum()) for i in range(L) for g in range(Hkv)) / (L * Hkv)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="no context token"):
        train.hindsight_weights(att, 14, 3, Hkv)


def test_the_hindsight_term_raises_the_keep_probability_of_what_the_answer_reads(monkeypatch):
    model = tiny_llama(seed=8)
    rows, window = 6, 4
    C = 48 - rows - window
    read = torch.tensor([9, 17, 30])  # what "the answer" reads, in every layer and KV head
    w = torch.zeros(2, 2, C).index_fill_(-1, read, 1 / 3)
    monkeypatch.setattr(train, "hindsight_weights", lambda att, r, win, kv: w if (r, win) == (rows, window) else None)

    def gap(weight):  # after training: keep probability of the read tokens minus the context's mean
        torch.manual_seed(9)
        net = gates.Gates(2, 4, 2, 16)
        opt = torch.optim.Adam(net.parameters(), lr=3e-2)
        ids = torch.randint(3, 97, (1, 48))
        for _ in range(30):
            row = train.train_step(model, net, opt, ids, 0.5, 10.0, 0.5, window, hindsight=(weight, rows))
        assert 0.4 < row["keep"] < 0.75 and row["hindsight"] > 0
        with torch.no_grad(), train.gated(model, net, 0.5, window):
            model(ids, use_cache=False)
            p = torch.stack([q[0, :, :C] for q in train._ACTIVE.probs])
        return float(p[..., read].mean() - p.mean())

    assert abs(gap(0.0)) < 0.05 and gap(5.0) > 0.15


def test_teacher_targets_are_each_heads_best_share():
    model = tiny_llama(seed=10)
    scorer = kvpass.transform(model, "knorm", 1.0, chunk=64, sink_tokens=2, evict_during_decode=False)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    keep = train.teacher_targets(scorer, ids, torch.tensor([0.25, 0.5]))
    assert keep.shape == (2, 2, 40)
    for layer, s in scorer.kvpass_cache.slots.items():
        for h in range(2):
            score = torch.full((40,), float("nan"))
            score[s.pos[0, h]] = s.score[0, h]  # knorm: -|k|, by position
            score[:2] = torch.inf  # the sinks
            n = math.ceil((0.25, 0.5)[layer] * 40)
            assert set(keep[layer, h].nonzero().flatten().tolist()) == set(score.topk(n).indices.tolist())


def test_teacher_targets_for_the_models_budget_are_its_best_share_over_all_layers_and_heads():
    model = tiny_llama(seed=11)
    scorer = kvpass.transform(model, "knorm", 1.0, chunk=64, sink_tokens=2, evict_during_decode=False)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    keep = train.teacher_targets(scorer, ids, 0.3, share="model")
    score = torch.full((2, 2, 40), float("nan"))
    for layer, s in scorer.kvpass_cache.slots.items():
        for h in range(2):
            score[layer, h, s.pos[0, h]] = s.score[0, h]
    score[..., :2] = torch.inf
    n = math.ceil(0.3 * 160)
    assert int(keep.sum()) == n
    assert set(keep.flatten().nonzero().flatten().tolist()) == set(score.flatten().topk(n).indices.tolist())


def test_the_teacher_term_pulls_the_gate_toward_the_teachers_keep_set():
    model = tiny_llama(seed=8)
    ids = torch.randint(3, 97, (1, 48), generator=torch.Generator().manual_seed(3))
    read = torch.tensor([9, 17, 30])
    taught = torch.zeros(2, 2, 48).index_fill_(-1, read, 1.0)  # the teacher keeps these, in every layer and head

    def share(weight):  # after training: how many of the taught entries are in their head's top quarter
        torch.manual_seed(9)
        net = gates.Gates(2, 4, 2, 16)
        opt = torch.optim.Adam(net.parameters(), lr=3e-2)
        for _ in range(60):
            row = train.train_step(model, net, opt, ids, 0.5, 10.0, 0.5, 4, keep=(weight, taught))
        assert row["teacher"] > 0
        with torch.no_grad(), train.gated(model, net, 0.5, 4):
            model(ids, use_cache=False)
            p = torch.stack([q[0] for q in train._ACTIVE.probs])
        top = p.topk(12, dim=-1).indices  # each head's top quarter
        return float((top[..., :, None] == read).any(-2).float().mean())

    assert share(0.0) < 0.5 and share(5.0) > 0.75


def test_training_with_a_kvzip_teacher_runs_and_records_it(tmp_path):
    model, tok = tiny_llama(seed=4), _CharTokenizer()
    path = tmp_path / "t.safetensors"
    train.train_gates(model, tok, path, steps=2, seq_len=48, teacher="kvzip", teacher_weight=2.0, progress=False)
    _, info, _ = gates.load(path)
    assert info["teacher"] == "kvzip" and info["teacher_weight"] == 2.0
    log = __import__("json").loads(path.with_suffix(".log.json").read_text())
    assert all(r["teacher"] > 0 for r in log)


def test_a_gate_trained_for_the_models_budget_holds_the_mean_rate_and_sets_its_share(tmp_path):
    model, tok = tiny_llama(seed=5), _CharTokenizer()
    torch.manual_seed(int(torch.randint(0, 2**31, ()).item()))
    net = gates.Gates(2, 4, 2, 16)
    ids = torch.randint(3, 97, (1, 48))
    for share in ("head", "model"):
        with torch.no_grad(), train.gated(model, net, 0.5) as rates:
            model(ids, use_cache=False)
        r = torch.stack(rates)
        row = train.train_step(model, net, torch.optim.SGD(net.parameters(), lr=0.0), ids, 0.3, 10.0, 0.5, share=share)
        penalty = (r - 0.3).square().mean() if share == "head" else (r.mean() - 0.3).square()
        assert math.isclose(row["loss"] - row["kl"], 10.0 * float(penalty), rel_tol=1e-4, abs_tol=1e-6)
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match="without an allocation"):
        train.train_gates(model, tok, path, steps=1, seq_len=48, share="model", allocation=[1.0, 1.0], progress=False)
    with pytest.raises(ValueError, match="share must be"):
        train.train_gates(model, tok, path, steps=1, seq_len=48, share="layer", progress=False)
    train.train_gates(model, tok, path, steps=2, seq_len=48, teacher="kvzip", share="model", progress=False)
    assert gates.load(path)[1]["share"] == "model"
    assert kvpass.transform(model, "gate", 0.4, checkpoint=path).kvpass_policy.share == "model"
    assert kvpass.transform(model, "gate", 0.4, checkpoint=path, share="head").kvpass_policy.share == "head"
    assert kvpass.transform(model, "gate", 0.4, checkpoint=path, share="layer").kvpass_policy.share == "layer"
    # shipped: the 25 % gate learned one budget for the model (KVzip's student), the 50 % one each head's
    assert [gates.load(gates.shipped(t))[1].get("share") for t in (0.25, 0.5)] == ["model", None]


def test_importing_kvpass_changes_nothing_in_transformers():
    import subprocess
    import sys

    code = (
        "from transformers import AttentionInterface; before = set(AttentionInterface._global_mapping); "
        "import kvpass; assert set(AttentionInterface._global_mapping) == before, "
        "set(AttentionInterface._global_mapping) - before"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
