"""The token-mixing check: a graph that mixes tokens outside its attention is refused, naming the node."""

import pytest
import torch

import kvpass
from kvpass.passes import TokenMixingError, capture, check_token_local
from tests.conftest import tiny_llama
from tests.models import Mixer, NanoGPT


@pytest.mark.parametrize(
    "mix,node,why",
    [
        ("cumsum", "cumsum", "reduces or rearranges along a dimension that carries tokens"),
        ("mean", "mean", "reduces or rearranges along a dimension that carries tokens"),
        ("conv", "conv1d", "cannot show to keep tokens apart"),
        ("shift", "slice", "takes part of the sequence"),
        ("arange_odd", "arange", "pass positions as an input"),
        ("bidirectional", "scaled_dot_product_attention", "attention that kvpass did not rewrite"),
    ],
)
def test_mixing_is_refused_with_the_node_named(mix, node, why):
    torch.manual_seed(0)
    with pytest.raises(TokenMixingError, match=why) as err:
        kvpass.transform(Mixer(mix).eval(), policy="full")
    assert f"node '{node}" in str(err.value) or f"({node}" in str(err.value) or f"aten.{node}" in str(err.value)


@pytest.mark.parametrize("mix", ["none", "arange"])
def test_mixer_without_mixing_is_rewritten_exactly(mix):
    """Positions made by ``arange(T)`` are what the whole sequence would have given (the true ones)."""
    torch.manual_seed(0)
    model = Mixer(mix).eval()
    ids = torch.randint(0, 50, (2, 30))
    small = kvpass.transform(model, policy="full", chunk=7)
    torch.testing.assert_close(small(ids).logits, model(ids, torch.arange(30).expand(2, 30)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, NanoGPT])
def test_untouched_attention_is_what_mixes(make):
    """Before rewriting, the model's own attention (and its mask construction) is what the check objects to."""
    torch.manual_seed(0)
    gm = capture(make().eval(), 50)
    with pytest.raises(TokenMixingError):
        check_token_local(gm)


def test_fixed_length_capture_is_refused():
    gm = torch.export.export(Mixer("none").eval(), (torch.zeros(1, 5, dtype=torch.long),) * 2).module()
    with pytest.raises(TokenMixingError, match="fixed sequence length"):
        check_token_local(gm)
