"""What torch's cuDNN varlen op does, before ``common.kernels.varlen`` uses it (GPU probe).

    PYTHONPATH=common/src:reference/src python common/bench/check_cudnn_varlen.py [--out DIR]

hamilton's packed step (``hamilton/bench/bench_packed.py``) runs at 0.55-0.81 of one cuDNN
varlen call over all documents / 8 with the flash varlen op per step. Whether the cuDNN op can
serve the steps instead depends on what this script measures, on packed documents (THD, bf16,
GQA) whose query and key lengths differ per document as in a step (a rank's queries against a
slot of another rank's rows):

* the output against the float64 oracle with the document mask, causal aligned bottom-right
  (flash-attn's rule, what the steps need) and top-left: which one the op follows;
* the layout of its ``logsumexp`` (printed shape) and its values against the oracle's lse,
  when that layout is ``[H, T]`` or ``[T, H]``;
* ``aten._cudnn_attention_backward`` against the oracle's gradients;
* the time of one call next to the flash varlen op's, for each case.

Prints one row per case and writes ``DIR/check_cudnn_varlen.json``; exits 1 when the op is
missing or a case misses the bf16 tolerance under both alignments. On a machine without CUDA it
says so and exits 0 (nothing to probe).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

from longattn.common.bench import cu_seqlens

TOL = 2e-2
# (name, q lengths per document, k lengths per document, Hq, Hkv, D, causal)
CASES = [
    ("Sq == Sk, causal", [512, 1024, 1, 300], [512, 1024, 1, 300], 8, 2, 128, True),
    ("Sq < Sk, causal", [128, 512, 7, 64], [512, 1024, 7, 300], 8, 2, 128, True),
    ("Sq < Sk, full", [128, 512, 7, 64], [512, 1024, 7, 300], 8, 8, 64, False),
    ("many short", [64] * 32, [128] * 32, 8, 2, 128, True),
]


def _oracle(q, k, v, dout, lq, lk, causal, bottom_right):
    from longattn.reference import document_mask

    cq, ck = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    if causal and not bottom_right:  # top-left: query i of a document sees keys j <= i
        mask = np.zeros((cq[-1], ck[-1]), dtype=bool)
        for a, b, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
            i, j = np.arange(b - a)[:, None], np.arange(d - c)[None, :]
            mask[a:b, c:d] = j <= i
    else:
        mask = document_mask(cq, ck, causal=causal)
    return _dense64(q, k, v, dout, mask, q.shape[-1] ** -0.5)


def _dense64(q, k, v, dout, mask, scale):
    """float64 attention with the oracle's mask, and its gradients, on q's device
    (:func:`longattn.common.testing.dense_reference64`), as numpy arrays: the oracle's numpy
    functions took 50 s a case on the device machine's CPU, and the probe's time limit cut the
    run (common/bench/results/h200/check_cudnn_varlen_log.txt)."""
    from longattn.common.testing import dense_reference64

    out, lse, grads = dense_reference64(q, k, v, dout, mask, scale)
    return out.cpu().numpy(), lse.cpu().numpy(), [t.cpu().numpy() for t in grads]


def _time(fn, reps=20):
    from longattn.common.bench import time_fn

    return time_fn(fn, device="cuda", rep=reps)


def probe(name, lq, lk, hq, hkv, d, causal, device):
    from longattn.common.testing import rel_error

    g = torch.Generator(device=device).manual_seed(0)
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq, hq, d, generator=g, device=device).bfloat16()
    k, v = (torch.randn(tk, hkv, d, generator=g, device=device).bfloat16() for _ in range(2))
    dout = torch.randn(tq, hq, d, generator=g, device=device).bfloat16()
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    mq, mk, scale = max(lq), max(lk), d ** -0.5
    row = {"case": name, "Tq": tq, "Tk": tk, "docs": len(lq), "H": f"{hq}/{hkv}", "D": d,
           "causal": causal}
    k0, v0 = k, v  # the oracle's K/V (Hkv heads)
    kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))  # in case GQA is refused
    try:
        res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cq, ck, mq, mk, True, 0.0,
                                                      causal, False, scale=scale)
        row["gqa"] = "native"
    except RuntimeError as e:
        row["gqa"] = f"refused ({str(e).splitlines()[0][:80]}); K/V repeated"
        k, v = kk, vv
        res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cq, ck, mq, mk, True, 0.0,
                                                      causal, False, scale=scale)
    out, lse = res[0], res[1]
    row["lse shape"] = str(tuple(lse.shape))
    best = None
    for align in ("bottom-right", "top-left"):
        ro, rl, rg = _oracle(q, k0, v0, dout, lq, lk, causal, align == "bottom-right")
        err = rel_error(out.double().cpu().numpy(), ro)
        row[f"out err ({align})"] = err
        if best is None or err < best[0]:
            best = (err, align, rl, rg)
        if not causal:
            break
    err, align, rl, rg = best
    row["follows"] = align if causal else "n/a"
    lse_d = lse.double().cpu().numpy()
    for name_, arr in (("[H, T]", lse_d.reshape(hq, -1)[:, :tq]),
                       ("[T, H]", lse_d.reshape(-1, hq)[:tq].T)):
        if arr.size == rl.size:
            row[f"lse err {name_}"] = rel_error(arr, rl)
    try:
        # by keyword: torch's own callers pass the arguments in two different orders
        # (seed and offset before or after the lengths); the names are the schema's
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad_out=dout, query=q, key=k, value=v, out=out, logsumexp=lse, philox_seed=res[6],
            philox_offset=res[7], attn_bias=None, cum_seq_q=cq, cum_seq_k=ck, max_q=mq,
            max_k=mk, dropout_p=0.0, is_causal=causal, scale=scale)
        for n, got, ref in (("dq", dq, rg[0]), ("dk", dk, rg[1]), ("dv", dv, rg[2])):
            if got.shape[1] != ref.shape[1]:  # repeated K/V: fold the query-head groups back
                got = got.unflatten(1, (hkv, -1)).sum(2)
            row[f"{n} err"] = rel_error(got.double().cpu().numpy(), ref)
    except Exception as e:  # noqa: BLE001 - the forward's findings still count
        row["backward"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["cudnn ms"] = _time(lambda: torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cq, ck, mq, mk, True, 0.0, causal, False, scale=scale))
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        row["flash ms"] = _time(lambda: torch.ops.aten._flash_attention_forward(
            q, kk, vv, cq, ck, mq, mk, 0.0, causal, False, scale=scale))
    row["ok"] = bool(err <= TOL and "backward" not in row
                     and all(row[f"{n} err"] <= TOL for n in ("dq", "dk", "dv")))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default $OUT or bench_out)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_cudnn_varlen: no CUDA device here; nothing to probe")
        return 0
    if not hasattr(torch.ops.aten, "_cudnn_attention_forward"):
        print("check_cudnn_varlen: this torch has no aten._cudnn_attention_forward")
        return 1
    from longattn.common.bench import format_table

    rows = []
    for case in CASES:
        t0 = time.perf_counter()
        try:
            rows.append(probe(*case, device=torch.device("cuda")))
        except Exception as e:  # noqa: BLE001 - one failed case is a row, the rest still run
            where = traceback.extract_tb(e.__traceback__)[-1]  # the line, for the next run
            rows.append({"case": case[0], "ok": False, "error": f"{type(e).__name__}: {e}"[:200],
                         "at": f"{os.path.basename(where.filename)}:{where.lineno} {where.line}"})
        # each row as it comes: a run cut short by its time limit still shows what it found
        print(f"{case[0]} ({time.perf_counter() - t0:.1f} s): {rows[-1]}", flush=True)
    print(format_table(rows, width=100))
    out = a.out or os.environ.get("OUT") or "bench_out"
    os.makedirs(out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(os.path.join(out, "check_cudnn_varlen.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
