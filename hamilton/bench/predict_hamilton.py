"""Predict TASP vs (zigzag) ring time per attention call over the paper's sweep, per target, from
the alpha-beta model of ``longattn.common.topology`` and single-GPU step times, and plot the
predicted speedups next to the paper's reported ones (key ``paper`` of each target's
``config.json``).

    PYTHONPATH=common/src:reference/src:hamilton/src python hamilton/bench/predict_hamilton.py
    ... --step-times bench_out/hamilton/step_times.json   # measured single-GPU step times

Model of one call on ``n`` ranks (``L`` tokens per rank, batch ``B``, ``H`` heads, head dim
``d``, bf16, KV heads = heads as in the paper):

* communication: transition ``s`` of a schedule is the set of its messages (rank r sends
  slot c, ``block / num_slots`` bytes with ``block = 2 * L * B * H * d * 2``, to
  ``dst[s][c][r]``); :func:`topology.step_time` gives its time on the target (alpha plus the
  slowest GPU's egress/ingress over fabric, per-peer and NIC bandwidths);
* compute: step 0 is the local (causal) block, steps 1..n-1 one ``L x L`` block (full mask) or
  half of one (causal, zigzag: every rank equal). Times come from ``--step-times`` (measured
  with ``bench_hamilton.py --step-sweep``: forward of one ``L x L`` block at B=1, H=20, d=64,
  scaled linearly in B*H) or, without it, FLOPs over the target's attention FLOP/s;
* the step loop overlaps step s's compute with transition s (:func:`topology.overlapped_time`).

Writes ``hamilton/targets/<T>/prediction.json`` and ``hamilton/bench/results/
predict_hamilton.png`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from longattn.common import topology
from longattn.hamilton.schedules import multi_ring_schedule, ring_schedule, two_level_schedule

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
TARGETS = ["H100-1", "H100-2", "H100-4", "MI300X-1"]
REF_BH = 20  # batch * heads of the measured step times (B=1, H=20)


def load_config(target):
    with open(os.path.join(PKG, "targets", target, "config.json")) as f:
        return json.load(f)


def sweep(cfg):
    for mask in ("full", "causal"):
        for k in cfg["seq_multipliers"]:
            seqlen = k * cfg["basic_len"]
            for b in cfg["batch_sizes"]:
                if b * seqlen <= cfg["max_tokens"]:
                    for h, d in cfg["heads_dim"]:
                        yield mask, seqlen, b, h, d


def schedules(cfg):
    n = cfg["nodes"] * cfg["gpus_per_node"]
    out = {"ring": ring_schedule(n), "tasp": multi_ring_schedule(n)}
    if cfg["nodes"] > 1:
        out["two_level"] = two_level_schedule(cfg["nodes"], cfg["gpus_per_node"])
    return out


def per_gb_step_times(target, sched):
    """For each transition: (alpha, seconds per GB of ``block``) -- step_time is affine in the
    message sizes, so one evaluation at block = 1 GB gives every size."""
    out = []
    n, k = sched.n, sched.num_slots
    for s in range(n - 1):
        msgs = [(r, int(sched.dst[s][c][r]), 1e9 / k) for r in range(n) for c in range(k)]
        t = topology.step_time(target, msgs)
        crosses = any(target.node_of(a) != target.node_of(b) for a, b, _ in msgs)
        alpha = target.inter_latency if crosses else target.intra_latency
        out.append((alpha, t - alpha))
    return out


class StepTimes:
    """Single-GPU forward time of one L x L block (ms) at B*H = 20, d = 64, by interpolation
    in log-log over measured lengths; ``None`` means: use FLOPs / attention FLOP/s."""

    def __init__(self, path=None):
        self.pts = None
        self.device = None
        if path:
            with open(path) as f:
                data = json.load(f)
            self.device = data.get("device")
            self.pts = sorted((r["tokens"], r["full_ms"]) for r in data["rows"])

    def block_ms(self, target, L, bh, d):
        flops = 4.0 * L * L * bh * d
        if self.pts is None:
            return flops / target.attn_flops_fwd * 1e3
        xs = [math.log(x) for x, _ in self.pts]
        ys = [math.log(y) for _, y in self.pts]
        x = math.log(L)
        i = max(1, min(len(xs) - 1, next((j for j, v in enumerate(xs) if v >= x), len(xs) - 1)))
        y = ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        ms = math.exp(y) * bh / REF_BH * d / 64
        # measured on H100: other devices scale by their attention FLOP/s
        return ms * topology.TARGETS["H100-1"].attn_flops_fwd / target.attn_flops_fwd


def predict_call(target, step_gb, mask, L, b, h, d, steps: StepTimes):
    """(total_s, compute_s, comm_s) for one call of one schedule."""
    n = len(step_gb) + 1
    block_gb = 2 * L * b * h * d * 2 / 1e9
    comm = [a + g * block_gb for a, g in step_gb]
    full = steps.block_ms(target, L, b * h, d) / 1e3
    comp = [full / 2 if mask == "causal" else full] * n  # step 0 causal: half a block too
    return topology.overlapped_time(comp, comm), sum(comp), sum(comm)


def predict_target(name, steps, peer_bw=None):
    cfg = load_config(name)
    target = topology.get_target(name)
    if peer_bw is not None:
        target = dataclasses.replace(target, peer_bw=peer_bw)
    return cfg, target, predict_rows(cfg, target, steps)


def predict_rows(cfg, target, steps):
    """Predicted time of every schedule for every (mask, length, batch, heads, head dim) of the
    sweep ``cfg`` on ``target`` (a ``topology.Target``), from the step times ``steps``."""
    n = target.world_size
    scheds = {m: per_gb_step_times(target, s) for m, s in schedules(cfg).items()}
    rows = []
    for mask, seqlen, b, h, d in sweep(cfg):
        L = seqlen // n
        row = {"mask": mask, "seqlen": seqlen, "per_gpu_seqlen": L, "batch": b, "heads": h,
               "head_dim": d}
        for m, step_gb in scheds.items():
            if mask == "causal" and m == "two_level":
                continue
            t, c, k = predict_call(target, step_gb, mask, L, b, h, d, steps)
            row[f"{m}_ms"], row[f"{m}_compute_ms"], row[f"{m}_comm_ms"] = (
                float(f"{x * 1e3:.5g}") for x in (t, c, k))
        rows.append(row)
    return rows


def speedup_curve(rows, mask, method, *, comm=False, batch=None):
    """Geometric mean over batch and heads of ring / method, per per-GPU length."""
    pts = {}
    key = "_comm_ms" if comm else "_ms"
    for r in rows:
        if r["mask"] != mask or f"{method}{key}" not in r or (batch and r["batch"] != batch):
            continue
        pts.setdefault(r["per_gpu_seqlen"], []).append(
            math.log(r[f"ring{key}"] / r[f"{method}{key}"]))
    xs = sorted(pts)
    return xs, [math.exp(sum(pts[x]) / len(pts[x])) for x in xs]


def _avg(rows, mask, method):
    vals = [r["ring_ms"] / r[f"{method}_ms"] for r in rows
            if r["mask"] == mask and f"{method}_ms" in r]
    return (sum(vals) / len(vals), max(vals)) if vals else (None, None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-times", default=None, help="JSON from bench_hamilton.py --step-sweep")
    p.add_argument("--out", default=None, help="plot folder (default hamilton/bench/results)")
    p.add_argument("--no-write", action="store_true", help="do not write prediction.json files")
    a = p.parse_args(argv)
    steps = StepTimes(a.step_times)
    out_dir = a.out or os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    summary = {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, name in zip(axes.ravel(), TARGETS):
        cfg, target, rows = predict_target(name, steps)
        low_bw = target.gpu_bw / 4 if target.fabric == "nvswitch" else None
        _, _, rows_low = predict_target(name, steps, peer_bw=low_bw) if low_bw else (0, 0, None)
        paper = cfg["paper"]
        colors = {"full": "tab:blue", "causal": "tab:red"}
        for mask in ("full", "causal"):
            for method, style in (("tasp", "-"), ("two_level", "--")):
                xs, ys = speedup_curve(rows, mask, method)
                if not xs:
                    continue
                label = (f"{mask}: {'TASP' if method == 'tasp' else 'two-level'} vs "
                         f"{'zigzag ring' if mask == 'causal' else 'ring'}")
                ax.plot(xs, ys, style, marker="o", ms=3, color=colors[mask], label=label)
                avg, mx = _avg(rows, mask, method)
                summary[(name, mask, method)] = {"pred_avg": avg, "pred_max": mx}
                if rows_low and method == "tasp":
                    xs2, ys2 = speedup_curve(rows_low, mask, method)
                    ax.plot(xs2, ys2, ":", color=colors[mask], alpha=0.7,
                            label=f"{mask}: TASP, single-peer bw = {low_bw / 1e9:.0f} GB/s")
                    summary[(name, mask, method)]["pred_avg_low_peer_bw"] = _avg(
                        rows_low, mask, method)[0]
        for kind, style in (("avg_speedup", "--"), ("max_speedup", "-.")):
            for key, val in paper.get(kind, {}).items():
                mask = "causal" if key.startswith("causal") else "full"
                what = "two-level" if key.endswith("two_level") else "TASP"
                ax.axhline(val, ls=style, lw=1, color=colors[mask], alpha=0.5)
                ax.annotate(f"paper {kind.split('_')[0]} {mask} {what} {val:.2f}x",
                            (0.01, val), xycoords=("axes fraction", "data"), fontsize=7,
                            color=colors[mask], va="bottom")
        if "comm_speedup_batch48" in paper:
            t3 = paper["comm_speedup_batch48"]
            n = cfg["nodes"] * cfg["gpus_per_node"]
            ax.plot([s / n for s in t3["seqlen"]], t3["speedup"], "k^", ms=6,
                    label="paper [3P]: comm-time speedup, batch 48 (x = seqlen / 8)")
            xs, ys = speedup_curve(rows, "full", "tasp", comm=True, batch=48)
            ax.plot(xs, ys, "k--", lw=1, label="predicted comm-time speedup, batch 48")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("per-GPU sequence length (tokens)")
        ax.set_ylabel("speedup over ring / zigzag ring")
        src = "measured step times" if steps.pts else "FLOPs / attn FLOP/s"
        ax.set_title(f"{name}: predicted ({src}), peer {target.peer_bw / 1e9:.0f} GB/s, "
                     f"NIC {target.nic_bw / 1e9:.0f} GB/s", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right")
        if not a.no_write:
            path = os.path.join(PKG, "targets", name, "prediction.json")
            with open(path, "w") as f:
                json.dump({"target": name, "model": dataclasses.asdict(target),
                           "compute": src, "step_times": a.step_times, "rows": rows}, f)
    fig.suptitle("TASP vs ring: alpha-beta prediction (lines) and the paper's reported "
                 "speedups (horizontal: average --, maximum -.)", fontsize=10)
    fig.tight_layout()
    png = os.path.join(out_dir, "predict_hamilton.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"{'target':9s} {'mask':6s} {'method':9s} {'pred avg':>8s} {'pred max':>8s} "
          f"{'paper avg':>9s} {'paper max':>9s} {'avg@bw/4':>8s}")
    for (name, mask, method), v in summary.items():
        paper = load_config(name)["paper"]
        key = mask if name in ("H100-1", "MI300X-1") else f"{mask}_{method}"
        pa, pm = paper.get("avg_speedup", {}).get(key), paper.get("max_speedup", {}).get(key)
        low = v.get("pred_avg_low_peer_bw")
        print(f"{name:9s} {mask:6s} {method:9s} {v['pred_avg']:8.2f} {v['pred_max']:8.2f} "
              f"{pa if pa else '-':>9} {pm if pm else '-':>9} "
              f"{f'{low:.2f}' if low else '-':>8}")
    print(f"wrote {png}")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
