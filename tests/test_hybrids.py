"""Hybrids: attention layers evicting beside recurrent layers that carry a fixed-size state
(:mod:`kvpass.runtime.recurrent`). A tiny Qwen3.5 (Gated DeltaNet) and a tiny Nemotron-H (Mamba-2)."""

import numpy as np
import pytest
import torch
import transformers

import kvpass
from kvpass.runtime import recurrent

pytestmark = pytest.mark.hf

CARRIED = hasattr(transformers.Cache, "get_conv_state")  # transformers >= 5.21
needs_surface = pytest.mark.skipif(not CARRIED, reason="transformers before 5.21 keeps recurrent state another way")

_SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
HYBRIDS = {  # name -> (config class, model class, config kwargs)
    "qwen3_5": (
        "Qwen3_5TextConfig",
        "Qwen3_5ForCausalLM",
        {
            **_SMALL,
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention", "linear_attention"],
            "num_hidden_layers": 3,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
        },
    ),
    "nemotron_h": (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        {
            **_SMALL,
            "head_dim": 16,
            "layers_block_type": ["linear_attention", "full_attention", "mlp", "linear_attention"],
            "mamba_num_heads": 8,
            "mamba_head_dim": 16,
            "ssm_state_size": 16,
            "n_groups": 2,
            "chunk_size": 16,  # the scan's own chunks (an engine's chunk must stay below: see the export test)
        },
    ),
}


def build(name: str, seed: int = 0):
    config_cls, model_cls, kwargs = HYBRIDS[name]
    config = getattr(transformers, config_cls)(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)._from_config(config, attn_implementation="sdpa").float().eval()


@pytest.fixture(scope="module", params=sorted(HYBRIDS))
def hybrid(request):
    if not CARRIED:
        pytest.skip("transformers before 5.21 keeps recurrent state another way")
    return request.param, build(request.param)


def _ids(seed: int, shape=(2, 30)) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_mixers_are_found_by_their_state_surface(hybrid):
    name, model = hybrid
    found = [path for path, _ in recurrent.mixers_of(model)]
    want = {"qwen3_5": ["model.layers.0.linear_attn", "model.layers.2.linear_attn"]}
    assert found == want.get(name, ["model.layers.0.mixer", "model.layers.3.mixer"])
    specs = kvpass.transform(model, "full").kvpass_step.mixers[0].specs
    assert [s.kind for s in specs] == ["conv", "recurrent"] and all(min(s.shape) > 1 for s in specs)


def test_full_budget_reproduces_logits_over_chunks_and_decoding(hybrid):
    """The prompt read in chunks of 24 and 6 (the second continuing the state; the first spanning
    two of the scan's own chunks), then 10 tokens one at a time."""
    name, model = hybrid
    ids = _ids(1, (2, 40))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        m = kvpass.transform(model, "full", chunk=24)
        got = [m(ids[:, :30]).logits]
        cache = m.kvpass_cache
        for t in range(30, 40):
            got.append(m.kvpass_forward(ids[:, t : t + 1], cache).logits)
    err = (torch.cat(got, dim=1) - want).abs().max()
    assert err < 1e-4, f"{name}: {err}"


def test_full_budget_generates_the_original_tokens_with_left_padding(hybrid):
    name, model = hybrid
    ids = _ids(2, (2, 20))
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0  # row 0 is left-padded: its padding never reaches a state or a slot
    greedy = dict(max_new_tokens=8, do_sample=False, attention_mask=mask, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **greedy)
        got = kvpass.transform(model, "full", chunk=8).generate(ids, **greedy)
    assert torch.equal(got, want), name


def test_beams_and_forks_carry_the_state(hybrid):
    """Beam search moves each beam's state with its KV (select_rows); a forked cache continues apart."""
    name, model = hybrid
    ids = _ids(3, (1, 16))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        m = kvpass.transform(model, "full", chunk=8)
        assert torch.equal(m.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False), want), name
        m(ids)
        cache = m.kvpass_cache
        other = cache.fork()
        a, b = torch.tensor([[5]]), torch.tensor([[9]])
        got_a = m.kvpass_forward(a, cache).logits
        got_b = m.kvpass_forward(b, other).logits
        for token, got in ((a, got_a), (b, got_b)):
            want = model(torch.cat([ids, token], dim=1), use_cache=False).logits[:, -1:]
            assert (got - want).abs().max() < 1e-4, name


def test_small_budget_bounds_attention_and_reports_the_state_apart(hybrid):
    _, model = hybrid
    m = kvpass.transform(model, "tova", 8, chunk=8)
    with torch.no_grad():
        m.generate(_ids(4), max_new_tokens=12, do_sample=False)
    stats = kvpass.cache_stats(m)
    assert stats.layers and all(s.capacity <= 8 for s in stats.layers)
    assert all(s.held <= 8 * 2 * 2 for s in stats.layers)  # slots x KV heads x rows
    specs = m.kvpass_step.mixers
    per_row = sum(np.prod(s.shape) * (s.dtype or torch.float32).itemsize for mx in specs.values() for s in mx.specs)
    assert stats.state_bytes == 2 * per_row > 0
    assert "recurrent state" in str(stats)


@pytest.mark.parametrize("name", sorted(HYBRIDS))
@needs_surface
def test_compiled_and_exported_give_the_eager_tokens(name, tmp_path):
    """(An engine's prefill graph holds for one side of the scans' branch on the length: its chunk is
    kept below the scans' own, 16 here, 64 and 128 in the real models; a longer one is refused.)"""
    model = build(name)
    ids = _ids(5, (2, 20))
    small = kvpass.transform(model, "tova", 8, chunk=8)
    greedy = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = small.generate(ids, **greedy)
        torch._dynamo.reset()
        compiled = kvpass.transform(model, "tova", 8, chunk=8)
        compiled.compile()
        assert torch.equal(compiled.generate(ids, **greedy), want)
    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, tmp_path / "model.onnx"))
    assert "conv0.0" in engine.table_names
    assert np.array_equal(engine.generate(ids.numpy(), 8), want.numpy())


def _jamba():
    config = transformers.JambaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=1, mamba_d_state=8, mamba_dt_rank=4, use_mamba_kernels=False,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.JambaForCausalLM(config).eval()


@needs_surface
def test_a_mixer_whose_chunks_start_from_zero_reads_a_token_at_a_time(tmp_path):
    """transformers' Mamba-1 scan (Jamba) ignores the state it is given on a chunk of several tokens:
    kvpass measures that and feeds it a token at a time, exact over chunks and left padding (and an
    engine, whose graph cannot loop over the chunk, is refused)."""
    model = _jamba()
    m = kvpass.transform(model, "full", chunk=8)
    assert m.kvpass_step.mixers[0].stepwise
    ids = _ids(6, (2, 20))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        got = m(ids, attention_mask=mask).logits
    assert (got - want)[:, 3:].abs().max() < 1e-4  # (rows' padding columns aside)
    assert (got - want)[1].abs().max() < 1e-4
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mamba reads a chunk a token at a time"):
        kvpass.export_onnx(kvpass.transform(model, "tova", 8, chunk=8), tmp_path / "jamba.onnx")


@needs_surface
def test_a_mixer_that_carries_no_state_is_refused():
    """A mixer that asks for its state and ignores it: no way of feeding it reproduces the model."""
    model = build("qwen3_5")
    layer = model.model.layers[0]

    class Forgetful(type(layer.linear_attn)):
        def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
            if cache is not None:  # asks for its state and writes one, then reads from scratch
                cache.get_recurrent_state(self.layer_idx)
                cache.update_recurrent_state(hidden_states.new_zeros(hidden_states.shape[0], 2), self.layer_idx)
            return super().forward(hidden_states, cache=None, attention_mask=attention_mask)

    layer.linear_attn.__class__ = Forgetful
    with pytest.raises(ValueError, match=r"model\.layers\.0\.linear_attn \(Forgetful\) does not carry its state"):
        kvpass.transform(model, "tova", 8)


@pytest.mark.skipif(CARRIED, reason="transformers 5.21 and newer carry recurrent state through their cache")
def test_old_transformers_refuse_naming_the_recurrent_layer():
    """Before 5.21 each family kept its recurrent state in its own cache class: refused, saying so."""
    config = transformers.Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    )  # fmt: skip
    model = transformers.Qwen3NextForCausalLM(config).eval()
    refused = (ValueError, RuntimeError)  # (at the token-mixing check, or already at capture)
    with pytest.raises(refused, match=r"linear_attn .* recurrent layer whose state kvpass cannot carry.*5\.21"):
        kvpass.transform(model, "tova", 8)
