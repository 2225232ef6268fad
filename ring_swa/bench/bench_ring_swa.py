"""The local sliding-window step of ring_swa on one GPU: candidates against FlexAttention and
dense causal cuDNN, in one run.

    PYTHONPATH=common/src:reference/src:ring_swa/src python ring_swa/bench/bench_ring_swa.py \
        [--smoke] [--out DIR] [--seq 131072] [--window 4096] [--backends auto,fa4]

1. Correctness first (small case, bf16 against the float64 oracle, forward and backward): the
   flash aten path, the band variants, the flex backend, the varlen flash path with sinks, and
   ring_swa's public functions (cp_group=None) on the GPU.
2. Speed at S=131072, W=4096, H=32, D=128, bf16, causal (window (W, 0)), forward and
   forward+backward, every contender alternated over rounds (``bench.time_interleaved``):
   * ``cudnn``: cuDNN's native sliding window (diagonal band mask) through cudnn-frontend, the
     ``cudnn`` backend of :mod:`longattn.common.kernels` (first in ``auto`` when installed);
   * ``flash``: FlashAttention-2 with window sizes (``aten::_flash_attention_forward``, the
     ``aten`` backend's window path);
   * ``band s{1,2} {flip,flash}``: :mod:`longattn.common.kernels.band_backend` (dense cuDNN
     calls on chunk pairs; the anti-causal triangle by reversing chunks or by FA2; the
     variant is its ``BandConfig(split=, anti=)``) and
     ``ring_swa local`` (what ring_swa's local step runs by default: ``auto``);
   * ``flex``: ``torch.compile(flex_attention)`` with a sliding-window BlockMask built with
     ``_compile=True`` (the baseline);
   * ``cudnn dense causal``: ``F.scaled_dot_product_attention`` on cuDNN, full causal, same S.
   TFLOP/s of the window kernels count the useful work only, 4 S W H D (x3.5 with backward);
   the dense one counts 2 S^2 H D (x3.5). Targets: best window kernel >= 1.1x flex and >= 80%
   of the dense causal cuDNN TFLOP/s, forward and forward+backward.

``--backends auto,fa4`` (default ``auto``: the candidates above) adds FlashAttention-4 beside
them, in the correctness checks and in each phase's pool: ``fa4``, its native window (the
``fa4`` backend of :mod:`longattn.common.kernels`), and ``ring_swa local [fa4]``, ring_swa's
local step with ``backend="fa4"``; its verdict against the same flex and dense cuDNN rows is
printed apart (``verdict_by_backend`` in the summary JSON; ``verdict`` stays the current
kernels'). fa4 that cannot run here is reported in one line and left out (``backends`` in the
summary JSON). The CPU smoke run, float64 elsewhere, runs the fa4 candidates in bf16 (FA4 serves
fp16 / bf16 only), checked at bf16's tolerance.

``--smoke`` runs a tiny configuration on the CPU (the torch backend under the band
decomposition) so the script itself can be checked without a GPU; it has no FlexAttention or
cuDNN baseline, so its ratios print as n/a.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

from longattn.common import bench
from longattn.common.kernels import BandConfig, attention_backward, attention_forward
from longattn.common.kernels import band_backend as band
from longattn.common.testing import rel_error
from longattn.ring_swa import local

# The band variants timed: (split, anti) of BandConfig. s1 flip was the faster of the two in
# results/h200/bench_ring_swa.json (H200, 2026-12-04).
BAND_VARIANTS = ((1, "flip"), (2, "flash"))

# --backends: "auto" is the current candidates (always timed); each of these adds two: its
# native window (candidate "<name>", check "<name> (native window)") and ring_swa's local step
# on it ("ring_swa local [<name>]")
EXTRA_BACKENDS = ("fa4",)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# correctness


def _oracle(q, k, v, do, w, scale):
    from longattn.reference import attention, attention_backward, causal_mask, window_mask

    s = q.shape[1]
    m = window_mask(s, s, (w, 0)) & causal_mask(s)
    args = [t.double().cpu().numpy() for t in (q, k, v)]
    out, lse = attention(*args, mask=m, scale=scale)
    return out, lse, attention_backward(do.double().cpu().numpy(), *args, mask=m, scale=scale)


def _band_config(split, anti, smoke):
    """The band variant; on the CPU (smoke) its pieces run on the torch backend, merged in
    torch, with chunks as small as the tiny configuration needs."""
    if smoke:
        return BandConfig(split=split, anti=anti, min_chunk=2, piece_backend="torch",
                          merge="torch")
    return BandConfig(split=split, anti=anti)


def correctness(device, smoke, skip=frozenset(), extra=None):
    """Rows {case, out, lse, dq, dk, dv, ok} for every path at a small size; ``extra``:
    ``{backend: dtype}`` of the extra backends (fa4), whose rows carry ``backend``."""
    dtype = torch.float64 if smoke else torch.bfloat16
    tol = 1e-10 if smoke else 2e-2
    s, w, hq, hkv, d = (48, 8, 4, 2, 8) if smoke else (2048, 256, 4, 2, 128)

    def inputs(dt):
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, s, h, d, generator=g).to(device, dt)
                       for h in (hq, hkv, hkv, hq))
        return (q, k, v, do), _oracle(q, k, v, do, w, d ** -0.5)

    (q, k, v, do), (ref_out, ref_lse, ref_g) = inputs(dtype)
    cases = []
    if not smoke:
        cases.append(("cudnn (native window)", lambda: _run_backend("cudnn", q, k, v, do, w)))
        cases.append(("flash (aten FA2 window)", lambda: _run_backend("aten", q, k, v, do, w)))
        cases.append(("flex backend", lambda: _run_backend("flex", q, k, v, do, w)))
    for split, anti in BAND_VARIANTS:
        cfg = _band_config(split, anti, smoke)
        cases.append((f"band s{split} {anti}", lambda cfg=cfg: _run_band(q, k, v, do, w, cfg)))
    cases.append(("ring_swa local (auto)", lambda: _run_local(q, k, v, do, w)))
    rows = _run_cases(cases, skip, (ref_out, ref_lse, ref_g), tol)
    for be, dt in (extra or {}).items():  # fa4: its native window and ring_swa's local step
        (qb, kb, vb, dob), ref = inputs(dt) if dt != dtype else ((q, k, v, do),
                                                                   (ref_out, ref_lse, ref_g))
        tol_b = tol if dt == dtype else 2e-2  # bf16 in the float64 smoke run
        more = [(f"{be} (native window)", functools.partial(_run_backend, be, qb, kb, vb, dob, w)),
                (f"ring_swa local [{be}]", functools.partial(_run_local, qb, kb, vb, dob, w,
                                                              backend=be))]
        for r in _run_cases(more, skip, ref, tol_b):
            rows.append(dict(r, backend=be, tol=tol_b))
    rows += _ring_api_checks(device, dtype, tol)
    return rows


def _run_cases(cases, skip, ref, tol):
    ref_out, ref_lse, ref_g = ref
    rows = []
    for name, fn in cases:
        if name in skip:
            continue
        try:
            out, lse, grads = fn()
            errs = [rel_error(out, ref_out), rel_error(lse, ref_lse)]
            errs += [rel_error(a, b) for a, b in zip(grads, ref_g)]
            rows.append(dict(zip(("case", "out", "lse", "dq", "dk", "dv"), [name, *errs]),
                             ok=all(e <= tol for e in errs)))
        except Exception as e:  # noqa: BLE001 - report and continue
            traceback.print_exc()
            rows.append({"case": name, "out": f"error: {e}"[:60], "ok": False})
    return rows


def _run_backend(backend, q, k, v, do, w):
    out, lse = attention_forward(q, k, v, causal=True, window_size=(w, 0), backend=backend)
    grads = attention_backward(do, q, k, v, out, lse, causal=True, window_size=(w, 0),
                               backend=backend)
    return out, lse, grads


def _run_band(q, k, v, do, w, cfg):
    kw = dict(softmax_scale=q.shape[-1] ** -0.5, window_size=(w, 0), config=cfg)
    out, lse = band.forward(q, k, v, **kw)
    return out, lse, band.backward(do, q, k, v, out, lse, **kw)


def _run_local(q, k, v, do, w, backend="auto"):
    kw = dict(softmax_scale=q.shape[-1] ** -0.5, window_size=(w, 0), backend=backend)
    out, lse = local.dense_forward(q, k, v, **kw)
    return out, lse, local.dense_backward(do, q, k, v, out, lse, **kw)


def _ring_api_checks(device, dtype, tol):
    """ring_swa's public functions on this process alone (no torch.distributed: group=None),
    on this device: the canonical function (dense) and a seed-compatible one (varlen, sinks)."""
    from longattn.ring_swa import ring_streaming_llm_attn_varlen, ring_swa_attn
    from longattn.ring_swa.cases import cu_seqlens, global_inputs, oracle

    rows = []
    checks = [
        ("ring_swa_attn", dict(kind="dense", n=1, b=1, m=1024, hq=4, hkv=2, d=64,
                                          window=255, ns=0, dtype="float64", seed=1)),
        ("ring_streaming_llm_attn_varlen", dict(kind="varlen", n=1, lengths=[300, 1, 517, 64,
                                                                             142],
                                                counts=[1024], hq=4, hkv=2, d=64, window=100,
                                                ns=4, dtype="float64", seed=2)),
    ]
    for name, case in checks:
        try:
            q, k, v, do = (t.to(device, dtype) for t in global_inputs(case))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            if case["kind"] == "dense":
                out = ring_swa_attn(q, k, v, window_size=(case["window"], 0))
            else:
                out = ring_streaming_llm_attn_varlen(q, k, v, case["window"],
                                                     cu_seqlens(case).to(device),
                                                     num_sink_tokens=case["ns"])
            out.backward(do)
            errs = [rel_error(a, b) for a, b in zip((out, q.grad, k.grad, v.grad),
                                                     oracle(case))]
            rows.append(dict(zip(("case", "out", "dq", "dk", "dv"), [name, *errs]), lse=None,
                             ok=all(e <= tol for e in errs)))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"case": name, "out": f"error: {e}"[:60], "ok": False})
    return rows


# --------------------------------------------------------------------------------------------
# speed


def _flex_fns(q, k, v, do, w):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = q.shape[1]

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (qi - ki <= w)

    bm = create_block_mask(mask_mod, None, None, s, s, device=q.device, _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]

    def fwd():
        with torch.no_grad():
            return flex(qt, kt, vt, block_mask=bm, enable_gqa=gqa)

    def fwd_bwd():
        o = flex(qt, kt, vt, block_mask=bm, enable_gqa=gqa)
        torch.autograd.grad(o, (qt, kt, vt), dot)

    return fwd, fwd_bwd


def _cudnn_dense_fns(q, k, v, do):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2)

    def fwd():
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        torch.autograd.grad(o, (qt, kt, vt), dot)

    return fwd, fwd_bwd


def _window_fns(q, k, v, do, w, smoke):
    """{name: (fwd, fwd_bwd)} of the local window candidates."""
    scale = q.shape[-1] ** -0.5
    fns = {}
    if not smoke:
        def cu_f():
            return attention_forward(q, k, v, causal=True, window_size=(w, 0), backend="cudnn")

        def cu_fb():
            o, lse = cu_f()
            attention_backward(do, q, k, v, o, lse, causal=True, window_size=(w, 0),
                               backend="cudnn")

        fns["cudnn"] = (cu_f, cu_fb)

        def fl_f():
            return attention_forward(q, k, v, causal=True, window_size=(w, 0), backend="aten")

        def fl_fb():
            o, lse = fl_f()
            attention_backward(do, q, k, v, o, lse, causal=True, window_size=(w, 0),
                               backend="aten")

        fns["flash"] = (fl_f, fl_fb)
    for split, anti in BAND_VARIANTS:
        kw = dict(softmax_scale=scale, window_size=(w, 0),
                  config=_band_config(split, anti, smoke))

        def b_f(kw=kw):
            return band.forward(q, k, v, **kw)

        def b_fb(kw=kw):
            o, lse = band.forward(q, k, v, **kw)
            band.backward(do, q, k, v, o, lse, **kw)

        fns[f"band s{split} {anti}"] = (b_f, b_fb)

    def loc_f():
        return local.dense_forward(q, k, v, softmax_scale=scale, window_size=(w, 0))

    def loc_fb():
        o, lse = loc_f()
        local.dense_backward(do, q, k, v, o, lse, softmax_scale=scale, window_size=(w, 0))

    fns["ring_swa local"] = (loc_f, loc_fb)
    return fns


def _usable(fns, device, skip):
    """Run each once (warm-up / compile); drop and report the ones that fail."""
    ok = {}
    for name, fn in bench.progress(fns.items(), desc="warm-up", total=len(fns)):
        if name in skip:
            continue
        try:
            t0 = time.perf_counter()
            fn()
            bench.sync(device)
            ok[name] = fn
            log(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s")
        except Exception:  # noqa: BLE001
            log(f"  {name} failed, skipped:")
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
    return ok


def _extra_fns(q, k, v, do, w, backend):
    """{name: (fwd, fwd_bwd)} of an extra backend (fa4): its native window and ring_swa's
    local step on it."""
    scale = q.shape[-1] ** -0.5

    def nat_f():
        return attention_forward(q, k, v, causal=True, window_size=(w, 0), backend=backend)

    def nat_fb():
        o, lse = nat_f()
        attention_backward(do, q, k, v, o, lse, causal=True, window_size=(w, 0),
                           backend=backend)

    def loc_f():
        return local.dense_forward(q, k, v, softmax_scale=scale, window_size=(w, 0),
                                   backend=backend)

    def loc_fb():
        o, lse = loc_f()
        local.dense_backward(do, q, k, v, o, lse, softmax_scale=scale, window_size=(w, 0),
                             backend=backend)

    return {backend: (nat_f, nat_fb), f"ring_swa local [{backend}]": (loc_f, loc_fb)}


def speed(device, s, w, h, d, smoke, rounds, skip=frozenset(), extra=None):
    """Timings of every candidate, each phase's in one pool; ``extra``: ``{backend: dtype}``
    of the extra backends (fa4), whose candidates join the pools (their rows carry
    ``backends``: the ``--backends`` entry, ``auto`` for the others, when ``extra`` is
    given)."""
    dtype = torch.float64 if smoke else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, do = (torch.randn(1, s, h, d, device=device, dtype=dtype, generator=g)
                   for _ in range(4))
    useful = 4.0 * s * w * h * d
    dense = 2.0 * s * s * h * d
    flops, dtypes, family = {}, {}, {}
    fwd, fwdbwd = {}, {}
    for name, (f, fb) in _window_fns(q, k, v, do, w, smoke).items():
        fwd[name], fwdbwd[name] = f, fb
        flops[name] = useful
    for be, dt in (extra or {}).items():
        xs = (q, k, v, do) if dt == dtype else (t.to(dt) for t in (q, k, v, do))
        for name, (f, fb) in _extra_fns(*xs, w, be).items():
            fwd[name], fwdbwd[name] = f, fb
            flops[name], dtypes[name], family[name] = useful, dt, be
    if not smoke:
        for name, maker, fl in (("flex", lambda: _flex_fns(q, k, v, do, w), useful),
                                ("cudnn dense causal", lambda: _cudnn_dense_fns(q, k, v, do),
                                 dense)):
            try:
                fwd[name], fwdbwd[name] = maker()
                flops[name] = fl
            except Exception:  # noqa: BLE001
                log(f"{name} unavailable:")
                traceback.print_exc()
    results = []
    for phase, fns, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwdbwd, 3.5)):
        log(f"{phase}: warming up {len(fns)} contenders")
        fns = _usable(fns, device, skip)
        log(f"{phase}: timing {list(fns)} ({rounds} alternating rounds)")
        t = bench.time_interleaved(fns, device=device, rounds=rounds)
        for name in fns:
            results.append(bench.result(
                "ring_swa" if name not in ("flex", "cudnn dense causal") else name,
                f"{name} {phase}", median_ms=t[name], flops=flops[name] * mult, device=device,
                dtype=dtypes.get(name, dtype),
                shape={"B": 1, "S": s, "W": w, "H": h, "D": d, "causal": True},
                phase=phase, candidate=name, spread=t[name + " spread"],
                **({} if extra is None else {"backends": family.get(name, "auto")})))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def summarize(results, backends="auto"):
    """Table rows with ratios to flex and to dense causal cuDNN; the verdict per phase over
    the candidates of the ``--backends`` entry ``backends`` (``auto``: the current kernels)."""
    rows, verdict = [], {}
    for phase in ("fwd", "fwd+bwd"):
        rs = {r["extra"]["candidate"]: r for r in results if r["extra"]["phase"] == phase}
        flex = rs.get("flex")
        dense = rs.get("cudnn dense causal")
        best = None
        for name, r in rs.items():
            row = {"phase": phase, "candidate": name, "ms": r["median_ms"],
                   "TFLOP/s": r["tflops"], "spread": r["extra"]["spread"],
                   "x flex": flex["median_ms"] / r["median_ms"] if flex else None,
                   "of dense": r["tflops"] / dense["tflops"] if dense else None}
            rows.append(row)
            if name not in ("flex", "cudnn dense causal") and (
                    r["extra"].get("backends", "auto") == backends) and (
                    best is None or r["median_ms"] < best[1]["median_ms"]):
                best = (name, r)
        if best:
            name, r = best
            vs_flex = flex["median_ms"] / r["median_ms"] if flex else None
            of_dense = r["tflops"] / dense["tflops"] if dense else None
            verdict[phase] = {"best": name, "x_flex": vs_flex, "of_dense": of_dense,
                              "meets": bool(vs_flex and of_dense and vs_flex >= 1.1
                                            and of_dense >= 0.8)}
    return rows, verdict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated checks / candidates to skip, "
                    "e.g. 'flex backend,band s2 flash'")
    ap.add_argument("--backends", default="auto", type=bench.backends_option(EXTRA_BACKENDS),
                    help="auto (default: the candidates above) or auto,fa4: also "
                         "FlashAttention-4's native window and ring_swa's local step on it")
    args = ap.parse_args(argv)
    extra_names = [n for n in args.backends if n != "auto"]  # auto's candidates always run
    skip = frozenset(x.strip() for x in args.skip.split(",") if x.strip())
    t_start = time.perf_counter()
    out = bench.out_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        args.out)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    smoke = device == "cpu"
    from longattn.common.kernels import pick_backend

    probe = torch.empty(1, 2 * args.window, 1, args.head_dim, device=device,
                        dtype=torch.float64 if smoke else torch.bfloat16)
    default = BandConfig()
    auto = pick_backend(probe, probe, probe, causal=True, window_size=(args.window, 0))
    log(f"device: {bench.device_name(device)}  torch {torch.__version__}  band default: "
        f"split={default.split} anti={default.anti}  auto picks {auto!r} for the window")
    if smoke:
        s, w, h, d, rounds = 256, 32, 2, 16, 1
    else:
        s, w, h, d, rounds = args.seq, args.window, args.heads, args.head_dim, args.rounds
    # the extra backends that can run here: {name: dtype}; the others reported, left out
    extra, status = bench.usable_backends(["auto", *extra_names], device, probe.dtype,
                                          (8 if smoke else 128, d), window_size=(4, 0), say=log)
    del extra["auto"]  # auto's candidates always run
    option = bool(extra_names)
    rows = correctness(device, smoke, skip, extra)
    print(bench.format_table(rows, ["case", "out", "lse", "dq", "dk", "dv", "ok"]))
    ok = all(r["ok"] for r in rows)
    log(f"correctness: {'PASS' if ok else 'FAIL'}")
    with open(os.path.join(out, "bench_ring_swa_correctness.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    try:
        results = speed(device, s, w, h, d, smoke, rounds, skip, extra if option else None)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        results = []
    bench.write_results(results, os.path.join(out, "bench_ring_swa.json"))
    table, verdict = summarize(results)
    by_backend = {be: summarize(results, be)[1] for be in extra}
    print(bench.format_table(table, ["phase", "candidate", "ms", "TFLOP/s", "x flex",
                                     "of dense", "spread"]))
    for be, ver in [("auto", verdict), *by_backend.items()]:
        sfx = bench.backend_tag("", be)
        for phase, v in ver.items():
            if v["x_flex"] is None or v["of_dense"] is None:
                log(f"{phase}: best window kernel{sfx} {v['best']!r}; ratios n/a (no "
                    "FlexAttention / dense cuDNN baseline in this run)")
                continue
            log(f"{phase}: best window kernel{sfx} {v['best']!r}: {v['x_flex']:.3f}x flex, "
                f"{v['of_dense']:.1%} of dense causal cuDNN TFLOP/s -> "
                f"{'MEETS' if v['meets'] else 'misses'} (>= 1.1x, >= 80%)")
    summary = {"table": table, "verdict": verdict, "correct": ok}
    if option:
        summary.update(verdict_by_backend=by_backend, backends=status)
    with open(os.path.join(out, "bench_ring_swa_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
