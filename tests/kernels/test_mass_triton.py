"""The Triton chunk-scoring kernel against the mass of the torch reference (``attend_reference``):
on a GPU where there is one, else in Triton's interpreter (``TRITON_INTERPRET=1``, tests/conftest.py)."""

import os

import pytest
import torch

from kvpass.kernels.attend import attend_attention, attend_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from kvpass.kernels.mass_triton import chunk_mass_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def chunk_case(seed: int, B=2, Hkv=2, G=2, C=50, T=37, D=16, dtype=torch.float32, pad=3):
    """Random queries, chunk and slots; a ragged slot mask (random, a whole invalid block of 16, one
    head with a single valid slot); slot positions a random permutation before the chunk; the last
    row left-padded by ``pad`` tokens; a random in-context keep flag per chunk token."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = randn(B, Hkv * G, T, D), randn(B, Hkv, T, D), randn(B, Hkv, T, D)
    slot_k, slot_v = randn(B, Hkv, C, D), randn(B, Hkv, C, D)
    valid = torch.rand(B, Hkv, C, generator=gen) < 0.6
    valid[:, :, 16:32] = False
    if C:
        valid[-1, -1] = False
        valid[-1, -1, int(torch.randint(0, C, (1,), generator=gen))] = True
    slot_pos = torch.stack([torch.randperm(C, generator=gen) for _ in range(B * Hkv)]).view(B, Hkv, C)
    pos = torch.arange(C, C + T).repeat(B, 1)
    pos[-1, :pad] = -1
    keep = torch.rand(B, Hkv, T, generator=gen) < 0.5
    return [t.to(DEVICE) for t in (q, k, v, slot_k, slot_v, valid, slot_pos, pos)], keep.to(DEVICE)


def check(case, keep, scale, window, softcap, obs, entropy_k=0, value_weighted=False, keeping=False, tol=1e-5):
    seed = torch.initial_seed()
    opts = dict(chunk_keep=keep if keeping else None, keep_window=3 if keeping else 0)
    got = chunk_mass_triton(
        *case, scale, window, softcap, obs, entropy_k, value_weighted, **opts, block_m=16, block_n=16, poison=True
    )
    want = attend_reference(*case, scale, window, softcap, obs, entropy_k, value_weighted, **opts)[1]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert want.abs().amax() > 0.1  # a real mass to compare with
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{m}\nseed {seed}")


@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(G, dtype):
    torch.seed()
    case, keep = chunk_case(torch.initial_seed() % 2**31, G=G, dtype=dtype)
    check(case, keep, 0.25, 0, 0.0, obs=8, tol=TOL[dtype])


@pytest.mark.parametrize(("window", "softcap", "keeping"), [(30, 0.0, False), (0, 1.5, False), (20, 0.0, True),
                                                           (0, 0.0, True)])  # fmt: skip
def test_window_softcap_and_in_context_eviction(window, softcap, keeping):
    torch.seed()
    case, keep = chunk_case(torch.initial_seed() % 2**31, G=3, D=32)
    check(case, keep, 0.2, window, softcap, obs=12, keeping=keeping)


@pytest.mark.parametrize("entropy_k", [0, 4])
@pytest.mark.parametrize("value_weighted", [False, True])
def test_aha_options(entropy_k, value_weighted):
    torch.seed()
    case, keep = chunk_case(torch.initial_seed() % 2**31, G=4)
    check(case, keep, 0.25, 0, 0.0, obs=10, entropy_k=entropy_k, value_weighted=value_weighted, tol=1e-4)


@pytest.mark.parametrize(("C", "T", "obs"), [(0, 37, 8), (50, 1, 4), (50, 37, 37), (50, 20, 64), (130, 70, 33)])
def test_sizes_empty_slots_single_token_and_whole_chunk_observed(C, T, obs):
    torch.seed()
    case, keep = chunk_case(torch.initial_seed() % 2**31, C=C, T=T, pad=min(3, T - 1))
    check(case, keep, 0.25, 0, 0.0, obs=obs)


def test_dispatch_and_bad_shapes(monkeypatch):
    from kvpass.kernels import backend

    case, _ = chunk_case(5, G=2)
    want = attend_reference(*case, 0.25, 0, 0.0, 8)
    monkeypatch.setattr(backend, "BACKEND", "triton")
    out, mass = attend_attention(*case, 0.25, 0, 0.0, 8)  # fused SDPA + the kernel
    torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, want[1], rtol=1e-5, atol=1e-5)
    small, _ = chunk_case(5, D=8)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        chunk_mass_triton(*small, 0.25, 0, 0.0, 8)
