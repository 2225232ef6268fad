"""``cache_leftpad`` (flash-attn's ``flash_attn_with_kvcache`` argument): row ``b``'s keys on
a rank start at slot ``cache_leftpad[b]``. Tree and ring decoding over random per-row starts
and ends on worlds 1-3 (rows empty on some ranks or all, a start equal to the end, Lq 1 and 3,
causal or not, GQA) against float64 dense attention of every row over the concatenation of
its slots ``[start, end)`` in rank order; NaN in every slot a row must not read. fp64 within
1e-10, bf16 within 2e-2, the split-K Triton kernel (interpreted) in fp32 within 1e-5. A bad
``cache_leftpad`` on one rank raises on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longattn.common.testing import rel_error, run_world
from longattn.reference import attention

B = 4


def make_case(seed, world, *, lq, dtype, causal, top=300, hq=4, hkv=2, d=16):
    rng = np.random.default_rng(seed)
    ends = rng.integers(0, top + 1, size=(world, B))
    starts = np.array([[rng.integers(0, e + 1) for e in row] for row in ends])
    ends[:, 1] = starts[:, 1]  # a row with no key anywhere
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, lq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    ks, vs = [], []
    for r in range(world):
        cap = int(ends[r].max()) + 2
        k, v = (torch.randn(B, cap, hkv, d, generator=g, dtype=torch.float64).to(dtype)
                for _ in range(2))
        for b in range(B):
            for t in (k, v):
                t[b, :starts[r, b]] = float("nan")
                t[b, ends[r, b]:] = float("nan")
        ks.append(k)
        vs.append(v)
    return dict(q=q, k=ks, v=vs, starts=starts.tolist(), ends=ends.tolist(), causal=causal)


def oracle(c):
    world = len(c["k"])
    q = c["q"].double().numpy()
    lq, hkv, d = q.shape[1], c["k"][0].shape[2], q.shape[3]
    rows = [[(c["k"][r][b, c["starts"][r][b]:c["ends"][r][b]].double().numpy(),
              c["v"][r][b, c["starts"][r][b]:c["ends"][r][b]].double().numpy())
             for r in range(world)] for b in range(B)]
    total = np.array([sum(len(kk) for kk, _ in row) for row in rows])
    n_max = max(int(total.max()), 1)
    k, v = np.zeros((B, n_max, hkv, d)), np.zeros((B, n_max, hkv, d))
    for b, row in enumerate(rows):
        if total[b]:
            k[b, :total[b]] = np.concatenate([kk for kk, _ in row])
            v[b, :total[b]] = np.concatenate([vv for _, vv in row])
    j, t, n = np.arange(n_max)[None, None], np.arange(lq)[None, :, None], total[:, None, None]
    mask = j < n
    if c["causal"]:
        mask = mask & (j <= n - lq + t)
    return attention(q, k, v, mask=mask[:, None])


def _worker(rank, world, specs):
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    out = []
    for spec in specs:
        c = make_case(world=world, **{k: v for k, v in spec.items() if k != "backend"})
        kw = dict(group=dist.group.WORLD, causal=c["causal"], return_lse=True,
                  cache_seqlens=torch.tensor(c["ends"][rank], dtype=torch.int32),
                  cache_leftpad=torch.tensor(c["starts"][rank], dtype=torch.int32),
                  backend=spec.get("backend", "auto"))
        k, v = c["k"][rank], c["v"][rank]
        res = {"tree": tree_decode(c["q"], k, v, **kw)}
        if "backend" not in spec:
            res["ring"] = ring_decode(c["q"], k, v, **kw)
        out.append(res)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_cache_leftpad_matches_the_oracle(world):
    specs, tols = [], []
    for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 2e-2)):
        for i, (lq, causal) in enumerate(((1, True), (3, True), (3, False))):
            specs.append(dict(seed=100 * world + 10 * i + (dtype == torch.bfloat16), lq=lq,
                              dtype=dtype, causal=causal))
            tols.append(tol)
    specs.append(dict(seed=7 + world, lq=3, dtype=torch.float32, causal=True, top=40,
                      backend="triton_decode"))
    tols.append(1e-5)
    res = run_world(world, _worker, specs, timeout=300)
    for ci, (spec, tol) in enumerate(zip(specs, tols)):
        c = make_case(world=world, **{k: v for k, v in spec.items() if k != "backend"})
        ref_out, ref_lse = oracle(c)
        for per_rank in res:
            for name, (out, lse) in per_rank[ci].items():
                assert not torch.isnan(out).any(), (name, spec)
                errs = rel_error(out, ref_out), rel_error(lse, ref_lse)
                assert max(errs) <= tol, (name, spec, errs)
                assert (out[:, :][torch.tensor([b == 1 for b in range(B)])] == 0).all()
                assert torch.equal(out, res[0][ci][name][0]), name  # the same bits everywhere


def _bad_on_one_rank(rank, world, what):
    import torch.distributed as dist

    from longattn.tree import tree_decode

    q, k, v = (torch.randn(2, n, 2, 8, dtype=torch.float64) for n in (1, 6, 6))
    ends = torch.tensor([6, 4], dtype=torch.int32)
    pads = torch.tensor([1, 2], dtype=torch.int32)
    if rank == world - 1:
        pads = {"range": torch.tensor([1, 5], dtype=torch.int32),
                "dtype": pads.long(), "missing": None}[what]
    try:
        tree_decode(q, k, v, group=dist.group.WORLD, cache_seqlens=ends, cache_leftpad=pads)
    except (ValueError, TypeError) as e:
        return type(e).__name__, str(e)
    return None


@pytest.mark.parametrize("what,cls,word", [("range", "ValueError", r"cache_leftpad\[1\] = 5"),
                                           ("dtype", "TypeError", "cache_leftpad must be"),
                                           ("missing", "ValueError", "cache_leftpad given")])
def test_a_bad_cache_leftpad_on_one_rank_raises_on_every_rank(what, cls, word):
    import re

    for got in run_world(3, _bad_on_one_rank, what, timeout=120):
        assert got is not None and got[0] == cls and re.search(word, got[1]), got
