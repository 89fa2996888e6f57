"""Spike for one KV budget shared by the model (issue 37, step 3): two layouts whose memory follows
ragged shares, measured against today's equal per-head tables on this machine's CPU.

- **equal** (today): per layer ``[B, Hkv, C, D]``, every KV head exactly ``C`` slots.
- **arena**: per layer one arena ``[B, S, D]`` of ``S = Hkv * C`` slots with an owner tag per slot
  (which KV head holds it): the heads of a layer share its slots in any proportion. Every query
  head scores every slot of its layer and masks the others' (``Hkv`` times the dot products of
  *equal*; each byte read once). Layer sizes are fixed per layout (across layers the shares move
  only where the layout is rebuilt: eager, after compression).
- **paged**: a pool of pages ``[B, P, page, D]`` per layer group and a page table per (layer, KV
  head) ``[B, Hkv, M]``; a head may hold up to ``M * page`` slots (``k`` times its average share),
  so shares move across layers too. The torch path gathers every head's ``M`` pages (``k`` times
  *equal*'s bytes, copied); a GPU kernel would skip unused pages.

Each prints its KV bytes (the memory formula, evaluated), and the time of one decode step's
attention over all layers (``--layers`` x attention of one token), mean of ``--steps`` after a
warm-up, as a ratio to *equal* measured in the same run.

    python benchmarks/shared_layout_spike.py --slots 512 --layers 30 --heads 9 --kv-heads 3 --dim 64
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def equal(q, k, v, valid):
    """q [B, Hkv, G, D], k/v [B, Hkv, C, D], valid [B, Hkv, C]."""
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = logits.masked_fill(~valid[:, :, None], -torch.inf).softmax(-1)
    return p @ v


def arena(q, k, v, valid, owner):
    """q [B, H, D]; k/v [B, S, D]; valid [B, S]; owner [B, S] (KV head of each slot)."""
    H, D = q.shape[1:]
    Hkv = int(owner.max()) + 1
    head_of = torch.arange(H) // (H // Hkv)
    logits = torch.einsum("bhd,bsd->bhs", q, k) * D**-0.5
    mask = valid[:, None, :] & (owner[:, None, :] == head_of[None, :, None])
    p = logits.masked_fill(~mask, -torch.inf).softmax(-1)
    return torch.einsum("bhs,bsd->bhd", p, v)


def paged(q, pool_k, pool_v, pool_valid, table):
    """q [B, Hkv, G, D]; pool [B, P, page, D]; table [B, Hkv, M] (page ids)."""
    B, Hkv, M = table.shape
    page, D = pool_k.shape[2:]
    rows = torch.arange(B)[:, None, None]
    k = pool_k[rows, table].reshape(B, Hkv, M * page, D)
    v = pool_v[rows, table].reshape(B, Hkv, M * page, D)
    valid = pool_valid[rows, table].reshape(B, Hkv, M * page)
    return equal(q, k, v, valid)


def timed(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=512, help="average slots per layer and KV head")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--spread", type=float, default=4.0, help="paged: most slots a head may hold / average")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    B, L, H, Hkv, D, C = args.batch, args.layers, args.heads, args.kv_heads, args.dim, args.slots
    G, S = H // Hkv, Hkv * C
    M = int(args.spread * C) // args.page
    P = S // args.page + Hkv  # the pool: the budget's pages, one partial page per head at most

    layers = []
    for _ in range(L):
        q = torch.randn(B, H, D)
        k, v = torch.randn(B, S, D), torch.randn(B, S, D)
        valid = torch.rand(B, S) < 0.95
        owner = torch.randint(0, Hkv, (B, S))  # ragged: each head holds a random share
        table = torch.randint(0, P, (B, Hkv, M))
        pool = torch.randn(B, P, args.page, D), torch.randn(B, P, args.page, D), torch.rand(B, P, args.page) < 0.95
        layers.append((q, k, v, valid, owner, table, pool))

    def run_equal():
        for q, k, v, valid, *_ in layers:
            equal(q.view(B, Hkv, G, D), k.view(B, Hkv, C, D), v.view(B, Hkv, C, D), valid.view(B, Hkv, C))

    def run_arena():
        for q, k, v, valid, owner, *_ in layers:
            arena(q, k, v, valid, owner)

    def run_paged():
        for q, *_, table, pool in layers:
            paged(q.view(B, Hkv, G, D), *pool, table)

    # a check that the arena computes attention per KV head: equal shares give equal's output
    q, k, v, valid, *_ = layers[0]
    owner = torch.arange(Hkv).repeat_interleave(C).expand(B, S)
    want = equal(q.view(B, Hkv, G, D), k.view(B, Hkv, C, D), v.view(B, Hkv, C, D), valid.view(B, Hkv, C))
    torch.testing.assert_close(arena(q, k, v, valid, owner).view(B, Hkv, G, D), want, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        base = timed(run_equal, args.steps)
        rows = [
            ("equal (today)", L * B * Hkv * C, 0, base),
            ("arena, owner tags", L * B * S, L * B * S, timed(run_arena, args.steps)),
            ("paged", L * B * P * args.page, L * B * Hkv * M * 8, timed(run_paged, args.steps)),
        ]
    kv = 2 * D * 4  # keys and values, fp32
    print(
        f"\nDecode attention, {L} layers, {H} heads, {Hkv} KV heads, dim {D}, batch {B}, {C} slots per layer and KV "
        f"head on average; page {args.page}, spread {args.spread:g}; {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| layout | KV MiB | index bytes | attention ms / step | vs equal |")
    print("|---|---|---|---|---|")
    for name, slots, index, t in rows:
        print(f"| {name} | {slots * kv / 2**20:.1f} | {index:,} | {1e3 * t:.2f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
