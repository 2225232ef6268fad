"""common.kernels on one GPU: correctness of the aten backend against the float64 oracle, and
its speed against calling cuDNN SDPA directly, in one run.

    PYTHONPATH=common/src:reference/src python common/bench/bench_kernels.py [--smoke] [--out D]

Target: at S=32768, H=32, D=128, bf16, causal, the forward and forward+backward of
attention_forward / attention_backward within 5% of F.scaled_dot_product_attention with the
cuDNN backend, timed in the same run (the two alternated).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.nn.functional as F

from longattn.common import bench
from longattn.common.kernels import attention_backward, attention_forward, pick_backend
from longattn.common.testing import rel_error


def oracle_cases(device, dtype):
    """(name, q, k, v, causal, window) small cases covering every aten code path."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    return [
        ("dense", r(2, 257, 4, 64), r(2, 257, 4, 64), r(2, 257, 4, 64), False, (-1, -1)),
        ("causal", r(2, 257, 4, 128), r(2, 257, 4, 128), r(2, 257, 4, 128), True, (-1, -1)),
        ("causal GQA 4:1", r(1, 200, 8, 64), r(1, 200, 2, 64), r(1, 200, 2, 64), True, (-1, -1)),
        ("causal Sq<Sk", r(1, 64, 4, 64), r(1, 300, 4, 64), r(1, 300, 4, 64), True, (-1, -1)),
        ("window (31,0)", r(1, 300, 4, 64), r(1, 300, 4, 64), r(1, 300, 4, 64), True, (31, -1)),
        ("window (16,16)", r(1, 300, 4, 64), r(1, 300, 4, 64), r(1, 300, 4, 64), False, (16, 16)),
        ("causal Sq>Sk (empty rows)", r(1, 300, 4, 64), r(1, 100, 4, 64), r(1, 100, 4, 64), True,
         (-1, -1)),
    ]


def check_oracle(device):
    from longattn.reference import attention as ref_attn
    from longattn.reference import attention_backward as ref_bwd
    from longattn.reference import causal_mask, window_mask

    rows = []
    for name, q, k, v, causal, window in oracle_cases(device, torch.bfloat16):
        try:
            sq, sk = q.shape[1], k.shape[1]
            m = window_mask(sq, sk, window)
            if causal:
                m = m & causal_mask(sq, sk)
            qn, kn, vn = (t.float().cpu().numpy() for t in (q, k, v))
            do = torch.randn_like(q)
            o_ref, l_ref = ref_attn(qn, kn, vn, mask=m)
            g_ref = ref_bwd(do.float().cpu().numpy(), qn, kn, vn, mask=m)
            be = pick_backend(q, k, v, causal=causal, window_size=window)
            out, lse = attention_forward(q, k, v, causal=causal, window_size=window)
            grads = attention_backward(do, q, k, v, out, lse, causal=causal, window_size=window)
            errs = [rel_error(out, o_ref), rel_error(lse, l_ref)] + [
                rel_error(a, b) for a, b in zip(grads, g_ref)]
            rows.append({"case": name, "backend": be, "out": errs[0], "lse": errs[1],
                         "dq": errs[2], "dk": errs[3], "dv": errs[4],
                         "ok": all(e <= 2e-2 for e in errs)})
        except Exception as e:  # noqa: BLE001 - report and continue
            traceback.print_exc()
            rows.append({"case": name, "backend": "error", "out": str(e)[:60], "ok": False})
    return rows


def speed(device, s, h, d, causal, dtype=torch.bfloat16):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, s, h, d, device=device, dtype=dtype, generator=g)
               for _ in range(3))
    do = torch.randn_like(q)
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2)

    def sdpa_f():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def sdpa_fb():
        o = sdpa_f()
        torch.autograd.grad(o, (qt, kt, vt), dot)

    def ours_f():
        return attention_forward(q, k, v, causal=causal, backend="aten")

    def ours_fb():
        o, l = attention_forward(q, k, v, causal=causal, backend="aten")
        attention_backward(do, q, k, v, o, l, causal=causal, backend="aten")

    from longattn.common.topology import attention_flops

    ff = attention_flops(1, s, s, h, d, causal=causal)
    fb = attention_flops(1, s, s, h, d, causal=causal, backward=True)
    fns = {"cudnn sdpa fwd": sdpa_f, "longattn aten fwd": ours_f,
           "cudnn sdpa fwd+bwd": sdpa_fb, "longattn aten fwd+bwd": ours_fb}
    t = bench.time_interleaved(fns, device=device, rounds=3)
    res = [bench.result("common.kernels" if "longattn" in name else "sdpa", name,
                        median_ms=t[name], flops=fb if "bwd" in name else ff, device=device,
                        dtype=dtype, shape={"B": 1, "S": s, "H": h, "D": d, "causal": causal},
                        spread=t[name + " spread"])
           for name in fns]
    ratio_f = t["cudnn sdpa fwd"] / t["longattn aten fwd"]
    ratio_fb = t["cudnn sdpa fwd+bwd"] / t["longattn aten fwd+bwd"]
    return res, ratio_f, ratio_fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the oracle check only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = bench.out_dir(os.path.join(os.path.dirname(__file__), "results"), args.out)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    print(f"device: {bench.device_name(device)}  torch {torch.__version__}")
    rows = check_oracle(device)
    print(bench.format_table(rows))
    results = []
    if device == "cuda":
        for s, causal in ((32768, True), (32768, False), (8192, True)):
            try:
                res, rf, rfb = speed(device, s, 32, 128, causal)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                continue
            results += res
            print(bench.format_table(
                [{"what": r["what"], "S": s, "causal": causal, "ms": r["median_ms"],
                  "TFLOP/s": r["tflops"]} for r in res]))
            print(f"S={s} causal={causal}: speed vs direct cuDNN: fwd {rf:.3f}x, "
                  f"fwd+bwd {rfb:.3f}x  (target >= 0.95)")
    bench.write_results(results, os.path.join(out, "bench_kernels.json"))
    with open(os.path.join(out, "bench_kernels_oracle.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    ok = all(r["ok"] for r in rows)
    print("oracle check:", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
