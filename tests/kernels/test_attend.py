"""kvpass::attend against a dense, per-query reference written independently of it."""

import math

import pytest
import torch

from kvpass.kernels import attend
from kvpass.kernels.attend import _splits, split_sdpa


def dense_reference(
    q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos, scale, window, softcap, obs, entropy_k=0, value_weighted=False,
    sinks=None, alibi=None, chunked=0,
):  # fmt: skip
    """Loop over every (row, head, query): gather what it may see, softmax, sum. The mass options
    as AhaKV states them: scale sqrt(2 ln(n / k) / d), never below ``scale``; weights ||v||^2.
    ``sinks [H]``: one more logit per head in the softmax, its probability dropped. ``alibi [H]``:
    ALiBi as BLOOM writes it, ``m_h (j - i)`` added for key position ``j`` and query position ``i``.
    ``chunked``: a query sees keys whose position is in its block (``// chunked`` equal)."""
    B, H, T, _ = q.shape
    Hkv, C = slot_k.shape[1], slot_k.shape[2]
    G = H // Hkv
    out = torch.full_like(q, float("nan"))
    mass = torch.zeros(B, Hkv, C + T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // G
            keys = torch.cat([slot_k[b, kv], k[b, kv]]).double()
            vals = torch.cat([slot_v[b, kv], v[b, kv]]).double()
            where = torch.cat([slot_pos[b, kv], pos[b]]).double()
            for t in range(T):
                qp = pos[b, t].item()
                ok = []
                for j in range(C + T):
                    if j < C:
                        see = bool(slot_valid[b, kv, j]) and (window == 0 or qp - slot_pos[b, kv, j].item() < window)
                    else:
                        i = j - C
                        see = i == t or (i < t and pos[b, i] >= 0 and (window == 0 or qp - pos[b, i].item() < window))
                    if chunked:
                        see = see and int(where[j]) // chunked == qp // chunked
                    ok.append(see)
                ok = torch.tensor(ok)
                logits = (keys @ q[b, h, t].double()) * scale
                if softcap:
                    logits = softcap * torch.tanh(logits / softcap)
                bias = 0.0 if alibi is None else alibi[h].double() * (where - qp)
                logits = torch.where(ok, logits + bias, -math.inf)
                if sinks is not None:
                    p = torch.cat([logits, sinks[h : h + 1].double()]).softmax(0)[:-1]
                else:
                    p = logits.softmax(0)
                out[b, h, t] = (p @ vals).to(q.dtype)
                if entropy_k:
                    n = int(ok.sum())
                    lam = max(scale, math.sqrt(max(0.0, 2 * math.log(n / entropy_k) / q.shape[-1])))
                    p = torch.where(ok, (keys @ q[b, h, t].double()) * lam + bias, -math.inf)
                    p = torch.cat([p, sinks[h : h + 1].double()]).softmax(0)[:-1] if sinks is not None else p.softmax(0)
                if value_weighted:
                    p = p * (vals * vals).sum(-1)
                if t >= T - min(obs, T):
                    mass[b, kv] += p
    return out, mass.float()


def random_case(seed, B, Hkv, G, C, T, D, dtype, window=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    q, k, v = r(B, Hkv * G, T, D), r(B, Hkv, T, D), r(B, Hkv, T, D)
    slot_k, slot_v = r(B, Hkv, C, D), r(B, Hkv, C, D)
    slot_valid = torch.rand(B, Hkv, C, generator=g) < 0.7
    slot_pos = torch.randint(0, 50, (B, Hkv, C), generator=g)
    pos = 50 + torch.arange(T).repeat(B, 1)
    if pad:  # left padding on row 0
        pos[0, : T // 2] = -1
        pos[0, T // 2 :] = 50 + torch.arange(T - T // 2)
    return q, k, v, slot_k, slot_v, slot_valid, slot_pos, pos


@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("obs", [1, 3, 100])
@pytest.mark.parametrize("window", [0, 30])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_matches_dense_reference(G, T, obs, window, softcap):
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=G, C=7, T=T, D=8, dtype=torch.float32, window=window, pad=T > 1)
    scale = 0.3
    out, mass = attend(*case, scale, window, softcap, obs)
    ref_out, ref_mass = dense_reference(*case, scale, window, softcap, obs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("T,obs", [(1, 1), (6, 2), (6, 6)])
@pytest.mark.parametrize("entropy_k", [0, 2])
@pytest.mark.parametrize("value_weighted", [False, True])
def test_mass_options(T, obs, entropy_k, value_weighted):
    """AhaKV's scoring options change the mass only (the output stays the model's attention)."""
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=3, C=20, T=T, D=8, dtype=torch.float32, pad=T > 1)
    got = attend(*case, 0.3, 0, 0.0, obs, entropy_k, value_weighted)
    ref = dense_reference(*case, 0.3, 0, 0.0, obs, entropy_k, value_weighted)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    if entropy_k or value_weighted:  # the option did something
        assert not torch.allclose(got[1], attend(*case, 0.3, 0, 0.0, obs)[1], atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_inputs(dtype, tol):
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=1, Hkv=2, G=2, C=6, T=3, D=8, dtype=dtype)
    out, mass = attend(*case, 0.35, 0, 0.0, 2)
    ref_out, ref_mass = dense_reference(*case, 0.35, 0, 0.0, 2)
    assert out.dtype == dtype and mass.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=tol, atol=tol, msg=f"seed {seed}")


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("slots", ["ragged", "all valid", "none valid", "one head empty"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_split_output_matches_dense_reference(G, slots, dtype, tol):
    """The CPU's output path without a mask (the slots and the causal chunk in two flash calls,
    joined by their log-sum-exps): taken by ``attend`` when no padding, window or block needs one."""
    seed = torch.randint(0, 2**31, ()).item()
    case = list(random_case(seed, B=2, Hkv=2, G=G, C=13, T=9, D=16, dtype=dtype))
    valid = case[5]
    if slots == "all valid":
        valid.fill_(True)
    elif slots == "none valid":
        valid.fill_(False)
    elif slots == "one head empty":
        valid[1, 0] = False
    q, k, v, slot_k, slot_v = case[:5]
    assert _splits(q, v, case[7], 0, None, 0)
    ref_out, ref_mass = dense_reference(*case, 0.3, 0, 0.0, 2)
    split = split_sdpa(q, k, v, slot_k, slot_v, valid, 0.3)
    out, mass = attend(*case, 0.3, 0, 0.0, 2)
    assert split.dtype == out.dtype == dtype and split.isfinite().all()
    for got in (split, out):
        torch.testing.assert_close(got.float(), ref_out.float(), rtol=tol, atol=tol, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=tol, atol=tol, msg=f"seed {seed}")


def test_split_path_only_where_no_mask_is_needed():
    case = random_case(4, B=1, Hkv=1, G=2, C=4, T=3, D=4, dtype=torch.float32, pad=True)
    q, v, pos = case[0], case[2], case[7]
    assert not _splits(q, v, pos, 0, None, 0)  # padding
    pos = pos.clamp_min(0)
    assert _splits(q, v, pos, 0, None, 0)
    assert not _splits(q, v, pos, 8, None, 0)  # a window
    assert not _splits(q, v, pos, 0, torch.ones(1, 1, 3, dtype=torch.bool), 0)  # in-context eviction
    assert not _splits(q, v, pos, 0, None, 4)  # chunked attention
    assert not _splits(q, v[..., :2], pos, 0, None, 0)  # values of another head dim


def test_empty_cache_and_single_valid_slot():
    case = list(random_case(3, B=1, Hkv=1, G=2, C=4, T=1, D=4, dtype=torch.float32))
    case[5] = torch.zeros(1, 1, 4, dtype=torch.bool)  # nothing kept: the query sees only itself
    out, mass = attend(*case, 0.5, 0, 0.0, 1)
    torch.testing.assert_close(out, case[2].expand(1, 2, 1, 4))
    assert mass[0, 0, :4].abs().sum() == 0 and mass[0, 0, 4] == pytest.approx(2.0)
    case[5] = torch.tensor([[[False, False, True, False]]])
    ref = dense_reference(*case, 0.5, 0, 0.0, 1)
    got = attend(*case, 0.5, 0, 0.0, 1)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_opcheck():
    case = random_case(5, B=1, Hkv=2, G=2, C=5, T=3, D=8, dtype=torch.float32)
    torch.library.opcheck(torch.ops.kvpass.attend.default, (*case, 0.3, 0, 1.5, 2))


@pytest.mark.parametrize("obs", [2, 7])
def test_sinks_match_dense_reference(obs):
    """Attention sinks (GPT-OSS): a learned logit per query head joins the softmax and is dropped."""
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=2, C=6, T=7, D=8, dtype=torch.float32, window=0)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(seed)) * 2
    out, mass = attend(*case, 0.3, 0, 0.0, obs, sinks=sinks)
    ref_out, ref_mass = dense_reference(*case, 0.3, 0, 0.0, obs, sinks=sinks)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    plain, _ = attend(*case, 0.3, 0, 0.0, obs)
    assert not torch.allclose(out, plain)  # the sinks take probability away from the keys


@pytest.mark.parametrize("T,obs,entropy_k", [(1, 1, 0), (7, 2, 0), (7, 7, 0), (7, 3, 2)])
def test_alibi_matches_dense_reference(T, obs, entropy_k):
    """ALiBi (BLOOM, MPT): each head's slope times the key's position joins its logits; the slots'
    positions are their true ones, in no order."""
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=2, C=6, T=T, D=8, dtype=torch.float32, window=0, pad=T > 1)
    alibi = torch.rand(4, generator=torch.Generator().manual_seed(seed)) * 0.5
    out, mass = attend(*case, 0.3, 0, 0.0, obs, entropy_k, alibi=alibi)
    ref_out, ref_mass = dense_reference(*case, 0.3, 0, 0.0, obs, entropy_k, alibi=alibi)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    plain, _ = attend(*case, 0.3, 0, 0.0, obs)
    assert not torch.allclose(out, plain)  # the bias moved the probabilities


@pytest.mark.parametrize("T,obs", [(1, 1), (9, 2), (9, 9)])
def test_chunked_attention_matches_dense_reference(T, obs):
    """Chunked attention (Llama 4): a query sees only the keys of its own block of positions."""
    seed = torch.randint(0, 2**31, ()).item()
    case = random_case(seed, B=2, Hkv=2, G=2, C=8, T=T, D=8, dtype=torch.float32, window=0, pad=T > 1)
    case[6].clamp_(min=44)  # slots in the chunk's first block (48..55) and the one before it
    out, mass = attend(*case, 0.3, 0, 0.0, obs, chunked=8)
    ref_out, ref_mass = dense_reference(*case, 0.3, 0, 0.0, obs, chunked=8)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    plain, _ = attend(*case, 0.3, 0, 0.0, obs)
    assert not torch.allclose(out, plain)  # some keys were out of the block
