"""kvpass::decode (one token over the slots and its own key, given apart or as one more slot)
against the dense per-query reference of ``attend``."""

import pytest
import torch

from kvpass.kernels import decode
from tests.kernels.test_attend import dense_reference, random_case


def with_arrival(case):
    """``attend``'s arguments for a one-token chunk -> ``decode``'s: the token appended as a slot."""
    q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos = case
    B, Hkv = k.shape[:2]
    valid = torch.cat([slot_valid, (pos >= 0)[:, None].expand(B, Hkv, 1)], dim=-1)
    slot_pos = torch.cat([slot_pos, pos[:, None].expand(B, Hkv, 1)], dim=-1)
    return q, torch.cat([slot_k, k], dim=2), torch.cat([slot_v, v], dim=2), valid, slot_pos, pos


def run(case, apart, *options):
    """``decode`` on ``attend``'s one-token case: the token's key and value handed apart (as the
    runtime does), or appended to the slots."""
    if not apart:
        return decode(*with_arrival(case), *options)
    q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos = case
    options = (*options, *(0, False)[len(options) - 3 :])
    return decode(q, slot_k, slot_v, slot_valid, slot_pos, pos, *options, k, v)


@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("window", [0, 30])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("apart", [True, False])
def test_matches_dense_reference(G, window, softcap, apart):
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=G, C=9, T=1, D=8, dtype=torch.float32, window=window)
    out, mass = run(case, apart, 0.3, window, softcap)
    ref_out, ref_mass = dense_reference(*case, 0.3, window, softcap, 1)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("entropy_k", [0, 2])
@pytest.mark.parametrize("value_weighted", [False, True])
@pytest.mark.parametrize("apart", [True, False])
def test_mass_options(entropy_k, value_weighted, apart):
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=3, G=2, C=20, T=1, D=8, dtype=torch.float32)
    out, mass = run(case, apart, 0.3, 0, 0.0, entropy_k, value_weighted)
    ref_out, ref_mass = dense_reference(*case, 0.3, 0, 0.0, 1, entropy_k, value_weighted)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs(dtype, tol):
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=1, Hkv=2, G=2, C=6, T=1, D=8, dtype=dtype)
    out, mass = run(case, True, 0.35, 0, 0.0)
    ref_out, ref_mass = dense_reference(*case, 0.35, 0, 0.0, 1)
    assert out.dtype == dtype and mass.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=tol, atol=tol, msg=f"seed {seed}")


def test_only_the_arrival_and_a_single_valid_slot():
    case = list(random_case(torch.randint(0, 2**31, ()).item(), B=1, Hkv=1, G=2, C=4, T=1, D=4, dtype=torch.float32))
    case[5] = torch.zeros(1, 1, 4, dtype=torch.bool)  # nothing kept: the query sees only itself
    out, mass = run(case, True, 0.5, 0, 0.0)
    torch.testing.assert_close(out, case[2].expand(1, 2, 1, 4))
    assert mass[0, 0, :4].abs().sum() == 0 and mass[0, 0, 4] == pytest.approx(2.0)
    case[5] = torch.tensor([[[False, False, True, False]]])
    got, ref = run(case, True, 0.5, 0, 0.0), dense_reference(*case, 0.5, 0, 0.0, 1)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_opcheck():
    case = random_case(5, B=1, Hkv=2, G=2, C=5, T=1, D=8, dtype=torch.float32)
    torch.library.opcheck(torch.ops.kvpass.decode.default, (*with_arrival(case), 0.3, 3, 1.5))
    q, k, v, *slots, pos = case
    torch.library.opcheck(torch.ops.kvpass.decode.default, (q, *slots, pos, 0.3, 3, 1.5, 2, True, k, v))


def test_sinks_match_dense_reference():
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=3, C=9, T=1, D=8, dtype=torch.float32, window=0)
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(seed)) * 2
    q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos = case
    out, mass = decode(q, slot_k, slot_v, slot_valid, slot_pos, pos, 0.3, 0, 0.0, 0, False, k, v, sinks)
    ref_out, ref_mass = dense_reference(*case, 0.3, 0, 0.0, 1, sinks=sinks)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_alibi_matches_dense_reference():
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=3, C=9, T=1, D=8, dtype=torch.float32, window=0)
    alibi = torch.rand(6, generator=torch.Generator().manual_seed(seed)) * 0.5
    q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos = case
    for entropy_k in (0, 2):
        slots = (slot_k, slot_v, slot_valid, slot_pos)
        out, mass = decode(q, *slots, pos, 0.3, 0, 0.0, entropy_k, False, k, v, alibi=alibi)
        ref_out, ref_mass = dense_reference(*case, 0.3, 0, 0.0, 1, entropy_k, alibi=alibi)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
        torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
