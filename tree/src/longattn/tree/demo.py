"""Demo rows: tree vs ring decoding on a CPU world of 4 gloo ranks, against the oracle.

``rows(run_world)`` returns one row per (method, case) with the relative error against the
float64 oracle, the median time of a call (rank 0, after a warm-up) and the bytes each rank
sends (the largest over ranks).
"""

from __future__ import annotations

import time

import torch

WORLD = 4
# (what, B, Lq, Hq, Hkv, D, shard lengths, dtype)
CASES = [
    ("decode Lq=1, uneven shards", 2, 1, 8, 2, 64, [3000, 1000, 0, 2192], torch.float32),
    ("speculative Lq=4, causal", 2, 4, 8, 2, 64, [1024, 1024, 1024, 1024], torch.float32),
    ("decode Lq=1, float64", 1, 1, 4, 4, 32, [700, 0, 300, 24], torch.float64),
]


def _inputs(case, rank):
    _, b, lq, hq, hkv, d, lens, dtype = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, lq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sum(lens), hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sum(lens), hkv, d, generator=g, dtype=torch.float64)
    if rank is None:
        return q, k, v
    off = sum(lens[:rank])
    sl = slice(off, off + lens[rank])
    return q.to(dtype), k[:, sl].to(dtype), v[:, sl].to(dtype)


def _demo_rank(rank, world, cases, reps):
    import torch.distributed as dist

    from longattn.common.comm import counting
    from longattn.tree import ring_decode, tree_decode

    out = []
    for case in cases:
        q, k, v = _inputs(case, rank)
        lens = case[6]
        for name, fn in (("tree", tree_decode), ("ring", ring_decode)):
            kw = dict(group=dist.group.WORLD, shard_lens=lens)
            fn(q, k, v, **kw)  # warm-up
            with counting() as c:
                res = fn(q, k, v, **kw)
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                fn(q, k, v, **kw)
                times.append((time.perf_counter() - t0) * 1e3)
            out.append((name, res, c.bytes_sent, sorted(times)[len(times) // 2]))
    return out


def rows(run_world):
    from longattn.common.testing import rel_error
    from longattn.reference import attention, causal_mask

    per_rank = run_world(WORLD, _demo_rank, CASES, 5)
    result = []
    for ci, case in enumerate(CASES):
        what, b, lq, hq, hkv, d, lens, dtype = case
        q, k, v = (x.numpy() for x in _inputs(case, None))
        ref, _ = attention(q, k, v, mask=causal_mask(lq, k.shape[1]))
        for mi in range(2):
            i = 2 * ci + mi
            name = per_rank[0][i][0]
            err = max(rel_error(r[i][1], ref) for r in per_rank)
            result.append(dict(
                method=f"tree.{name}_decode", what=f"{what} ({str(dtype)[6:]})",
                shape=f"B={b} Lq={lq} Hq={hq} Hkv={hkv} D={d} N={sum(lens)} p={WORLD}",
                rel_err=err, time_ms=per_rank[0][i][3],
                bytes=max(r[i][2] for r in per_rank)))
    return result
