"""Compile the hyper Triton kernels for a Hopper GPU without one, and report their resources.

    PYTHONPATH=common/src:hyper/src python hyper/bench/compile_sm90.py [--dtype bf16|fp16|fp32]

Uses triton's own compiler and the ``ptxas`` / ``cuobjdump`` shipped in its wheel, so it runs
on a CPU-only machine. For every kernel and autotuning config it prints the shared memory,
registers and spill stack (``STACK``) of the sm_90 cubin, with the specialisation the runtime
applies (pointers and strides divisible by 16: contiguous BSHD with head_dim 64). A developer
tool: it catches compile errors the interpreter cannot, and register spills. It leans on
triton internals (``ASTSource``, ``GPUTarget``) that move between versions.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from longattn.common.bench import compile_sm90  # noqa: E402
from longattn.hyper import lsh_triton  # noqa: E402
from longattn.hyper import triton_kernels as tk  # noqa: E402

FP32_PTRS = ("L", "DELTA", "DQ", "DKA", "DVA", "DKS", "DVS", "PLW", "DLSE")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
I32_PTRS = ("PQ", "PK", "SAMP", "TP", "TI", "PQ0", "PNQ", "PK0", "PNK")


def _signature(fn, consts, dtype):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in I32_PTRS:
            sig[name] = "*i32"
        elif name == "R":  # LSH ranks: uint8 for r <= 8 projections
            sig[name] = "*u8"
        elif name in ("Q", "K", "V", "DO", "O", "X", "W"):  # O: the input dtype (bf16 / fp16)
            sig[name] = "*" + dtype
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        stride = name[:1] == "s" and name[-1:] in "bsh" and len(name) == 3
        if sig[name].startswith("*") or stride:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kernel(kern, consts, dtype, num_warps, num_stages):
    fn = kern.fn if hasattr(kern, "configs") else kern
    sig, attrs = _signature(fn, consts, dtype)
    return compile_sm90(fn, sig, consts, attrs, num_warps=num_warps, num_stages=num_stages)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args(argv)
    d = args.head_dim
    prec = "tf32x3" if args.dtype == "fp32" else "tf32"
    failures = 0
    for smooth in (False, True):
        base = dict(SMOOTH=smooth, BLOCK_M=128, BLOCK_N=64, BLOCK_D=d, BLOCK_DV=d, PREC=prec,
                    EVEN_D=True, EVEN_DV=True, IDX64=False, UNIFORM=not smooth)
        for name, kern, extra in (("fwd", tk._fwd, dict(HAS_INIT=True)),
                                  ("bwd_dq", tk._bwd_dq, {}),
                                  ("bwd_dkdv", tk._bwd_dkdv, {}),
                                  ("bwd_samples", tk._bwd_samples, {})):
            for cfg in kern.configs:
                consts = {**base, **extra, **cfg.kwargs}
                try:
                    shared, res = compile_kernel(kern, consts, args.dtype, cfg.num_warps,
                                                 cfg.num_stages)
                    print(f"{name:<12} smooth={smooth!s:<5} inner={cfg.kwargs['BLOCK_INNER']:<4}"
                          f" warps={cfg.num_warps} stages={cfg.num_stages}  shared={shared:>6}"
                          f"  {res}", flush=True)
                except Exception as e:  # noqa: BLE001 - report every failing config
                    failures += 1
                    print(f"{name} smooth={smooth} {cfg}: FAILED {type(e).__name__}: {e}")
    shared, res = compile_kernel(tk._delta, dict(HAS_DLSE=True, BLOCK_M=64, BLOCK_DV=d,
                                                 EVEN_DV=True, IDX64=False),
                                 args.dtype, 4, 1)
    print(f"delta        shared={shared} {res}")
    prec_lsh = "ieee" if args.dtype == "fp32" else "tf32"
    rows = lsh_triton.block_s(getattr(torch, DTYPES[args.dtype]))
    shared, res = compile_kernel(lsh_triton._lsh_rank,
                                 dict(BLOCK_S=rows, BLOCK_D=d, BLOCK_R=16, EVEN_D=True,
                                      PREC=prec_lsh), args.dtype, 4, 1)
    print(f"lsh_rank     shared={shared} {res}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
