"""HyperAttention on one GPU against exact cuDNN attention, in one run.

    PYTHONPATH=common/src:reference/src:hyper/src python hyper/bench/bench_hyper.py [--smoke]
        [--out DIR] [--seq 131072] [--heads 32] [--head-dim 64] [--no-sweep] [--fwd-tile 256]
        [--samples-chunk 4096] [--leaf-backend auto,fa4,auto/fa4]

Targets: B = 1, H = 32, D = 64, bf16, S = 131072, defaults (block 256, samples 256,
min_seq_len 2048): causal forward >= 10x faster than cuDNN exact causal, causal forward+backward
>= 8x, non-causal forward >= 50x, the relative error to exact attention printed beside each.
Then a sweep of S = 4096 .. 131072 (speed-up and error, plotted).

Steps: (1) correctness on small fp32 and bf16 cases: Triton path against the torch path with the
same randomness, forward and backward with d(lse); (2) timings (warm-up first, so compilation
and autotuning never land in a timing; ``triton.testing.do_bench`` medians; the JSON is
rewritten after each timed mode, so a run stopped by a time cap keeps what it timed); (3) table,
JSON and PNGs in ``--out`` (default ``$OUT``, else ``hyper/bench/results``). A failing
configuration prints its error and the run goes on. ``--smoke`` runs a tiny configuration on the
CPU (torch path against PyTorch's SDPA) to check the script itself.

``--leaf-backend`` (default ``auto``): the local-kernel backend of HyperAttention's exact parts
(``HyperConfig.leaf_backend``: the causal leaves, and the whole call where it is exact),
``auto``, ``fa4`` (FlashAttention-4), ``auto/fa4`` (the leaves' forward on ``auto``, their
backward on ``fa4``: ``HyperConfig.leaf_backend_bwd``) or several, ``auto,fa4,auto/fa4``: then
HyperAttention is checked (Triton path with fa4 leaves against the torch path with the default
ones, in bf16: FA4 serves fp16 / bf16 only) and timed once per leaf backend, each
configuration's exact baseline and HyperAttention variants alternated over 3 rounds in one
``time_interleaved`` pool (one round, as before, with one variant); the fa4 rows are tagged
``[fa4]`` (``[auto/fa4]``) and every row records ``leaf_backend`` and the ``leaf_backends`` that
ran. A leaf backend that cannot run here is reported in one line and left out (the leaves fall
back to ``auto`` if none is left). The targets stay against exact cuDNN. A non-causal call
longer than ``min_seq_len`` has no exact part: its ``[fa4]`` rows time the same kernels as the
``auto`` ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

if "--smoke" in sys.argv:  # the CPU smoke run checks the Triton path in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from longattn.common import bench  # noqa: E402
from longattn.common.testing import rel_error  # noqa: E402
from longattn.hyper import (  # noqa: E402
    HyperConfig,
    draw_projections,
    draw_sample_indices,
    hyper_attention,
)

MODES = (("causal", True, False), ("causal fwd+bwd", True, True), ("non-causal", False, False))
TARGETS = {"causal": 10.0, "causal fwd+bwd": 8.0, "non-causal": 50.0}


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------ correctness


def check_correctness(dev, backend, config, tiny=False, dtype=None):
    """Triton vs torch path (same randomness), fwd + bwd with d(lse), small cases; the torch
    path runs its leaves on the default backend (``auto``), the Triton path on
    ``config.leaf_backend``. ``dtype``: every case in this dtype (the fa4 leaves: bf16)."""
    cases = [  # B, S, Hq, Hkv, D, causal, smooth, block, samples, min_seq_len, dtype
        (1, 1000, 4, 2, 64, True, False, 64, 80, 128, torch.float32),
        (2, 777, 2, 2, 64, False, True, 64, 200, 128, torch.float32),
        (1, 2048, 4, 4, 64, True, False, 256, 256, 512, torch.float32),
        (1, 2048, 4, 4, 64, True, False, 256, 256, 512, torch.bfloat16),
    ]
    if tiny:  # the Triton interpreter on a CPU
        cases = [(1, 40, 2, 1, 16, True, False, 16, 20, 8, torch.float32),
                 (1, 33, 2, 2, 16, False, True, 8, 12, 8, torch.float32)]
    if dtype is not None:
        cases = list(dict.fromkeys(c[:-1] + (dtype,) for c in cases))
    ref_config = dataclasses.replace(config, leaf_backend="auto")
    ok = True
    for b, s, hq, hkv, d, causal, smooth, bs, m, msl, dt in cases:
        name = f"B{b} S{s} H{hq}/{hkv} D{d} {'causal' if causal else 'full'}" \
               f"{' smooth' if smooth else ''} {str(dt)[6:]}"
        try:
            g = torch.Generator(device="cpu").manual_seed(s)
            q, k, v = (torch.randn(b, s, h, d, generator=g).to(dev, dt)
                       for h in (hq, hkv, hkv))
            p = draw_projections(d, 8, generator=g).to(dev)
            si = draw_sample_indices(s, s, b, hkv, m, causal=causal, min_seq_len=msl,
                                     generator=g).to(dev)
            do = torch.randn(b, s, hq, d, generator=g).to(dev, dt)
            dl = torch.randn(b, hq, s, generator=g).to(dev)
            res = []
            for be in ("torch", backend):
                x = [t.clone().requires_grad_(True) for t in (q, k, v)]
                o, lse = hyper_attention(*x, causal=causal, block_size=bs, min_seq_len=msl,
                                         smooth_block=smooth, projections=p, sample_indices=si,
                                         return_lse=True, backend=be,
                                         config=ref_config if be == "torch" else config)
                grads = torch.autograd.grad([o, lse], x, [do, dl])
                res.append([o, lse, *grads])
            errs = [rel_error(a, e) for a, e in zip(res[1], res[0])]
            tol = 1e-4 if dt == torch.float32 else 3e-2
            good = max(errs) <= tol
            ok &= good
            log(f"  {'PASS' if good else 'FAIL'} {name}: rel err out/lse/dq/dk/dv = "
                + " ".join(f"{e:.1e}" for e in errs) + f" (tol {tol:.0e})")
        except Exception:  # noqa: BLE001 - report and go on
            ok = False
            log(f"  ERROR {name}:\n{traceback.format_exc()}")
    return ok


# ------------------------------------------------------------------------------ timing


def exact_fn(q, k, v, causal, dev):
    """Exact attention on [B, H, S, D] tensors: cuDNN SDPA on GPUs (flash if it fails)."""
    if dev == "cpu":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    try:
        run()
        return run
    except RuntimeError as e:
        log(f"  cuDNN SDPA failed ({str(e).splitlines()[0]}); exact baseline = flash SDPA")

        def run_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return run_flash


def measure(s, causal, bwd, cfg, dev, backend, config, leaves=None):
    """``(exact ms, {leaf backend: (hyper ms, rel. error of out, of the gradients)})``;
    ``leaves``: ``{leaf backend: (HyperConfig, dtype)}`` (default: ``config`` in the run's
    dtype). Exact first, then each variant, in one pool: one round for one variant (as
    before), 3 alternating rounds for more."""
    b, h, d, dt = cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["dtype"]
    leaves = {config.leaf_backend: (config, dt)} if leaves is None else leaves
    g = torch.Generator(device=dev).manual_seed(s)
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dt, generator=g) for _ in range(3))
    do = torch.randn(b, s, h, d, device=dev, dtype=dt, generator=g)
    qh, kh, vh, doh = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))  # BHSD copies
    for t in (q, k, v, qh, kh, vh):
        t.requires_grad_(bwd)
    ex = exact_fn(qh, kh, vh, causal, dev)

    if bwd:
        def f_exact():
            return torch.autograd.grad(ex(), (qh, kh, vh), doh)
    else:
        f_exact = ex
    fns, errs = {"exact": f_exact}, {}
    for be, (conf, ldt) in leaves.items():
        xs = (q, k, v, do) if ldt == dt else tuple(
            t.detach().to(ldt).requires_grad_(t.requires_grad) for t in (q, k, v, do))
        kw = dict(causal=causal, block_size=cfg["block_size"], sample_size=cfg["sample_size"],
                  min_seq_len=cfg["min_seq_len"], lsh_num_projs=cfg["lsh_num_projs"],
                  backend=backend, config=conf)

        def hyper(xs=xs, kw=kw):
            return hyper_attention(*xs[:3], **kw)

        if bwd:
            def f_hyper(hyper=hyper, xs=xs):
                return torch.autograd.grad(hyper(), xs[:3], xs[3])
        else:
            f_hyper = hyper

        # errors (one call each; the hyper call draws its randomness from a fixed seed)
        torch.manual_seed(0)
        o_ex = ex()
        o_hy = hyper()
        err = rel_error(o_hy.float(), o_ex.transpose(1, 2).float())
        gerr = None
        if bwd:
            ge = torch.autograd.grad(o_ex, (qh, kh, vh), doh)
            gh = torch.autograd.grad(o_hy, xs[:3], xs[3])
            gerr = max(rel_error(a.float(), e.transpose(1, 2).float()) for a, e in zip(gh, ge))
            del ge, gh
        del o_ex, o_hy
        fns[be], errs[be] = f_hyper, (err, gerr)
    n = 5 if dev == "cuda" else 2
    t = bench.time_interleaved(fns, device=dev, rounds=1 if len(leaves) == 1 else 3,
                               warmup=2, rep=n)
    return t["exact"], {be: (t[be], *errs[be]) for be in leaves}


# ------------------------------------------------------------------------------ main


LEAF_BACKENDS = ("auto", "fa4", "auto/fa4")


def leaf_variants(names, config, dev, dtype, head_dim):
    """``({name: (HyperConfig, dtype)}, {name: status})`` for the ``--leaf-backend`` names that
    can run here: ``"fa4"`` both directions of the leaves on FA4, ``"auto/fa4"`` the forward on
    ``auto`` and the backward on FA4 (``HyperConfig.leaf_backend_bwd``); a variant runs where
    each of its backends can (:func:`bench.usable_backends`, which reports the others), in bf16
    where one of them serves only half precision."""
    parts = {n: n.split("/") for n in names}
    runs, status = bench.usable_backends(list(dict.fromkeys(p for ps in parts.values()
                                                            for p in ps)),
                                         dev, dtype, head_dim, say=log, label="leaf backend")
    leaves, out = {}, {}
    for n, ps in parts.items():
        named = [p for p in ps if p != "auto"]
        missing = [p for p in ps if p not in runs]
        out[n] = status[(missing or named or ["auto"])[0]]  # why not, or how it ran
        if not missing:
            fwd, bwd = ps if len(ps) == 2 else (ps[0], None)
            conf = dataclasses.replace(config, leaf_backend=fwd, leaf_backend_bwd=bwd)
            leaves[n] = (conf, runs[named[-1]] if named else dtype)
    return leaves, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-sweep", action="store_true", help="only the main sequence length")
    ap.add_argument("--fwd-tile", type=int, default=HyperConfig().fwd_tile, choices=[128, 256],
                    help="query rows per forward program (HyperConfig.fwd_tile)")
    ap.add_argument("--samples-chunk", type=int, default=HyperConfig().samples_chunk,
                    help="query rows per program of the sampled keys' backward "
                         "(HyperConfig.samples_chunk)")
    ap.add_argument("--leaf-backend", default="auto",
                    type=bench.backends_option(LEAF_BACKENDS, option="--leaf-backend"),
                    help="HyperConfig.leaf_backend, the local kernels of the exact leaves: auto "
                         "(default), fa4 (FlashAttention-4), auto/fa4 (forward auto, backward "
                         "fa4: HyperConfig.leaf_backend_bwd) or several, side by side "
                         "(auto,fa4,auto/fa4)")
    args = ap.parse_args(argv)
    leaf_names = args.leaf_backend
    try:
        config = HyperConfig(fwd_tile=args.fwd_tile, samples_chunk=args.samples_chunk)
    except ValueError as e:
        ap.error(str(e))

    if args.smoke:
        dev, backend = "cpu", "torch"
        cfg = dict(batch=1, heads=2, head_dim=16, dtype=torch.float32, block_size=32,
                   sample_size=32, min_seq_len=64, lsh_num_projs=8)
        main_s, sweep = 256, [128]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke on a CPU")
        dev, backend = "cuda", "triton"
        cfg = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                   dtype=torch.bfloat16, block_size=256, sample_size=256, min_seq_len=2048,
                   lsh_num_projs=8)
        main_s = args.seq
        sweep = [s for s in (4096, 8192, 16384, 32768, 65536) if s < main_s]
    if args.no_sweep:
        sweep = []
    out = bench.out_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        args.out)
    t0 = time.time()
    log(f"device: {bench.device_name(dev)}  torch {torch.__version__}  backend {backend}")
    log(f"config: {cfg}  {config}  S = {main_s}, sweep {sweep}")

    # the leaf backends that run: {name: (HyperConfig, dtype)}; the others reported, left out
    option = leaf_names != ["auto"]  # rows record their leaf backend only with the option
    leaves, status = leaf_variants(leaf_names, config, dev, cfg["dtype"], cfg["head_dim"])
    if not leaves:
        log("no leaf backend left: the leaves run on auto")
        leaves["auto"] = (config, cfg["dtype"])
        status["auto"] = "ran (the fallback)"
    extra = {"leaf_backends": status} if option else {}

    correct = True
    for be, (conf, dt) in leaves.items():
        sfx = "" if be == "auto" else (f" [{be}: Triton path with {be} leaves"
                                       f"{' (forward/backward)' if '/' in be else ''}, in "
                                       f"{str(dt)[6:]}]")
        log(f"correctness (triton path vs torch path, same randomness){sfx}:")
        correct &= check_correctness(dev, "triton", conf, tiny=args.smoke,
                                     dtype=None if be == "auto" else dt)
    if args.smoke:
        from longattn.reference.hyper import hyper_attention as ref

        q, k, v = (torch.randn(1, 100, 2, 16, dtype=torch.float64) for _ in range(3))
        p = draw_projections(16, 8)
        si = draw_sample_indices(100, 100, 1, 2, 8, causal=True, min_seq_len=16)
        for be, (conf, dt) in leaves.items():
            x = [t.to(dt) if be != "auto" else t for t in (q, k, v)]
            tol = 1e-10 if be == "auto" else 3e-2
            o = hyper_attention(*x, causal=True, block_size=8, min_seq_len=16, projections=p,
                                sample_indices=si, config=conf)
            o_ref, _ = ref(*(t.double().numpy() for t in x), projections=p.numpy(),
                           sample_indices=si.numpy(), block_size=8, min_seq_len=16, causal=True)
            e = rel_error(o, torch.from_numpy(o_ref))
            correct &= e < tol
            leaf = "" if be == "auto" else f" ({be} leaves, {str(dt)[6:]})"
            log(f"  {'PASS' if e < tol else 'FAIL'} torch path{leaf} vs float64 oracle: {e:.1e}")

    results, table = [], []
    json_path = os.path.join(out, "bench_hyper.json")
    for s in bench.progress(sweep + [main_s], desc="S"):
        for name, causal, bwd in MODES:
            try:
                t_ex, hy = measure(s, causal, bwd, cfg, dev, backend, config, leaves)
            except Exception as e:  # noqa: BLE001 - one failing configuration must not stop us
                log(f"  S={s} {name}: FAILED: {type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            finally:
                if dev == "cuda":
                    torch.cuda.empty_cache()
            shape = {"B": cfg["batch"], "S": s, "H": cfg["heads"], "D": cfg["head_dim"]}
            common = dict(shape=shape, device=dev)
            results.append(bench.result("exact (cuDNN SDPA)", name, median_ms=t_ex,
                                        dtype=cfg["dtype"], **common, **extra))
            for be, (t_hy, err, gerr) in hy.items():
                what = bench.backend_tag(name, be)
                speedup = t_ex / t_hy
                row = {"S": s, "mode": what, "exact_ms": t_ex, "hyper_ms": t_hy,
                       "speedup": speedup, "rel_err_out": err, "rel_err_grad": gerr,
                       "target": TARGETS[name] if s == main_s else None}
                table.append(row)
                log(f"  S={s:>6} {what:<15} exact {t_ex:9.3f} ms  hyper {t_hy:8.3f} ms  "
                    f"x{speedup:7.2f}  rel.err out {err:.3f}"
                    + (f" grad {gerr:.3f}" if gerr is not None else ""))
                results.append(bench.result(
                    "hyper", what, median_ms=t_hy, speedup=speedup, rel_err_out=err,
                    rel_err_grad=gerr, block_size=cfg["block_size"],
                    sample_size=cfg["sample_size"], min_seq_len=cfg["min_seq_len"],
                    fwd_tile=config.fwd_tile, samples_chunk=config.samples_chunk,
                    dtype=leaves[be][1], **common,
                    **({"leaf_backend": be, **extra} if option else {})))
            # the rows so far, after each mode: a run stopped by a time cap keeps them
            bench.write_results(results, json_path)

    log("\n" + bench.format_table(table))
    verdict = []
    for r in table:
        if r["target"] is not None:
            ok = r["speedup"] >= r["target"]
            verdict.append(ok)
            log(f"{'MEETS' if ok else 'MISSES'} target {r['mode']}: x{r['speedup']:.2f} "
                f"(>= x{r['target']:.0f}), rel. error to exact {r['rel_err_out']:.3f}")
    log(f"correctness checks: {'PASS' if correct else 'FAIL'}")
    path = bench.write_results(results, json_path)
    log(f"wrote {path}")
    try:
        series_t, series_e = {}, {}
        for name in [bench.backend_tag(m, be) for be in leaves for m, _, _ in MODES]:
            rs = [r for r in table if r["mode"] == name]
            if rs:
                series_t[name] = ([r["S"] for r in rs], [r["speedup"] for r in rs])
                series_e[name] = ([r["S"] for r in rs], [r["rel_err_out"] for r in rs])
        if series_t:
            title = (f"HyperAttention vs exact cuDNN, B={cfg['batch']} H={cfg['heads']} "
                     f"D={cfg['head_dim']} {str(cfg['dtype'])[6:]}, {bench.device_name(dev)}")
            bench.plot_lines(series_t, os.path.join(out, "bench_hyper_speedup.png"),
                             xlabel="sequence length", ylabel="speed-up over exact (x)",
                             title=title, logx=True, logy=True)
            bench.plot_lines(series_e, os.path.join(out, "bench_hyper_error.png"),
                             xlabel="sequence length", ylabel="relative error of out",
                             title=title, logx=True)
            log(f"wrote plots to {out}")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    log(f"total {time.time() - t0:.1f} s")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
