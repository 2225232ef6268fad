"""GPU check of the compiled local decode kernels (the CPU tests run them interpreted).

On CUDA: the split-K Triton kernel (through ``tree_decode``'s ``backend="auto"`` and
``"triton_decode"``) and, with JAX on the GPU, the Pallas kernel and the XLA split-K step,
each against a float64 reference for a few shapes (GQA, Lq > 1 with a causal cut, a cache
shorter than Lq), a NaN key (exactly the rows that see it must be NaN in out and lse), and per
row lengths (``cache_seqlens``: rows of 3,000, 0, 17, 2 and 1,500 keys with NaN past each
row's length, in one launch), and per-row starts and skipped slots (what a left-padded batch's
decode reads, NaN in every slot a row must not read). Prints one line per check and exits
non-zero on a failure.

    PYTHONPATH=common/src:tree/src python tree/bench/check_gpu.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

CASES = [  # (B, Lq, Hq, Hkv, S, D, right)
    (1, 1, 16, 16, 100_000, 128, -1), (2, 4, 8, 2, 5000, 64, 0), (3, 2, 6, 3, 777, 128, 1),
    (2, 4, 4, 1, 2, 64, 0),  # S < Lq: the first tokens see nothing
]
FAILED = []


def ref(q, k, v, scale, right):
    """float64 attention with the window (-1, right), bottom-right aligned; lse [B, Hq, Lq]."""
    b, lq, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    qd, kd, vd = (x.double() for x in (q, k, v))
    kd, vd = kd.repeat_interleave(hq // hkv, 2), vd.repeat_interleave(hq // hkv, 2)
    sc = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if right >= 0:
        j = torch.arange(s, device=q.device)[None, :]
        t = torch.arange(lq, device=q.device)[:, None]
        sc = sc.masked_fill(~(j <= t + s - lq + right), float("-inf"))
    lse = torch.logsumexp(sc, -1)
    p = torch.exp(sc - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vd), lse


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    live = torch.isfinite(b)
    if not torch.equal(torch.isneginf(a), torch.isneginf(b)):
        return float("inf")
    a, b = torch.where(live, a, 0.0), torch.where(live, b, 0.0)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def report(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def nan_case(dev, dtype):
    b, lq, hq, hkv, s, d = 2, 3, 4, 2, 3000, 64
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=dev).to(dtype)
               for n, h in ((lq, hq), (s, hkv), (s, hkv)))
    k[0, s - 2, 0, 5] = float("nan")  # seen by tokens 1, 2 (causal), q heads 0, 1, batch 0
    want = torch.zeros(b, lq, hq, dtype=torch.bool)
    want[0, 1:, :2] = True
    return q, k, v, want


ROWS = [(3000, -1), (0, -1), (17, 0), (2, 0), (1500, 3)]  # per-row (length, window right)


def per_row_case(dev, dtype, d=64):
    """``q [5, 4, 8, D]``, ``k, v [5, 3008, 2, D]`` (a capacity Pallas can tile) with NaN
    past each row's length."""
    g = torch.Generator(device=dev).manual_seed(7)
    b, lq, s = len(ROWS), 4, 3008
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=dev).to(dtype)
               for n, h in ((lq, 8), (s, 2), (s, 2)))
    for i, (n, _) in enumerate(ROWS):
        k[i, n:] = float("nan")
        v[i, n:] = float("nan")
    return q, k, v


def per_row_errors(q, k, v, o, lse):
    """The largest relative error of per-row results against ``ref`` of each row's prefix
    (an empty row must be exactly out 0, lse -inf)."""
    worst = 0.0
    for i, (n, right) in enumerate(ROWS):
        oi, li = o[i:i + 1].double().cpu(), lse[i:i + 1].double().cpu()
        if n == 0:
            ok = bool((oi == 0).all() and torch.isneginf(li).all())
            worst = max(worst, 0.0 if ok else float("inf"))
            continue
        ro, rl = ref(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], q.shape[-1] ** -0.5, right)
        worst = max(worst, rel(oi, ro), rel(li, rl))
    return worst


def check_per_row_torch(dev):
    from longattn.tree.local import local_attention

    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        q, k, v = per_row_case(dev, dtype)
        for backend in ("auto", "triton_decode"):
            o, lse = local_attention(q, k, v, softmax_scale=q.shape[-1] ** -0.5,
                                     seqlens=[n for n, _ in ROWS],
                                     right=[r for _, r in ROWS], backend=backend)
            e = per_row_errors(q, k, v, o, lse)
            report(f"torch {backend} cache_seqlens {dtype}", e <= tol, f"rel err {e:.2e}")


# per-row (start, skipped lo, skipped hi, end): what a left-padded batch's decode reads
RANGES = [(0, 100, 140, 3000), (5, 0, 0, 17), (0, 0, 0, 0), (900, 1000, 1200, 1500), (2, 2, 9, 9)]


def check_starts_and_skips(dev):
    """``local_attention`` with per-row ``starts`` and ``skips`` (one launch): NaN in every slot
    a row must not read (before its start, inside its skip, past its end), each row against
    ``ref`` of the slots it sees."""
    from longattn.tree.local import local_attention

    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        q, k, v = per_row_case(dev, dtype)
        k, v = k.clone(), v.clone()
        for i, (a, lo, hi, e) in enumerate(RANGES):
            for t in (k, v):
                t[i, :a] = float("nan")
                t[i, lo:hi] = float("nan")
                t[i, e:] = float("nan")
        for backend in ("auto", "triton_decode"):
            o, lse = local_attention(q, k, v, softmax_scale=q.shape[-1] ** -0.5,
                                     seqlens=[e for *_, e in RANGES],
                                     starts=[a for a, *_ in RANGES],
                                     skips=[(lo, hi) for _, lo, hi, _ in RANGES],
                                     backend=backend)
            worst = 0.0
            for i, (a, lo, hi, e) in enumerate(RANGES):
                keep = [j for j in range(a, e) if not lo <= j < hi]
                oi, li = o[i:i + 1].double().cpu(), lse[i:i + 1].double().cpu()
                if not keep:
                    ok = bool((oi == 0).all() and torch.isneginf(li).all())
                    worst = max(worst, 0.0 if ok else float("inf"))
                    continue
                idx = torch.tensor(keep, device=dev)
                ro, rl = ref(q[i:i + 1], k[i:i + 1, idx], v[i:i + 1, idx], q.shape[-1] ** -0.5,
                             -1)
                worst = max(worst, rel(oi, ro), rel(li, rl))
            report(f"torch {backend} starts + skips {dtype}", worst <= tol,
                   f"rel err {worst:.2e}")


def check_per_row_jax():
    import jax.numpy as jnp

    from longattn.tree.jax.local import local_attention

    for dtype, tol in ((jnp.bfloat16, 2e-2), (jnp.float32, 1e-5)):
        tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
        q, k, v = (x.float() for x in per_row_case(torch.device("cpu"), tdt))
        k, v = torch.nan_to_num(k, nan=0.0), torch.nan_to_num(v, nan=0.0)  # JAX: finite slots
        lens = jnp.asarray([n for n, _ in ROWS], jnp.int32)
        lim = jnp.asarray([n - q.shape[1] + r if r >= 0 else 1 << 30 for n, r in ROWS],
                          jnp.int32)
        for backend in ("xla", "pallas"):
            o, lse = local_attention(*(jnp.asarray(x.numpy(), dtype) for x in (q, k, v)),
                                     softmax_scale=q.shape[-1] ** -0.5, valid_len=lens,
                                     limit=lim, backend=backend, splits=4)
            e = per_row_errors(q, k, v, torch.from_numpy(np.asarray(o, np.float64)),
                               torch.from_numpy(np.asarray(lse, np.float64)))
            report(f"jax {backend} cache_seqlens {dtype.__name__}", e <= tol, f"rel err {e:.2e}")


def check_torch(dev):
    from longattn.tree import tree_decode
    from longattn.tree.local import local_attention

    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)):
        for i, (b, lq, hq, hkv, s, d, right) in enumerate(CASES):
            g = torch.Generator(device=dev).manual_seed(i)
            q, k, v = (torch.randn(b, n, h, d, generator=g, device=dev).to(dtype)
                       for n, h in ((lq, hq), (s, hkv), (s, hkv)))
            ro, rl = ref(q, k, v, d ** -0.5, right)
            for backend in ("auto", "triton_decode"):
                o, lse = local_attention(q, k, v, softmax_scale=d ** -0.5, right=right,
                                         backend=backend)
                e = max(rel(o, ro), rel(lse, rl))
                report(f"torch {backend} {dtype} case {i}", e <= tol, f"rel err {e:.2e}")
        q, k, v, want = nan_case(dev, dtype)
        out, lse = tree_decode(q, k, v, return_lse=True)  # one process: backend auto
        got_o, got_l = torch.isnan(out).any(-1).cpu(), torch.isnan(lse).transpose(1, 2).cpu()
        report(f"torch NaN rows {dtype}", torch.equal(got_o, want) and torch.equal(got_l, want),
               f"{int(got_o.sum())} / {int(got_l.sum())} NaN rows, want {int(want.sum())}")


def check_jax():
    import jax
    import jax.numpy as jnp

    from longattn.tree.jax.local import local_attention

    if jax.default_backend() != "gpu":
        print(f"JAX on {jax.default_backend()}: JAX checks skipped", flush=True)
        return
    # float32: tree.jax asks for full-float32 dots (JAX's GPU default is TF32, which measured
    # 3.06e-4 to 5.02e-4 here on the H200 before: bench/results/check_gpu_h200.log)
    for dtype, tol in ((jnp.bfloat16, 2e-2), (jnp.float32, 1e-5)):
        for i, (b, lq, hq, hkv, s, d, right) in enumerate(CASES):
            if s % 16:  # the Pallas kernel wants a multiple of 16 keys per block
                s = s - s % 16 or 16
            g = torch.Generator().manual_seed(i)
            q, k, v = (torch.randn(b, n, h, d, generator=g) for n, h in ((lq, hq), (s, hkv),
                                                                          (s, hkv)))
            tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
            q, k, v = (x.to(tdt).float() for x in (q, k, v))
            ro, rl = ref(q, k, v, d ** -0.5, right)
            limit = None if right < 0 else s - lq + right
            for backend in ("xla", "pallas"):
                o, lse = local_attention(*(jnp.asarray(x.numpy(), dtype) for x in (q, k, v)),
                                         softmax_scale=d ** -0.5, valid_len=s, limit=limit,
                                         backend=backend)
                e = max(rel(torch.from_numpy(np.asarray(o, np.float64)), ro),
                        rel(torch.from_numpy(np.asarray(lse, np.float64)), rl))
                report(f"jax {backend} {dtype.__name__} case {i}", e <= tol, f"rel err {e:.2e}")
        q, k, v, want = nan_case(torch.device("cpu"), torch.float32)
        s, lq = k.shape[1] - k.shape[1] % 16, q.shape[1]
        k, v = k[:, :s].clone(), v[:, :s].clone()
        k[0, s - 2, 0, 5] = float("nan")
        for backend in ("xla", "pallas"):
            o, lse = local_attention(*(jnp.asarray(x.numpy(), dtype) for x in (q, k, v)),
                                     softmax_scale=0.125, valid_len=s, limit=s - lq,
                                     backend=backend)
            got_o = torch.from_numpy(np.isnan(np.asarray(o, np.float32)).any(-1))
            got_l = torch.from_numpy(np.isnan(np.asarray(lse, np.float32))).transpose(1, 2)
            report(f"jax {backend} NaN rows {dtype.__name__}",
                   torch.equal(got_o, want) and torch.equal(got_l, want),
                   f"{int(got_o.sum())} / {int(got_l.sum())} NaN rows, want {int(want.sum())}")


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}", flush=True)
    check_torch(dev)
    check_per_row_torch(dev)
    check_starts_and_skips(dev)
    try:
        import jax
    except ImportError:
        print("no JAX: JAX checks skipped", flush=True)
    else:
        check_jax()
        if jax.default_backend() == "gpu":
            check_per_row_jax()
    print(f"{len(FAILED)} failed: {FAILED}" if FAILED else "all checks passed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
