"""LongNet dilated attention on one GPU: linear cost and kernel efficiency, in one run.

    PYTHONPATH=common/src:reference/src:dilated/src python dilated/bench/bench_dilated.py \
        [--smoke] [--out DIR] [--no-flex] [--backends auto,fa4]

Configuration (LongNet, arXiv 2307.02486): segments 2048..32768, rates 1,2,4,6,12, 12 heads,
head_dim 64, bf16, causal, forward + backward; sequence lengths 32k .. 1M with the batch
shrinking so every row holds the same number of tokens (2**20).

Measures, in the same run:
1. correctness first: the GPU path against the float64 oracle on a small case (fwd + bwd), and
   the paper's schedule at S = 40000 (no segment divides it) against the float32 torch backend;
2. dilated attention time per token at each length (target: flat within 20%);
3. its useful TFLOP/s (the FLOPs of the sparsified segment attentions, counted like dense
   attention: 4*nq*nk*D per head, halved when causal, x3.5 with the backward) against dense
   causal cuDNN (``sdpa_kernel(CUDNN_ATTENTION)``) at 32k (target: >= 60%);
4. dense causal cuDNN per token at 32k..128k (quadratic growth), and FlexAttention running the
   same exact dilated attention as a block-sparse mask over the branches' key copies (the
   generic alternative), at 32k.

``--backends`` (default ``auto``): the local-kernel backends of ``longattn.common.kernels`` the
dilated rows run on (``dilated_attention(..., backend=...)``), e.g. ``auto,fa4`` to time
FlashAttention-4 beside the current kernels in the same run: the correctness checks and the
timed rows (fwd, fwd+bwd per length) once per backend, each length's rows of every backend in
one ``time_interleaved`` pool; rows of a backend other than ``auto`` are tagged `` [name]``
(the ``auto`` rows keep their names) and every row records its ``backend``. For each backend
other than ``auto`` a dense causal row through ``longattn.common.kernels`` on that backend joins
the dense cuDNN baseline's pool (for reference; the targets stay against cuDNN). A backend that
cannot run here is reported in one line (the reason) and left out (``summary.backends`` in the
JSON); a backend that serves only fp16 / bf16 (fa4) runs its rows in bf16 in the float32 CPU
smoke run.

Writes ``bench_dilated.json`` (the common result schema) and ``bench_dilated.png`` into
``--out`` (default ``$OUT`` if set, else ``dilated/bench/results``). ``--smoke`` runs a tiny
configuration on the CPU in float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from longattn.common import bench
from longattn.common import kernels as K
from longattn.common.bench import backend_tag as tag
from longattn.common.testing import rel_error
from longattn.dilated import FusedConfig, dilated_attention
from longattn.dilated.plan import make_plan

PAPER_SEGMENTS = (2048, 4096, 8192, 16384, 32768)
PAPER_RATES = (1, 2, 4, 6, 12)


def useful_flops(b, s, h, hkv, d, seg, rates, causal, backward):
    """FLOPs of the sparsified segment attentions (dense-attention counting convention)."""
    plan = make_plan(s, s, 0, 1, h, hkv, tuple(seg), tuple(rates), causal)
    f = 0.0
    for c in plan.calls:
        nseg, nq, nk, heads, _ = c.shape
        heads = h if heads < 0 else heads
        f += 4.0 * b * nseg * heads * nq * nk * d / (2 if causal else 1)
    return f * (3.5 if backward else 1.0)


def dense_flops(b, s, h, d, causal, backward):
    f = 4.0 * b * s * s * h * d / (2 if causal else 1)
    return f * (3.5 if backward else 1.0)


def _rand(shape, device, dtype, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, device=device, dtype=dtype, generator=g)


def check_oracle(device, dtype, config, backend="auto"):
    """Small case against the float64 oracle, forward and backward."""
    from longattn.reference.dilated import dilated_attention as ref_fwd
    from longattn.reference.dilated import dilated_attention_backward as ref_bwd

    seg, rates = (64, 128, 256, 512), (1, 2, 4, 6)
    b, s, h, hkv, d = 1, 700, 12, 4, 64
    q, k, v = (_rand((b, s, n, d), device, dtype, i) for i, n in enumerate((h, hkv, hkv)))
    do = _rand((b, s, h, d), device, dtype, 9)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = dilated_attention(qq, kk, vv, seg, rates, causal=True, config=config, backend=backend)
    out.backward(do)
    c = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    ro, _ = ref_fwd(c(q), c(k), c(v), seg, rates, causal=True)
    grads = ref_bwd(c(do), c(q), c(k), c(v), seg, rates, causal=True)
    errs = {"out": rel_error(out, ro)}
    errs.update({n: rel_error(t.grad, g) for n, t, g in zip(("dq", "dk", "dv"), (qq, kk, vv),
                                                            grads)})
    return errs


def check_paper_schedule(device, dtype, config, s=40000, h=12, d=64, backend="auto"):
    """The full paper schedule on the fast path against the float32 torch backend."""
    q, k, v, do = (_rand((1, s, h, d), device, dtype, 20 + i) for i in range(4))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = dilated_attention(qq, kk, vv, PAPER_SEGMENTS, PAPER_RATES, causal=True,
                            config=config, backend=backend)
    out.backward(do)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref = dilated_attention(q32, k32, v32, PAPER_SEGMENTS, PAPER_RATES, causal=True,
                            backend="torch")
    ref.backward(do.float())
    errs = {"out": rel_error(out, ref)}
    errs.update({n: rel_error(a.grad, b.grad) for n, a, b in zip(
        ("dq", "dk", "dv"), (qq, kk, vv), (q32, k32, v32))})
    return errs


def _warm(fns, device):
    """Run each ``{backend: fn}`` once (warm-up: plans, kernels' own plans, compilation);
    drop and report the ones that fail."""
    ok = {}
    for be, fn in fns.items():
        try:
            fn()
            ok[be] = fn
        except Exception:  # noqa: BLE001 - report and go on with the other backends
            print(f"backend {be} failed, left out here:")
            traceback.print_exc()
            if device == "cuda":
                torch.cuda.empty_cache()
    return ok


def time_dilated(device, dtype, b, s, h, d, seg, rates, config, backends=None):
    """Median ms of ``fwd`` / ``fwd+bwd`` (tagged per backend, :func:`tag`) of the backends
    ``{name: dtype}`` (default: ``auto`` in ``dtype``), alternated in one pool."""
    backends = {"auto": dtype} if backends is None else backends
    data = {}

    def inputs(dt):
        if dt not in data:
            q, k, v, do = (_rand((b, s, h, d), device, dt, i) for i in range(4))
            data[dt] = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do)
        return data[dt]

    pairs = {}
    for be, dt in backends.items():
        q, k, v, do = inputs(dt)

        def fwd(q=q, k=k, v=v, be=be):
            with torch.no_grad():
                return dilated_attention(q, k, v, seg, rates, causal=True, config=config,
                                         backend=be)

        def fwd_bwd(q=q, k=k, v=v, do=do, be=be):
            o = dilated_attention(q, k, v, seg, rates, causal=True, config=config, backend=be)
            torch.autograd.grad(o, (q, k, v), do)

        pairs[be] = (fwd, fwd_bwd)
    if list(backends) == ["auto"]:  # the default run, as before: a failure ends this length
        pairs["auto"][1]()
        usable = pairs
    else:
        usable = {be: pairs[be] for be in _warm({be: p[1] for be, p in pairs.items()}, device)}
    fns = {}
    for be, (f, fb) in usable.items():
        fns[tag("fwd", be)] = f
        fns[tag("fwd+bwd", be)] = fb
    if not fns:
        return {}
    return bench.time_interleaved(fns, device=device, rounds=2, **bench.timing_kw(device))


def time_dense(device, dtype, b, s, h, d, backends=None):
    """Dense causal attention: cuDNN SDPA (the CPU: math SDPA) as ``fwd`` / ``fwd+bwd``, and
    for each backend ``{name: dtype}`` here besides ``auto`` the same through
    ``longattn.common.kernels`` on it (BSHD), tagged; all alternated in one pool."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH
    q, k, v, do = (_rand((b, h, s, d), device, dtype, 30 + i) for i in range(4))
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()

    def fwd():
        with torch.no_grad(), sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), do)

    fwd_bwd()
    fns = {"fwd": fwd, "fwd+bwd": fwd_bwd}
    others = {be: dt for be, dt in (backends or {}).items() if be != "auto"}
    pairs = {}
    for be, dt in others.items():
        qb, kb, vb, dob = (_rand((b, s, h, d), device, dt, 30 + i) for i in range(4))

        def kf(q=qb, k=kb, v=vb, be=be):
            return K.attention_forward(q, k, v, causal=True, backend=be)

        def kfb(q=qb, k=kb, v=vb, do=dob, be=be):
            o, lse = K.attention_forward(q, k, v, causal=True, backend=be)
            K.attention_backward(do, q, k, v, o, lse, causal=True, backend=be)

        pairs[be] = (kf, kfb)
    for be in _warm({be: p[1] for be, p in pairs.items()}, device):
        fns[tag("fwd", be)], fns[tag("fwd+bwd", be)] = pairs[be]
    return bench.time_interleaved(fns, device=device, rounds=2, **bench.timing_kw(device))


def time_flex(device, dtype, s, h, d, seg, rates):
    """The same dilated attention with FlexAttention: keys/values repeated once per branch
    (the multiset union), a mask_mod that keeps each branch's sparsified causal segments."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    nb = len(seg)
    wt = torch.tensor(seg, device=device)
    rt = torch.tensor(rates, device=device)

    def mask_mod(b, hh, qi, kv):
        br = kv // s
        j = kv - br * s
        w, r = wt[br], rt[br]
        same = (qi // w) == (j // w)
        off = hh % r
        return same & ((qi % w) % r == off) & ((j % w) % r == off) & (j <= qi)

    bm = create_block_mask(mask_mod, 1, h, s, nb * s, device=device, _compile=True)
    flex = torch.compile(flex_attention)
    q, k, v, do = (_rand((1, h, s, d), device, dtype, 40 + i) for i in range(4))
    kk, vv = k.repeat(1, 1, nb, 1), v.repeat(1, 1, nb, 1)
    q.requires_grad_()
    kk.requires_grad_()
    vv.requires_grad_()

    def fwd():
        with torch.no_grad():
            return flex(q, kk, vv, block_mask=bm)

    def fwd_bwd():
        o = flex(q, kk, vv, block_mask=bm)
        torch.autograd.grad(o, (q, kk, vv), do)

    fwd_bwd()
    t = bench.time_interleaved({"fwd": fwd, "fwd+bwd": fwd_bwd}, device=device, rounds=2)
    # same numbers as ours?
    ours = dilated_attention(q.detach().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             seg, rates, causal=True)
    t["rel_err_vs_ours"] = rel_error(fwd().transpose(1, 2), ours)
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention row")
    ap.add_argument("--fused", choices=("auto", "on", "off"), default="auto",
                    help="fused Triton merge / gradient sum (off: the eager code, for A/B)")
    ap.add_argument("--fused-tile", default=None, metavar="ROWS,CHUNK,WARPS,PROGRAMS_PER_SM",
                    help="launch of the fused kernels: positions a tile, head-dim columns a "
                         "load, warps, programs per SM or 'none' (one per tile) (default: "
                         "longattn.dilated.FusedConfig's)")
    ap.add_argument("--backends", default="auto", type=bench.backends_option(),
                    help="comma-separated local-kernel backends the dilated rows and checks run "
                         "on, each tagged (default auto; e.g. auto,fa4: FlashAttention-4 beside "
                         "the current kernels, plus a dense causal fa4 row)")
    args = ap.parse_args(argv)
    backend_names = args.backends
    option = backend_names != ["auto"]  # rows record their backend only with the option
    config = FusedConfig(fused=args.fused)
    if args.fused_tile:
        rows, chunk, warps, pps = args.fused_tile.split(",")
        config = FusedConfig(fused=args.fused, rows=int(rows), chunk=int(chunk),
                             num_warps=int(warps),
                             programs_per_sm=None if pps == "none" else int(pps))
    out_dir = bench.out_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                            args.out)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if cuda:
        dtype, h, d = torch.bfloat16, 12, 64
        seg, rates = PAPER_SEGMENTS, PAPER_RATES
        total = 1 << 20
        lengths = [1 << p for p in range(15, 21)]  # 32k .. 1M
        dense_lengths = [1 << 15, 1 << 16, 1 << 17]
    else:
        dtype, h, d = torch.float32, 4, 16
        seg, rates = (16, 32, 64, 128, 256), PAPER_RATES
        total = 2048
        lengths = [512, 2048]
        dense_lengths = [512]
    t_start = time.perf_counter()
    print(f"device: {bench.device_name(device)}  torch {torch.__version__}  dtype {dtype}"
          f"  fused {config.fused} (tiles of {config.rows} positions, {config.chunk}-column"
          f" loads, {config.num_warps} warps, programs per SM "
          f"{config.programs_per_sm or 'one per tile'})")
    results, table = [], []
    # the backends the dilated rows run on: {name: dtype}; the others are reported and left out
    runs, status = bench.usable_backends(backend_names, device, dtype, d)
    extra = (lambda be: {"backend": be}) if option else (lambda be: {})

    def tol_of(dt):
        return 2e-2 if dt == torch.bfloat16 else 1e-5

    # 1. correctness first (per backend)
    checks, tols = {}, {}
    for be, dt in runs.items():
        for name, fn in (("oracle (S=700, GQA 3, causal)",
                          lambda dt=dt, be=be: check_oracle(device, dt, config, be)),
                         ("paper schedule S=40000 vs fp32 torch backend",
                          lambda dt=dt, be=be: check_paper_schedule(device, dt, config,
                                                                    backend=be) if cuda
                          else {"skipped": "cpu smoke"})):
            name = tag(name, be)
            try:
                checks[name] = fn()
            except Exception:  # noqa: BLE001 - report and go on
                traceback.print_exc()
                checks[name] = {"error": 1.0}
            tols[name] = tol_of(dt)
            print(f"check {name}: {checks[name]}")
    ok = all(isinstance(e, str) or e <= tols[n] for n, c in checks.items() for e in c.values())
    tol_text = ", ".join(dict.fromkeys(
        (f"{tol_of(dt)}" if be == "auto" else f"[{be}] {tol_of(dt)}") for be, dt in runs.items()))
    print("correctness:", "PASS" if ok else "FAIL", f"(tolerance {tol_text})")

    # 2./3. dilated attention over lengths, constant tokens, every backend in one pool
    per_token = {be: {} for be in runs}
    for s in bench.progress(lengths, desc="dilated"):
        b = max(1, total // s)
        try:
            t = time_dilated(device, dtype, b, s, h, d, seg, rates, config, runs) if runs else {}
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            if cuda:
                torch.cuda.empty_cache()
            continue
        for be, dt in runs.items():
            if tag("fwd+bwd", be) not in t:
                continue
            for what in ("fwd", "fwd+bwd"):
                key = tag(what, be)
                fl = useful_flops(b, s, h, h, d, seg, rates, True, what == "fwd+bwd")
                r = bench.result("dilated", tag(f"dilated {what}", be), median_ms=t[key],
                                 flops=fl, device=device, dtype=dt,
                                 shape={"B": b, "S": s, "H": h, "D": d, "segments": list(seg),
                                        "rates": list(rates), "causal": True},
                                 ns_per_token=t[key] * 1e6 / (b * s),
                                 spread=t[key + " spread"], **extra(be))
                results.append(r)
                table.append({"what": r["what"], "S": s, "B": b, "ms": t[key],
                              "ns/token": r["extra"]["ns_per_token"], "TFLOP/s": r["tflops"]})
            per_token[be][s] = t[tag("fwd+bwd", be)] * 1e6 / (b * s)
        if cuda:
            torch.cuda.empty_cache()

    # 4. dense causal cuDNN (the efficiency reference) and FlexAttention; with other backends
    # than auto also dense causal on each of them, in the cuDNN rows' pool
    dense_tflops = {}
    for s in bench.progress(dense_lengths, desc="dense"):
        try:
            t = time_dense(device, dtype, 1, s, h, d, runs)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            continue
        for be in ["auto", *(x for x in runs if x != "auto")]:
            if tag("fwd+bwd", be) not in t:
                continue
            for what in ("fwd", "fwd+bwd"):
                key = tag(what, be)
                fl = dense_flops(1, s, h, d, True, what == "fwd+bwd")
                method = be if be != "auto" else "sdpa cudnn" if cuda else "sdpa math"
                r = bench.result(method, tag(f"dense causal {what}", be),
                                 median_ms=t[key], flops=fl, device=device,
                                 dtype=runs.get(be, dtype),
                                 shape={"B": 1, "S": s, "H": h, "D": d, "causal": True},
                                 ns_per_token=t[key] * 1e6 / s, spread=t[key + " spread"],
                                 **(extra(be) if be != "auto" else {}))
                results.append(r)
                table.append({"what": r["what"], "S": s, "B": 1, "ms": t[key],
                              "ns/token": r["extra"]["ns_per_token"], "TFLOP/s": r["tflops"]})
                dense_tflops[(s, key)] = r["tflops"]
        if cuda:
            torch.cuda.empty_cache()
    if cuda and not args.no_flex:
        s = lengths[0]
        try:
            t = time_flex(device, dtype, s, h, d, seg, rates)
            for what in ("fwd", "fwd+bwd"):
                fl = useful_flops(1, s, h, h, d, seg, rates, True, what == "fwd+bwd")
                r = bench.result("flex", f"dilated via flex {what}", median_ms=t[what],
                                 flops=fl, device=device, dtype=dtype,
                                 shape={"B": 1, "S": s, "H": h, "D": d, "causal": True},
                                 ns_per_token=t[what] * 1e6 / s,
                                 rel_err_vs_ours=t["rel_err_vs_ours"])
                results.append(r)
                table.append({"what": r["what"], "S": s, "B": 1, "ms": t[what],
                              "ns/token": r["extra"]["ns_per_token"], "TFLOP/s": r["tflops"]})
            print(f"flex vs ours, forward rel. error: {t['rel_err_vs_ours']:.2e}")
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    print(bench.format_table(table, ["what", "S", "B", "ms", "ns/token", "TFLOP/s"]))
    summary = {"checks": checks, "correct": ok}
    if option:
        summary["backends"] = status
    ref = dense_tflops.get((dense_lengths[0], "fwd+bwd"))
    for be in runs:
        pt, sfx = per_token[be], tag("", be)
        if pt:
            flat = max(pt.values()) / min(pt.values())
            summary[tag("per_token_max_over_min", be)] = flat
            print(f"time per token (fwd+bwd){sfx}, max/min over {len(pt)} lengths: "
                  f"{flat:.3f} (target <= 1.20): {'PASS' if flat <= 1.2 else 'FAIL'}")
        dil = [r for r in results if r["what"] == tag("dilated fwd+bwd", be)]
        if ref and dil:
            ratios = {r["shape"]["S"]: r["tflops"] / ref for r in dil}
            summary[tag("useful_tflops_over_dense_cudnn_32k", be)] = ratios
            worst = min(ratios.values())
            print(f"useful TFLOP/s{sfx} / dense causal at S={dense_lengths[0]} (fwd+bwd): "
                  + ", ".join(f"{s}: {x:.2f}" for s, x in ratios.items())
                  + f"  (target >= 0.60): {'PASS' if worst >= 0.6 else 'FAIL'}")
        own = dense_tflops.get((dense_lengths[0], tag("fwd+bwd", be)))
        if be != "auto" and own and dil:  # for reference: against dense causal on itself
            ratios = {r["shape"]["S"]: r["tflops"] / own for r in dil}
            summary[f"useful_tflops_over_dense_{be}_32k"] = ratios
            print(f"useful TFLOP/s{sfx} / dense causal {be} at S={dense_lengths[0]} "
                  "(fwd+bwd, for reference): "
                  + ", ".join(f"{s}: {x:.2f}" for s, x in ratios.items()))
    results.append(bench.result("dilated", "summary", median_ms=None, device=device,
                                **{k: (str(v) if isinstance(v, dict) else v)
                                   for k, v in summary.items()}))
    path = bench.write_results(results, os.path.join(out_dir, "bench_dilated.json"))
    try:
        series = {}
        for be in runs:
            if per_token[be]:
                xs = sorted(per_token[be])
                series[tag("dilated fwd+bwd", be)] = (xs, [per_token[be][x] for x in xs])
        for be in ["auto", *(x for x in runs if x != "auto")]:
            what = tag("dense causal fwd+bwd", be)
            dn = sorted(r["shape"]["S"] for r in results if r["what"] == what)
            if dn:
                series[what] = (dn, [
                    next(r["extra"]["ns_per_token"] for r in results
                         if r["what"] == what and r["shape"]["S"] == x)
                    for x in dn])
        if series:
            bench.plot_lines(series, os.path.join(out_dir, "bench_dilated.png"),
                             xlabel="sequence length (tokens, batch x length constant)",
                             ylabel="ns per token", logx=True, logy=True,
                             title=f"LongNet dilated attention, {bench.device_name(device)}")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    print(f"wrote {path}  ({time.perf_counter() - t_start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
