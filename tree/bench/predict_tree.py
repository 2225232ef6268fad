"""Predicted tree vs ring decode time per hardware target (alpha-beta model), vs the paper.

One decode step of one attention layer (Lq = 1, B = 1, Hq = Hkv = 16, D = 128, bf16: the
paper's hidden size 2048) over a KV cache of N tokens split evenly over p GPUs:

* local step: the shard's K and V read once from HBM, ``2 * (N / p) * Hkv * D * 2`` bytes over
  the achievable HBM bandwidth (``Target`` has no HBM figure yet: ``HBM`` below, datasheet x
  ``--hbm-efficiency``; the one-GPU benchmark ``bench_tree.py`` measures the real one);
* tree: local step + all-reduce MAX of ``B*Hq`` fp32 + all-reduce SUM of ``B*Hq*(D+1)`` fp32
  (``topology.allreduce_time``, binary tree, latency bound); the hierarchical variant is a
  gather inside each node, the MAX / SUM pair across the node leaders, and a broadcast inside;
* ring: ``p`` local steps, the ``p - 1`` shard hand-offs ``r -> r + 1`` overlapped with them
  (``topology.step_time`` / ``overlapped_time``: NVLink inside nodes, the NIC across them).

Targets are the data of ``longattn.common.topology``; 64 GPUs is H100-4's node type with 8
nodes (``dataclasses.replace``). The paper (arXiv 2408.04093) claims "up to 8x" faster than
Ring Attention, and the blog "over 8x at 1M tokens"; it is drawn as a marker.

    PYTHONPATH=common/src:tree/src python tree/bench/predict_tree.py [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from longattn.common import topology

HBM = {"NVIDIA H100 SXM 80GB": 3.35e12, "AMD Instinct MI300X": 5.3e12}  # datasheet bytes/s
CONTEXTS = [1 << e for e in range(16, 23)]  # 64k .. 4M
B, HQ, HKV, D, ELT = 1, 16, 16, 128, 2


def targets():
    """(label, Target) for 8..64 GPUs: the named targets plus 8 nodes of H100."""
    t = topology.TARGETS
    h8 = dataclasses.replace(t["H100-4"], name="H100-8 (8 nodes, derived)", nodes=8)
    return [("H100-1", t["H100-1"]), ("H100-2", t["H100-2"]), ("H100-4", t["H100-4"]),
            ("H100-8*", h8), ("MI300X-1", t["MI300X-1"])]


def local_time(target, tokens, eff):
    return 2 * tokens * HKV * D * ELT / (HBM[target.device] * eff)


def tree_time(target, n, eff, hierarchical=False):
    p = target.world_size
    t = local_time(target, n / p, eff)
    mx, sm = B * HQ * 4, B * HQ * (D + 1) * 4
    if not hierarchical or target.nodes == 1:
        return t + topology.allreduce_time(target, mx) + topology.allreduce_time(target, sm)
    g = target.gpus_per_node
    msg = B * HQ * (D + 1) * 4
    gather = topology.step_time(target, [(r, 0, msg) for r in range(1, g)])
    leaders = dataclasses.replace(target, gpus_per_node=1)
    across = topology.allreduce_time(leaders, mx) + topology.allreduce_time(leaders, sm)
    bcast = topology.step_time(target, [(0, r, msg) for r in range(1, g)])
    return t + gather + across + bcast


def ring_time(target, n, eff):
    p = target.world_size
    shard = 2 * (n / p) * HKV * D * ELT
    comp = [local_time(target, n / p, eff)] * p
    hop = topology.step_time(target, [(r, (r + 1) % p, shard) for r in range(p)])
    return topology.overlapped_time(comp, [hop] * (p - 1))


def predict(eff):
    rows = []
    for label, tg in targets():
        for n in CONTEXTS:
            tt, th, tr = tree_time(tg, n, eff), tree_time(tg, n, eff, True), ring_time(tg, n, eff)
            rows.append(dict(target=label, gpus=tg.world_size, context=n, tree_ms=tt * 1e3,
                             tree_hier_ms=th * 1e3, ring_ms=tr * 1e3, speedup=tr / min(tt, th)))
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label in dict.fromkeys(r["target"] for r in rows):
        rs = [r for r in rows if r["target"] == label]
        xs = [r["context"] for r in rs]
        tag = f"{label} ({rs[0]['gpus']} GPUs)"
        line, = a.plot(xs, [r["ring_ms"] for r in rs], "--", marker="s", ms=3)
        a.plot(xs, [min(r["tree_ms"], r["tree_hier_ms"]) for r in rs], "-", marker="o", ms=3,
               color=line.get_color(), label=tag)
        b.plot(xs, [r["speedup"] for r in rs], marker="o", ms=3, label=tag)
    a.set(xscale="log", yscale="log", xlabel="context N (tokens)", ylabel="ms per layer",
          title="Predicted decode step: tree (solid) vs ring (dashed)")
    a.set_xscale("log", base=2)
    b.axhline(8, color="k", lw=0.8, ls=":")
    b.plot([1 << 20], [8], "k*", ms=14, label="paper: up to 8x (1M tokens)")
    b.set(yscale="log", xlabel="context N (tokens)", ylabel="ring / tree",
          title="Predicted speed-up of tree over ring decoding")
    b.set_xscale("log", base=2)
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "results"))
    ap.add_argument("--hbm-efficiency", type=float, default=0.8,
                    help="achievable fraction of the datasheet HBM bandwidth")
    args = ap.parse_args(argv)
    rows = predict(args.hbm_efficiency)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "predict_tree.json"), "w") as f:
        json.dump(dict(model=__doc__, hbm_efficiency=args.hbm_efficiency, rows=rows), f,
                  indent=1)
    plot(rows, os.path.join(args.out, "predict_tree.png"))
    print(f"{'target':10s} {'GPUs':>4s} {'N':>8s} {'tree ms':>9s} {'hier ms':>9s} "
          f"{'ring ms':>9s} {'ring/tree':>9s}")
    for r in rows:
        print(f"{r['target']:10s} {r['gpus']:4d} {r['context']:8d} {r['tree_ms']:9.3f} "
              f"{r['tree_hier_ms']:9.3f} {r['ring_ms']:9.3f} {r['speedup']:9.1f}")
    return rows


if __name__ == "__main__":
    main()
