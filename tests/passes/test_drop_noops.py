import torch

from kvpass.passes import capture, drop_noops

aten = torch.ops.aten


def test_outputs_unchanged_and_noops_gone(llama):
    gm = capture(llama, 97)
    ids, pos = torch.randint(0, 97, (2, 11)), torch.arange(11).expand(2, 11)
    want = gm(ids, pos)
    before = len(gm.graph.nodes)
    removed = drop_noops(gm)
    assert removed > 0 and len(gm.graph.nodes) == before - removed
    assert not any(n.target == aten._assert_tensor_metadata.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(ids, pos), want, rtol=0, atol=0)
    torch.testing.assert_close(
        gm(ids[:1, :3], pos[:1, :3]), capture(llama, 97)(ids[:1, :3], pos[:1, :3]), rtol=0, atol=0
    )


def test_real_slices_and_casts_stay():
    class M(torch.nn.Module):
        def forward(self, input_ids, position_ids):
            x = input_ids.float()
            return x[:, 1:].to(torch.float16).float() + position_ids[:, :-1]

    gm = capture(M(), 5)
    drop_noops(gm)
    slices = [n.args[2:4] for n in gm.graph.nodes if n.target == aten.slice.Tensor]
    assert (1, 2**63 - 1) in slices and (0, -1) in slices, slices
    casts = [n.args[1] for n in gm.graph.nodes if n.target == aten.to.dtype]
    assert torch.float16 in casts, casts
    ids, pos = torch.randint(0, 5, (2, 6)), torch.arange(6).expand(2, 6)
    torch.testing.assert_close(gm(ids, pos), M()(ids, pos))
