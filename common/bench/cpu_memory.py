"""Peak host memory of one causal forward of the ``torch`` backend on the CPU.

    python common/bench/cpu_memory.py                 # S = 65,536, B = 1, H = 8, D = 64, fp32
    python common/bench/cpu_memory.py --seq 16384 --heads 1 --json [--out DIR]

The forward runs in a fresh subprocess (so earlier allocations of the caller do not count);
the child reports its peak resident set size (``ru_maxrss``) before and after the call. The
whole-process peak includes the Python interpreter and torch (a few hundred MB); the increase
over the baseline is what the attention itself needed. A dense implementation would need
``B * H * S * S * 4`` bytes for one score matrix (128 GiB at the default size); the chunked
backend keeps a few score blocks of ``TorchConfig().score_block_elems`` = 2**22 elements (16 MiB
each in fp32) plus O(S) tensors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from longattn.common import bench

CHILD = r"""
import json, resource, sys, time
import torch
from longattn.common.kernels import attention_forward
b, s, h, d, threads = (int(x) for x in sys.argv[1:6])
torch.set_num_threads(threads)
torch.manual_seed(0)
q = torch.randn(b, s, h, d)
k = torch.randn(b, s, h, d)
v = torch.randn(b, s, h, d)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out, lse = attention_forward(q, k, v, causal=True, backend="torch")
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ok = bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
print(json.dumps({"baseline_kib": base, "peak_kib": peak, "forward_s": wall, "finite": ok}))
"""


def measure(seq=65536, heads=8, dim=64, batch=1, threads=None):
    """Run the forward in a subprocess; returns a dict with peak/baseline RSS in bytes."""
    threads = threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(batch), str(seq), str(heads), str(dim), str(threads)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "seq": seq, "heads": heads, "dim": dim, "batch": batch, "dtype": "float32",
        "causal": True, "threads": threads,
        "peak_rss_bytes": res["peak_kib"] * kib,
        "baseline_rss_bytes": res["baseline_kib"] * kib,
        "attention_bytes": (res["peak_kib"] - res["baseline_kib"]) * kib,
        "dense_scores_bytes": batch * heads * seq * seq * 4,
        "forward_s": res["forward_s"],
        "wall_s": time.perf_counter() - t0,
        "finite": res["finite"],
        "device": bench.device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit-gb", type=float, default=1.0, help="exit 1 if the peak exceeds it")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--out", default=None, help="also write DIR/cpu_memory.json")
    a = p.parse_args(argv)
    r = measure(a.seq, a.heads, a.dim, a.batch, a.threads)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "cpu_memory.json"), "w") as f:
            json.dump(r, f, indent=1)
    gib = 1024 ** 3
    if a.json:
        print(json.dumps(r))
    else:
        print(f"causal forward B={a.batch} S={a.seq} H={a.heads} D={a.dim} fp32, "
              f"{r['threads']} threads")
        print(f"  peak RSS          {r['peak_rss_bytes'] / gib:.3f} GiB "
              f"(limit {a.limit_gb} GB)")
        print(f"  baseline RSS      {r['baseline_rss_bytes'] / gib:.3f} GiB "
              "(python + torch + q/k/v)")
        print(f"  attention itself  {r['attention_bytes'] / gib:.3f} GiB "
              f"(dense scores would be {r['dense_scores_bytes'] / gib:.1f} GiB)")
        print(f"  forward {r['forward_s']:.1f} s, wall {r['wall_s']:.1f} s, finite {r['finite']}")
    ok = r["finite"] and r["peak_rss_bytes"] < a.limit_gb * 1e9
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
