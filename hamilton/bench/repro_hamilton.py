"""Reproduce the TASP paper's sweep on one hardware target: TASP vs (zigzag) ring attention.

    python hamilton/bench/repro_hamilton.py --target H100-1            # on an 8-GPU node
    python hamilton/bench/repro_hamilton.py --target H100-2 --nnodes 2 --node-rank R \\
        --rdzv-endpoint HOST:PORT                                       # on each of 2 nodes
    python hamilton/bench/repro_hamilton.py --target H100-1 --dry-run  # tiny sweep, CPU gloo
    nox -s "repro(hamilton, H100-1)" [-- --dry-run]

The sweep (``hamilton/targets/<T>/config.json``) is the paper's: global sequence lengths
``k * basic_len`` for k in {1, 2, 4, ..., 128}, batch sizes from the same set with batch x
seqlen <= 10M tokens, (heads, head_dim) in {(20, 64), (4, 64), (12, 64)}, bf16, forward (the
paper measured prefill). Masks: full (TASP vs ring; also the two-level schedule on 2 and 4
nodes) and causal (TASP vs zigzag ring, zigzag layout). Every rank times each call between
CUDA events after a barrier; the iteration time is the slowest rank's; the median over
iterations is reported. This script launches itself under ``torchrun`` (one process per GPU;
NCCL; gloo on the CPU for ``--dry-run``), rank 0 writes ``repro_<T>.json`` (after every
configuration, so an interrupted run keeps its results and ``--resume`` continues it) and the
driver plots the speedup over the baseline against the per-GPU sequence length.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)


def load_config(target, dry_run=False):
    path = os.path.join(PKG, "targets", target, "config.json")
    if not os.path.exists(path):
        raise SystemExit(f"no config for target {target!r} ({path})")
    with open(path) as f:
        cfg = json.load(f)
    if dry_run:
        cfg = {**cfg, **cfg["dry_run"]}
    return cfg


def sweep(cfg, quick=False):
    """[(mask, seqlen, batch, heads, head_dim)] in the paper's order (short sequences first)."""
    heads = cfg["heads_dim"][:1] if quick else cfg["heads_dim"]
    batches = cfg["batch_sizes"][:1] if quick else cfg["batch_sizes"]
    out = []
    for mask in ("full", "causal"):
        for k in cfg["seq_multipliers"]:
            seqlen = k * cfg["basic_len"]
            for b in batches:
                if b * seqlen > cfg["max_tokens"]:
                    continue
                for h, d in heads:
                    out.append((mask, seqlen, b, h, d))
    return out


def _key(mask, seqlen, b, h, d, method):
    return f"{mask}|{seqlen}|{b}|{h}|{d}|{method}"


# ---------------------------------------------------------------------------------------------
# worker (one process per GPU, under torchrun)


def _schedule(method, cfg, n):
    from longattn.hamilton import multi_ring_schedule, ring_schedule, two_level_schedule

    if method == "ring":
        return ring_schedule(n)
    if method == "tasp":
        return multi_ring_schedule(n)
    if method == "two_level":
        return two_level_schedule(cfg["nodes"], cfg["gpus_per_node"])
    raise ValueError(f"unknown method {method!r}")


def _fits(cfg, n, seqlen, b, h, d, dev_bytes):
    """Rough per-GPU memory need (q, k, v, out, fp32 accumulators, two KV buffers, kernel
    workspace) against 80% of the device; decided identically on every rank."""
    if dev_bytes is None:
        return True
    tokens = b * seqlen // n
    need = tokens * h * d * (2 * 6 + 4 * 2 + 2 * 4)
    return need < 0.8 * dev_bytes


def worker(a):
    import torch
    import torch.distributed as dist

    from longattn.common import bench

    cfg = load_config(a.target, a.dry_run)
    cuda = torch.cuda.is_available() and not a.dry_run
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=a.timeout))
    rank, n = dist.get_rank(), dist.get_world_size()
    want = cfg["nodes"] * cfg["gpus_per_node"]
    if n != want:
        raise SystemExit(f"target {a.target} needs {want} ranks, got {n}")
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = getattr(torch, cfg["dtype"])
    dev_bytes = torch.cuda.get_device_properties(dev).total_memory if cuda else None
    warmup = a.warmup if a.warmup is not None else cfg["warmup"]
    iters = a.iters if a.iters is not None else cfg["iters"]
    path = os.path.join(a.out, f"repro_{a.target}.json")
    done = {}
    if a.resume and os.path.exists(path):
        with open(path) as f:
            for r in json.load(f):
                done[r["extra"]["key"]] = r
    results = list(done.values())
    _check(rank, n, dev, dtype, cfg)

    configs = sweep(cfg, a.quick)
    it = configs
    if rank == 0:
        it = bench.progress(configs, desc=f"repro {a.target}")
    for mask, seqlen, b, h, d in it:
        causal = mask == "causal"
        local = seqlen // n
        if not _fits(cfg, n, seqlen, b, h, d, dev_bytes):
            if rank == 0:
                print(f"skip {mask} S={seqlen} B={b} H={h}: does not fit the device memory")
            continue
        g = torch.Generator(device=dev).manual_seed(1000 + rank)
        try:
            q, k, v = (torch.randn(b, local, h, d, generator=g, device=dev).to(dtype)
                       for _ in range(3))
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(f"rank {rank}: out of memory allocating S={seqlen} B={b}") from None
        for method in cfg["methods"][mask]:
            key = _key(mask, seqlen, b, h, d, method)
            if key in done:
                continue
            try:
                call = functools.partial(_call, q, k, v, causal, _schedule(method, cfg, n),
                                         a.backward)
                ms = _time(call, warmup, iters, cuda)
            except ValueError as e:  # raised on every rank (e.g. length not divisible)
                if rank == 0:
                    print(f"skip {key}: {e}")
                continue
            if rank == 0:
                res = bench.result(
                    "hamilton", f"{mask} {method}", median_ms=ms, target=a.target, device=dev,
                    dtype=dtype, shape={"seqlen": seqlen, "per_gpu_seqlen": local, "batch": b,
                                        "heads": h, "head_dim": d, "ranks": n},
                    key=key, mask=mask, schedule=method, backward=a.backward,
                    dry_run=a.dry_run)
                results.append(res)
                done[key] = res
                bench.write_results(results, path)
    dist.barrier()
    dist.destroy_process_group()


def _call(q, k, v, causal, sched, backward):
    import torch
    import torch.distributed as dist

    from longattn.hamilton import hamilton_attn

    world = dist.group.WORLD
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
            t.grad = None
        hamilton_attn(q, k, v, group=world, causal=causal, schedule=sched).float().sum() \
            .backward()
    else:
        with torch.no_grad():
            hamilton_attn(q, k, v, group=world, causal=causal, schedule=sched)


def _time(fn, warmup, iters, cuda):
    """Median over iterations of the slowest rank's time (ms)."""
    import torch
    import torch.distributed as dist

    from longattn.common.bench import time_once

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time_once(fn, cuda=cuda))
    t = torch.tensor(times, dtype=torch.float64, device="cuda" if cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def _check(rank, n, dev, dtype, cfg):
    """A small causal and full problem against one device's dense attention, every method."""
    import torch
    import torch.distributed as dist

    from longattn.common.kernels import attention
    from longattn.common.testing import rel_error
    from longattn.hamilton import hamilton_attn, shard, unshard

    h, d = cfg["heads_dim"][0]
    world = dist.group.WORLD
    g = torch.Generator(device=dev).manual_seed(0)
    for mask, methods in cfg["methods"].items():
        causal = mask == "causal"
        seqlen = 2 * n * max(1, n - 1) * cfg["gpus_per_node"]  # divisible for every schedule
        q, k, v = (torch.randn(1, seqlen, h, d, generator=g, device=dev).to(dtype)
                   for _ in range(3))
        ref = attention(q, k, v, causal=causal)
        for method in methods:
            try:
                out = hamilton_attn(*(shard(t, group=world, causal=causal) for t in (q, k, v)),
                                    group=world, causal=causal,
                                    schedule=_schedule(method, cfg, n))
            except ValueError as e:
                if rank == 0:
                    print(f"check {mask} {method}: skipped ({e})")
                continue
            err = rel_error(unshard(out, group=world, causal=causal), ref)
            if rank == 0:
                print(f"check {mask} {method}: rel. error vs dense {err:.2e}")
            if not err <= (2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4):
                raise SystemExit(f"{mask} {method}: error {err:.2e} against dense attention")
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# driver: launch torchrun, then plot


def plot(path, cfg, png):
    """Speedup (baseline ms / method ms, geometric mean over batch and heads) against the
    per-GPU sequence length, one line per (mask, method)."""
    from longattn.common import bench

    rows = bench.read_results(path)
    by = {}
    for r in rows:
        s = r["shape"]
        by[(r["extra"]["mask"], r["extra"]["schedule"], s["per_gpu_seqlen"], s["batch"],
            s["heads"], s["head_dim"])] = r["median_ms"]
    series = {}
    for mask, methods in cfg["methods"].items():
        for method in methods:
            if method == "ring":
                continue
            pts = {}
            for (m, meth, L, b, h, d), ms in by.items():
                base = by.get((m, "ring", L, b, h, d))
                if m == mask and meth == method and base:
                    pts.setdefault(L, []).append(math.log(base / ms))
            if pts:
                xs = sorted(pts)
                label = f"{mask}: {method} vs {'zigzag ring' if mask == 'causal' else 'ring'}"
                series[label] = (xs, [math.exp(sum(pts[x]) / len(pts[x])) for x in xs])
    if not series:
        print("nothing to plot")
        return None
    summary = {k: (min(v[1]), max(v[1]), math.exp(sum(map(math.log, v[1])) / len(v[1])))
               for k, v in series.items()}
    for k, (lo, hi, gm) in summary.items():
        print(f"{k}: speedup min {lo:.2f} max {hi:.2f} geo-mean {gm:.2f}")
    bench.plot_lines(series, png, xlabel="per-GPU sequence length (tokens)",
                     ylabel="speedup over the baseline", logx=True,
                     title=f"TASP on {cfg['target']}"
                     + (" (dry run, CPU gloo)" if "dry" in os.path.basename(png) else ""))
    print(f"wrote {png}")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, choices=["H100-1", "H100-2", "H100-4", "MI300X-1"])
    p.add_argument("--dry-run", action="store_true", help="tiny sweep on a CPU gloo world")
    p.add_argument("--out", default=None, help="default: $OUT, else hamilton/targets/<T>/"
                   "results (dry run: hamilton/bench/results/dry_run)")
    p.add_argument("--quick", action="store_true", help="batch 1 and the first (heads, dim)")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--resume", action="store_true", help="skip configurations already in JSON")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--timeout", type=int, default=900, help="collective timeout (s)")
    p.add_argument("--nnodes", type=int, default=None)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--rdzv-endpoint", default=None)
    p.add_argument("--plot-only", action="store_true", help="re-plot an existing JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cfg = load_config(a.target, a.dry_run)
    default_out = (os.path.join(HERE, "results", "dry_run") if a.dry_run
                   else os.path.join(PKG, "targets", a.target, "results"))
    a.out = a.out or os.environ.get("OUT") or default_out
    os.makedirs(a.out, exist_ok=True)
    if a.worker:
        return worker(a)
    path = os.path.join(a.out, f"repro_{a.target}.json")
    png = os.path.join(a.out, f"repro_{a.target}{'_dry' if a.dry_run else ''}_speedup.png")
    if not a.plot_only:
        nnodes = a.nnodes or (1 if a.dry_run else cfg["nodes"])
        per_node = cfg["nodes"] * cfg["gpus_per_node"] // nnodes
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}"]
        if nnodes == 1:
            cmd.append("--standalone")
        else:
            if not a.rdzv_endpoint:
                raise SystemExit("multi-node: pass --rdzv-endpoint HOST:PORT and --node-rank")
            cmd += [f"--nnodes={nnodes}", f"--node_rank={a.node_rank}",
                    "--rdzv_backend=c10d", f"--rdzv_endpoint={a.rdzv_endpoint}"]
        cmd += [os.path.abspath(__file__), "--worker", "--target", a.target, "--out", a.out]
        for flag in ("dry_run", "quick", "backward", "resume"):
            if getattr(a, flag):
                cmd.append("--" + flag.replace("_", "-"))
        for opt in ("warmup", "iters", "timeout"):
            if getattr(a, opt) is not None:
                cmd += [f"--{opt}", str(getattr(a, opt))]
        env = dict(os.environ)
        src = [os.path.join(os.path.dirname(PKG), p, "src") for p in ("common", "reference",
                                                                      "hamilton")]
        env["PYTHONPATH"] = os.pathsep.join(src + [env.get("PYTHONPATH", "")])
        if a.dry_run:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            env["OMP_NUM_THREADS"] = "1"
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, env=env)
        print(f"torchrun exited {rc} after {time.time() - t0:.0f} s")
        if rc != 0:
            raise SystemExit(rc)
    if a.node_rank == 0 and os.path.exists(path):
        try:
            plot(path, cfg, png)
        except Exception:  # noqa: BLE001 - the JSON is the result; a plot failure is reported
            traceback.print_exc()
    return 0


if __name__ == "__main__":
    main()
