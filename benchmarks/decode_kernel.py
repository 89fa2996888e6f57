"""The Triton decode kernel on a CUDA GPU: achieved bandwidth against the device's copy bandwidth,
and time against full-cache SDPA, side by side in one run (Llama-3-8B shapes: 32 query heads,
8 KV heads, head dim 128, bf16).

    python benchmarks/decode_kernel.py --slots 8192 16384 32768 --batch 1 8 --context 32768 --budget 0.25

Bandwidth = bytes of kept K and V (valid slots) / kernel time; the reference is a device-to-device
copy of a 1 GiB tensor (read + write, counted once each). The time target compares the kernel over
``budget x context`` slots with ``F.scaled_dot_product_attention`` over the whole ``context``.
Needs CUDA (it says so and stops otherwise); prints a Markdown block for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def timed(fn, repeats: int = 50) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events, after warm-up)."""
    for _ in range(5):
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
    return 2 * src.nbytes / timed(lambda: dst.copy_(src), 20)


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
        "| batch | kept slots | kernel µs | K+V GB/s | % of copy |",
        "|---|---|---|---|---|",
    ]
    for B in args.batch:
        for N in args.slots:
            q, k, v, valid, spos, pos = case(B, N)
            t = timed(
                lambda q=q, k=k, v=v, valid=valid, spos=spos, pos=pos: decode_triton(
                    q, k, v, valid, spos, pos, scale, 0, 0.0
                )
            )
            bw = (k.nbytes + v.nbytes) / t
            lines.append(f"| {B} | {N} | {t * 1e6:.1f} | {bw / 1e9:.0f} | {100 * bw / copy:.0f} |")
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
    print("\n".join(lines))


if __name__ == "__main__":
    main()
