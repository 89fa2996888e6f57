"""The ``torch.compile`` backend "kvpass": same tokens as the eager transformed model, and a number of
compilations that stops growing as generation goes on."""

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import kvpass
from tests.test_transform import prompt


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.hf
def test_compiled_generation_matches_eager_and_stops_recompiling(llama):
    torch._dynamo.reset()
    ids = prompt(int(torch.randint(0, 2**31, ())), B=2, T=50)
    eager = kvpass.transform(llama, policy="tova", budget=24, chunk=16)
    compiled = kvpass.transform(llama, policy="tova", budget=24, chunk=16)
    compiled.compile(backend="kvpass")
    start = graphs()
    torch.testing.assert_close(
        compiled.generate(ids, max_new_tokens=20, do_sample=False),
        eager.generate(ids, max_new_tokens=20, do_sample=False),
    )
    first = graphs() - start
    assert 0 < first <= 6  # step and head graphs for the chunk lengths 16 and 2, and for decoding
    compiled.generate(ids, max_new_tokens=60, do_sample=False)
    assert graphs() - start == first  # three times as many decode steps: nothing recompiled
    for T in (37, 41, 23, 29):  # new prompt lengths: recompiled once as a dynamic length, then reused
        compiled.generate(ids[:, :T], max_new_tokens=5, do_sample=False)
    assert graphs() - start <= first + 4


def test_torch_compile_of_the_module(llama):
    ids = prompt(5, T=30)
    small = kvpass.transform(llama, policy="streaming", budget=16, sink_tokens=2)
    want = small(ids).logits
    torch.testing.assert_close(torch.compile(small, backend="kvpass")(ids).logits, want, rtol=1e-4, atol=1e-4)


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
        "assert fn.__module__ == 'kvpass.compile', fn\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
