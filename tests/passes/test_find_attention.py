import pytest
import torch

import kvpass
from tests.models import LengthCondition, NoAttention, SDPAModel


def test_llama_sites(llama):
    sites = kvpass.find_attention(llama)
    assert [s.layer for s in sites] == [0, 1]
    s = sites[0]
    assert (s.heads, s.kv_heads, s.head_dim, s.causal, s.sliding_window, s.action) == (4, 2, 16, True, None, "rewrite")
    assert s.scale == pytest.approx(16**-0.5)
    assert s.module == "model.layers.0.self_attn"


@pytest.mark.parametrize(
    "form,kv_heads,scale",
    [("causal", 2, 8**-0.5), ("bool_mask", 2, 8**-0.5), ("additive_mask", 2, 8**-0.5), ("enable_gqa", 2, 0.2)],
)
def test_call_forms(form, kv_heads, scale):
    torch.manual_seed(0)
    (site,) = kvpass.find_attention(SDPAModel(form=form).eval())
    assert (site.heads, site.kv_heads, site.head_dim, site.causal, site.action) == (4, kv_heads, 8, True, "rewrite")
    assert site.scale == pytest.approx(scale)


def test_sliding_window_is_measured():
    (site,) = kvpass.find_attention(SDPAModel(form="bool_mask", window=5).eval())
    assert site.causal and site.sliding_window == 5


def test_bidirectional_is_skipped_and_refused():
    model = SDPAModel(form="bidirectional").eval()
    (site,) = kvpass.find_attention(model)
    assert site.action == "skip" and "causal" in site.reason
    with pytest.raises(ValueError, match="can be rewritten"):
        kvpass.transform(model, policy="tova", budget=8)


def test_alibi_is_measured_and_kept():
    """A bias of a slope times the distance under the causal mask (ALiBi) is found on the probe;
    kvpass adds it from the slots' positions, so the model is exact at full budget."""
    model = SDPAModel(form="alibi").eval()
    (site,) = kvpass.find_attention(model)
    assert site.action == "rewrite" and site.causal and site.alibi == (0.5,) * 4
    ids = torch.randint(0, 50, (2, 45))
    exact = kvpass.transform(model, policy="full", chunk=16)
    torch.testing.assert_close(exact(ids).logits, model(ids, torch.arange(45).expand(2, 45)), rtol=1e-5, atol=1e-5)


def test_a_bias_in_the_mask_is_not_taken_for_a_causal_mask():
    """An additive mask with nonzero finite entries that are not ALiBi's is a bias kvpass cannot
    compute from positions it keeps: dropping it would be silently wrong, so the site is skipped and
    the model refused."""
    model = SDPAModel(form="distance_bias").eval()
    (site,) = kvpass.find_attention(model)
    assert site.action == "skip" and "causal" in site.reason
    with pytest.raises(ValueError, match="can be rewritten"):
        kvpass.transform(model, policy="full")


def test_no_attention_is_an_error():
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        kvpass.transform(NoAttention().eval(), policy="tova", budget=8)


def test_a_graph_that_holds_for_some_lengths_only_is_refused():
    """torch.export keeps a condition on the length as the range the graph holds for; kvpass runs a
    graph one token at a time, so such a capture is refused, not run into a failing guard later."""
    with pytest.raises(RuntimeError, match="holds only for 7 tokens or more"):
        kvpass.transform(LengthCondition().eval(), policy="full")
