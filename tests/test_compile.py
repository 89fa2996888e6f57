"""The ``torch.compile`` backend "kvpass": same tokens as the eager transformed model, and a number of
compilations that stops growing as generation goes on."""

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import kvpass
from kvpass.runtime.step import Step
from tests.test_transform import prompt


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def compiled_entries(fn) -> int:
    """How many compiled graphs dynamo holds for the function ``fn`` (its code object)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


@pytest.mark.hf
def test_one_decode_graph_for_whole_generations(llama):
    """The whole decode step -- attention, scoring, eviction, admission, the head -- is one graph
    (``fullgraph``: a graph break would raise), compiled once: over 256 and more new tokens and two
    prompt lengths, the same tokens as eager, and no recompilation."""
    torch._dynamo.reset()
    counters.clear()
    seed = int(torch.randint(0, 2**31, ()))
    eager = kvpass.transform(llama, policy="tova", budget=24, chunk=16)
    compiled = kvpass.transform(llama, policy="tova", budget=24, chunk=16)
    compiled.compile()
    for T, new in ((50, 260), (37, 40)):
        ids = prompt(seed + T, B=2, T=T)
        want = eager.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        got = compiled.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        assert got.shape == (2, T + new)
        assert torch.equal(got, want), f"seed {seed}, prompt {T}"
        assert compiled_entries(Step.decode) == 1, "decoding recompiled"
    assert compiled_entries(Step.prefill) <= 4  # chunks that read and chunks that compress: 2 and 16, then any length
    assert not counters["graph_break"]


@pytest.mark.parametrize("share", ["layer", "model"])
def test_kv_heads_sharing_a_pool_compile_to_one_decode_graph(llama, share):
    """``share="layer"``: the compiled step (one decode graph, admitting each KV head's token in turn)
    gives the eager tokens and keeps the same entries; ``share="model"`` too (a prompt's layers' pool
    sizes are its layout: one decode graph per prompt)."""
    torch._dynamo.reset()
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=40)
    eager = kvpass.transform(llama, policy="snapkv", budget=12, chunk=16, share=share, window=4)
    compiled = kvpass.transform(llama, policy="snapkv", budget=12, chunk=16, share=share, window=4)
    compiled.compile()
    want = eager.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(compiled.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16), want)
    assert compiled_entries(Step.decode) == 1
    for layer, s in eager.kvpass_cache.slots.items():
        got = compiled.kvpass_cache.slots[layer]
        assert s.pos.shape[1] == 1 and got.pos.shape == s.pos.shape  # one pool, of the same size
        assert torch.equal((got.pos * 4 + got.owner).sort(-1).values, (s.pos * 4 + s.owner).sort(-1).values)


def test_torch_compile_of_the_module(llama):
    ids = prompt(5, T=30)
    small = kvpass.transform(llama, policy="streaming", budget=16, sink_tokens=2)
    want = small(ids).logits
    torch.testing.assert_close(torch.compile(small, backend="kvpass")(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reading,share", [(0, "head"), (None, "head"), (0, "model")])
def test_a_probing_policy_compiles_with_its_probe(llama, reading, share):
    # kvzip's probe is appended inside the step (reading=0, each head its budget), or run over the whole
    # buffer after it is read (reading=None, or one budget for the model: then after every chunk):
    # the compiled prefill runs it and keeps the same slots
    torch._dynamo.reset()  # (the prefill's graphs of earlier tests count towards dynamo's recompile limit)
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=33)  # (a lone first token joins a chunk)
    kw = dict(policy="kvzip", budget=12, chunk=16, reading=reading, repeat=(4, 5), share=share)
    eager, compiled = kvpass.transform(llama, **kw), kvpass.transform(llama, **kw)
    compiled.compile()
    want = eager.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8, do_sample=False), want)
    assert eager.kvpass_cache.read_whole == (reading is None or share == "model")
    for layer, s in eager.kvpass_cache.slots.items():
        got = compiled.kvpass_cache.slots[layer]
        assert torch.equal(got.pos.sort(-1).values, s.pos.sort(-1).values)


def test_untransformed_model_is_refused(llama):
    torch._dynamo.reset()
    with pytest.raises(Exception, match="Transform the model first"):
        torch.compile(llama, backend="kvpass")(prompt(1, T=8))


def test_transform_arguments_are_not_compile_options(llama):
    torch._dynamo.reset()
    small = kvpass.transform(llama, policy="tova", budget=16)
    with pytest.raises(Exception, match=r"kvpass\.transform's arguments"):
        torch.compile(small, backend="kvpass", options={"budget": 8})(prompt(1, T=8))


def test_backend_is_an_entry_point():
    """Found by torch.compile without importing kvpass first (the package's entry point)."""
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "assert 'kvpass' not in sys.modules\n"
        "fn = lookup_backend('kvpass')\n"
        "assert fn.__module__ == 'kvpass.runtime.compile', fn\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_kvpass_model_compiles_only_with_its_backend(llama):
    small = kvpass.transform(llama, policy="tova", budget=16)
    with pytest.raises(ValueError, match="backend='kvpass'"):
        small.compile(backend="inductor")
