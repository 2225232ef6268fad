"""One-GPU benchmark of a batch of decode requests of different lengths, against the HBM floor.

What a server's decode step on one rank looks like: ``--batch`` 16 requests, one new token
each, whose caches hold from ``--min-len`` 4,096 to ``--max-len`` 1,048,576 keys (lengths
spaced evenly on a log scale, in a shuffled order), GQA ``--q-heads`` 32 / ``--kv-heads`` 8,
``--dim`` 128, bf16, in one padded cache ``[B, max_len, Hkv, D]`` whose slots past each
row's length hold NaN (so a kernel that reads them shows it). One call of
``longattn.tree.local.local_attention(..., seqlens=lens)`` (what ``tree_decode`` runs per rank
with ``cache_seqlens``): the Triton split-K kernel in one launch.

Methods, in one run:

* ``default``: ``local_attention`` as a user calls it (the device's launch configuration,
  ``triton_decode.default_config``, and the split plan that fills whole waves,
  ``triton_decode.make_plan(rows=...)``);
* ``triton[bn/w/s]``: the same kernel with each launch configuration of a sweep (block_n,
  num_warps, num_stages) and that plan; ``/share`` and ``/share x2`` with the plan before it
  (every program an equal share of the key blocks, 4 or 8 programs per SM);
* ``flash_varlen``: torch's flash-attention varlen op on the same padded cache
  (``cu_seqlens_k`` over the padded rows with ``seqused_k``, as ``flash_attn_with_kvcache``),
  with its lse, when the op is there.

The floor is the time to read each row's keys and values once (``sum(lens) * Hkv * D * 2``
tensors * 2 bytes) at the HBM bandwidth measured in the same run by a device copy (a copy
reads and writes each byte). Correctness first: ``default`` against a float64 reference per
row (out and lse; every row finite), every other method against ``default``.

Verdict (the serving target, printed at the end): ``default`` within 1.05x the floor and within
1.05x the best configuration tried.

    PYTHONPATH=common/src:reference/src:tree/src python tree/bench/bench_decode_batch.py [--out DIR]
    ... --smoke    # tiny configuration on the CPU (Triton interpreted)
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402

from longattn.common import bench  # noqa: E402
from longattn.common.testing import rel_error as rel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT = 1.05  # the acceptance bound, against the floor and against the best config


def lengths(b, lo, hi, seed=0):
    """``b`` lengths from ``lo`` to ``hi`` spaced evenly on a log scale, shuffled."""
    if b == 1:
        return [hi]
    out = [round(lo * (hi / lo) ** (i / (b - 1))) for i in range(b)]
    random.Random(seed).shuffle(out)
    return out


def make_inputs(b, cap, hq, hkv, d, lens, dev, dtype, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(b, 1, hq, d, generator=g, device=dev).to(dtype)
    k = torch.full((b, cap, hkv, d), float("nan"), device=dev, dtype=dtype)
    v = torch.full_like(k, float("nan"))
    step = 1 << 16
    for t in (k, v):  # in slices: an fp32 randn of the whole cache would need 2x its memory
        for r, n in enumerate(lens):
            for i in range(0, n, step):
                t[r, i:min(n, i + step)] = torch.randn(min(step, n - i), hkv, d, generator=g,
                                                       device=dev).to(dtype)
    return q, k, v


def reference(q, k, v, lens, scale):
    """float64 ``(out [B, 1, Hq, D], lse [B, Hq, 1])`` per row, per KV head."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, 1, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((b, hq, 1), float("-inf"), dtype=torch.float64, device=q.device)
    for r, n in enumerate(lens):
        for h in range(hkv):
            if n == 0:
                continue
            qh = q[r, 0, h * g:(h + 1) * g].double()  # [G, D]
            s = qh @ k[r, :n, h].double().T * scale  # [G, n]
            ls = torch.logsumexp(s, -1)
            out[r, 0, h * g:(h + 1) * g] = torch.softmax(s, -1) @ v[r, :n, h].double()
            lse[r, h * g:(h + 1) * g, 0] = ls
    return out, lse


def methods(dev, smoke, lens, scale, configs=None):
    from longattn.tree import triton_decode as td
    from longattn.tree.local import local_attention

    ms = {"default": lambda q, k, v: local_attention(q, k, v, softmax_scale=scale, seqlens=lens)}
    cfgs = [(16, 4, 1)] if smoke else configs or [
        (bn, w, s) for bn in (64, 128) for w in (4, 8) for s in (3, 4)]
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" \
        else 132
    for bn, w, s in cfgs:
        for plan, mult in (("", None), ("/share", 1), ("/share x2", 2)):
            def run(q, k, v, cfg=(bn, w, s), mult=mult):
                c = dict(zip(("block_n", "num_warps", "num_stages"), cfg))
                splits = None if mult is None else share_splits(lens, c["block_n"], k.shape[2],
                                                                sms, mult)
                return td.decode(q, k, v, softmax_scale=scale, seqlens=lens, splits=splits, **c)

            ms[f"triton[bn{bn}/w{w}/s{s}{plan}]"] = run
    if dev.type == "cuda" and hasattr(torch.ops.aten, "_flash_attention_forward"):
        ms["flash_varlen"] = lambda q, k, v: flash_varlen(q, k, v, lens, scale)
    return ms


def share_splits(lens, block_n, hkv, sms, mult):
    """The splits of the plan before waves were counted: every program an equal share of the
    key blocks, ``4 * mult`` programs per SM."""
    total = hkv * sum(math.ceil(n / block_n) for n in lens)
    per = max(1, math.ceil(total / (4 * mult * sms)))
    return max(1, math.ceil(math.ceil(max(lens) / block_n) / per))


def flash_varlen(q, k, v, lens, scale):
    """torch's flash varlen op on the padded cache: ``seqused_k`` gives each row's length."""
    b, _, hq, d = q.shape
    cap = k.shape[1]
    dev = q.device
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
    cu_k = torch.arange(b + 1, dtype=torch.int32, device=dev) * cap
    used = torch.tensor(lens, dtype=torch.int32, device=dev)
    o, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.reshape(b, hq, d), k.reshape(b * cap, *k.shape[2:]), v.reshape(b * cap, *v.shape[2:]),
        cu_q, cu_k, 1, max(lens), 0.0, False, False, scale=scale, seqused_k=used)
    return o.reshape(b, 1, hq, d), lse.reshape(hq, b).T.unsqueeze(-1)


def copy_bandwidth(dev, nbytes):
    """Bytes read + written per second by a device copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench.time_fn(lambda: dst.copy_(src), device=dev, warmup=5, rep=50)
    return 2 * nbytes / (ms * 1e-3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=1 << 20)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--configs", default=None, metavar="BN/W/S,...",
                    help="launch configurations to sweep (default: 64 and 128 x 4 and 8 warps x "
                         "3 and 4 stages)")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU")
    args = ap.parse_args(argv)
    configs = None if args.configs is None else [
        tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")]
    out_dir = bench.out_dir(os.path.join(HERE, "results"), args.out)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.min_len, args.max_len = 3, 5, 300
        args.q_heads, args.kv_heads, args.dim = 4, 2, 16
    b, hq, hkv, d = args.batch, args.q_heads, args.kv_heads, args.dim
    dtype = torch.bfloat16
    scale = d ** -0.5
    lens = lengths(b, args.min_len, args.max_len)
    cap = max(lens)
    kv_bytes = 2 * sum(lens) * hkv * d * 2
    print(f"device: {bench.device_name(dev)}; torch {torch.__version__}; B={b} Lq=1 Hq={hq} "
          f"Hkv={hkv} D={d} bf16; lengths {sorted(lens)}; padded cache {cap} slots; "
          f"KV read {kv_bytes / 2**30:.2f} GiB", flush=True)
    q, k, v = make_inputs(b, cap, hq, hkv, d, lens, dev, dtype)
    ms = methods(dev, args.smoke, lens, scale, configs)

    # 1. correctness: default against float64, every other method against default
    ref_o, ref_l = reference(q, k, v, lens, scale)
    o0, l0 = ms["default"](q, k, v)
    e_o, e_l = rel(o0, ref_o), rel(l0, ref_l)
    ok_default = e_o <= 2e-2 and e_l <= 2e-2
    print(f"default vs float64: out {e_o:.3g} lse {e_l:.3g} -> {'ok' if ok_default else 'BAD'}",
          flush=True)
    del ref_o, ref_l

    # 2. the floor, measured now
    bw = copy_bandwidth(dev, min(2 << 30, kv_bytes) if dev.type == "cuda" else 16 << 20)
    floor_ms = kv_bytes / bw * 1e3
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read+write) -> HBM floor {floor_ms:.3f} ms",
          flush=True)

    # 3. every method: its error against default, then its time
    table, results = [], []
    reps = dict(warmup=1, rep=2) if args.smoke else dict(warmup=10, rep=100)
    for name, fn in bench.progress(list(ms.items()), "methods"):
        try:
            o, lse = fn(q, k, v)
            err = max(rel(o, o0), rel(lse, l0))
            t = bench.time_fn(lambda fn=fn: fn(q, k, v), device=dev, **reps)
        except Exception as ex:  # noqa: BLE001 - report and go on
            print(f"  {name} failed: {type(ex).__name__}: {ex}".splitlines()[0][:200], flush=True)
            continue
        ok = err <= 2e-2
        table.append(dict(method=name, ms=t, gbps=kv_bytes / (t * 1e-3) / 1e9,
                          x_floor=t / floor_ms, err_vs_default=err, ok=ok))
        results.append(bench.result(
            "tree.batch_decode." + name, "local decode step, batch of requests", median_ms=t,
            device=dev, shape=dict(B=b, Lq=1, Hq=hq, Hkv=hkv, D=d, lens=lens), dtype=dtype,
            bytes_moved=kv_bytes, hbm_floor_ms=floor_ms, copy_bw_rw=bw, x_floor=t / floor_ms,
            err_vs_default=err, ok=ok))
    best = min((r for r in table if r["ok"] and r["method"].startswith(("triton", "default"))),
               key=lambda r: r["ms"])
    dflt = next(r for r in table if r["method"] == "default")
    for r in table:
        r["x_best"] = r["ms"] / best["ms"]
    print()
    print(bench.format_table(table, ["method", "ms", "gbps", "x_floor", "x_best",
                                     "err_vs_default", "ok"]))
    good = ok_default and dflt["x_floor"] <= LIMIT and dflt["x_best"] <= LIMIT
    print(f"\ndefault {dflt['ms']:.3f} ms = {dflt['x_floor']:.3f}x the HBM floor, "
          f"{dflt['x_best']:.3f}x the best configuration ({best['method']}, {best['ms']:.3f} ms)"
          f" -> {'PASS' if good else 'FAIL'} (<= {LIMIT}x both)")
    path = bench.write_results(results, os.path.join(out_dir, "bench_decode_batch.json"))
    print(f"wrote {path}")
    return 0 if good or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
