"""The GPU paths of common that the CPU tests cannot run, against the torch backend in float32
(compiled Triton, PyTorch's cuDNN and flash ops):

    PYTHONPATH=common/src python common/bench/check_gpu_paths.py [--out DIR]

* ``auto`` on a bf16 causal window (the band backend without cudnn-frontend), with the default
  ``BandConfig`` and with ``BandConfig(split=2, anti="flash")``, forward and backward;
* ``aten`` dense causal GQA and a two-sided window, forward and backward;
* the compiled Triton merges (``merge_partials_`` on CUDA fp32 accumulators, the band's fused
  merge) against their slow twins, with dead rows and NaN rows.

Relative errors against the torch backend on the same bf16 inputs must be <= 2e-2 (bf16's
tolerance in ``longattn.common.testing``); the merges must equal their twins (NaN rows at the
same places). Prints one row per case, writes ``DIR/check_gpu_paths.json``, exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch

from longattn.common import bench
from longattn.common import kernels as K
from longattn.common.kernels import BandConfig, band_backend
from longattn.common.merge import merge_partials_
from longattn.common.testing import TOLERANCES, oracle_errors, random_like, random_qkv

TOL = TOLERANCES[torch.bfloat16]
DEV = "cuda"


def _kernel_case(name, shape, causal, window, backend, config=None, want_backend=None):
    """``shape = (B, S, Hq, Hkv, D)``, Sq = Sk = S."""
    b, s, hq, hkv, d = shape
    q, k, v = random_qkv(b, s, s, hq, hkv, d, dtype=torch.bfloat16, seed=len(name), device=DEV)
    chosen = K.pick_backend(q, k, v, causal=causal, window_size=window, backend=backend,
                            config=config)
    out, lse = K.attention_forward(q, k, v, causal=causal, window_size=window, backend=backend,
                                   config=config)
    dout = random_like(out, seed=99)
    grads = K.attention_backward(dout, q, k, v, out, lse, causal=causal, window_size=window,
                                 backend=backend, config=config)
    q32, k32, v32, do32 = (t.float() for t in (q, k, v, dout))
    ro, rl = K.attention_forward(q32, k32, v32, causal=causal, window_size=window,
                                 backend="torch")
    rg = K.attention_backward(do32, q32, k32, v32, ro, rl, causal=causal, window_size=window,
                              backend="torch")
    errs = oracle_errors({"out": out, "lse": lse, "dq": grads[0], "dk": grads[1],
                          "dv": grads[2]},
                         {"out": ro, "lse": rl, "dq": rg[0], "dk": rg[1], "dv": rg[2]})
    ok = all(e <= TOL for e in errs.values()) and (want_backend in (None, chosen))
    return {"case": name, "backend": chosen, **errs, "ok": ok}


def _same_nan_and_close(a, b, tol):
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    keep = ~torch.isnan(a)
    return bool(torch.allclose(a[keep].float(), b[keep].float(), rtol=tol, atol=tol))


def _merge_case():
    g = torch.Generator(device=DEV).manual_seed(3)
    out = torch.randn(2, 64, 8, 128, device=DEV, generator=g)
    lse = torch.randn(2, 8, 64, device=DEV, generator=g) * 3
    ob = torch.randn(2, 64, 8, 128, device=DEV, generator=g).bfloat16()
    lb = torch.randn(2, 8, 64, device=DEV, generator=g) * 3
    lse[0, 1, 3] = float("-inf")
    out[0, 3, 1] = float("nan")  # a dead side's garbage: dropped
    lb[1, 2, 5] = float("-inf")
    lse[1, 4, 7] = float("nan")  # a NaN row: stays NaN
    lb[0, 5, 9] = float("nan")
    res = {}
    for backend in ("torch", "triton"):
        o, l_ = out.clone(), lse.clone()
        merge_partials_(o, l_, ob, lb, backend=backend)
        res[backend] = (o, l_)
    ok = (_same_nan_and_close(res["triton"][0], res["torch"][0], 1e-5)
          and _same_nan_and_close(res["triton"][1], res["torch"][1], 1e-5)
          and int(torch.isnan(res["triton"][1]).sum()) == 2)
    return {"case": "merge_partials_ triton vs torch (dead + NaN rows)", "backend": "triton",
            "ok": ok}


def _band_merge_case():
    g = torch.Generator(device=DEV).manual_seed(4)
    b, nc, c, h, dv = 2, 8, 128, 4, 128
    rnd = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    parts = [(rnd(b * nc, c, h, dv).bfloat16(), rnd(b * nc, h, c), 0, False)]
    for j, flip in ((1, False), (2, True)):
        lp = rnd(b * (nc - j), h, c)
        lp[0, 0, :5] = float("-inf")
        parts.append((rnd(b * (nc - j), c, h, dv).bfloat16(), lp, j, flip))
    parts[2][1][3, 1, 7] = float("nan")
    o_t, l_t = band_backend._merge_triton(parts, b, nc, c, h, dv, torch.bfloat16)
    o_r, l_r = band_backend._merge_torch(parts, b, nc, c, h, dv, torch.bfloat16)
    ok = (_same_nan_and_close(l_t, l_r, 1e-5) and _same_nan_and_close(o_t, o_r, 2e-2)
          and int(torch.isnan(l_t).sum()) == 1)
    return {"case": "band fused merge vs _merge_torch (dead + NaN rows)", "backend": "triton",
            "ok": ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"device: {bench.device_name(DEV)}  torch {torch.__version__}  backends "
          f"{sorted(K.BACKENDS)}  unavailable {sorted(K.UNAVAILABLE)}")
    window_backend = "cudnn" if "cudnn" in K.BACKENDS else "band"
    cases = [
        lambda: _kernel_case("auto causal window (1024, 0)", (1, 8192, 8, 2, 128), True,
                             (1024, 0), "auto", want_backend=window_backend),
        lambda: _kernel_case("band split=2 flash", (1, 8192, 8, 2, 128), True, (1024, 0),
                             "band", BandConfig(split=2, anti="flash")),
        lambda: _kernel_case("band merge=torch", (2, 4096, 4, 4, 64), True, (512, 0), "band",
                             BandConfig(merge="torch")),
        lambda: _kernel_case("aten dense causal GQA", (2, 2048, 8, 2, 128), True, (-1, -1),
                             "aten"),
        lambda: _kernel_case("aten window (64, 16)", (1, 2048, 4, 4, 64), False, (64, 16),
                             "aten"),
        _merge_case,
        _band_merge_case,
    ]
    rows = []
    for case in cases:
        try:
            rows.append(case())
        except Exception as e:  # noqa: BLE001 - report every case
            traceback.print_exc()
            rows.append({"case": getattr(case, "__name__", "case"), "error": str(e)[:300],
                         "ok": False})
    print(bench.format_table(rows, ["case", "backend", "out", "lse", "dq", "dk", "dv", "ok"]))
    bad = sum(not r["ok"] for r in rows)
    print(f"GPU paths: {len(rows) - bad}/{len(rows)} pass (tolerance {TOL} against the torch "
          "backend in float32)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check_gpu_paths.json"), "w") as f:
            json.dump({"device": bench.device_name(DEV), "torch": torch.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                       "rows": rows, "bad": bad}, f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
