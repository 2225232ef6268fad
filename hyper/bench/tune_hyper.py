"""HyperAttention's Triton-path settings side by side on one GPU, in one run.

    PYTHONPATH=$(ls -d */src | tr '\\n' ':') python hyper/bench/tune_hyper.py [--seq 131072]
        [--variants "default;grad_accum=float32;fwd_tile=256"] [--profile] [--out DIR]

The configuration of ``bench_hyper.py``'s causal rows (B = 1, H = 32, D = 64, bf16, block 256,
256 samples, ``min_seq_len`` 2048, 8 LSH projections). A variant is a ``HyperConfig`` written as
``field=value,field=value`` (``default``: the defaults; ``leaf_backend=fa4`` or
``leaf_backend_bwd=fa4`` needs FlashAttention-4 on the path, ``common/bench/fa4_wheels.sh``).
Steps: (1) every variant's Triton path against the torch path on
``bench_hyper.check_correctness``'s small cases; (2) on the main shape, every variant's output
and gradients against the first variant's (the rounding a setting adds; all compute the same
function); (3) the causal forward and forward + backward of every variant and exact causal cuDNN
SDPA, timed in one ``time_interleaved`` pool (3 alternating rounds, ``triton.testing``-style
medians after warm-up, so autotuning never lands in a timing); (4) ``--profile``: the top
kernels of one forward + backward of each variant. Prints a table; writes ``tune_hyper.json``
(and the profiles) to ``--out`` (default ``$OUT``, else ``hyper/bench/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from longattn.common import bench
from longattn.common.testing import rel_error
from longattn.hyper import HyperConfig, hyper_attention

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "common", "bench"))

from bench_hyper import check_correctness, exact_fn  # noqa: E402

DEFAULT_VARIANTS = "default;grad_accum=float32;fwd_tile=256"
KW = dict(causal=True, block_size=256, sample_size=256, min_seq_len=2048, lsh_num_projs=8)


def parse_variant(text: str) -> HyperConfig:
    """``"fwd_tile=256,grad_accum=input"`` -> ``HyperConfig(fwd_tile=256, grad_accum="input")``
    (``"default"``: the defaults); ints stay ints."""
    if text.strip() == "default":
        return HyperConfig()
    kw = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name not in {f.name for f in dataclasses.fields(HyperConfig)}:
            raise ValueError(f"--variants: {name!r} is not a HyperConfig field")
        kw[name] = int(value) if value.isdigit() else value
    return HyperConfig(**kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated HyperConfigs")
    ap.add_argument("--profile", action="store_true", help="top kernels of each variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    names = [v.strip() for v in args.variants.split(";") if v.strip()]
    variants = {n: parse_variant(n) for n in names}
    out = bench.out_dir(os.path.join(HERE, "results"), args.out)
    t0 = time.time()
    s, h, d = args.seq, args.heads, args.head_dim
    print(f"device: {bench.device_name('cuda')}  torch {torch.__version__}  S={s} H={h} D={d} "
          f"bf16 {KW}", flush=True)

    correct = True
    for n, conf in variants.items():
        print(f"correctness, {n} ({conf}):", flush=True)
        # a named leaf backend (e.g. fa4) may serve fp16 / bf16 only: its checks run in bf16
        named = {conf.leaf_backend, conf.leaf_backward} != {"auto"}
        correct &= check_correctness("cuda", "triton", conf,
                                     dtype=torch.bfloat16 if named else None)

    g = torch.Generator(device="cuda").manual_seed(s)
    q, k, v, do = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    qh, kh, vh, doh = (t.detach().transpose(1, 2).contiguous().requires_grad_(t is not do)
                       for t in (q, k, v, do))
    ex = exact_fn(qh, kh, vh, True, "cuda")

    def run(conf):
        torch.manual_seed(0)  # the same LSH projections and samples for every variant
        return hyper_attention(q, k, v, config=conf, **KW)

    # every variant against the first: the rounding a setting adds
    ref = None
    diffs = {}
    for n, conf in variants.items():
        o = run(conf)
        grads = torch.autograd.grad(o, (q, k, v), do)
        res = (o.float(), *(x.float() for x in grads))
        if ref is None:
            ref, diffs[n] = res, (0.0, 0.0)
        else:
            diffs[n] = (rel_error(res[0], ref[0]),
                        max(rel_error(a, b) for a, b in zip(res[1:], ref[1:])))
        if any(not torch.isfinite(x).all() for x in res):
            print(f"  FAIL {n}: non-finite output or gradient", flush=True)
            correct = False
        del o, grads, res
    del ref

    fns = {"exact fwd": ex,
           "exact fwd+bwd": lambda: torch.autograd.grad(ex(), (qh, kh, vh), doh)}
    for n, conf in variants.items():
        fns[f"{n} fwd"] = lambda conf=conf: run(conf)
        fns[f"{n} fwd+bwd"] = lambda conf=conf: torch.autograd.grad(run(conf), (q, k, v), do)
    t = bench.time_interleaved(fns, device="cuda", rounds=3, warmup=2, rep=5)

    rows, results = [], []
    for n, conf in variants.items():
        row = {"variant": n}
        for mode in ("fwd", "fwd+bwd"):
            ms = t[f"{n} {mode}"]
            row[f"{mode} ms"] = ms
            row[f"{mode} x"] = t[f"exact {mode}"] / ms
            results.append(bench.result(
                "hyper", f"causal {mode}", median_ms=ms, speedup=t[f"exact {mode}"] / ms,
                spread=t[f"{n} {mode} spread"], variant=n, config=dataclasses.asdict(conf),
                out_diff_to_default=diffs[n][0], grad_diff_to_default=diffs[n][1],
                shape={"B": 1, "S": s, "H": h, "D": d}, dtype=torch.bfloat16, device="cuda",
                **KW))
        row["out diff"], row["grad diff"] = diffs[n]
        rows.append(row)
    for mode in ("fwd", "fwd+bwd"):
        results.append(bench.result("exact (cuDNN SDPA)", f"causal {mode}",
                                    median_ms=t[f"exact {mode}"], shape={"B": 1, "S": s, "H": h,
                                                                         "D": d},
                                    dtype=torch.bfloat16, device="cuda"))
    print(f"\nexact causal cuDNN: fwd {t['exact fwd']:.2f} ms, fwd+bwd "
          f"{t['exact fwd+bwd']:.2f} ms")
    print(bench.format_table(rows))

    profiles = {}
    if args.profile:
        from profile_kernels import profile_fn

        for n, conf in variants.items():
            def f(conf=conf):
                torch.autograd.grad(run(conf), (q, k, v), do)

            total, top, wall, _ = profile_fn(f, 40)
            print(f"\nprofile {n}: wall {wall:.2f} ms, device {total:.2f} ms")
            for ms, count, name in top:
                print(f"  {ms:8.2f} ms x{count:4d}  {name}")
            profiles[n] = {"wall_ms": wall, "device_ms": total, "top": [
                {"ms": ms, "count": c, "kernel": k_} for ms, c, k_ in top]}
    print(f"correctness checks: {'PASS' if correct else 'FAIL'}")
    print(f"wrote {bench.write_results(results, os.path.join(out, 'tune_hyper.json'))}")
    prof_path = os.path.join(out, "tune_hyper_profiles.json")
    if profiles:
        with open(prof_path, "w") as fh:
            json.dump({"device": bench.device_name("cuda"), "profiles": profiles}, fh, indent=1)
    elif os.path.exists(prof_path):  # an earlier run's, which would pass for this one's
        os.remove(prof_path)
    print(f"total {time.time() - t0:.1f} s")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
