"""The Triton kernels on a CUDA GPU: the decode kernel's achieved bandwidth against the device's copy
bandwidth and its time against full-cache SDPA; the chunk-scoring kernel's time and peak memory
against the torch reference's mass; side by side in one run (Llama-3-8B shapes: 32 query heads,
8 KV heads, head dim 128, bf16).

    python benchmarks/decode_kernel.py --slots 8192 16384 32768 --batch 1 8 --context 32768 --budget 0.25 \
        --chunk 512 --obs 64

Bandwidth = bytes of kept K and V (valid slots) / kernel time; the reference is a device-to-device
copy of a 1 GiB tensor (read + write, counted once each). The time target compares the kernel over
``budget x context`` slots with ``F.scaled_dot_product_attention`` over the whole ``context``.
Needs CUDA (it says so and stops otherwise); prints a Markdown block for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F


def timed(fn, repeats: int = 50, graph: bool = True) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events, after warm-up). ``graph``: replayed from
    a CUDA graph, as a compiled decode step runs it (no host launch cost in the time)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (and Triton's compilation) off the capturing stream
        for _ in range(5):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.nbytes / timed(lambda: dst.copy_(src), 20, graph=False)


def case(B: int, N: int, H: int = 32, Hkv: int = 8, D: int = 128, dtype=torch.bfloat16):
    q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=dtype)
    valid = torch.ones(B, Hkv, N, dtype=torch.bool, device="cuda")
    pos = torch.arange(N, device="cuda").expand(B, Hkv, N).contiguous()
    return q, k, v, valid, pos, torch.full((B, 1), N, device="cuda")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk length for the scoring kernel")
    ap.add_argument("--obs", type=int, default=64, help="observed queries (SnapKV / AhaKV window)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_kernel.py needs a CUDA GPU (none here)")
    import triton

    from kvpass.kernels.decode_triton import decode_triton

    scale = 128**-0.5
    copy = copy_bandwidth()
    lines = [
        f"## Triton decode kernel -- {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
        f"{triton.__version__}",
        "",
        f"device copy bandwidth: {copy / 1e9:.0f} GB/s",
        "",
        "Times from CUDA graph replays (a compiled step's way); `eager µs` launches from Python.",
        "",
        "| batch | kept slots | kernel µs | eager µs | K+V GB/s | % of copy |",
        "|---|---|---|---|---|---|",
    ]
    for B in args.batch:
        for N in args.slots:
            q, k, v, valid, spos, pos = case(B, N)
            step = partial(decode_triton, q, k, v, valid, spos, pos, scale, 0, 0.0)
            t, eager = timed(step), timed(step, graph=False)
            bw = (k.nbytes + v.nbytes) / t
            lines.append(f"| {B} | {N} | {t * 1e6:.1f} | {eager * 1e6:.1f} | {bw / 1e9:.0f} | {100 * bw / copy:.0f} |")
    lines += [
        "",
        f"| batch | context | SDPA full µs | kernel at {args.budget:.0%} µs | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for B in args.batch:
        q, k, v, *_ = case(B, args.context)
        full = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
        kept = round(args.budget * args.context)
        q, k, v, valid, spos, pos = case(B, kept)
        t = timed(
            lambda q=q, k=k, v=v, valid=valid, spos=spos, pos=pos: decode_triton(
                q, k, v, valid, spos, pos, scale, 0, 0.0
            )
        )
        lines.append(
            f"| {B} | {args.context} | {full * 1e6:.1f} | {t * 1e6:.1f} | {t / full:.2f} | <= {1.1 * args.budget:.2f} |"
        )
    print("\n".join(lines), flush=True)
    print("\n".join(chunk_scoring(args.batch, args.slots, args.chunk, args.obs, scale)))


def chunk_scoring(batches, slots, T: int, obs: int, scale: float) -> list[str]:
    """The mass of a prefill chunk's last ``obs`` queries over ``N`` kept slots plus the chunk:
    the Triton kernel against the torch reference's way (mask, probability rows, column sums)."""
    from kvpass.kernels.attend import _probs, visible
    from kvpass.kernels.mass_triton import chunk_mass_triton

    def reference(q, k, slot_k, valid, spos, pos):
        mask = visible(valid, spos, pos, 0)[:, :, T - obs :]
        return _probs(q[:, :, T - obs :], (slot_k, k), mask, scale).sum(dim=(2, 3))

    lines = [
        "",
        "| batch | kept slots | chunk | observed | torch mass µs | kernel µs | speed-up | torch MiB | kernel MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for B in batches:
        for N in slots:
            _, k, v, valid, spos, _ = case(B, N)
            _, kc, vc, *_ = case(B, T)
            q = torch.randn(B, 32, T, 128, device="cuda", dtype=k.dtype)
            pos = torch.arange(N, N + T, device="cuda").expand(B, T).contiguous()
            ref, ref_mib = timed_peak(partial(reference, q, kc, k, valid, spos, pos))
            ker, ker_mib = timed_peak(partial(chunk_mass_triton, q, kc, vc, k, v, valid, spos, pos, scale, 0, 0.0, obs))
            lines.append(
                f"| {B} | {N} | {T} | {obs} | {ref * 1e6:.0f} | {ker * 1e6:.0f} | {ref / ker:.1f} | "
                f"{ref_mib:.0f} | {ker_mib:.0f} |"
            )
    return lines


def timed_peak(fn) -> tuple[float, float]:
    """Median seconds of ``fn()`` and the peak memory it allocates beyond what is live (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return timed(fn, 20), peak


if __name__ == "__main__":
    main()
