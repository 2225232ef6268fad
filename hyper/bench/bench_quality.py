"""HyperAttention's error against exact attention: longattn next to the seed's rules
(``seed_reference.py``), the ablations that switch one rule at a time, and error against the
budget (block size x samples) on four input families (three synthetic, one of a trained
model's attention).

    PYTHONPATH=common/src:reference/src:hyper/src python hyper/bench/bench_quality.py \\
        [--smoke] [--out DIR] [--name bench_quality] [--device cpu|cuda] \\
        [--dtype float32|bfloat16] [--heads 2] [--families random clustered heavy model] \\
        [--seq-lens 4096 8192 16384] [--seeds 5] [--budget-seq 8192] [--budget-seeds 3] \\
        [--no-budget] [--no-ablations] [--model-cache DIR | --no-model-cache]

Methods (the rules are :class:`seed_reference.SeedRules`; all share the LSH hyperplanes, and the
uniform draws of a seed are the same tensor for every method that draws):

* ``seed``: the fused Triton seed's rules (amirzandieh/HyperAttention): sampled columns of
  weight 1, in-block samples counted twice, buckets by ``g(code)``; its columns taken as the
  first ``m`` keys of the original order. ``seed, kernel columns``: the columns the kernel
  really reads (tile ``c`` at row ``c * 128 * D``: keys 0..127 and 8192..8319 for 256 samples
  at D = 64; past the tensor, NaN here).
* ``seed +X``: the seed with one of longattn's rules (``ginv`` order, ``uniform`` samples,
  ``n/m`` weight, ``exclude`` in-block samples).
* ``longattn``: ``hyper_attention`` (torch path on a CPU; the Triton path on CUDA).
  ``longattn -X``: longattn with one rule of the seed (``g`` order, ``first`` columns,
  weight ``one``, no exclusion).
* ``block only``: longattn with 0 samples.

Inputs (B = 1, ``--heads`` heads, D = 64, scale 1/8):
* random: q, k, v ~ N(0, 1).
* clustered: S/16 clusters, centres ~ N(0, I); q, k = 1.5 centre + 0.3 noise; v ~ N(0, 1).
* heavy: S/8 clusters; q, k = 8 * unit(centre + 0.1 noise) (a query's 8 cluster keys score
  ~7.9, every other key ~N(0, 1): the 8 hold about half of the row's mass at S = 8192);
  v = 2 * (its cluster's value centre) + N(0, 1), so the heavy keys carry the signal.
* model: q, k, v of the global (second) attention layer of a tiny causal transformer trained
  on the CPU on a long-range copy task (``model_attention.py``: induction heads, a query's
  heavy keys are the positions after earlier occurrences of its last two tokens), on a fresh
  sequence of S tokens per seed; its first ``--heads`` heads. The model is trained once (a few
  minutes on 2 cores; ``--smoke``: a tiny one, seconds) and cached in ``--model-cache``; its
  task loss / accuracy and per-head concentration at each length are printed and written as
  ``sweep: "model"`` records.

Error = ``||out - exact|| / ||exact||`` over all rows and heads (exact: SDPA in fp32 on the same
inputs), the mean over ``--seeds`` input/hyperplane/sample draws. Non-causal points also report
``top8`` (mean share of a row's attention held by its 8 heaviest keys) and ``in block`` (mean
share held by the keys of the row's LSH block, ``exp(lse_block - lse)``), on 256 rows. Writes
``NAME.json`` (``longattn.common.bench`` records, one per family x point x method) and
``NAME.png`` (NAME: ``--name``, default ``bench_quality``) to ``--out`` (default ``$OUT``, else
``hyper/bench/results/cpu``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from longattn.common import bench
from longattn.common.testing import shared_script
from longattn.hyper import draw_projections, draw_sample_indices, hyper_attention, make_plan

HERE = os.path.dirname(os.path.abspath(__file__))
D = 64


ref = shared_script(os.path.join(HERE, "seed_reference.py"))
ma = shared_script(os.path.join(HERE, "model_attention.py"))
SEED = ref.FUSED.but(samples="first")
METHODS = {  # name -> rules of seed_reference (None: longattn's own function)
    "seed": SEED,
    "seed, kernel columns": ref.FUSED,
    "seed +ginv": SEED.but(order="ginv"),
    "seed +uniform": SEED.but(samples="uniform"),
    "seed +n/m": SEED.but(weight="n/m"),
    "seed +exclude": SEED.but(exclude=True),
    "longattn": None,
    "longattn -ginv": ref.LONGATTN.but(order="g"),
    "longattn -uniform": ref.LONGATTN.but(samples="first"),
    "longattn -n/m": ref.LONGATTN.but(weight="one"),
    "longattn -exclude": ref.LONGATTN.but(exclude=False),
    "block only": "block",
}
BUDGET_METHODS = ("seed", "longattn", "longattn -n/m")
CAUSAL_METHODS = ("seed", "seed, kernel columns", "seed +n/m", "longattn", "longattn -n/m")


# ----------------------------------------------------------------------------- inputs
def make_inputs(family, s, h, seed, device, dtype, model=None):
    """q, k, v ``[1, s, h, D]`` of ``family`` for ``seed``; ``model`` (a
    ``model_attention.CopyLM``): the trained model of the ``model`` family."""
    if family == "model":
        if model is None:
            raise ValueError("the model family needs its trained model")
        return [t.to(device, dtype) for t in ma.capture_qkv(model, s, seed, heads=h)]
    g = torch.Generator().manual_seed(seed)
    hh = torch.arange(h).view(1, h)
    if family == "random":
        q, k, v = (torch.randn(s, h, D, generator=g) for _ in range(3))
    elif family == "clustered":
        nc = max(1, s // 16)
        c = torch.randn(h, nc, D, generator=g)[hh, torch.randint(0, nc, (s, h), generator=g)]
        q = 1.5 * c + 0.3 * torch.randn(s, h, D, generator=g)
        k = 1.5 * c + 0.3 * torch.randn(s, h, D, generator=g)
        v = torch.randn(s, h, D, generator=g)
    elif family == "heavy":
        nc = max(1, s // 8)
        which = torch.randint(0, nc, (s, h), generator=g)
        c = torch.randn(h, nc, D, generator=g)[hh, which]
        q = 8 * F.normalize(c + 0.1 * torch.randn(s, h, D, generator=g), dim=-1)
        k = 8 * F.normalize(c + 0.1 * torch.randn(s, h, D, generator=g), dim=-1)
        v = 2 * torch.randn(h, nc, D, generator=g)[hh, which] + torch.randn(s, h, D, generator=g)
    else:
        raise ValueError(family)
    return [t[None].to(device, dtype) for t in (q, k, v)]


def exact(q, k, v, causal):
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def rel_error(out, ex):
    """``||out - exact|| / ||exact||`` in float64 on the tensors' device. Not
    ``common.testing.rel_error``: that one copies to the host and turns NaN into inf, where
    this table reports the seed's NaN as NaN."""
    out, ex = out.double(), ex.double()
    return float((out - ex).norm() / ex.norm())


def top_mass(q, k, top=8, rows=256):
    """Mean share of a row's (non-causal) attention held by its ``top`` heaviest keys."""
    idx = torch.linspace(0, q.shape[1] - 1, rows, device=q.device).long()
    s = torch.einsum("bihd,bjhd->bhij", q[:, idx].float(), k.float()) * D ** -0.5
    return float(torch.softmax(s, -1).topk(top, -1).values.sum(-1).mean())


def block_mass(q, k, lse, rows=256):
    """Mean share of a row's (non-causal) attention that its LSH block holds: ``exp(lse_block -
    lse_exact)``, ``lse_block`` ``[B, H, S]`` from the block-only call, on ``top_mass``'s
    rows."""
    idx = torch.linspace(0, q.shape[1] - 1, rows, device=q.device).long()
    s = torch.einsum("bihd,bjhd->bhij", q[:, idx].double(), k.double()) * D ** -0.5
    return float((lse[..., idx].double() - torch.logsumexp(s, -1)).exp().mean())


# ----------------------------------------------------------------------------- one point
def run_point(family, s, causal, block, samples, min_seq_len, methods, seeds, args):
    """Errors of ``methods`` at one point, ``seeds`` draws. Returns {method: [errors]} and the
    means of the top-8 mass and of the block's mass (non-causal; else None)."""
    errs = {m: [] for m in methods}
    mass, in_block = [], []
    tile = min(128, block, samples) if samples else min(128, block)
    for seed in range(seeds):
        q, k, v = make_inputs(family, s, args.heads, seed, args.device, args.dtype,
                              model=args.model)
        ex = exact(q, k, v, causal)
        if not causal:
            mass.append(top_mass(q, k))
        g = torch.Generator().manual_seed(1000 + seed)
        p = draw_projections(D, 8, generator=g).to(args.device)
        si = draw_sample_indices(s, s, 1, args.heads, samples, causal=causal,
                                 min_seq_len=min_seq_len, generator=g).to(args.device)
        plan = make_plan(s, s, causal, min_seq_len)
        ids = {c: i for i, c in enumerate(plan.calls)}

        def call_samples(*call, si=si, ids=ids):  # a call's draws, as longattn's plan numbers it
            return si[ids[call]]

        kw = dict(causal=causal, block_size=block, min_seq_len=min_seq_len, projections=p)
        if not causal:
            _, lse = hyper_attention(q, k, v, sample_size=0, backend=args.backend,
                                     return_lse=True, **kw)
            in_block.append(block_mass(q, k, lse))
        for m in methods:
            rules = METHODS[m]
            if rules is None or rules == "block":
                n = 0 if rules == "block" else samples
                out = hyper_attention(q, k, v, sample_size=n, backend=args.backend,
                                      sample_indices=si[..., :n] if plan.calls else None,
                                      **kw)
            else:
                out, _ = ref.seed_attention(q, k, v, rules=rules, sample_size=samples,
                                            tile=tile, samples=call_samples, **kw)
            e = rel_error(out.float(), ex)
            errs[m].append(e if math.isfinite(e) else float("nan"))
    return errs, (statistics.mean(mass) if mass else None), \
        (statistics.mean(in_block) if in_block else None)


def records(family, point, errs, mass, in_block, args):
    out = []
    for m, es in errs.items():
        finite = [e for e in es if math.isfinite(e)]
        mean = statistics.mean(es) if len(finite) == len(es) else None
        out.append(bench.result(
            m, f"{family} {'causal' if point['causal'] else 'non-causal'}", median_ms=None,
            shape=dict(B=1, S=point["S"], H=args.heads, D=D), dtype=args.dtype,
            device=args.device, family=family, sweep=point["sweep"], causal=point["causal"],
            block=point["block"], samples=point["samples"], min_seq_len=point["msl"],
            rel_err=mean, rel_err_seeds=[e if math.isfinite(e) else None for e in es],
            nan_seeds=len(es) - len(finite), top8_mass=mass, block_mass=in_block,
            lsh_num_projs=8,
            command=args.command))
    return out


# ----------------------------------------------------------------------------- driver
def plan_points(args):
    pts = []
    if not args.no_ablations:
        for s in args.seq_lens:
            pts.append(dict(sweep="ablation", S=s, causal=False, block=args.block,
                            samples=args.samples, msl=args.min_seq_len,
                            methods=tuple(METHODS), seeds=args.seeds))
        for s in args.causal_seq_lens:
            pts.append(dict(sweep="causal", S=s, causal=True, block=args.block,
                            samples=args.samples, msl=args.causal_min_seq_len,
                            methods=CAUSAL_METHODS, seeds=args.seeds))
    if not args.no_budget:
        for b in args.blocks:
            for m in args.budget_samples:
                pts.append(dict(sweep="budget", S=args.budget_seq, causal=False, block=b,
                                samples=m, msl=args.min_seq_len, methods=BUDGET_METHODS,
                                seeds=args.budget_seeds))
    return pts


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--families", nargs="+", default=["random", "clustered", "heavy", "model"])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--causal-seq-lens", type=int, nargs="+", default=[16384])
    ap.add_argument("--causal-min-seq-len", type=int, default=1024)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--min-seq-len", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget-seq", type=int, default=8192)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--budget-samples", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--budget-seeds", type=int, default=3)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--no-budget", action="store_true")
    ap.add_argument("--name", default="bench_quality", help="the output files' stem")
    ap.add_argument("--model-cache", default=ma.CACHE,
                    help="folder of the model family's trained weights (git-ignored)")
    ap.add_argument("--no-model-cache", action="store_true", help="train the model every run")
    args = ap.parse_args(argv)
    args.model_config = ma.DEFAULT
    if args.no_model_cache:
        args.model_cache = None
    if args.smoke:
        args.model_config, args.model_cache = ma.SMOKE, None
        args.device, args.heads, args.seeds, args.budget_seeds = "cpu", 1, 1, 1
        args.seq_lens, args.causal_seq_lens, args.causal_min_seq_len = [256], [256], 64
        args.block, args.samples, args.min_seq_len, args.budget_seq = 32, 32, 32, 256
        args.blocks, args.budget_samples = [16, 32], [16, 32]
    args.command = " ".join(["python", "hyper/bench/bench_quality.py"]
                            + list(sys.argv[1:] if argv is None else argv))
    args.dtype = getattr(torch, args.dtype)
    args.backend = "torch" if args.device == "cpu" else "auto"
    args.model = None  # the model family's trained model: main() loads it
    return args


def model_records(args):
    """Train or load the model family's model (``args.model``); its training and, per
    ``--seq-lens`` length, its task loss / accuracy and heads' concentration, as records."""
    t0 = time.time()
    cfg = args.model_config
    args.model, stats = ma.load_or_train(cfg, args.model_cache)
    ev = stats["eval"]
    print(f"model: {cfg.steps} training steps, {stats['train_s']:.0f} s (cached: "
          f"{stats['cached']}); held-out S={ev['S']}: copied-target loss {ev['loss']:.3f}, "
          f"accuracy {ev['acc']:.3f} (chance {ev['chance_acc']:.3f})", flush=True)
    out = [bench.result("trained model", "model family: training", median_ms=None,
                        device="cpu", family="model", sweep="model", key=cfg.key(),
                        **{k: v for k, v in stats.items() if k != "cached"})]
    for d in ma.describe(args.model, sorted(set(args.seq_lens + args.causal_seq_lens))):
        print(ma.format_description(d), flush=True)
        out.append(bench.result("trained model", "model family: task and concentration",
                                median_ms=None, shape=dict(B=1, S=d["S"], H=cfg.heads, D=D),
                                device="cpu", family="model", sweep="model", **d))
    print(f"model ready ({time.time() - t0:.0f} s)", flush=True)
    return out


def main(argv=None):
    args = parse(argv)
    out_dir = bench.out_dir(os.path.join(HERE, "results", "cpu"), args.out)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    pts = plan_points(args)
    tasks = [(f, p) for p in pts for f in args.families]
    results, t0 = [], time.time()
    if "model" in args.families:
        results += model_records(args)
    for fam, p in bench.progress(tasks, desc="points"):
        errs, mass, in_block = run_point(fam, p["S"], p["causal"], p["block"], p["samples"],
                                         p["msl"], p["methods"], p["seeds"], args)
        results += records(fam, p, errs, mass, in_block, args)
        print(f"{p['sweep']:<8} {fam:<9} S={p['S']:<6} block={p['block']:<4} "
              f"samples={p['samples']:<4} " + " ".join(
                  f"[{m}] {statistics.mean(e):.3f}" for m, e in errs.items()), flush=True)
    path = bench.write_results(results, os.path.join(out_dir, f"{args.name}.json"))
    print(tables(results))
    try:
        plot(results, os.path.join(out_dir, f"{args.name}.png"))
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return results


def _fmt(x):
    return "nan" if x is None else f"{x:.3f}"


def tables(results):
    """One table per sweep: a row per (family, point), a column per method."""
    lines = []
    for sweep in ("ablation", "causal", "budget"):
        rs = [r for r in results if r["extra"]["sweep"] == sweep]
        if not rs:
            continue
        methods = list(dict.fromkeys(r["method"] for r in rs))
        keys = list(dict.fromkeys((r["extra"]["family"], r["shape"]["S"], r["extra"]["block"],
                                   r["extra"]["samples"]) for r in rs))
        rows = []
        for fam, s, b, m in keys:
            row = dict(family=fam, S=s, block=b, samples=m)
            for r in rs:
                e = r["extra"]
                if (e["family"], r["shape"]["S"], e["block"], e["samples"]) == (fam, s, b, m):
                    row[r["method"]] = _fmt(e["rel_err"])
                    if e["top8_mass"] is not None:
                        row["top8"] = f"{e['top8_mass']:.2f}"
                    if e.get("block_mass") is not None:
                        row["in block"] = f"{e['block_mass']:.2f}"
            rows.append(row)
        cols = ["family", "S", "block", "samples"] + [c for c in ("top8", "in block")
                                                      if c in rows[0]]
        lines += [f"\n{sweep} (rel. error of out, mean over seeds)",
                  bench.format_table(rows, cols + methods)]
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results if r["extra"]["sweep"] == "budget"]
    if not rs:
        return
    fams = list(dict.fromkeys(r["extra"]["family"] for r in rs))
    blocks = sorted({r["extra"]["block"] for r in rs})
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"seed": "--", "longattn": "-", "longattn -n/m": ":"}
    for ax, fam in zip(axes[0], fams):
        for bi, b in enumerate(blocks):
            for m, ls in styles.items():
                pts = sorted((r["extra"]["samples"], r["extra"]["rel_err"]) for r in rs
                             if r["extra"]["family"] == fam and r["extra"]["block"] == b
                             and r["method"] == m and r["extra"]["rel_err"] is not None)
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", color=colours[bi % len(colours)],
                            label=f"{m}, block {b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("samples")
        ax.set_ylabel("rel. error of out")
        ax.set_title(f"{fam}, S {rs[0]['shape']['S']}, non-causal")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    r0 = rs[0]
    fig.suptitle(f"error vs budget: longattn vs the fused seed's rules ({r0['device']}, "
                 f"{r0['dtype']}, H={r0['shape']['H']}, D={D}, {r0['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
