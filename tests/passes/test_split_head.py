import torch
from torch import nn

from kvpass.passes import capture, split_head
from tests.models import SDPAModel


def test_llama_head_is_cut_off(llama):
    gm = capture(llama, 97)
    ids, pos = torch.randint(0, 97, (2, 9)), torch.arange(9).expand(2, 9)
    want = gm(ids, pos)
    head = split_head(gm)
    hidden = gm(ids, pos)
    assert head is not None and hidden.shape == (2, 9, 64)
    assert head.weight is llama.lm_head.weight
    torch.testing.assert_close(head(hidden), want)


class SoftCapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = SDPAModel()

    def forward(self, input_ids, position_ids):
        return 5.0 * torch.tanh(self.inner(input_ids, position_ids) / 5.0)


def test_nothing_is_cut_when_logits_are_transformed_after_the_head():
    gm = capture(SoftCapped().eval(), 50)
    before = len(gm.graph.nodes)
    assert split_head(gm) is None and len(gm.graph.nodes) == before
