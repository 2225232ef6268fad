"""How close HyperAttention is to exact attention: relative error of the output against sequence
length, sample size and block size, on random and on clustered inputs, causal and not.

    PYTHONPATH=common/src:reference/src:hyper/src python hyper/bench/quality_hyper.py
        [--out DIR] [--quick] [--device cpu|cuda]

Inputs (B = 1, H = 2, D = 64, fp32, scale 1/sqrt(D)):
* random: q, k, v ~ N(0, 1). Scores are ~N(0, 1): attention is spread over all keys, the hard
  case for a sparse approximation (its error grows with S / samples).
* clustered: tokens belong to S / 64 clusters with centres ~N(0, I); q and k are their centre
  plus N(0, 0.5^2) noise, so each row's heavy keys are its own cluster -- the structure that
  sorted LSH is meant to find.

The error is ``||out - exact|| / ||exact||`` (Frobenius, all rows), the median of 3 seeds.
``min_seq_len`` is 256 so the approximation is used at every length shown. Writes
``quality_hyper.json`` and ``quality_hyper.png`` to ``--out`` (default
``hyper/bench/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from longattn.common.kernels import attention
from longattn.common.testing import rel_error
from longattn.hyper import hyper_attention

DEFAULTS = dict(block_size=256, sample_size=256, min_seq_len=256, lsh_num_projs=8)


def make_inputs(kind, s, seed, device, h=2, d=64):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, k, v = (torch.randn(1, s, h, d, generator=g) for _ in range(3))
    else:
        n_clusters = max(1, s // 64)
        centres = torch.randn(h, n_clusters, d, generator=g)
        which = torch.randint(0, n_clusters, (2, s, h), generator=g)
        hh = torch.arange(h).view(1, h)
        q = centres[hh, which[0]] + 0.5 * torch.randn(s, h, d, generator=g)
        k = centres[hh, which[1]] + 0.5 * torch.randn(s, h, d, generator=g)
        q, k = q[None], k[None]
        v = torch.randn(1, s, h, d, generator=g)
    return q.to(device), k.to(device), v.to(device)


def error(kind, s, causal, seeds, device, **over):
    kw = {**DEFAULTS, **over}
    errs = []
    for seed in range(seeds):
        q, k, v = make_inputs(kind, s, seed, device)
        exact = attention(q, k, v, causal=causal)
        out = hyper_attention(q, k, v, causal=causal, generator=torch.Generator(
            device=device).manual_seed(100 + seed), backend="torch", **kw)
        errs.append(rel_error(out, exact))
    return statistics.median(errs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter points (CI check)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plot-only", action="store_true", help="re-plot quality_hyper.json")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    seeds = 1 if args.quick else 3
    lengths = [512, 1024] if args.quick else [1024, 2048, 4096, 8192]
    s0 = 1024 if args.quick else 4096
    samples = [0, 256] if args.quick else [0, 64, 128, 256, 512, 1024]
    blocks = [128, 256] if args.quick else [64, 128, 256, 512, 1024]
    if args.plot_only:
        with open(os.path.join(out, "quality_hyper.json")) as f:
            plot(json.load(f), out, seeds, s0)
        return
    sweeps = {
        "sequence length": ("S", lengths, lambda s: dict(s=s)),
        "sample size": ("sample_size", samples, lambda m: dict(s=s0, sample_size=m)),
        "block size": ("block_size", blocks, lambda b: dict(s=s0, block_size=b)),
    }
    t0 = time.time()
    rows = []
    for title, (xname, xs, params) in sweeps.items():
        for kind in ("random", "clustered"):
            for causal in (False, True):
                for x in xs:
                    p = params(x)
                    s = p.pop("s")
                    e = error(kind, s, causal, seeds, args.device, **p)
                    rows.append(dict(sweep=title, x=x, inputs=kind, causal=causal, S=s,
                                     rel_err=e, **{**DEFAULTS, **p}))
                    print(f"{title:>15} {xname}={x:<6} {kind:<9} "
                          f"{'causal' if causal else 'full':<6} rel.err {e:.4f}", flush=True)
    with open(os.path.join(out, "quality_hyper.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, out, seeds, s0)
    print(f"wrote quality_hyper.png and quality_hyper.json to {out} ({time.time() - t0:.0f} s)")


def plot(rows, out, seeds, s0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xnames = {"sequence length": "S", "sample size": "sample_size", "block size": "block_size"}
    fixed = {"sequence length": f"block {DEFAULTS['block_size']}, samples "
                                f"{DEFAULTS['sample_size']}",
             "sample size": f"S {s0}, block {DEFAULTS['block_size']}",
             "block size": f"S {s0}, samples {DEFAULTS['sample_size']}"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, xname) in zip(axes, xnames.items()):
        for kind, colour in (("random", "tab:red"), ("clustered", "tab:blue")):
            for causal, style in ((False, "-"), (True, "--")):
                rs = [r for r in rows if r["sweep"] == title and r["inputs"] == kind
                      and r["causal"] == causal]
                ax.plot([r["x"] for r in rs], [r["rel_err"] for r in rs], style, marker="o",
                        color=colour, label=f"{kind}, {'causal' if causal else 'non-causal'}")
        if title == "sample size":  # includes 0 samples (block diagonal only)
            ax.set_xscale("symlog", base=2, linthresh=64)
        else:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xname)
        ax.set_ylabel("relative error of out")
        ax.set_title(f"vs {title} ({fixed[title]})")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("HyperAttention vs exact attention (H=2, D=64, fp32, median of "
                 f"{seeds} seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality_hyper.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
