"""kvpress as a peer: the same answer loop with a press applied at prefill (skipped where kvpress is
not installed, as in CI: it is the optional extra ``compare``)."""

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from kvpass.eval import peers
from kvpass.eval.evaluate import answer, evaluate
from tests.eval.stub import WordTokenizer

HAVE_KVPRESS = importlib.util.find_spec("kvpress") is not None


@pytest.mark.skipif(HAVE_KVPRESS, reason="checks the message shown when kvpress is missing")
def test_missing_kvpress_is_a_clear_error():
    with pytest.raises(ValueError, match=r"kvpass\[compare\]"):
        peers.press("tova", 0.5)


def test_bad_peer_arguments():
    with pytest.raises(ValueError, match="no kvpress counterpart"):
        peers.press("random", 0.5)
    with pytest.raises(ValueError, match="fractions"):
        peers.press("tova", 256)


@pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed (pip install 'kvpass[compare]')")
def test_kvpress_keeps_the_fraction_asked_for(llama):
    ids = torch.randint(3, 97, (1, 200), generator=torch.Generator().manual_seed(0))
    for name in ("tova", "snapkv", "streaming", "knorm", "observed"):
        cache = DynamicCache(config=llama.config)
        with peers.applied(peers.press(name, 0.25), llama):
            llama(input_ids=ids, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 50, name
    assert llama.config._attn_implementation == "sdpa"  # restored after ObservedAttention's eager run
    full = answer(llama, [ids], 5)
    assert torch.equal(answer(llama, [ids], 5, press=peers.press("tova", 1.0)), full)


@pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed (pip install 'kvpass[compare]')")
def test_eval_with_the_peer(llama):
    records = evaluate(
        llama, WordTokenizer(), task_names=["niah_single"], lengths=[150], policies=["tova"], budgets=[0.5],
        samples=1, max_new_tokens=4, chunk=64, peer="kvpress", progress=False,
    )  # fmt: skip
    assert {r.policy for r in records} == {"full", "tova", "kvpress:tova", "kvpress:expected_attention",
                                           "kvpress:pyramidkv"}  # fmt: skip


@pytest.mark.skipif(HAVE_KVPRESS, reason="checks the message shown when kvpress is missing")
def test_a_press_named_without_kvpress_fails_before_any_run(llama):
    with pytest.raises(ValueError, match=r"kvpass\[compare\]"):
        evaluate(llama, WordTokenizer(), task_names=["vt"], lengths=[100], policies=["kvpress:tova"], budgets=[0.5])


@pytest.mark.skipif(not HAVE_KVPRESS, reason="kvpress is not installed (pip install 'kvpass[compare]')")
def test_a_press_named_as_a_policy_runs_alone(llama):
    records = evaluate(
        llama, WordTokenizer(), task_names=["niah_single"], lengths=[150], policies=["kvpress:knorm"],
        budgets=[0.5], samples=1, max_new_tokens=4, chunk=64, progress=False,
    )  # fmt: skip
    assert {r.policy for r in records} == {"full", "kvpress:knorm"}
