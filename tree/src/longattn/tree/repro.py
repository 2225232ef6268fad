"""tree's answers to ``python -m longattn.common.repro tree --target T``.

One decode step of one layer (Lq new tokens, B, Hq = Hkv heads, D, bf16) over a KV cache of N
tokens split evenly over p GPUs (``tree/targets/<T>/target.json``'s sweep):

* local step: measured on one H200 (``tree.tree_local_auto`` over a 1,048,576-token cache in
  ``bench/results/h200/bench_tree.json``), scaled linearly in the shard's KV bytes and by the
  HBM bandwidth of the H200 over the target's (``hardware.hbm_bw`` of the target folders);
* tree: local step + all-reduce MAX of ``B*Lq*Hq`` statistics + all-reduce SUM of
  ``B*Lq*Hq*(D+1)`` (``topology.allreduce_time``, binary tree);
* ring: p local steps with the p - 1 hand-offs of a whole KV shard overlapped
  (``topology.step_time`` / ``overlapped_time``);
* peak memory per GPU: tree holds its shard and O(B*Hq*D) statistics; ring holds its shard
  and the two shard buffers of its double-buffered hand-off;
* bytes sent per GPU: tree 2 * ceil(log2 p) tree all-reduce messages (max, then sum); ring
  p - 1 shards.

World sizes past the target's GPUs are more nodes of the same type (derived).
"""

from __future__ import annotations

import dataclasses
import json
import math

from longattn.common import topology

BENCH = "bench/results/h200/bench_tree.json"
LOCAL = "tree.tree_local_auto"  # the launch tree_decode uses by default
STAT_BYTES = 4  # fp32 statistics for bf16 inputs (common.dtypes.lse_dtype)


def _bench_row(ctx):
    for r in ctx.load(BENCH):
        if r["method"] == LOCAL:
            return r
    raise ValueError(f"{BENCH} has no {LOCAL!r} row")


def _h200_hbm(ctx):
    with open(ctx.pkg_dir / "targets" / "H200-1" / "target.json") as f:
        return json.load(f)["hardware"]["hbm_bw"]


def cluster(hw, p):
    """The target, or more nodes of its type when p exceeds its GPUs; p GPUs in all."""
    if p <= hw.world_size:
        if p <= hw.gpus_per_node:
            return dataclasses.replace(hw, nodes=1, gpus_per_node=p)
        return dataclasses.replace(hw, nodes=p // hw.gpus_per_node)
    return dataclasses.replace(hw, name=f"{hw.name} x{p // hw.gpus_per_node} nodes (derived)",
                               nodes=p // hw.gpus_per_node)


def kv_bytes(sw, tokens):
    return 2 * sw["batch"] * tokens * sw["kv_heads"] * sw["head_dim"] * 2  # bf16 K and V


def model(ctx, local_s_per_byte, n, p):
    """(tree s, ring s, tree peak bytes, ring peak bytes, tree sent, ring sent) per GPU."""
    sw = ctx.sweep
    tg = cluster(ctx.hw, p)
    shard = kv_bytes(sw, n / p)
    local = shard * local_s_per_byte
    rows = sw["batch"] * sw["q_len"] * sw["q_heads"]
    mx, sm = rows * STAT_BYTES, rows * (sw["head_dim"] + 1) * STAT_BYTES
    tree = local + topology.allreduce_time(tg, mx) + topology.allreduce_time(tg, sm)
    hop = topology.step_time(tg, [(r, (r + 1) % p, shard) for r in range(p)])
    ring = topology.overlapped_time([local] * p, [hop] * (p - 1))
    q_out = 2 * rows * sw["head_dim"] * 2
    hops = 2 * math.ceil(math.log2(p))
    return (tree, ring, shard + q_out + sm, 3 * shard + q_out + sm,
            hops * (mx + sm), (p - 1) * shard)


def run(ctx):
    sw = ctx.sweep
    row = _bench_row(ctx)
    measured_ms = row["median_ms"]
    # seconds per KV byte on an H200, scaled to the target's HBM bandwidth
    s_per_byte = measured_ms * 1e-3 / row["bytes_moved"] * _h200_hbm(ctx) / ctx.hbm_bw
    rows = []
    for n in sw["contexts"]:
        for p in sw["world_sizes"]:
            t, r, mt, mr, bt, br = model(ctx, s_per_byte, n, p)
            rows.append({"context": n, "gpus": p, "tree_ms": t * 1e3, "ring_ms": r * 1e3,
                         "speedup": r / t, "tree_peak_bytes": mt, "ring_peak_bytes": mr,
                         "tree_sent_bytes": bt, "ring_sent_bytes": br})
    basis = (f"alpha-beta model ({ctx.hw.name} figures) with the local step measured on an "
             f"NVIDIA H200 ({measured_ms:.3f} ms for {row['bytes_moved'] / 2**30:.0f} GiB of "
             f"K and V), scaled by HBM bandwidth")
    best = max(rows, key=lambda r: r["speedup"])
    series = {f"N = {n}": ([r["gpus"] for r in rows if r["context"] == n],
                           [r["speedup"] for r in rows if r["context"] == n])
              for n in sw["contexts"]}
    ctx.answer("decode_speedup_max", best["speedup"], "predicted",
               basis + f"; maximum at N = {best['context']}, {best['gpus']} GPUs",
               source=BENCH, device=row["device"], date=row["date"], series=series,
               x="GPUs", y="ring / tree decode time", logy=True)
    n0 = sw["contexts"][0]
    last = [r for r in rows if r["context"] == n0][-1]
    at = f"at N = {n0}, {last['gpus']} GPUs"
    ring_sent, tree_sent = last["ring_sent_bytes"], last["tree_sent_bytes"]
    for cid, key, basis in (
            ("peak_memory_ratio", "peak", f"bytes held per GPU {at}: shard + two hand-off "
             "buffers (ring) against shard + statistics (tree)"),
            ("comm_volume_ratio", "sent", f"bytes sent per GPU {at}: {ring_sent:.3g} (ring) "
             f"against {tree_sent:.3g} (tree)")):
        ctx.answer(cid, last[f"ring_{key}_bytes"] / last[f"tree_{key}_bytes"], "predicted", basis)
    _local_claim(ctx)
    return {"rows": rows}


def _local_claim(ctx):
    cid = "local_step_ms"
    if ctx.measure:
        ms, dev = measure_local(ctx.sweep, 1 << 20, device="cuda")
        ctx.answer(cid, ms, "measured", "timed by this run", device=dev)
    elif ctx.dry_run:
        ctx.answer(cid, None, "not measured yet", "a dry run measures nothing")
    elif ctx.measured_file() is not None:
        f = ctx.measured_file()["file"]
        r = next(x for x in ctx.load(f) if x["method"] == LOCAL)
        ctx.answer(cid, r["median_ms"], "measured", "committed benchmark (bench_tree.py)",
                   source=f, device=r["device"], date=r["date"])
    else:
        ctx.answer(cid, None, "not measured yet", ctx.not_measured(
            f"no committed benchmark on a {ctx.hw.device}: python tree/bench/bench_tree.py"))


def measure_local(sw, tokens, *, device):
    """Median ms of tree_decode's local step (one process) over ``tokens`` cached tokens."""
    import torch

    from longattn.common import bench
    from longattn.common.dist import LOCAL
    from longattn.tree import tree_decode

    dtype = getattr(torch, sw["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(sw["batch"], sw["q_len"], sw["q_heads"], sw["head_dim"], generator=g,
                    device=device).to(dtype)
    k, v = (torch.randn(sw["batch"], tokens, sw["kv_heads"], sw["head_dim"], generator=g,
                        device=device).to(dtype) for _ in range(2))
    ms = bench.time_fn(lambda: tree_decode(q, k, v, group=LOCAL, return_lse=True),
                       device=device)
    return ms, bench.device_name(device)


def readme_views(pkg_dir):
    """The figures tree's README derives from its benchmark JSON: GB/s of each local decode
    step (bytes_moved / median_ms)."""
    out = []
    for path in sorted((pkg_dir / "bench" / "results").rglob("bench_tree.json")):
        with open(path) as f:
            out += [r["bytes_moved"] / r["median_ms"] / 1e6 for r in json.load(f)
                    if r.get("bytes_moved") and r.get("median_ms")]
    return out
