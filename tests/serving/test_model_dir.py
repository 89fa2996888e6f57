"""``kvpass export --format vllm``: the directory vLLM serves (no vLLM needed to write it)."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpass.serving import model_dir


def tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_the_directory_names_the_plugin_and_carries_the_transform(tmp_path):
    model = tiny(3)
    out = model_dir.write(model, tmp_path / "m", "tova", 12, chunk=8)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["KvpassForCausalLM"]
    assert config["kvpass"] == {
        "architecture": "LlamaForCausalLM",
        "policy": "tova",
        "budget": 12,
        "chunk": 8,
        "knobs": {},
    }
    again = LlamaForCausalLM.from_pretrained(out)  # the weights are the model's, unchanged
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bad_requests_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="no fixed number of slots"):
        model_dir.write(tiny(4), tmp_path / "a", "tova", 0.5)
    with pytest.raises(ValueError, match="nope"):
        model_dir.write(tiny(4), tmp_path / "b", "nope", 12)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_gate_checkpoint_and_an_allocation_travel_inside_the_directory(tmp_path):
    import kvpass
    from kvpass.policies import gate_network as gates
    from kvpass.runtime import allocation
    from kvpass.transform import sites_of

    model = tiny(5)
    base = gates.BaseModel.of(model, sites_of(model)[1])
    net = gates.Gates(base.layers, base.heads, base.kv_heads, base.head_dim)
    torch.nn.init.normal_(next(net.parameters()))
    gates.save(net, tmp_path / "g.safetensors", base, {"target": 0.5})
    calibration = allocation.save({"sensitivity": [3.0, 1.0], "budget": 0.5}, tmp_path / "alloc.json")
    out = model_dir.write(model, tmp_path / "m", f"gate:checkpoint={tmp_path / 'g.safetensors'}", 12, chunk=8,
                          knobs={"allocation": str(calibration)})  # fmt: skip
    spec = json.loads((out / "config.json").read_text())["kvpass"]
    assert spec["policy"] == "gate"
    assert spec["knobs"]["checkpoint"] == "kvpass/gates.safetensors"  # relative: the directory can move
    assert not list(out.glob("gates*"))  # not beside the model's weights, which vLLM loads as the model's
    assert (out / "kvpass/gates.safetensors").read_bytes() == (tmp_path / "g.safetensors").read_bytes()
    want = list(allocation.for_budget(allocation.load(calibration), 12))
    assert spec["knobs"]["allocation"] == want and want[0] > want[1]
    small = kvpass.transform(model, "gate", 12, chunk=8, checkpoint=out / "kvpass/gates.safetensors", allocation=want)
    assert small.kvpass_policy.allocation == tuple(want)
