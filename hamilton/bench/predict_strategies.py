"""Predicted time of every strategy of ``hamilton_attn`` (ring / zigzag ring, TASP, two-level,
allgather, ulysses) on every target, from ``longattn.hamilton.explain`` (the alpha-beta model of
``longattn.common.topology`` and the H200 block times it is built on). No GPU needed.

    PYTHONPATH=common/src:reference/src:hamilton/src python hamilton/bench/predict_strategies.py \
        [--out hamilton/bench/results/predict_strategies] [--markdown]

One causal training step (forward + backward), bf16, batch 1, head dim 128, KV heads
min(8, H), every GPU of the target in one group, for S in {32k, 128k, 1M} and H in {8, 32, 64}.
TASP needs the local length divisible by 2 (n - 1) (causal); powers of two are not, so it is
also predicted at the next length that is (``tasp_padded``, the padding it would take).
Writes ``predict_strategies.json`` (every prediction) and ``predict_strategies.png`` (time over
sequence length and over head count, where the best strategy changes marked), and prints the
README table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from longattn.common import topology
from longattn.hamilton import explain

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ["H100-1", "H100-2", "H100-4", "MI300X-1", "H200-1"]
SEQLENS = [32768, 131072, 1048576]
HEADS = [8, 32, 64]
CALL = dict(head_dim=128, batch=1, causal=True, backward=True, dtype_bytes=2)
CURVE_S = [2 ** k for k in range(14, 21)]  # 16k .. 1M for the plots
CURVE_H = [8, 16, 24, 32, 40, 48, 56, 64]


def _kv(h):
    return min(8, h)


def _rec(p):
    """A prediction as JSON: infinite times (infeasible) as null."""
    return {k: (None if v == math.inf else v) for k, v in dataclasses.asdict(p).items()}


def _row(target, s, h):
    n = topology.get_target(target).world_size
    e = explain(seqlen=s, heads=h, kv_heads=_kv(h), world=n, target=target, **CALL)
    row = {"target": target, "world": n, "seqlen": s, "heads": h, "kv_heads": _kv(h),
           "best": e.best.name, "predictions": [_rec(p) for p in e.predictions]}
    unit = n * 2 * (n - 1)
    padded = math.ceil(s / unit) * unit
    tp = explain(seqlen=padded, heads=h, kv_heads=_kv(h), world=n, target=target, **CALL)
    tasp = next(p for p in tp.predictions if p.schedule == "tasp")
    row["tasp_padded"] = dict(_rec(tasp), seqlen=padded)
    return row


def _fmt(ms):
    return "-" if ms is None else (f"{ms:.3g}" if ms < 100 else f"{ms:.0f}")


def markdown(rows):
    names = ["ring", "tasp_padded", "two_level", "allgather", "ulysses"]
    head = ("| target | S | H | " + " | ".join(names) + " | best |\n"
            + "|---" * (len(names) + 4) + "|")
    lines = [head]
    for r in rows:
        by = {p["schedule"]: p for p in r["predictions"]}
        cells = []
        for name in names:
            p = r["tasp_padded"] if name == "tasp_padded" else by.get(name)
            cells.append(_fmt(p["total_ms"]) if p else "n/a")
        lines.append(f"| {r['target']} | {r['seqlen'] // 1024}k | {r['heads']} | "
                     + " | ".join(cells) + f" | {r['best']} |")
    return "\n".join(lines)


def _curve(target, xs, key):
    n = topology.get_target(target).world_size
    series, best = {}, []
    for x in xs:
        s, h = (x, 32) if key == "S" else (131072, x)
        e = explain(seqlen=s, heads=h, kv_heads=_kv(h), world=n, target=target, **CALL)
        for p in e.predictions:
            series.setdefault(p.name, []).append(p.total_ms if p.feasible else math.nan)
        best.append(e.best.name)
    return series, best


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(TARGETS), figsize=(4.2 * len(TARGETS), 7.5))
    for col, target in enumerate(TARGETS):
        for row, (key, xs) in enumerate((("S", CURVE_S), ("H", CURVE_H))):
            ax = axes[row][col]
            series, best = _curve(target, xs, key)
            ring = series.get("zigzag_ring")
            for name, ys in series.items():
                rel = [y / r for y, r in zip(ys, ring)]
                ax.plot(xs, rel, marker="o", ms=3, label=name)
            for i in range(1, len(xs)):
                if best[i] != best[i - 1]:
                    ax.axvline(xs[i], color="gray", ls=":", lw=1)
                    ax.annotate(best[i], (xs[i], 1.0), fontsize=7, rotation=90, va="bottom")
            ax.set_title(f"{target}: best at the left: {best[0]}", fontsize=8)
            ax.set_xlabel("global sequence length (H = 32)" if key == "S"
                          else "query heads (S = 128k)")
            if key == "S":
                ax.set_xscale("log", base=2)
            ax.set_ylabel("predicted time / zigzag ring")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle("explain(): causal fwd+bwd, bf16, D=128, KV heads min(8, H); dotted: the "
                 "best strategy changes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "predict_strategies"))
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    rows = [_row(t, s, h) for t in TARGETS for s in SEQLENS for h in HEADS]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "predict_strategies.json"), "w") as f:
        json.dump({"call": CALL, "kv_heads": "min(8, heads)", "model": "longattn.hamilton."
                   "strategy (explain)", "targets": {t: dataclasses.asdict(
                       topology.get_target(t)) for t in TARGETS}, "rows": rows}, f, indent=1)
    if not a.no_plot:
        plot(os.path.join(a.out, "predict_strategies.png"))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
