"""One-GPU benchmark of the local decode step of Tree Attention, torch and JAX, vs the HBM floor.

The step every rank runs in ``tree_decode``: ``Lq = 1`` new token against a KV-cache shard of
``--seq`` tokens (default 1,048,576), ``--kv-heads`` 16, ``--dim`` 128, bf16, returning lse. It
is memory bound, so the floor is the time to read K and V once: KV bytes over the HBM bandwidth
measured in the same run with a device-to-device copy (a copy reads and writes each byte, so
the bandwidth is ``2 * bytes / time``; the looser "bytes copied / time" floor is printed too).

Methods (each config that fails prints its error and the run goes on):

* torch: ``triton_splitk`` (this package's split-K kernel, the default CUDA path of
  ``tree_decode``; a few launch configs, best kept), ``torch_bmm_splitk`` (chunked cuBLAS
  matmuls + exact merge), baselines ``sdpa_cudnn`` / ``sdpa_flash`` (no lse) and ``flex``
  (FlexAttention with ``return_lse``, compiled).
* JAX: ``jax_xla`` / ``jax_xla_reduce`` (split-K in XLA), ``jax_pallas`` (this package's
  Pallas kernel on BSHD), ``jax_cudnn`` (``jax.nn.dot_product_attention`` with
  ``return_residual``), ``jax_pallas_gqa`` (JAX's own Pallas decode kernel; it transposes the
  BSHD cache, which is part of its time).

Correctness first on a small case against a float64 reference; then every method's full-size
output against ``triton_splitk``'s. Timings exclude compilation (warm-up first): torch with
``longattn.common.bench.time_fn`` (``triton.testing.do_bench``, median), JAX as the mean of
back-to-back dispatches ended by ``block_until_ready`` (median of 5 rounds).

    PYTHONPATH=common/src:reference/src:tree/src python tree/bench/bench_tree.py [--out DIR]
    ... --smoke    # tiny configuration on the CPU (Triton interpreted)
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first triton import (longattn.common.kernels may import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# JAX must not grab 75% of the GPU: torch holds the KV cache too
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from longattn.common import bench  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ torch methods


def torch_methods(dev, smoke):
    from longattn.tree import triton_decode
    from longattn.tree.local import local_attention

    ms = {}
    cfgs = [dict(block_n=16, num_warps=4, num_stages=1)] if smoke else [
        dict(block_n=64, num_warps=4, num_stages=3), dict(block_n=128, num_warps=4, num_stages=3),
        dict(block_n=64, num_warps=8, num_stages=4), dict(block_n=128, num_warps=8, num_stages=3),
        dict(block_n=64, num_warps=4, num_stages=4, splits_mult=2),
        dict(block_n=32, num_warps=2, num_stages=4, splits_mult=2),
    ]
    for c in cfgs:
        c = dict(c)
        mult = c.pop("splits_mult", 1)

        def run(q, k, v, scale, c=c, mult=mult):
            splits = None
            if mult != 1:
                splits = mult * triton_decode.make_plan(k.shape[1], k.shape[0] * k.shape[2],
                                                        block_n=c["block_n"], device=q.device)[0]
            return triton_decode.decode(q, k, v, softmax_scale=scale, splits=splits, **c)

        tag = f"bn{c['block_n']}/w{c['num_warps']}/s{c['num_stages']}" + (
            f"/x{mult}" if mult != 1 else "")
        ms[f"triton_splitk[{tag}]"] = run
    ms["tree_local_auto"] = lambda q, k, v, scale: local_attention(q, k, v, softmax_scale=scale)
    ms["torch_bmm_splitk"] = bmm_splitk
    if dev.type == "cuda":
        ms["sdpa_cudnn"] = lambda q, k, v, scale: sdpa(q, k, v, scale, "CUDNN_ATTENTION")
        ms["sdpa_flash"] = lambda q, k, v, scale: sdpa(q, k, v, scale, "FLASH_ATTENTION")
        ms["flex"] = flex
    return ms


def bmm_splitk(q, k, v, scale, chunk=32768):
    """Chunked cuBLAS matmuls per (batch, KV head) on strided BSHD views + exact merge."""
    b, lq, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    chunk = min(chunk, s)
    while s % chunk:
        chunk //= 2
    ns = s // chunk
    out = torch.empty(b, hkv, lq * g, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hkv, lq * g, dtype=torch.float32, device=q.device)
    for bi in range(b):
        for h in range(hkv):
            kh = k[bi, :, h].unflatten(0, (ns, chunk))  # [ns, chunk, D], strided view
            vh = v[bi, :, h].unflatten(0, (ns, chunk))
            qh = q[bi, :, h * g:(h + 1) * g].reshape(lq * g, d).t()  # [D, rows]
            sc = torch.matmul(kh, qh).float() * scale  # [ns, chunk, rows]
            m = sc.amax(1, keepdim=True)
            p = torch.exp(sc - m)
            l_ = p.sum(1)  # [ns, rows]
            o = torch.matmul(p.to(v.dtype).transpose(1, 2), vh).float()  # [ns, rows, D]
            mx = m.amax(0)  # [1, rows]
            w = torch.exp(m[:, 0] - mx)  # [ns, rows]
            den = (w * l_).sum(0)
            out[bi, h] = (w.unsqueeze(-1) * o).sum(0) / den.unsqueeze(-1)
            lse[bi, h] = mx[0] + torch.log(den)
    out = out.reshape(b, hkv, lq, g, d).permute(0, 2, 1, 3, 4).reshape(b, lq, hq, d)
    return out, lse.reshape(b, hkv, lq, g).permute(0, 1, 3, 2).reshape(b, hq, lq)


def sdpa(q, k, v, scale, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[2] // k.shape[2]
    kw = dict(enable_gqa=True) if g > 1 else {}
    with sdpa_kernel(getattr(SDPBackend, backend)):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, **kw)
    return o.transpose(1, 2), None


_FLEX = {}


def flex(q, k, v, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    g = q.shape[2] // k.shape[2]
    o, lse = _FLEX["fn"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                         enable_gqa=g > 1, return_lse=True)
    return o.transpose(1, 2), lse


# -------------------------------------------------------------------------------- JAX methods


def jax_methods(smoke, scale):
    import jax
    import jax.numpy as jnp

    from longattn.tree.jax.local import local_attention

    def local(backend, **kw):
        return jax.jit(lambda q, k, v: local_attention(q, k, v, softmax_scale=scale,
                                                       backend=backend, **kw))

    ms = {"jax_xla": local("xla"), "jax_xla_reduce": local("xla_reduce")}
    pallas_cfgs = [dict()] if smoke else [
        dict(), dict(block_k=128), dict(num_warps=8, num_stages=4), dict(block_k=32)]
    from longattn.tree.jax import pallas_decode

    for c in pallas_cfgs:
        tag = ",".join(f"{key}={val}" for key, val in c.items()) or "default"

        def mk(c=c):
            return jax.jit(lambda q, k, v: pallas_decode.decode(q, k, v, softmax_scale=scale,
                                                                **c))

        ms[f"jax_pallas[{tag}]"] = mk()
    if jax.default_backend() == "gpu":
        ms["jax_cudnn"] = local("cudnn")

        def gqa(q, k, v):
            from jax.experimental.pallas.ops.gpu.decode_attention import gqa as g

            o, (l_, m) = g(q[:, 0], k, v, sm_scale=scale, return_residuals=True)
            return o[:, None], (m + jnp.log(l_))[..., None]

        ms["jax_pallas_gqa"] = jax.jit(gqa)
    return ms


def time_jax(f, args, rounds=5, inner=20):
    out = f(*args)
    _block(out)  # compile + warm up
    _block(f(*args))
    res = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        _block(out)
        res.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(res)


def _block(x):
    import jax

    for leaf in jax.tree_util.tree_leaves(x):
        leaf.block_until_ready()


# ------------------------------------------------------------------------------------ helpers


def rel(a, b):
    a, b = a.double(), b.double()
    e = (a - b).norm() / b.norm()
    return float("inf") if math.isnan(e) else float(e)


def copy_bandwidth(dev, nbytes):
    """(bytes read + written per second, bytes copied per second) of a device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench.time_fn(lambda: dst.copy_(src), device=dev, warmup=5, rep=50)
    return 2 * nbytes / (ms * 1e-3), nbytes / (ms * 1e-3)


def reference(q, k, v, scale):
    """float64 dense attention with lse (small case)."""
    g = q.shape[2] // k.shape[2]
    qd, kd, vd = (x.double() for x in (q, k, v))
    kd, vd = kd.repeat_interleave(g, 2), vd.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vd), lse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    ap.add_argument("--seq", type=int, default=1 << 20)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--q-heads", type=int, default=None, help="default: --kv-heads (MHA)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU")
    ap.add_argument("--no-jax", action="store_true")
    args = ap.parse_args(argv)
    out_dir = bench.out_dir(os.path.join(HERE, "results"), args.out)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.seq, args.kv_heads, args.dim = 1024, 2, 32
        args.q_heads = args.q_heads or 4  # GQA paths too
    b, hkv, d, s = args.batch, args.kv_heads, args.dim, args.seq
    hq = args.q_heads or hkv
    dtype = torch.bfloat16
    scale = d ** -0.5
    scale = scale
    print(f"device: {bench.device_name(dev)}; torch {torch.__version__}; "
          f"B={b} Lq=1 Hq={hq} Hkv={hkv} D={d} S={s} bf16", flush=True)

    tm = torch_methods(dev, args.smoke)
    jm = {}
    if not args.no_jax:
        try:
            import jax

            print(f"jax {jax.__version__} on {jax.default_backend()}", flush=True)
            jm = jax_methods(args.smoke, scale)
        except Exception as e:  # noqa: BLE001 - report and go on without JAX
            print(f"JAX unavailable: {type(e).__name__}: {e}", flush=True)

    # 1. correctness on a small case
    small = 512 if args.smoke else 8192
    g = torch.Generator(device=dev).manual_seed(0)
    qs, ks, vs = (torch.randn(b, n, h, d, generator=g, device=dev).to(dtype)
                  for n, h in ((1, hq), (small, hkv), (small, hkv)))
    ref_o, ref_l = reference(qs, ks, vs, scale)
    status = {}
    print(f"\ncorrectness (small case, S={small}) vs float64:", flush=True)
    for name, fn in bench.progress(list(tm.items()), "torch check"):
        try:
            o, lse = fn(qs, ks, vs, scale)
            e = rel(o, ref_o)
            el = rel(lse, ref_l) if lse is not None else None
            status[name] = (e <= 2e-2, e, el)
        except Exception as ex:  # noqa: BLE001
            status[name] = (False, f"{type(ex).__name__}: {ex}".splitlines()[0][:160], None)
    if jm:
        import jax.numpy as jnp

        qj, kj, vj = (jnp.asarray(x.float().cpu().numpy(), jnp.bfloat16) for x in (qs, ks, vs))
        for name, f in bench.progress(list(jm.items()), "jax check"):
            try:
                o, lse = f(qj, kj, vj)
                o = torch.tensor(np.asarray(o, "float64"))
                lse = torch.tensor(np.asarray(lse, "float64"))
                e, el = rel(o, ref_o.cpu()), rel(lse, ref_l.cpu())
                status[name] = (e <= 2e-2, e, el)
            except Exception as ex:  # noqa: BLE001
                status[name] = (False, f"{type(ex).__name__}: {ex}".splitlines()[0][:160], None)
    # a method is timed if its output is right; only methods whose lse is right too count
    # for the HBM-floor verdict (baselines such as SDPA return no lse)
    lse_ok = {n: st[2] is not None and st[2] <= 2e-2 for n, st in status.items()}
    for name, (ok, e, el) in status.items():
        print(f"  {name:34s} {'ok ' if ok else 'BAD'} out {e} lse {el}", flush=True)
    del qs, ks, vs, ref_o, ref_l

    # 2. the HBM floor, measured now
    kv_bytes = 2 * b * s * hkv * d * 2
    copy_n = min(2 << 30, kv_bytes) if dev.type == "cuda" else 64 << 20
    bw_rw, bw_copy = copy_bandwidth(dev, copy_n)
    floor_ms = kv_bytes / bw_rw * 1e3
    print(f"\ncopy bandwidth: {bw_rw / 1e9:.0f} GB/s read+write ({bw_copy / 1e9:.0f} GB/s copied)"
          f"; KV {kv_bytes / 2**30:.2f} GiB -> HBM floor {floor_ms:.3f} ms "
          f"(loose floor {kv_bytes / bw_copy * 1e3:.3f} ms)", flush=True)

    # 3. full size
    q = torch.randn(b, 1, hq, d, generator=g, device=dev).to(dtype)
    k = torch.empty(b, s, hkv, d, device=dev, dtype=dtype)
    v = torch.empty_like(k)
    for t in (k, v):  # fill in slices: randn of the whole cache in fp32 would need 2x memory
        for i in range(0, s, 1 << 16):
            t[:, i:i + (1 << 16)] = torch.randn(b, min(1 << 16, s - i), hkv, d, generator=g,
                                                device=dev).to(dtype)
    results, table = [], []
    base = None

    def record(name, ms, err, family):
        row = dict(method=name, family=family, ms=ms, gbps=kv_bytes / (ms * 1e-3) / 1e9,
                   x_floor=ms / floor_ms, err_vs_triton=err, lse=lse_ok.get(name, False))
        table.append(row)
        results.append(bench.result(
            "tree." + name, "local decode step", median_ms=ms, device=dev,
            shape=dict(B=b, Lq=1, Hq=hq, Hkv=hkv, D=d, S=s), dtype=dtype, bytes_moved=kv_bytes,
            hbm_floor_ms=floor_ms, copy_bw_rw=bw_rw, x_floor=ms / floor_ms, err=err,
            correct_small=status.get(name, (None,))[0]))

    for name, fn in bench.progress(list(tm.items()), "torch timing"):
        if not status.get(name, (False,))[0]:
            print(f"  skip {name}: failed the correctness check", flush=True)
            continue
        try:
            o, _ = fn(q, k, v, scale)
            if base is None:
                base = o.float()
            err = rel(o, base)
            reps = dict(warmup=1, rep=2) if args.smoke else dict(warmup=5, rep=50)
            ms = bench.time_fn(lambda fn=fn: fn(q, k, v, scale), device=dev, **reps)
            record(name, ms, err, "torch")
        except Exception as ex:  # noqa: BLE001
            print(f"  {name} failed: {type(ex).__name__}: {ex}".splitlines()[0][:200], flush=True)
            traceback.print_exc(limit=2)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    if jm:
        import jax
        import jax.numpy as jnp

        try:  # zero-copy views of the torch cache
            qj, kj, vj = (jax.dlpack.from_dlpack(x) for x in (q, k, v))
        except Exception as ex:  # noqa: BLE001
            print(f"dlpack failed ({ex}); copying the cache into JAX", flush=True)
            qj, kj, vj = (jnp.asarray(x.float().cpu().numpy(), jnp.bfloat16) for x in (q, k, v))
        for name, f in bench.progress(list(jm.items()), "jax timing"):
            if not status.get(name, (False,))[0]:
                print(f"  skip {name}: failed the correctness check", flush=True)
                continue
            try:
                o, _ = f(qj, kj, vj)
                err = None
                if base is not None:
                    err = rel(torch.tensor(np.asarray(o, np.float32)), base.cpu())
                ms = time_jax(f, (qj, kj, vj), *((2, 2) if args.smoke else ()))
                record(name, ms, err, "jax")
            except Exception as ex:  # noqa: BLE001
                print(f"  {name} failed: {type(ex).__name__}: {ex}".splitlines()[0][:200],
                      flush=True)

    print()
    print(bench.format_table(table, ["method", "family", "ms", "gbps", "x_floor",
                                     "err_vs_triton", "lse"]))
    for fam in ("torch", "jax"):
        rows = [r for r in table if r["family"] == fam and r["lse"]]
        if rows:
            best = min(rows, key=lambda r: r["ms"])
            verdict = "within" if best["x_floor"] <= 1.3 else "NOT within"
            print(f"best {fam} (with a correct lse): {best['method']} {best['ms']:.3f} ms = "
                  f"{best['x_floor']:.2f}x the HBM floor -> {verdict} 1.3x")
    path = bench.write_results(results, os.path.join(out_dir, "bench_tree.json"))
    try:
        _plot(table, floor_ms, os.path.join(out_dir, "bench_tree.png"), b, hq, hkv, d, s)
    except Exception as ex:  # noqa: BLE001
        print(f"plot failed: {ex}")
    print(f"wrote {path}")
    return table


def _plot(table, floor_ms, path, b, hq, hkv, d, s):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table, key=lambda r: r["ms"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.barh([r["method"] for r in rows], [r["ms"] for r in rows],
            color=["C0" if r["family"] == "torch" else "C1" for r in rows])
    ax.axvline(floor_ms, color="k", ls="--", label=f"HBM floor {floor_ms:.3f} ms")
    ax.axvline(1.3 * floor_ms, color="r", ls=":", label="1.3x floor")
    ax.set_xscale("log")
    ax.set_xlabel("ms (log)")
    ax.set_title(f"local decode step, B={b} Hq={hq} Hkv={hkv} D={d} S={s} bf16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
