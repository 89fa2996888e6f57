"""flatten_attrs: the graph reads each weight under one flat name, the very same Parameter."""

import torch

import kvpass
from kvpass.passes import capture, flatten_attrs
from tests.test_transform import prompt


def test_weights_are_read_flat_and_stay_shared(llama):
    gm = capture(llama, llama.config.vocab_size)
    ids = prompt(3, T=12)
    pos = torch.arange(12)[None]
    want = gm(ids, pos)
    nested = [n for n in gm.graph.nodes if n.op == "get_attr" and "." in n.target]
    assert nested and flatten_attrs(gm) > 0
    params = dict(llama.named_parameters())
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(getattr(gm, n.target, None), torch.nn.Parameter):
            assert "." not in n.target
            assert any(getattr(gm, n.target) is p for p in params.values())
    torch.testing.assert_close(gm(ids, pos), want, rtol=0, atol=0)


def test_transformed_model_follows_weight_changes(llama):
    """``.to()`` swaps a parameter's data, not the parameter: the transformed model sees the change."""
    small = kvpass.transform(llama, policy="full")
    ids = prompt(4, T=10)
    before = small(ids).logits
    g = small.kvpass_graph
    flat = [getattr(g, n.target) for n in g.graph.nodes if n.op == "get_attr" and "." not in n.target]
    try:
        llama.double()
        assert flat and all(p.dtype == torch.float64 for p in flat)
        with torch.no_grad():
            llama.lm_head.weight.data = llama.lm_head.weight.data.flip(0)  # replaced as .to() does
        want = llama(ids).logits
        got = small(ids).logits
        assert not torch.allclose(got.float(), before, atol=1e-3)  # the change is seen...
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)  # ...and is the original's
    finally:
        with torch.no_grad():
            llama.lm_head.weight.data = llama.lm_head.weight.data.flip(0)
        llama.float()
