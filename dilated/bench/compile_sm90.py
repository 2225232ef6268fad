"""Compile the fused dilated-attention kernels for a Hopper GPU without one; report resources.

    python dilated/bench/compile_sm90.py [--dtype bf16|fp16|fp32] [--head-dim 64]

Uses triton's own compiler and the ``ptxas`` / ``cuobjdump`` of its wheel (runs on a CPU-only
machine), for the default launch of :class:`longattn.dilated.FusedConfig` and a few alternatives:
shared memory, registers and spill stack of each sm_90 cubin. A developer tool that catches
compile errors the interpreter cannot; it leans on triton internals (``ASTSource``,
``GPUTarget``) that move between versions.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

from longattn.common.bench import compile_sm90  # noqa: E402
from longattn.dilated import FusedConfig, fused  # noqa: E402


def _compile(kern, dtype, consts, num_warps):
    ptrs = {"HT": "*i64", "LSE": "*fp32", "LREF": "*fp32", "OREF": "*" + dtype,
            "GREF": "*" + dtype, "OUT": "*" + dtype}
    sig, attrs = {}, {}
    for i, name in enumerate(kern.arg_names):
        sig[name] = "constexpr" if name in consts else ptrs.get(name, "i32")
        if sig[name].startswith("*") or name in ("L", "D", "DV"):  # runtime: divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    return compile_sm90(kern, sig, consts, attrs, num_warps=num_warps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args(argv)
    bd = triton.next_power_of_2(args.head_dim)
    d0 = FusedConfig()
    default = (d0.rows, d0.chunk, d0.num_warps)
    for rows, chunk, warps in dict.fromkeys((default, (128, 16, 4), (64, 32, 4), (128, 32, 8),
                                             (128, 8, 4))):
        for name, kern in (("merge", fused._merge_kernel), ("sum", fused._sum_kernel)):
            consts = dict(ALIGN=16 // {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype],
                          BLOCK_T=rows, BLOCK_D=bd, CHUNK=min(chunk, bd), NGROUPS=5, FAST=True)
            shared, res = _compile(kern, args.dtype, consts, warps)
            print(f"{name:<6} rows={rows:<4} chunk={chunk:<3} warps={warps}  shared={shared:>6}"
                  f"  {res}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
