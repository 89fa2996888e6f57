"""The same transform on a CUDA device (skipped where there is none)."""

import pytest
import torch

import kvpass
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_on_cuda(dtype):
    model = tiny_llama().to("cuda", dtype)
    ids = torch.randint(3, 97, (2, 50), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    full = kvpass.transform(model, policy="h2o", budget=256, chunk=16)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(full(ids).logits, model(ids).logits, rtol=tol, atol=tol)
    small = kvpass.transform(model, policy="snapkv", budget=12, window=4, chunk=16)
    out = small.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert out.shape == (2, 70) and out.device.type == "cuda"
    stats = kvpass.cache_stats(small)
    assert all(layer.capacity == 12 and layer.held == 2 * 2 * 12 for layer in stats.layers)


def test_compiled_decode_replays_cuda_graphs_with_the_eager_tokens():
    """model.compile(mode="reduce-overhead"): the decode step as a CUDA graph over the cache's
    tables (fixed addresses, written in place), the same greedy tokens as eager."""
    model = tiny_llama().to("cuda")
    ids = torch.randint(3, 97, (2, 40), device="cuda")
    eager = kvpass.transform(model, policy="tova", budget=16, chunk=16)
    graphs = kvpass.transform(model, policy="tova", budget=16, chunk=16)
    graphs.compile(mode="reduce-overhead")
    want = eager.generate(ids, max_new_tokens=24, do_sample=False)
    for _ in range(2):  # the second generation replays the recorded graph with a fresh cache
        assert torch.equal(graphs.generate(ids, max_new_tokens=24, do_sample=False), want)
