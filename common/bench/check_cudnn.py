"""The ``cudnn`` kernel backend (cuDNN graphs through cudnn-frontend) against the float64
oracle on the GPU, forward and backward, on every request shape it serves.

    PYTHONPATH=common/src:reference/src python common/bench/check_cudnn.py [--out DIR] [--time]

Cases: dense, causal (Sq == Sk and bottom-right Sq < Sk; Sq > Sk, whose first rows see no key,
is refused by ``supports`` and goes to the next backend), sliding
windows (causal and two-sided, Sq != Sk), GQA, head dims 64 / 128, and strided (non-contiguous)
views as inputs. bf16 inputs; relative errors to the oracle must be <= 2e-2 (the kernels'
bf16 tolerance in ``longattn.common.testing``). Prints one row per case (and writes them to
``DIR/check_cudnn.json``); exits 1 on a miss.

``--time`` then times the backward of bottom-right causal calls (``Sq < Sk``) as the backend
runs it (two graphs: the keys before the diagonal block unmasked, the block top-left) against
one bottom-right graph (``cudnn_backend.backward_single``), alternated, at the shapes of the
hamilton all-gather's calls (8 ranks x 8,192 tokens: 4,096 queries against 8,192..36,864
keys; H = 32 / 8, D = 128, bf16), also into the JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

from longattn.common.kernels import attention_backward, attention_forward
from longattn.common.testing import rel_error
from longattn.reference import attention, window_mask
from longattn.reference import attention_backward as ref_backward

TOL = 2e-2
# (name, B, Sq, Sk, Hq, Hkv, D, causal, window, strided)
CASES = [
    ("dense GQA", 2, 777, 777, 8, 2, 64, False, (-1, -1), False),
    ("causal", 1, 1000, 1000, 4, 4, 128, True, (-1, -1), False),
    ("causal Sq<Sk", 1, 300, 1000, 4, 2, 128, True, (-1, -1), False),
    ("causal Sq<Sk B=2 GQA", 2, 512, 1536, 8, 2, 64, True, (-1, -1), False),
    ("causal Sq=Sk-1", 1, 640, 641, 4, 4, 128, True, (-1, -1), False),
    ("strided causal Sq<Sk", 1, 400, 900, 4, 2, 64, True, (-1, -1), True),
    ("window (100,0)", 1, 1000, 1000, 4, 1, 128, True, (100, 0), False),
    ("window (64,16)", 2, 513, 513, 4, 4, 64, False, (64, 16), False),
    ("window (200,0) Sq<Sk", 1, 200, 900, 4, 2, 128, True, (200, 0), False),
    ("window (1,0)", 1, 256, 256, 2, 2, 64, True, (1, 0), False),
    ("strided views", 1, 600, 600, 4, 2, 64, True, (-1, -1), True),
    ("strided window", 1, 600, 600, 4, 2, 64, True, (50, 0), True),
]


def run_case(name, b, sq, sk, hq, hkv, d, causal, window, strided, dev="cuda"):
    g = torch.Generator().manual_seed(hash(name) % 2**31)

    def make(s, h):
        if strided:  # every other row of a longer tensor: seq stride 2*H*D
            return torch.randn(b, 2 * s, h, d, generator=g).to(dev, torch.bfloat16)[:, ::2]
        return torch.randn(b, s, h, d, generator=g).to(dev, torch.bfloat16)

    q, k, v, do = make(sq, hq), make(sk, hkv), make(sk, hkv), make(sq, hq)
    win = (window[0], 0 if window[1] < 0 else min(window[1], 0)) if causal else window
    out, lse = attention_forward(q, k, v, causal=causal, window_size=window, backend="cudnn")
    dq, dk, dv = attention_backward(do, q, k, v, out, lse, causal=causal, window_size=window,
                                    backend="cudnn")
    mask = window_mask(sq, sk, win)
    c = lambda t: t.double().cpu().numpy()  # noqa: E731
    ro, rl = attention(c(q), c(k), c(v), mask=mask)
    rg = ref_backward(c(do), c(q), c(k), c(v), mask=mask)
    # rel_error: -inf must match -inf exactly (rows that see no key), NaN never passes
    errs = {"out": rel_error(out, ro), "lse": rel_error(lse, rl),
            "dq": rel_error(dq, rg[0]), "dk": rel_error(dk, rg[1]), "dv": rel_error(dv, rg[2])}
    return errs, True


def time_split(sq=4096, sks=(8192, 16384, 36864), hq=32, hkv=8, d=128):
    """Rows of the split backward's and the one graph's medians (ms) per key length."""
    from longattn.common import bench
    from longattn.common.kernels import cudnn_backend as cb

    rows = []
    print(f"\nbottom-right causal backward, Sq={sq}, H={hq}/{hkv}, D={d}, bf16: ms")
    print(f"{'Sk':>7s} {'split':>9s} {'one graph':>10s} {'one/split':>10s} {'dq rel':>9s}")
    for sk in sks:
        g = torch.Generator(device="cuda").manual_seed(sk)
        q, do = (torch.randn(1, sq, hq, d, device="cuda", generator=g, dtype=torch.bfloat16)
                 for _ in range(2))
        k, v = (torch.randn(1, sk, hkv, d, device="cuda", generator=g, dtype=torch.bfloat16)
                for _ in range(2))
        out, lse = attention_forward(q, k, v, causal=True, backend="cudnn")
        kw = {"softmax_scale": d ** -0.5, "window_size": (-1, 0)}
        a = cb.backward(do, q, k, v, out, lse, **kw)
        b = cb.backward_single(do, q, k, v, out, lse, **kw)
        diff = max(rel_error(x, y.double().cpu().numpy()) for x, y in zip(a, b))
        ops = (do, q, k, v, out, lse)
        t = bench.time_interleaved({
            "split": functools.partial(cb.backward, *ops, **kw),
            "one": functools.partial(cb.backward_single, *ops, **kw)}, device="cuda")
        print(f"{sk:7d} {t['split']:9.3f} {t['one']:10.3f} {t['one'] / t['split']:10.3f} "
              f"{diff:9.2e}")
        rows.append({"sq": sq, "sk": sk, "split_ms": t["split"], "one_graph_ms": t["one"],
                     "max_rel_diff": diff, "device": torch.cuda.get_device_name()})
    return rows


def main():
    import longattn.common.kernels as K

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--time", action="store_true",
                    help="time the split bottom-right backward against one graph")
    args = ap.parse_args()
    rows = []
    if "cudnn" not in K.BACKENDS:
        print("cudnn backend not registered (is nvidia-cudnn-frontend installed?)")
        return 1
    bad = 0
    print(f"{'case':28s} {'out':>9s} {'lse':>9s} {'dq':>9s} {'dk':>9s} {'dv':>9s}  ok")
    for case in CASES:
        try:
            errs, clean = run_case(*case)
            ok = clean and all(e <= TOL for e in errs.values())
            print(f"{case[0]:28s} " + " ".join(f"{errs[n]:9.2e}" for n in
                                               ("out", "lse", "dq", "dk", "dv")) + f"  {ok}")
            rows.append({"case": case[0], **errs, "ok": ok})
        except Exception as e:  # noqa: BLE001 - report every case
            ok = False
            print(f"{case[0]:28s} error: {type(e).__name__}: {str(e)[:200]}")
            rows.append({"case": case[0], "error": str(e)[:200], "ok": False})
        bad += not ok
    x = torch.zeros(1, 500, 4, 64, device="cuda", dtype=torch.bfloat16)
    refused = K.BACKENDS["cudnn"].supports(K.Request(x, x[:, :100], x[:, :100], True, (-1, 0)))
    print(f"causal Sq=500 > Sk=100 refused: {refused!r}; auto picks "
          f"{K.pick_backend(x, x[:, :100], x[:, :100], causal=True)!r}")
    bad += refused is None
    print(f"cudnn backend: {len(CASES) - bad}/{len(CASES)} cases within {TOL}")
    timed = time_split() if args.time else []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check_cudnn.json"), "w") as f:
            json.dump({"rows": rows, "sq_gt_sk_refused": refused, "bad": bad,
                       "split_timing": timed}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
