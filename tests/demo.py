"""The main job: every longattn method on a CPU world of gloo ranks, checked against the oracle.

    nox -s demo          (or: python tests/demo.py [--out demo_out])

Rows come from the foundation (below) and from each installed paper package through the entry
point group ``longattn.demo`` (``rows(run_world) -> list[dict]``), so ``common`` never imports a
paper package. Prints a table (what, shape, relative error, time, bytes) and writes
``demo.png`` and ``demo.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from importlib.metadata import entry_points

import numpy as np
import torch
import torch.distributed as dist

from longattn.common import bench, comm
from longattn.common.kernels import attention_backward, attention_forward
from longattn.common.merge import merge_partials
from longattn.common.testing import rel_error, run_world

WORLD = 4


def _inputs(seed, b=1, s=64, hq=4, hkv=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)]


def _merge_on_world(rank, world, seed):
    """Each rank attends to its quarter of the keys; all partials are gathered and merged."""
    q, k, v = _inputs(seed)
    m = k.shape[1] // world
    ks, vs = k[:, rank * m:(rank + 1) * m], v[:, rank * m:(rank + 1) * m]
    t0 = time.perf_counter()
    with comm.counting() as c:
        out, lse = attention_forward(q, ks.contiguous(), vs.contiguous())
        outs = [torch.empty_like(out) for _ in range(world)]
        lses = [torch.empty_like(lse) for _ in range(world)]
        dist.all_gather(outs, out.contiguous())
        dist.all_gather(lses, lse.contiguous())
        for p in range(world):
            if p != rank:
                comm.record("send", p, out.numel() * 8 + lse.numel() * 8)
        acc_o, acc_l = outs[0], lses[0]
        for o, lse_p in zip(outs[1:], lses[1:]):
            acc_o, acc_l = merge_partials(acc_o, acc_l, o, lse_p)
    return acc_o, acc_l, (time.perf_counter() - t0) * 1e3, c.bytes_sent


def foundation_rows(world_runner):
    from longattn import reference as R

    rows = []
    q, k, v = _inputs(0)
    qn, kn, vn = (t.numpy() for t in (q, k, v))
    o_ref, l_ref = R.attention(qn, kn, vn)
    res = world_runner(WORLD, _merge_on_world, 0)
    o, lse, ms, nbytes = res[0]
    rows.append({"method": "common", "what": "merge of 4 ranks' key-shard partials",
                 "shape": "B1 S64 H4/2 D16 fp64", "tol": 1e-10,
                 "rel_err": max(rel_error(o, o_ref), rel_error(lse, l_ref)), "time_ms": ms,
                 "bytes": nbytes})
    for causal, window, name in ((True, (-1, -1), "causal"), (False, (8, 8), "window (8,8)"),
                                 (True, (-1, -1), "causal Sq<Sk")):
        qq = q[:, :40] if name.endswith("Sq<Sk") else q
        mask = R.window_mask(qq.shape[1], k.shape[1], window)
        if causal:
            mask = mask & R.causal_mask(qq.shape[1], k.shape[1])
        do = torch.randn_like(qq)
        t0 = time.perf_counter()
        out, lse = attention_forward(qq, k, v, causal=causal, window=window)
        grads = attention_backward(do, qq, k, v, out, lse, causal=causal, window=window)
        ms = (time.perf_counter() - t0) * 1e3
        ro, _ = R.attention(qq.numpy(), kn, vn, mask=mask)
        rg = R.attention_backward(do.numpy(), qq.numpy(), kn, vn, mask=mask)
        err = max([rel_error(out, ro)] + [rel_error(a, b) for a, b in zip(grads, rg)])
        rows.append({"method": "common", "what": f"kernels torch fwd+bwd {name}",
                     "shape": f"B1 Sq{qq.shape[1]} Sk64 H4/2 D16 fp64", "rel_err": err,
                     "tol": 1e-10,
                     "time_ms": ms, "bytes": None})
    return rows


def package_rows():
    eps = entry_points()
    group = eps.select(group="longattn.demo") if hasattr(eps, "select") else eps.get(
        "longattn.demo", [])
    rows = []
    for ep in sorted(group, key=lambda e: e.name):
        t0 = time.perf_counter()
        try:
            got = ep.load()(run_world)
        except Exception as e:  # noqa: BLE001 - one broken package must not hide the others
            traceback.print_exc()
            got = [{"method": ep.name, "what": f"FAILED: {type(e).__name__}: {e}"[:80],
                    "rel_err": float("inf")}]
        print(f"  {ep.name}: {len(got)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        rows += got
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}: {r['what']}"[:60] for r in rows]
    errs = [max(float(r.get("rel_err") or 0.0), 1e-18) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    colors = ["tab:green" if e <= 2e-2 else "tab:red" for e in errs]
    ax.barh(range(len(rows)), errs, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1e-10, color="k", ls="--", lw=0.8, label="fp64 tolerance 1e-10")
    ax.axvline(2e-2, color="r", ls=":", lw=0.8, label="bf16 tolerance 2e-2")
    ax.set_xlabel("relative error against the float64 oracle")
    ax.set_title(f"longattn demo: CPU world of {WORLD} gloo ranks")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"longattn demo: CPU world of {WORLD} gloo ranks", flush=True)
    rows = foundation_rows(run_world) + package_rows()
    cols = ["method", "what", "shape", "rel_err", "time_ms", "bytes"]
    print(bench.format_table(rows, cols))
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    plot(rows, os.path.join(args.out, "demo.png"))
    # A row may carry its own tolerance ("tol"); fp64 rows should, bf16 ones default to 2e-2.
    bad = [r for r in rows if not np.isfinite(float(r.get("rel_err") or 0.0))
           or float(r.get("rel_err") or 0.0) > float(r.get("tol") or 2e-2)]
    print(f"{len(rows)} rows, {len(bad)} over tolerance, {time.perf_counter() - t0:.1f} s; "
          f"plot: {os.path.join(args.out, 'demo.png')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
