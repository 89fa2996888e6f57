"""Exported engines: the pure step against the evicting cache, the ONNX round trip through
onnxruntime, the TensorRT path up to the TensorRT call."""

import math

import numpy as np
import onnx
import pytest
import torch

import kvpass
from kvpass.cli import main
from kvpass.export.tensorrt import input_shapes, missing
from kvpass.policies import H2O
from kvpass.policies import gate_network as gates
from kvpass.runtime.plan import plan
from kvpass.runtime.step import PureStep, Slots, per_head
from kvpass.transform import sites_of
from tests.conftest import tiny_llama

CHUNK = 16


def policy_cases(model):
    """Every exportable policy with knobs that fit a 24-slot budget (``random`` draws from a torch
    generator an engine cannot share, so it has no reference to equal)."""
    base = gates.BaseModel.of(model, sites_of(model)[1])
    net = gates.Gates(base.layers, base.heads, base.kv_heads, base.head_dim, seed=3)
    with torch.no_grad():
        net.bias.zero_()  # flags of both kinds
    return {
        "h2o": {"window": 4},
        "tova": {},
        "snapkv": {"window": 4},
        "aha": {"recent": 8, "k": 4},
        "streaming": {"sink_tokens": 2},
        "knorm": {"window": 2},
        "observed": {},
        "kvzip": {"repeat": (7, 8, 9), "sink_tokens": 2},
        "gate": {"gates": net, "window": 3, "attention": 0.5, "pool": 3},
    }


def greedy_with_step(step: PureStep, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens from the pure step (prefill in the runtime's chunks, then one token a step)."""
    B, T = ids.shape
    tables = step.layout.empty(B)
    for s, e, *_ in plan(T, step.chunk):
        logits, *tables = step(ids[:, s:e], torch.arange(s, e).expand(B, -1), *tables)
    out = [ids]
    for i in range(new):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if i < new - 1:
            logits, *tables = step(nxt, torch.full((B, 1), T + i), *tables)
    return torch.cat(out, 1), tables


@pytest.mark.parametrize(
    "name,share", [(n, "head") for n in policy_cases(tiny_llama())] + [("tova", "layer"), ("gate", "layer")]
)
def test_the_pure_step_keeps_what_the_cache_keeps(name, share):
    model = tiny_llama(seed=1)
    small = kvpass.transform(model, name, 24, chunk=CHUNK, share=share, **policy_cases(model)[name])
    torch.manual_seed(hash(name) % 1000)
    ids = torch.randint(3, 97, (2, 45))
    # no end of sequence: the pure step's greedy loop decodes on past it (tiny_llama's eos is a token like any)
    ref = small.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    got, tables = greedy_with_step(PureStep(small), ids, 10)
    assert torch.equal(got, ref)
    if name == "knorm":  # a repeated token has the same key norm at layer 0: ties, broken by either path its way
        return
    cache = small.kvpass_cache  # the same tokens kept per layer and KV head
    layout = PureStep(small).layout
    for layer in layout.layers:
        kept = cache.slots[layer]
        g, i = layout.where[layer]
        n = len(Slots._fields)
        _, _, pos, score, valid, _ = per_head(Slots(*tables[n * g : n * (g + 1)]).layer(i), 2)
        kept = per_head(kept, 2)
        for b in range(2):
            for h in range(pos.shape[1]):
                want = kept.score[b, h][kept.valid[b, h]].sort()
                got = score[b, h][valid[b, h]].sort()
                torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-5)
                if len(want.values) < 2 or want.values.diff().min() > 1e-4:  # no ties: the same positions
                    assert sorted(pos[b, h][valid[b, h]].tolist()) == sorted(kept.pos[b, h][kept.valid[b, h]].tolist())


def test_a_full_capacity_step_reproduces_the_model():
    model = tiny_llama(seed=2)
    ids = torch.randint(3, 97, (1, 40))
    step = PureStep(kvpass.transform(model, "full", chunk=CHUNK), capacity=64)
    tables = step.layout.empty(1)
    for s in range(0, 40, CHUNK):
        logits, *tables = step(ids[:, s : s + CHUNK], torch.arange(s, min(s + CHUNK, 40))[None], *tables)
    torch.testing.assert_close(logits[:, -1], model(ids).logits[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.hf
@pytest.mark.parametrize(
    "name,share", [("h2o", "head"), ("snapkv", "head"), ("aha", "head"), ("gate", "head"), ("kvzip", "layer")]
)
def test_onnx_round_trip_gives_the_torch_tokens(tmp_path, name, share):
    model = tiny_llama(seed=4)
    small = kvpass.transform(model, name, 24, chunk=CHUNK, share=share, **policy_cases(model)[name])
    path = kvpass.export_onnx(small, tmp_path / f"{name}.onnx")  # onnx.checker runs inside
    proto = onnx.load(path, load_external_data=False)
    assert [n.op_type for n in proto.graph.node][-1] == "If"
    assert not any(n.domain not in ("", "ai.onnx") for g in _graphs(proto.graph) for n in g.node)  # standard ops
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert path.with_name(path.name + ".data").stat().st_size < 1.25 * params  # weights stored once
    engine = kvpass.OnnxEngine(path)
    assert engine.capacity == 24 and engine.chunk == CHUNK
    torch.manual_seed(7)
    ids = torch.randint(3, 97, (2, 45))
    ref = small.generate(ids, max_new_tokens=10, do_sample=False)
    assert np.array_equal(engine.generate(ids.numpy(), 10), ref.numpy())
    lone = ids[:, : 2 * CHUNK + 1]  # one token past whole chunks: the planner cuts it the same for both
    ref = small.generate(lone, max_new_tokens=4, do_sample=False)
    assert np.array_equal(engine.generate(lone.numpy(), 4), ref.numpy())
    if name == "h2o":  # a left-padded batch
        mask = torch.ones_like(ids)
        mask[0, :7] = 0
        ref = small.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert np.array_equal(engine.generate(ids.numpy(), 10, attention_mask=mask.numpy()), ref.numpy())


def _graphs(graph):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def test_engine_sampling_and_bad_input(tmp_path):
    model = tiny_llama(seed=5)
    small = kvpass.transform(model, "tova", 20, chunk=CHUNK)
    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, tmp_path / "m.onnx"))
    ids = np.random.default_rng(0).integers(3, 97, (2, 30))
    greedy = engine.generate(ids, 8)
    assert np.array_equal(engine.generate(ids, 8, do_sample=True, top_k=1, seed=1), greedy)  # top-1 is greedy
    a, b = (engine.generate(ids, 8, do_sample=True, temperature=2.0, seed=s) for s in (3, 3))
    assert np.array_equal(a, b) and a.shape == (2, 38) and a.max() < 97
    assert not all(
        np.array_equal(engine.generate(ids, 8, do_sample=True, temperature=2.0, seed=s), a) for s in range(4, 8)
    )
    eos = int(greedy[0, 31])
    stopped = engine.generate(ids[:1], 8, eos_token_id=eos)
    assert (
        stopped.shape[1] <= 32 and stopped[0, -1] == eos and np.array_equal(stopped[0], greedy[0, : stopped.shape[1]])
    )
    with pytest.raises(ValueError, match="batch, length"):
        engine.generate(ids[0], 4)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(ids, 4, do_sample=True, temperature=0)
    assert engine.cache_bytes(1) == 2 * (
        2 * 2 * 20 * 16 * 4 + 2 * 20 * (8 + 4 + 1 + 1)
    )  # K + V; positions, scores, flags, owners


def test_export_refuses_what_it_cannot_export_safely(tmp_path):
    model = tiny_llama(seed=6)
    with pytest.raises(ValueError, match=r"kvpass\.transform"):
        kvpass.export_onnx(model, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="pass capacity="):
        kvpass.export_onnx(kvpass.transform(model, "tova", 0.25), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="pass capacity="):
        kvpass.export_onnx(kvpass.transform(model, "full"), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="evict_during_decode=True"):
        kvpass.export_onnx(kvpass.transform(model, "tova", 16, evict_during_decode=False), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="positive number of slots"):
        kvpass.export_onnx(kvpass.transform(model, "tova", 16), tmp_path / "x.onnx", capacity=0)
    with pytest.raises(ValueError, match="smaller than the budget"):
        kvpass.export_onnx(kvpass.transform(model, "h2o", 64), tmp_path / "x.onnx", capacity=20)

    class Branchy(H2O):  # scores a long chunk differently: a guard in the exported graph
        def score(self, chunk):
            s = super().score(chunk)
            return s * 2 if chunk.keys.shape[2] > 8 else s

    with pytest.raises(ValueError, match="valid only where"):
        kvpass.export_onnx(kvpass.transform(model, Branchy(budget=24, window=4), chunk=CHUNK), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_engine_refuses_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        kvpass.OnnxEngine(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(ValueError, match="cannot load"):
        kvpass.OnnxEngine(corrupt)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not one exported by kvpass"):
        kvpass.OnnxEngine(tmp_path / "plain.onnx")


def test_a_full_engine_gives_the_torch_tokens_and_refuses_more_than_it_holds(tmp_path):
    small = kvpass.transform(tiny_llama(seed=7), "full", chunk=CHUNK)
    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, tmp_path / "full.onnx", capacity=40))
    ids = np.random.default_rng(1).integers(3, 97, (1, 30))
    ref = small.generate(torch.from_numpy(ids), max_new_tokens=10, do_sample=False)
    assert np.array_equal(engine.generate(ids, 10), ref.numpy())  # a full engine is the model itself
    with pytest.raises(ValueError, match="do not fit"):
        engine.generate(ids, 11)


def test_cli_exports_a_saved_model(tmp_path, capsys):
    tiny_llama(seed=8).save_pretrained(tmp_path / "model")
    main(["export", "--policy", "tova", "--budget", "40", "--chunk", "16", "--model", str(tmp_path / "model"),
          "--out", str(tmp_path / "snap.onnx")])  # fmt: skip
    assert "KV cache per sequence" in capsys.readouterr().out
    assert kvpass.OnnxEngine(tmp_path / "snap.onnx").capacity == 40
    with pytest.raises(SystemExit, match="unknown policy"):
        main(["export", "--policy", "nope"])


@pytest.mark.skipif(not missing(), reason="this machine has CUDA and TensorRT")
def test_tensorrt_export_says_what_is_missing(tmp_path):
    small = kvpass.transform(tiny_llama(), "tova", 16, chunk=CHUNK)
    with pytest.raises(RuntimeError, match=r"the TensorRT export needs .*(CUDA|torch-tensorrt)"):
        kvpass.export_tensorrt(small, tmp_path / "trt")
    with pytest.raises(SystemExit, match="TensorRT export needs"):
        main(["export", "--format", "tensorrt"])
    with pytest.raises(ValueError, match="pass capacity="):  # bad arguments first, whatever the machine
        kvpass.export_tensorrt(kvpass.transform(tiny_llama(), "tova", 0.5), tmp_path / "trt")


def test_tensorrt_input_shapes_follow_the_tables():
    step = PureStep(kvpass.transform(tiny_llama(), "tova", 16, chunk=CHUNK))
    shapes = input_shapes(step.layout, (2, 16, 16), (1, 1, 8))
    examples = step.layout.empty(3)
    assert len(shapes) == 2 + len(examples)
    assert shapes[0] == ((1, 2), (1, 16), (8, 16))
    for (lo, opt, hi), t in zip(shapes[2:], examples, strict=True):
        assert lo[0] == opt[0] == hi[0] == t.shape[0] and (lo[1], hi[1]) == (1, 8)  # [L, batch, ...]
        assert lo[2:] == opt[2:] == hi[2:] == tuple(t.shape[2:])


@pytest.mark.skipif(bool(missing()), reason="needs a CUDA GPU and torch-tensorrt: " + "; ".join(missing()))
def test_tensorrt_engine_gives_the_torch_tokens(tmp_path):
    small = kvpass.transform(tiny_llama().cuda(), "tova", 16, chunk=CHUNK)
    decode, prefill = kvpass.export_tensorrt(small, tmp_path / "trt")
    steps = {n: torch.export.load(str(p)).module() for n, p in (("decode", decode), ("prefill", prefill))}
    ids = torch.randint(3, 97, (1, 40), device="cuda")
    ref = small.generate(ids, max_new_tokens=8, do_sample=False)
    tables = PureStep(small).layout.empty(1, device="cuda")
    for s, e, *_ in plan(40, CHUNK):  # 8, 16, 16 tokens: each a prefill graph input
        logits, *tables = steps["prefill"](ids[:, s:e], torch.arange(s, e, device="cuda")[None], *tables)
    out = [ids]
    for i in range(8):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits, *tables = steps["decode"](out[-1], torch.full((1, 1), 40 + i, device="cuda"), *tables)
    assert torch.equal(torch.cat(out, 1), ref)


@pytest.mark.slow
@pytest.mark.hf
def test_default_model_onnx_engine_gives_the_torch_tokens(default_model, tmp_path):
    from kvpass.data.passkey import passkey_prompt
    from kvpass.eval.greedy import greedy

    model, tok = default_model
    prompt, _ = passkey_prompt(tok, 1050, seed=2)
    ids = tok(prompt, return_tensors="pt").input_ids
    T = ids.shape[1]
    assert T >= 1000
    small = kvpass.transform(model, "tova", math.ceil(0.25 * T))  # (a full engine: tested on a tiny model)
    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, tmp_path / "tova.onnx"))
    ref = greedy(small, ids, 32).tokens  # 32 tokens, past the end of the answer (no stop at eos)
    assert np.array_equal(engine.generate(ids.numpy(), 32)[:, T:], ref.numpy())
