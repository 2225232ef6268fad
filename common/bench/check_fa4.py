"""FlashAttention-4 as the ``fa4`` backend on one GPU: does it load, is it right, and is it
faster than cuDNN for the shapes longattn uses. Made for one call of the device machine.

    bash common/bench/run_gpu.sh fa4            (with FA4 installed by fa4_wheels.sh install)
    PYTHONPATH=common/src:reference/src python common/bench/check_fa4.py --out DIR
    PYTHONPATH=common/src:reference/src python common/bench/check_fa4.py --smoke --out DIR

1. **Environment**: python, torch and its CUDA, the GPU and its compute capability, whether
   ``flash_attn.cute`` imports (and how long that takes), the versions of flash-attn-4,
   nvidia-cutlass-dsl and its libraries, quack-kernels, apache-tvm-ffi, cuda-bindings and
   nvidia-cudnn-frontend.
2. **Correctness**: bf16 inputs against a float64 reference of the same inputs
   (:func:`longattn.common.testing.dense_reference64`, the oracle's computation in torch),
   forward and backward, through ``attention_forward`` / ``attention_backward`` and the varlen
   entry points with ``backend="fa4"``: dense, causal, GQA, Sq < Sk, Sq > Sk (rows without
   keys), windows, ``dlse``, head dims 64 and 128, packed documents (Sq != Sk per document, a
   document without keys, sinks), the NaN rule, and ``out=`` / ``dq_out=`` slots FA4
   writes in place. Relative errors of out, lse, dq, dk, dv;
   PASS within 2e-2. Each case's first call (FA4 compiles its kernels then) is timed.
3. **Speed**: fa4 against ``cudnn`` (cudnn-frontend graphs; the ragged graphs for varlen) and
   FlashAttention-2 as torch has it (``aten._flash_attention_forward`` / backward, directly for
   dense shapes, through the ``aten`` backend for windows and varlen), forward and
   forward+backward, alternated in one run (:func:`longattn.common.bench.time_interleaved`)
   at: dense causal S 32768 H 32 D 128 bf16; dense causal S 32768 H 12 D 64 (dilated's
   baseline); causal segments [512, 2048, 12, 64] (dilated's heaviest branch); sliding window
   S 131072 W 4096 H 32 D 128 (ring_swa); packed causal documents of 1k-32k tokens, 262144 in
   all, H 32 D 128 (hamilton's packed steps). Every contender is called once before timing:
   that first call (FA4's JIT compilation) is reported apart, never inside a timing. Table:
   ms, TFLOP/s (4 * visible (query, key) pairs * H * D forward, x3.5 forward+backward), fa4
   time / cudnn time, and how far fa4's out and dq are from the baseline's on the timed inputs.

Writes ``DIR/check_fa4.json`` (environment, correctness rows, speed rows in the
``longattn.common.bench.result`` schema) after every step, so a run cut short keeps what it
found; ``--budget`` seconds (default 420) stops starting new cases in time. Exit status 1 when
FA4 does not load or a correctness case fails. ``--smoke``: a tiny configuration on the CPU
with FA4's stand-in (:class:`longattn.common.testing.Fa4Standin`) in place of the kernels, to
test this script's plumbing (CI runs it). ``--fake-sm90``: no GPU either, but FA4 installed
here: every case's calls go into FA4's real interface on fake tensors, compiling its sm90
kernels (:func:`fake_sm90`), which checks that FA4 accepts them and times its compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback

import numpy as np
import torch

from longattn.common import bench
from longattn.common import kernels as K
from longattn.common.kernels import fa4_backend as fb
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
from longattn.common.testing import (
    dense_reference64,
    device_rel_error,
    rel_error,
)

TOL = 2e-2
PACKAGES = ("flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base",
            "nvidia-cutlass-dsl-libs-core", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels",
            "apache-tvm-ffi", "torch-c-dlpack-ext", "cuda-bindings", "nvidia-cudnn-frontend",
            "einops", "triton")


# --------------------------------------------------------------------------------------------
# 1. environment


def environment(device, smoke=False):
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "torch cuda": torch.version.cuda,
           "device": bench.device_name(device)}
    if torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env["capability"] = f"sm{major}{minor}"
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env["versions"] = versions
    env["fa4 found"] = fb.MISSING is None
    t0 = time.perf_counter()
    rt = fb.runtime()
    env["fa4 import s"] = round(time.perf_counter() - t0, 3)
    env["fa4"] = ("FA4's stand-in (--smoke)" if smoke else "flash_attn.cute imports"
                  ) if not isinstance(rt, str) else rt
    env["unavailable backends"] = dict(K.UNAVAILABLE)
    return env


# --------------------------------------------------------------------------------------------
# 2. correctness against float64

# (name, b, sq, sk, hq, hkv, d, causal, window, dlse); smoke runs them at 1/8 of the lengths
DENSE_CASES = [
    ("causal D128", 2, 300, 300, 4, 4, 128, True, (-1, -1), False),
    ("causal GQA 4:1 D64", 1, 517, 517, 8, 2, 64, True, (-1, -1), False),
    ("dense D64", 2, 257, 257, 4, 4, 64, False, (-1, -1), False),
    ("causal Sq<Sk D128", 1, 128, 700, 4, 1, 128, True, (-1, -1), False),
    ("causal Sq>Sk empty rows D64", 1, 400, 150, 4, 2, 64, True, (-1, -1), False),
    ("window (63,0) GQA D128", 1, 1000, 1000, 8, 2, 128, True, (63, -1), False),
    ("window (16,16) D64", 1, 300, 300, 4, 4, 64, False, (16, 16), False),
    ("window (100,0) Sq<Sk D128", 1, 200, 777, 4, 2, 128, True, (100, -1), False),
    ("causal dlse D128", 1, 333, 333, 4, 2, 128, True, (-1, -1), True),
]
# (name, q lengths, k lengths, hq, hkv, d, causal, window, sinks, dlse)
VARLEN_CASES = [
    ("varlen causal GQA D128", [512, 1, 1000, 77, 300], [512, 1, 1000, 77, 300], 8, 2, 128,
     True, (-1, -1), 0, False),
    ("varlen Sq!=Sk causal D64", [100, 400, 0, 64, 90], [300, 400, 50, 64, 30], 4, 4, 64, True,
     (-1, -1), 0, False),
    ("varlen window (64,0) D128", [700, 129, 444], [700, 129, 444], 4, 2, 128, True, (64, -1),
     0, True),
    ("varlen keyless doc + 4 sinks D64", [300, 50, 211], [300, 0, 211], 4, 2, 64, True,
     (-1, -1), 4, False),
]


def _randn(*shape, gen, device, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _dense_mask(sq, sk, causal, window):
    from longattn.reference import causal_mask, window_mask

    m = window_mask(sq, sk, window)
    return m & causal_mask(sq, sk) if causal else m


def _errors(got, want):
    names = ("out", "lse", "dq", "dk", "dv")
    return {n: rel_error(a, b) for n, a, b in zip(names, got, want)}


def _batched_reference(q, k, v, dout, mask, dl):
    """``[out, lse, dq, dk, dv]`` in float64 of dense BSHD tensors, one batch row at a time."""
    ref = [[], [], [], [], []]
    for i in range(q.shape[0]):
        o, l, g = dense_reference64(q[i], k[i], v[i], dout[i], mask, q.shape[-1] ** -0.5,
                                    None if dl is None else dl[i])
        for lst, x in zip(ref, (o, l, *g)):
            lst.append(x)
    return [torch.stack(x) for x in ref]


def check_dense(case, device, scale_len=1):
    name, b, sq, sk, hq, hkv, d, causal, window, dlse = case
    sq, sk = max(1, sq // scale_len), max(1, sk // scale_len)
    if scale_len > 1 and window[0] > 0:
        window = (max(1, window[0] // scale_len), window[1] if window[1] < 0 else
                  max(1, window[1] // scale_len))
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (_randn(b, s, h, d, gen=gen, device=device)
               for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    dout = _randn(b, sq, hq, d, gen=gen, device=device)
    dl = _randn(b, hq, sq, gen=gen, device=device, dtype=torch.float32) if dlse else None
    kw = dict(causal=causal, window_size=window, backend="fa4")
    t0 = time.perf_counter()
    out, lse = K.attention_forward(q, k, v, **kw)
    grads = K.attention_backward(dout, q, k, v, out, lse, dlse=dl, **kw)
    bench.sync(device)
    first = time.perf_counter() - t0
    want = _batched_reference(q, k, v, dout, _dense_mask(sq, sk, causal, window), dl)
    errs = _errors((out, lse, *grads), want)
    row = {"case": name, "shape": f"B{b} Sq{sq} Sk{sk} H{hq}/{hkv} D{d}", "window": window,
           "first call s": first, **errs}
    row["ok"] = all(e <= TOL for e in errs.values())
    return row


def check_varlen(case, device, scale_len=1):
    from longattn.reference import document_mask

    name, lq, lk, hq, hkv, d, causal, window, sinks, dlse = case
    lq = [(n + scale_len - 1) // scale_len for n in lq]
    lk = [(n + scale_len - 1) // scale_len for n in lk]
    gen = torch.Generator(device=device).manual_seed(1)
    tq, tk = sum(lq), sum(lk)
    q, k, v = (_randn(t, h, d, gen=gen, device=device)
               for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    dout = _randn(tq, hq, d, gen=gen, device=device)
    dl = _randn(hq, tq, gen=gen, device=device, dtype=torch.float32) if dlse else None
    cq, ck = bench.cu_seqlens(lq), bench.cu_seqlens(lk)
    kw = dict(causal=causal, window_size=window, num_sink_tokens=sinks, backend="fa4")
    t0 = time.perf_counter()
    out, lse = attention_forward_varlen(q, k, v, cq, ck, **kw)
    grads = attention_backward_varlen(dout, q, k, v, out, lse, cq, ck, dlse=dl, **kw)
    bench.sync(device)
    first = time.perf_counter() - t0
    mask = document_mask(cq.numpy(), ck.numpy(), causal=causal, window=window,
                         num_sink_tokens=sinks)
    o, l, g = dense_reference64(q, k, v, dout, mask, d ** -0.5, dl)
    errs = _errors((out, lse, *grads), (o, l, *g))
    row = {"case": name, "shape": f"docs {len(lq)} Tq{tq} Tk{tk} H{hq}/{hkv} D{d}",
           "window": window, "first call s": first, **errs}
    row["ok"] = all(e <= TOL for e in errs.values())
    return row


def check_nan_rule(device):
    """A NaN in one query element: that row's out and lse NaN (FA4 reports lse -inf there; the
    backend makes it NaN), every other row finite, and its dq NaN."""
    gen = torch.Generator(device=device).manual_seed(2)
    q, k, v = (_randn(1, 200, 4, 128, gen=gen, device=device) for _ in range(3))
    q[0, 17, 2, 5] = float("nan")
    out, lse = K.attention_forward(q, k, v, causal=True, backend="fa4")
    dq, _, _ = K.attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=True,
                                    backend="fa4")
    nan = torch.isnan(lse)
    ok = bool(nan[0, 2, 17] and nan.sum() == 1 and torch.isnan(out[0, 17, 2]).all()
              and torch.isfinite(out[~nan.transpose(1, 2)]).all()
              and torch.isnan(dq[0, 17, 2]).any())
    return {"case": "NaN rule", "shape": "B1 S200 H4 D128", "ok": ok,
            "lse of the NaN row": str(lse[0, 2, 17].item()),
            "NaN rows": int(nan.sum())}


def check_slots(device):
    """``out=`` / ``dq_out=`` slots of a larger buffer (rows padded by 16 bytes, so neither
    slot is contiguous but FA4 can write both, :func:`fa4_backend.writable`): FA4 writes the
    results there, the padding stays as it was, and the values match float64."""
    gen = torch.Generator(device=device).manual_seed(3)
    b, s, hq, hkv, d = 2, 300, 4, 2, 128
    q = _randn(b, s, hq, d, gen=gen, device=device)
    k, v = (_randn(b, s, hkv, d, gen=gen, device=device) for _ in range(2))
    dout = _randn(b, s, hq, d, gen=gen, device=device)
    buf = torch.full((2, b, s, hq, d + 8), float("nan"), dtype=q.dtype, device=device)
    out_slot, dq_slot = buf[0, ..., :d], buf[1, ..., :d]
    t0 = time.perf_counter()
    out, lse = K.attention_forward(q, k, v, causal=True, backend="fa4", out=out_slot)
    grads = K.attention_backward(dout, q, k, v, out, lse, causal=True, backend="fa4",
                                 dq_out=dq_slot)
    bench.sync(device)
    first = time.perf_counter() - t0
    want = _batched_reference(q, k, v, dout, _dense_mask(s, s, True, (-1, -1)), None)
    errs = _errors((out_slot, lse, *grads), want)
    placed = bool(out is out_slot and grads[0] is dq_slot and fb.writable(out_slot)
                  and fb.writable(dq_slot) and torch.isnan(buf[..., d:]).all())
    return {"case": "out= / dq_out= slots", "shape": f"B{b} Sq{s} Sk{s} H{hq}/{hkv} D{d}",
            "window": (-1, 0), "first call s": first, **errs, "written in place": placed,
            "ok": placed and all(e <= TOL for e in errs.values())}


def correctness(device, scale_len, budget_end):
    rows = []
    cases = ([(check_dense, c) for c in DENSE_CASES] + [(check_varlen, c) for c in VARLEN_CASES]
             + [(lambda c, dev, s: check_nan_rule(dev), ("NaN rule",)),
                (lambda c, dev, s: check_slots(dev), ("out= / dq_out= slots",))])
    for fn, case in bench.progress(cases, desc="correctness"):
        if time.monotonic() > budget_end:
            rows.append({"case": case[0], "ok": None, "skipped": "time budget"})
            continue
        try:
            rows.append(fn(case, device, scale_len))
        except Exception as e:  # noqa: BLE001 - one failed case is a row, the rest still run
            rows.append(_error_row(case[0], e))
        r = rows[-1]
        errs = [r[n] for n in ("out", "lse", "dq", "dk", "dv") if n in r]
        print(f"  {r['case']}: ok={r['ok']}"
              + (f" max err {max(errs):.3g}" if errs else "")
              + (f" first call {r['first call s']:.2f} s" if "first call s" in r else "")
              + (f" {r['error']} at {r['at']}" if "error" in r else ""), flush=True)
    return rows


def _error_row(name, e):
    where = traceback.extract_tb(e.__traceback__)[-1]
    return {"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300],
            "at": f"{os.path.basename(where.filename)}:{where.lineno}"}


# --------------------------------------------------------------------------------------------
# 3. speed


def visible_pairs(lq, lk, causal, window):
    """(query, key) pairs the mask lets through, summed over documents (bottom-right)."""
    from longattn.common.kernels import normalize_window

    left, right = normalize_window(causal, window)
    total = 0
    for sq, sk in zip(lq, lk):
        i = np.arange(sq, dtype=np.int64) + (sk - sq)
        hi = np.minimum(sk - 1, i + right) if right >= 0 else np.full(sq, sk - 1)
        lo = np.maximum(0, i - left) if left >= 0 else np.zeros(sq, dtype=np.int64)
        total += int(np.clip(hi - lo + 1, 0, None).sum())
    return total


# (name, kind, b, s, h, d, causal, window); kind "dense" or "varlen" (b = total tokens then)
SPEED_CASES = [
    ("dense causal 32k H32 D128", "dense", 1, 32768, 32, 128, True, (-1, -1)),
    ("sliding window S131072 W4096 H32 D128 (ring_swa)", "dense", 1, 131072, 32, 128, True,
     (4096, -1)),
    ("varlen causal docs 1k-32k, 256k tokens H32 D128 (hamilton packed)", "varlen", 262144,
     None, 32, 128, True, (-1, -1)),
    ("dense causal 32k H12 D64 (dilated baseline)", "dense", 1, 32768, 12, 64, True, (-1, -1)),
    ("causal segments [512, 2048, 12, 64] (dilated branch)", "dense", 512, 2048, 12, 64, True,
     (-1, -1)),
]
SMOKE_SPEED = [
    ("smoke dense causal", "dense", 1, 128, 2, 64, True, (-1, -1)),
    ("smoke window", "dense", 1, 160, 2, 64, True, (16, -1)),
    ("smoke varlen", "varlen", 256, None, 2, 64, True, (-1, -1)),
]


def _flash2_dense(q, k, v, dout, causal, scale):
    """FlashAttention-2 as torch has it, called directly (dense, no window)."""
    sq, sk = q.shape[1], k.shape[1]

    def fwd():
        return torch.ops.aten._flash_attention_forward(q, k, v, None, None, sq, sk, 0.0, causal,
                                                       False, scale=scale)

    def fwd_bwd():
        res = fwd()
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)
        unused = torch.empty(0, device=q.device)
        g = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, res[0], res[1], None, None, sq, sk, 0.0, causal, rng, unused,
            scale=scale)
        return res[0], g[0]

    return fwd, fwd_bwd


def _contenders(kind, device, q, k, v, dout, cu, causal, window, smoke):
    """{name: (forward fn, forward+backward fn)}; a forward+backward fn returns (out, dq).
    The cuDNN contender is the cudnn backend (cudnn-frontend graphs), or without it torch's
    cuDNN SDPA op (the aten backend) where that serves the shape: named ``cudnn(aten)``."""
    out = {}

    def ours(backend):
        if kind == "dense":
            def fwd():
                return K.attention_forward(q, k, v, causal=causal, window_size=window,
                                           backend=backend)

            def fwd_bwd():
                o, l = fwd()
                g = K.attention_backward(dout, q, k, v, o, l, causal=causal,
                                         window_size=window, backend=backend)
                return o, g[0]
        else:
            def fwd():
                return attention_forward_varlen(q, k, v, cu, cu, causal=causal,
                                                window_size=window, backend=backend)

            def fwd_bwd():
                o, l = fwd()
                g = attention_backward_varlen(dout, q, k, v, o, l, cu, cu, causal=causal,
                                              window_size=window, backend=backend)
                return o, g[0]
        return fwd, fwd_bwd

    out["fa4"] = ours("fa4")
    if "cudnn" in K.BACKENDS:
        out["cudnn"] = ours("cudnn")
    elif kind == "dense" and window == (-1, -1) and "aten" in K.BACKENDS and not smoke:
        out["cudnn(aten)"] = ours("aten")  # torch's cuDNN SDPA op (no cudnn-frontend here)
    if smoke:
        out["torch"] = ours("torch")
    elif kind == "dense" and window == (-1, -1) and hasattr(torch.ops.aten,
                                                            "_flash_attention_forward"):
        out["flash2"] = _flash2_dense(q, k, v, dout, causal, q.shape[-1] ** -0.5)
    else:
        out["flash2"] = ours("aten")  # the flash op with a window / the flash varlen op
    return out


def _first(fn, device):
    t0 = time.perf_counter()
    res = fn()
    bench.sync(device)
    return time.perf_counter() - t0, res


def speed_case(case, device, smoke):
    name, kind, b, s, h, d, causal, window = case
    gen = torch.Generator(device=device).manual_seed(3)
    cu = None
    if kind == "dense":
        shape, lens = (b, s, h, d), [s] * b
    else:
        lens = bench.draw_documents(b, *((16, 64) if smoke else (1024, 32768)), seed=0)
        shape = (b, h, d)
        cu = bench.cu_seqlens(lens)
    q, k, v, dout = (_randn(*shape, gen=gen, device=device) for _ in range(4))
    fns = _contenders(kind, device, q, k, v, dout, cu, causal, window, smoke)
    pairs = visible_pairs(lens, lens, causal, window)
    flops = {"fwd": 4.0 * pairs * h * d, "fwd+bwd": 4.0 * pairs * h * d * 3.5}
    first, agree, ref = {}, {}, None
    for who, (f, fb_) in fns.items():
        first[f"{who} fwd"], _ = _first(f, device)
        first[f"{who} fwd+bwd"], pair = _first(fb_, device)
        if who == "fa4":
            ref = pair
        elif ref is not None and pair is not None:
            agree[who] = {"out": device_rel_error(ref[0], pair[0]),
                          "dq": device_rel_error(ref[1], pair[1])}
        del pair
    ref = None
    timed = {f"{who} {what}": fn for who, (f, fb_) in fns.items()
             for what, fn in (("fwd", f), ("fwd+bwd", fb_))}
    kw = dict(rounds=1, warmup=1, rep=2) if smoke else dict(rounds=3)
    t = bench.time_interleaved(timed, device=device, **kw)
    results, table = [], []
    base = next((who for who in fns if who.startswith("cudnn")), None)
    shape_rec = {"kind": kind, "B": b if kind == "dense" else len(lens), "S": s, "H": h,
                 "D": d, "causal": causal, "window": list(window), "pairs": pairs}
    if kind == "varlen":
        shape_rec.update(tokens=b, max_len=max(lens), min_len=min(lens))
    for what in ("fwd", "fwd+bwd"):
        row = {"case": name, "what": what}
        for who in fns:
            ms = t[f"{who} {what}"]
            tf = flops[what] / (ms * 1e-3) / 1e12
            row[f"{who} ms"], row[f"{who} TFLOP/s"] = ms, tf
            jit = first[f"{who} {what}"] - ms * 1e-3
            results.append(bench.result(
                "common.kernels", f"{who} {what}", median_ms=ms, flops=flops[what],
                device=device, dtype=torch.bfloat16, shape=shape_rec, case=name,
                spread=t[f"{who} {what} spread"], first_call_s=first[f"{who} {what}"],
                jit_s=max(jit, 0.0), agreement_with_fa4=agree.get(who)))
        row["fa4/cudnn time"] = (row["fa4 ms"] / row[f"{base} ms"]) if base else None
        row["baseline"] = base
        row["fa4 first call s"] = first[f"fa4 {what}"]
        table.append(row)
    return results, table, agree


def speed(device, smoke, budget_end):
    results, table = [], []
    cases = SMOKE_SPEED if smoke else SPEED_CASES
    for case in bench.progress(cases, desc="speed"):
        if time.monotonic() > budget_end:
            table.append({"case": case[0], "what": "skipped: time budget"})
            continue
        try:
            res, rows, agree = speed_case(case, device, smoke)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other cases still run
            table.append({**_error_row(case[0], e), "what": "error"})
            print(f"  {case[0]}: {table[-1]['error']} at {table[-1]['at']}", flush=True)
            continue
        finally:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        results += res
        table += rows
        for r in rows:
            ms = ", ".join(f"{c[:-3]} {r[c]:.4g} ms" for c in r if c.endswith(" ms"))
            print(f"  {r['case']} {r['what']}: {ms}; fa4 first call "
                  f"{r['fa4 first call s']:.2f} s", flush=True)
        print("  fa4 against the others on these inputs (relative difference): "
              + "; ".join(f"{w}: out {e['out']:.2g}, dq {e['dq']:.2g}" for w, e in agree.items()),
              flush=True)
    return results, table


# --------------------------------------------------------------------------------------------
# --fake-sm90: FA4's real interface on the CPU with fake tensors


def fake_sm90(budget_end):
    """Each case's calls of the backend into FA4's real ``_flash_attn_fwd`` / ``_flash_attn_bwd``
    on fake CUDA tensors (``FakeTensorMode``: no GPU, nothing runs), with FA4 told to build for
    sm90 (``FLASH_ATTENTION_ARCH=sm_90``, ``CUTE_DSL_ARCH=sm_90a``, 132 SMs): FA4 checks the
    arguments, picks its configuration and compiles the kernels, so a wrong argument fails here
    and the compile times show. The backend's row fix-ups and pinned copies are left out (a CPU
    build of torch runs no op on fake CUDA tensors)."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    rows = []
    cases = ([("dense", c[0], (c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]))
              for c in DENSE_CASES]
             + [("varlen", c[0], (c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[9]))
                for c in VARLEN_CASES if not c[8]]
             + [(c[1], c[0], c) for c in SPEED_CASES])
    patches = (mock.patch.object(fb, "_fix_rows", lambda o, l, e: (o, l)),
               mock.patch.object(fb, "_cu_tensors", lambda a, b, dev: tuple(
                   torch.tensor(list(x), dtype=torch.int32, device=dev) for x in (a, b))))
    with fb.use(fb.runtime().interface, arch=90, device_type="cuda"), patches[0], patches[1]:
        for kind, name, c in bench.progress(cases, desc="fake sm90"):
            if time.monotonic() > budget_end:
                rows.append({"case": name, "ok": None, "skipped": "time budget"})
                continue
            try:
                with FakeTensorMode():
                    rows.append({"case": name, **_fake_case(kind, c), "ok": True})
            except Exception as e:  # noqa: BLE001 - a refused call is the finding
                rows.append(_error_row(name, e))
            print(f"  {rows[-1]}", flush=True)
    return rows


def _fake_case(kind, c):
    def mk(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="cuda")

    if kind == "dense" and len(c) == 9:  # a correctness case
        b, sq, sk, hq, hkv, d, causal, window, dlse = c
    elif kind == "dense":  # a speed case
        _, _, b, sq, hq, d, causal, window = c
        sk, hkv, dlse = sq, hq, False
    if kind == "dense":
        q, k = mk(b, sq, hq, d), mk(b, sk, hkv, d)
        dl = mk(b, hq, sq, dtype=torch.float32) if dlse else None
        t0 = time.perf_counter()
        out, lse = K.attention_forward(q, k, k, causal=causal, window_size=window, backend="fa4")
        t1 = time.perf_counter()
        K.attention_backward(out, q, k, k, out, lse, causal=causal, window_size=window, dlse=dl,
                             backend="fa4")
    else:
        if len(c) == 8 and isinstance(c[0], list):  # a correctness case
            lq, lk, hq, hkv, d, causal, window, dlse = c
        else:  # a speed case
            _, _, total, _, hq, d, causal, window = c
            lq = lk = bench.draw_documents(total, 1024, 32768, seed=0)
            hkv, dlse = hq, False
        cq, ck = (bench.cu_seqlens(x).tolist() for x in (lq, lk))
        win = K.normalize_window(causal, window)
        q, k = mk(sum(lq), hq, d), mk(sum(lk), hkv, d)
        dl = mk(hq, sum(lq), dtype=torch.float32) if dlse else None
        t0 = time.perf_counter()
        out, lse = fb.varlen_forward(q, k, k, cq, ck, softmax_scale=d ** -0.5, window_size=win)
        t1 = time.perf_counter()
        fb.varlen_backward(out, q, k, k, out, lse, cq, ck, softmax_scale=d ** -0.5,
                           window_size=win, dlse=dl)
    return {"fwd s": round(t1 - t0, 2), "bwd s": round(time.perf_counter() - t1, 2),
            "out": str(tuple(out.shape)), "lse": f"{tuple(lse.shape)} {lse.dtype}"}


# --------------------------------------------------------------------------------------------


def _write(out_dir, doc):
    path = os.path.join(out_dir, "check_fa4.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration on the CPU with FA4's stand-in (tests the plumbing)")
    p.add_argument("--out", default=None, help="output folder (default $OUT or bench_out)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds after which no new case starts (default 420; the correctness "
                        "cases start within the first 45%%)")
    p.add_argument("--skip", choices=("check", "speed"), action="append", default=[],
                   help="leave out the correctness cases or the timings")
    p.add_argument("--fake-sm90", action="store_true",
                   help="no GPU: FA4's real interface on fake tensors, compiling for sm90 "
                        "(needs flash-attn-4 installed here)")
    a = p.parse_args(argv)
    out_dir = bench.out_dir("bench_out", a.out)
    start = time.monotonic()
    if a.fake_sm90:
        for var, val in (("FLASH_ATTENTION_ARCH", "sm_90"), ("CUTE_DSL_ARCH", "sm_90a"),
                         ("FLASH_ATTENTION_NUM_SMS", "132")):
            os.environ.setdefault(var, val)
        env = environment("cpu")
        print("environment: " + json.dumps(env, default=str), flush=True)
        if isinstance(fb.runtime(), str):
            print(f"check_fa4: FA4 is not usable here: {env['fa4']}")
            return 1
        doc = {"env": env, "fake_sm90": fake_sm90(start + a.budget)}
        print(bench.format_table(doc["fake_sm90"], width=160))
        print(f"wrote {_write(out_dir, doc)} ({time.monotonic() - start:.0f} s)")
        return 0 if all(r["ok"] is not False for r in doc["fake_sm90"]) else 1
    if a.smoke:
        from longattn.common.testing import Fa4Standin

        device, ctx = "cpu", fb.use(Fa4Standin(arch=90), arch=90, device_type="cpu")
    else:
        if not torch.cuda.is_available():
            print("check_fa4: no CUDA device here (use --smoke on a CPU)")
            return 0
        device, ctx = "cuda", contextlib.nullcontext()
    with ctx:
        env = environment(device, a.smoke)
        print("environment: " + json.dumps(env, default=str), flush=True)
        doc = {"env": env, "correctness": [], "speed": [], "table": []}
        _write(out_dir, doc)
        if "fa4" not in K.BACKENDS or isinstance(fb.runtime(), str):
            print(f"check_fa4: FA4 is not usable here: {env['fa4']}")
            return 1
        ok = True
        if "check" not in a.skip:
            end = start + (a.budget if a.smoke else 0.45 * a.budget)
            doc["correctness"] = correctness(device, 8 if a.smoke else 1, end)
            _write(out_dir, doc)
            print(bench.format_table(doc["correctness"], width=140))
            ok = all(r.get("ok") is not False for r in doc["correctness"])
            print(f"correctness (tolerance {TOL} for bf16): {'PASS' if ok else 'FAIL'}",
                  flush=True)
        if "speed" not in a.skip:
            doc["speed"], doc["table"] = speed(device, a.smoke, start + a.budget)
            _write(out_dir, doc)
            cols = ["case", "what"] + [c for c in (doc["table"][0] if doc["table"] else {})
                                       if c not in ("case", "what")]
            print(bench.format_table(doc["table"], columns=cols, width=160))
        path = _write(out_dir, doc)
        print(f"wrote {path} ({time.monotonic() - start:.0f} s)")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
