"""Time the fused merge / gradient-sum kernels alone, per launch choice, against memory speed.

    PYTHONPATH=$(ls -d */src | tr '\\n' ':') python dilated/bench/tune_fused.py [--batch 32]
        [--seq 32768] [--full 3]

LongNet's schedule (segments 2048..32768, rates 1,2,4,6,12), H = 12, D = 64, bf16, causal (GPU
only). The kernels' inputs are captured from one real forward + backward; each launch choice
(positions a tile, head-dim columns a load, warps, programs per SM or one program per
tile) is timed on them, with the
bytes each kernel must move and the bandwidth it reaches, next to a plain device copy of as
many bytes (the memory speed this GPU gives such traffic). Then the ``--full`` best choices
(by merge + 3 sums) and the default :class:`~longattn.dilated.FusedConfig` run the whole
forward + backward, alternated round by round, and a profile of the best shows where the rest
of the time goes. Each choice is a ``FusedConfig`` passed as ``config=``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from longattn.common import bench
from longattn.dilated import FusedConfig, dilated_attention
from longattn.dilated import fused as F

SEG, RATES = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
# (positions a tile, head-dim columns a load, warps, programs per SM or None: one per tile)
CHOICES = [(rows, chunk, warps, pps) for rows, chunk, warps in
           ((64, 16, 4), (128, 16, 4), (128, 16, 8), (256, 16, 8), (32, 16, 2), (64, 32, 4),
            (128, 32, 4), (128, 32, 8), (128, 8, 4))
           for pps in (None, 32)]


def _config(choice):
    rows, chunk, warps, pps = choice
    return FusedConfig(rows=rows, chunk=chunk, num_warps=warps, programs_per_sm=pps)


def _capture(run):
    """The positional arguments of every merge_strided / sum_strided call made by ``run()``
    (the launch, ``config=``, is the caller's to choose)."""
    seen = {"merge": [], "sum": []}
    real = F.merge_strided, F.sum_strided

    def merge(*a, **kw):
        seen["merge"].append(a)
        return real[0](*a, **kw)

    def sums(*a, **kw):
        seen["sum"].append(a)
        return real[1](*a, **kw)

    F.merge_strided, F.sum_strided = merge, sums
    try:
        run()
    finally:
        F.merge_strided, F.sum_strided = real
    return seen


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--full", type=int, default=3, help="best choices to time end to end")
    ap.add_argument("--best-file", default=None, help="write the fastest choice here")
    args = ap.parse_args(argv)
    dev = "cuda"
    d0 = FusedConfig()
    default = (d0.rows, d0.chunk, d0.num_warps, d0.programs_per_sm)
    b, s, h, d = args.batch, args.seq, 12, 64
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v, do = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def fb(config=None):
        o = dilated_attention(q, k, v, SEG, RATES, causal=True, config=config)
        torch.autograd.grad(o, (q, k, v), do)

    seen = _capture(fb)
    (merge_args,), sum_args = seen["merge"], seen["sum"]
    parts = merge_args[0]
    out_bytes = b * s * h * d * 2
    merge_bytes = _nbytes([t for p in parts for t in p]) + out_bytes + b * s * h * 4
    sum_bytes = [_nbytes(a[0]) + out_bytes for a in sum_args]
    src = torch.empty(merge_bytes // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench.time_fn(lambda: dst.copy_(src), device=dev)
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    print(f"B={b} S={s} H={h} D={d} bf16 on {bench.device_name(dev)}; merge moves "
          f"{merge_bytes / 1e9:.2f} GB, each sum {sum_bytes[0] / 1e9:.2f} GB; a device copy "
          f"of {merge_bytes / 1e9:.2f} GB: {copy_ms:.2f} ms = {copy_gbs:.0f} GB/s", flush=True)

    rows = []
    for choice in bench.progress(CHOICES, desc="launch choices"):
        cfg = _config(choice)
        ms = [bench.time_fn(lambda c=cfg: F.merge_strided(*merge_args, config=c), device=dev)]
        ms += [bench.time_fn(lambda a=a, c=cfg: F.sum_strided(*a, config=c), device=dev)
               for a in sum_args]
        rows.append({"rows": choice[0], "chunk": choice[1], "warps": choice[2],
                     "programs/SM": choice[3] or "1 per tile",
                     "merge ms": round(ms[0], 3),
                     "merge GB/s": round(merge_bytes / ms[0] / 1e6),
                     "3 sums ms": round(sum(ms[1:]), 3),
                     "sum GB/s": round(sum(sum_bytes) / sum(ms[1:]) / 1e6),
                     "total ms": round(sum(ms), 3), "_choice": choice})
    rows.sort(key=lambda r: r["total ms"])
    print(flush=True)  # the table starts on a line of its own after the progress bar
    print(bench.format_table([{k: v for k, v in r.items() if k != "_choice"} for r in rows]))
    print(f"memory time at copy speed: merge {merge_bytes / copy_gbs / 1e6:.2f} ms, 3 sums "
          f"{sum(sum_bytes) / copy_gbs / 1e6:.2f} ms", flush=True)

    best = [r["_choice"] for r in rows[:args.full]]
    fns = {}
    for choice in dict.fromkeys(best + [default]):
        cfg = _config(choice)

        def run(cfg=cfg):
            fb(cfg)
        run()
        fns[str(choice)] = run
    times = bench.time_interleaved(fns, device=dev, rounds=3)
    for name in fns:
        print(f"fwd+bwd with (rows, chunk, warps, programs/SM) = {name}: {times[name]:.2f} ms "
              f"(spread {times[name + ' spread']:.3f})", flush=True)

    from torch.profiler import ProfilerActivity, profile

    fastest = min(fns, key=times.get)
    if args.best_file:  # for a benchmark run that follows: "ROWS,CHUNK,WARPS,PROGRAMS_PER_SM"
        with open(args.best_file, "w") as f:
            f.write(fastest.strip("()").replace(" ", "").replace("None", "none"))
    fns[fastest]()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fns[fastest]()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    print(f"profile of {fastest}: total device time "
          f"{sum(e.self_device_time_total for e in ev) / 1e3:.2f} ms")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:16]:
        print(f"  {e.self_device_time_total / 1e3:9.2f} ms  x{e.count:4d}  {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
