"""The Triton decode kernel against the torch reference: on a GPU where there is one, else in
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``)."""

import os

import pytest
import torch

from kvpass.kernels.decode import decode_attention, decode_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from kvpass.kernels.decode_triton import decode_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def close(got, want, rtol, atol, seed):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{m}\nseed {seed}")


def ragged_case(seed: int, B: int, Hkv: int, G: int, N: int, D: int, dtype, block: int = 16):
    """Random q, K, V and a ragged mask: random slots, a whole block nobody sees, a row with a single
    visible slot; positions a random permutation (slot order means nothing)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, 1, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    valid = torch.rand(B, Hkv, N, generator=gen) < 0.6
    valid[:, :, block : 2 * block] = False  # an all-invalid block
    valid[-1, -1] = False
    one = int(torch.randint(0, N, (1,), generator=gen))
    valid[-1, -1, one] = True  # a single valid slot
    slot_pos = torch.stack([torch.randperm(N, generator=gen) for _ in range(B * Hkv)]).view(B, Hkv, N)
    where = (slot_pos[-1, -1] == N - 1).nonzero().item()  # the single slot is the newest: inside any window
    slot_pos[-1, -1, [one, where]] = slot_pos[-1, -1, [where, one]]
    pos = torch.full((B, 1), N)
    return [t.to(DEVICE) for t in (q, k, v, valid, slot_pos, pos)]


@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(G, dtype):
    seed = torch.randint(0, 2**31, ()).item()
    case = ragged_case(seed, B=2, Hkv=2, G=G, N=83, D=32, dtype=dtype)
    out, mass = decode_triton(*case, 0.2, 0, 0.0, block_n=16, splits=3, poison=True)
    ref_out, ref_mass = decode_reference(*case, 0.2, 0, 0.0)
    assert out.dtype == dtype and mass.dtype == torch.float32
    tol = TOL[dtype]
    close(out.float(), ref_out.float(), tol, tol, seed)
    close(mass, ref_mass, tol, tol, seed)


@pytest.mark.parametrize("G", [1, 4])
def test_a_pool_shared_by_the_kv_heads_is_read_through_views(G):
    """A layer whose KV heads share one pool (``share="layer"``): the kernel reads its keys and values
    through stride-0 views over the heads, each head seeing the slots it owns, as the reference
    does on copies."""
    from kvpass.runtime.step import Slots, per_head

    seed = torch.randint(0, 2**31, ()).item()
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, N, D = 2, 3, 70, 16
    pool = Slots.empty((B, 1), N, D)
    pool.keys.normal_(generator=gen), pool.values.normal_(generator=gen)
    pool.pos.copy_(torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])[:, None])
    pool.valid.copy_(torch.rand(B, 1, N, generator=gen) < 0.9)
    pool.owner.copy_(torch.randint(0, Hkv, (B, 1, N), generator=gen))
    view = per_head(Slots(*(t.to(DEVICE) for t in pool)), Hkv)
    assert view.keys.stride(1) == 0  # no copy
    q = torch.randn(B, Hkv * G, 1, D, generator=gen).to(DEVICE)
    pos = torch.full((B, 1), N, device=DEVICE)
    args = (q, view.keys, view.values, view.valid, view.pos, pos, 0.3, 0, 0.0)
    out, mass = decode_triton(*args, block_n=16, splits=2, poison=True)
    copies = (q, *(t.contiguous() for t in (view.keys, view.values, view.valid, view.pos)), pos, 0.3, 0, 0.0)
    ref_out, ref_mass = decode_reference(*copies)
    close(out, ref_out, 1e-5, 1e-5, seed)
    close(mass, ref_mass, 1e-5, 1e-5, seed)
    assert (mass[~view.valid] == 0).all()  # a head gives nothing to the slots of the others


@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize(("window", "softcap"), [(30, 0.0), (0, 1.5), (25, 2.0)])
def test_window_and_softcap(D, window, softcap):
    seed = torch.randint(0, 2**31, ()).item()
    case = ragged_case(seed, B=2, Hkv=3, G=2, N=70, D=D, dtype=torch.float32)
    out, mass = decode_triton(*case, 0.3, window, softcap, block_n=16, poison=True)
    ref_out, ref_mass = decode_reference(*case, 0.3, window, softcap)
    close(out, ref_out, 1e-5, 1e-5, seed)
    close(mass, ref_mass, 1e-5, 1e-5, seed)


@pytest.mark.parametrize("entropy_k", [0, 4])
@pytest.mark.parametrize("value_weighted", [False, True])
@pytest.mark.parametrize("splits", [1, 4])
def test_mass_options_and_splits(entropy_k, value_weighted, splits):
    seed = torch.randint(0, 2**31, ()).item()
    case = ragged_case(seed, B=1, Hkv=2, G=4, N=100, D=16, dtype=torch.float32)
    out, mass = decode_triton(*case, 0.25, 0, 0.0, entropy_k, value_weighted, block_n=16, splits=splits, poison=True)
    ref_out, ref_mass = decode_reference(*case, 0.25, 0, 0.0, entropy_k, value_weighted)
    close(out, ref_out, 1e-5, 1e-5, seed)
    close(mass, ref_mass, 1e-5, 1e-4, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "splits"), [(47, 1), (48, 3), (100, 4)])
@pytest.mark.parametrize(("entropy_k", "value_weighted", "window"), [(0, False, 0), (4, True, 30)])
def test_own_key_apart(dtype, N, splits, entropy_k, value_weighted, window):
    """The token's own key and value handed apart (index ``N``, also at a block's edge); a padding
    token (position -1) does not see itself."""
    seed = torch.randint(0, 2**31, ()).item()
    case = ragged_case(seed, B=3, Hkv=2, G=3, N=N, D=16, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    k_new, v_new = (torch.randn(3, 2, 1, 16, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    case[5] = case[5].clone()
    case[5][1] = -1
    args = (*case, 0.25, window, 0.0, entropy_k, value_weighted, k_new, v_new)
    out, mass = decode_triton(*args, block_n=16, splits=splits, poison=True)
    ref_out, ref_mass = decode_reference(*args)
    assert mass.shape == (3, 2, N + 1) and mass[1, :, N].abs().sum() == 0
    tol = TOL[dtype]
    close(out.float(), ref_out.float(), tol, tol, seed)
    close(mass, ref_mass, tol, 1e-4 if dtype == torch.float32 else tol, seed)


def test_a_row_that_sees_nothing_gets_nan_like_the_reference():
    case = ragged_case(1, B=1, Hkv=1, G=2, N=32, D=16, dtype=torch.float32)
    case[3][:] = False
    out, _ = decode_triton(*case, 0.25, 0, 0.0, block_n=16)
    assert torch.isnan(out).all() and torch.isnan(decode_reference(*case, 0.25, 0, 0.0)[0]).all()


def test_dispatch_and_bad_shapes():
    case = ragged_case(2, B=1, Hkv=1, G=2, N=20, D=16, dtype=torch.float32)
    out, mass = decode_attention(*case, 0.25)  # Triton on CUDA, the reference on CPU: the same numbers
    ref_out, ref_mass = decode_reference(*case, 0.25, 0, 0.0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5)
    small = ragged_case(2, B=1, Hkv=1, G=2, N=20, D=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        decode_triton(*small, 0.25, 0, 0.0)


def test_a_transformed_model_gives_the_same_tokens_with_the_kernels(monkeypatch):
    import importlib

    from kvpass.kernels import backend
    from kvpass.transform import transform
    from tests.conftest import tiny_llama

    calls = {"decode_triton": 0, "chunk_mass_triton": 0}
    for module, name in (("decode_triton", "decode_triton"), ("mass_triton", "chunk_mass_triton")):
        kernel = importlib.import_module(f"kvpass.kernels.{module}")
        launch = getattr(kernel, name)

        def counted(*a, name=name, launch=launch, **kw):
            calls[name] += 1
            return launch(*a, **kw)

        monkeypatch.setattr(kernel, name, counted)
    model = tiny_llama(seed=3).to(DEVICE)
    ids = torch.randint(3, 97, (2, 40), device=DEVICE)
    runs = {}
    for choice in ("torch", "triton"):
        monkeypatch.setattr(backend, "BACKEND", choice)
        for policy, knobs in (("h2o", {"window": 4}), ("aha", {"recent": 8, "k": 4}), ("snapkv", {"window": 8})):
            small = transform(model, policy, 24, chunk=16, **knobs)
            runs[choice, policy] = small.generate(ids, max_new_tokens=8, do_sample=False)
    # the kernels really ran: policies x layers x (7 decode steps | 3 prefill chunks)
    assert calls == {"decode_triton": 3 * 2 * 7, "chunk_mass_triton": 3 * 2 * 3}
    for policy in ("h2o", "aha", "snapkv"):
        assert torch.equal(runs["triton", policy], runs["torch", policy]), policy
