import pytest
import torch
from transformers import LlamaForCausalLM

import kvpass
from tests.models import EagerForms, NanoGPT


@pytest.fixture(scope="module")
def eager_llama(llama):
    config = llama.config.__class__(**{**llama.config.to_dict(), "attn_implementation": "eager"})
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(llama.state_dict())
    return model


def test_hf_eager_attention_is_found(eager_llama):
    sites = kvpass.find_attention(eager_llama)
    assert [(s.heads, s.kv_heads, s.head_dim, s.causal, s.action) for s in sites] == [(4, 2, 16, True, "rewrite")] * 2
    assert sites[0].scale == pytest.approx(0.25)


def test_hf_eager_full_budget_is_exact(eager_llama):
    ids = torch.randint(3, 97, (2, 40))
    small = kvpass.transform(eager_llama, policy="h2o", budget=128, chunk=16)
    torch.testing.assert_close(small(ids).logits, eager_llama(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        small.generate(ids, max_new_tokens=16, do_sample=False),
        eager_llama.generate(ids, max_new_tokens=16, do_sample=False),
    )


def test_nanogpt_masked_fill_attention():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    sites = kvpass.find_attention(model)
    assert [(s.heads, s.kv_heads, s.head_dim, s.causal, s.action) for s in sites] == [(4, 4, 8, True, "rewrite")] * 2
    assert sites[0].scale == pytest.approx(8**-0.5)
    ids, pos = torch.randint(0, 50, (1, 60)), torch.arange(60)[None]
    small = kvpass.transform(model, policy="full", chunk=16)
    torch.testing.assert_close(small(ids).logits, model(ids, pos), rtol=1e-5, atol=1e-5)
    bounded = kvpass.transform(model, policy="streaming", budget=12, sink_tokens=2)
    assert bounded(ids).logits.shape == (1, 60, 50)
    assert all(layer.held == 4 * 12 for layer in kvpass.cache_stats(bounded).layers)


FORMS = ["einsum", "einsum_bthd", "einsum_letters", "matmul_permute", "bmm", "baddbmm", "bmm_mask4", "multiplied"]


@pytest.mark.parametrize("form,softcap", [*((f, 0.0) for f in FORMS), ("softcap", 2.0), ("lse_sinks", 0.0)])
def test_eager_forms(form, softcap):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = EagerForms(form).eval()
    (site,) = kvpass.find_attention(model)
    assert (site.heads, site.kv_heads, site.head_dim, site.causal, site.action) == (4, 4, 8, True, "rewrite")
    assert site.scale == pytest.approx(1.0 if form == "bmm_mask4" else 8**-0.5) and site.softcap == softcap
    assert (site.sinks is not None) == (form == "lse_sinks")  # sinks written after attention: found as sinks
    ids = torch.randint(0, 50, (2, 45))
    exact = kvpass.transform(model, policy="full", chunk=16)
    torch.testing.assert_close(exact(ids).logits, model(ids, torch.arange(45).expand(2, 45)), rtol=1e-5, atol=1e-5)


def test_a_multiplier_without_its_penalty_is_left_alone():
    """``scores * b`` alone gives the keys where b is 0 a score of 0, not no probability: not a mask."""
    model = EagerForms("multiplied_only").eval()
    assert kvpass.find_attention(model) == []


def test_einsum_with_keys_first_is_left_alone():
    """Scores written ``einsum(k, q)``: not recognised (so refused by the token check), never misread."""
    model = EagerForms("einsum_keys_first").eval()
    assert kvpass.find_attention(model) == []


def test_softcap_op_matches_eager():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)
    ref = (torch.tanh(q @ k.transpose(-1, -2) * 0.3 / 1.5) * 1.5).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(torch.ops.kvpass.eager_sdpa(q, k, v, mask, 0.3, 1.5), ref)
    torch.library.opcheck(torch.ops.kvpass.eager_sdpa.default, (q, k, v, mask, 0.3, 1.5))
