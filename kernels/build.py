"""Build kvpass's Triton kernels for NVIDIA GPUs on a machine without one: Triton's own compiler
down to PTX, then ``ptxas -v`` (the one Triton ships and uses) for the machine code's registers, spills and
shared memory. A kernel that does not compile for a GPU, or that spills, is found here before a
user's GPU finds it; the launch settings in the kernels' wrappers are the ones built.

    python -m kvpass.kernels.build            # a table: kernel, architecture, configuration, resources
    python -m kvpass.kernels.build --json     # one JSON object per build

Run without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ARCHS = (80, 90)  # A100, H100
FP32_SCRATCH = {"M", "L", "M2", "L2", "LAM", "ACC", "LOGITS", "VNORM", "LSE", "MUL", "MASS"}
INT8 = {"VALID", "KEEP"}
INT64 = {"SPOS", "QPOS", "CPOS"}
FLOATS = {"scale", "softcap"}
SIZES = {"N", "NA", "C", "T", "R", "OBS"}  # upper-case names that are numbers, not pointers


@dataclass
class Build:
    kernel: str
    arch: int
    config: dict
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int

    def row(self) -> str:
        knobs = " ".join(f"{k}={v}" for k, v in self.config.items())
        return (
            f"{self.kernel:<10} sm_{self.arch}  regs {self.registers:>3}  spills {self.spill_stores:>4}/"
            f"{self.spill_loads:<4} smem {self.shared:>6}  {knobs}"
        )


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton types for ``fn``'s arguments by kvpass's naming: upper case = pointer (inputs in
    ``dtype``; masks int8; positions int64; scratch and results fp32), ``scale``/``softcap`` fp32,
    other lower case int32."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.isupper() and name not in SIZES:
            kind = "fp32" if name in FP32_SCRATCH else "i8" if name in INT8 else "i64" if name in INT64 else dtype
            types[name] = "*" + kind
        else:
            types[name] = "fp32" if name in FLOATS else "i32"
    return types


def build(fn, arch: int, dtype: str, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> Build:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn, signature(fn, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for ``arch``

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run(
            [ptxas, "-v", f"-arch={arch_flag}", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, out)
        return int(found.group(1)) if found else 0

    config = dict(dtype=dtype, warps=num_warps, **{k: v for k, v in constexprs.items()})
    return Build(
        fn.__name__,
        arch,
        config,
        number(r"Used (\d+) registers"),
        number(r"(\d+) bytes spill stores"),
        number(r"(\d+) bytes spill loads"),
        compiled.metadata.shared,
    )


def plan(quick: bool = False):
    """The builds, with the launch settings the wrappers use: every kernel with its options off
    across head dims, GQA groups and dtypes, then with every option on (``quick``: the latter only)."""
    from . import decode_triton as dt
    from . import mass_triton as mt

    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}
    cases = [(128, 4, "bf16", True)]
    if not quick:
        cases = [(64, 4, "bf16", False), (128, 4, "bf16", False), (256, 4, "bf16", False), (128, 1, "fp16", False),
                 (128, 8, "fp32", False), *cases]  # fmt: skip
    for D, G, dtype, on in cases:
        decode, mass = dt.launch(D, itemsize[dtype]), mt.launch(D, itemsize[dtype])
        shapes = dict(G=G, G_PAD=max(16, 1 << (G - 1).bit_length()), D=D, BLOCK_N=decode["BLOCK_N"])
        options = dict(WINDOW=on, RAW=on, NORMS=on)
        yield dt._partial, dtype, {**shapes, **options, "NEW": on, "SOFTCAP": on, "UPCAST": False}, decode["num_warps"]
        yield dt._merge, dtype, {**shapes, **options, "NEW": on}, decode["merge_warps"]
        shapes = dict(G=G, D=D, BLOCK_M=mass["BLOCK_M"], BLOCK_N=mass["BLOCK_N"], KEEPING=on, SOFTCAP=on, UPCAST=False)
        yield mt._rows, dtype, {**shapes, "RAW": on}, mass["num_warps"]
        for slots in (True, False):
            yield mt._columns, dtype, {**shapes, "SLOTS": slots, "NORMS": on}, mass["num_warps"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per build")
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--quick", action="store_true", help="only the builds with every option on")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kvpass.kernels.build compiles for a GPU: run it without TRITON_INTERPRET=1")
    for (fn, dtype, constexprs, warps), arch in itertools.product(list(plan(args.quick)), args.arch):
        b = build(fn, arch, dtype, constexprs, num_warps=warps)
        print(json.dumps(b.__dict__) if args.json else b.row(), flush=True)


if __name__ == "__main__":
    main()
