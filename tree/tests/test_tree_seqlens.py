"""Per-row cache lengths (``cache_seqlens``, as flash-attn's ``flash_attn_with_kvcache``) in
tree_decode / ring_decode on gloo worlds, against the float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longattn.common.dtypes import lse_dtype
from longattn.common.testing import rel_error, run_world
from longattn.reference import attention

B = 5


def row_lengths(rng, world, top):
    """``[rank][row]`` lengths in ``[0, top]``: random rows with empty pieces, a row empty on
    every rank, a row with fewer keys than new tokens, a row whose keys all sit on rank 0."""
    rows = rng.integers(0, top + 1, size=(world, B))
    rows[rng.integers(0, world), 0] = 0  # empty on one rank
    rows[:, 1] = 0  # empty everywhere: out 0, lse -inf
    rows[:, 2] = 0
    rows[-1, 2] = 2  # 2 keys: with Lq = 4 the first two new tokens see nothing
    rows[1:, 3] = 0  # the tail of row 3 is on rank 0
    rows[0, 4] = top  # a full row on rank 0
    return rows.tolist()


def make_case(seed, *, rows, lq, hq, hkv, d, dtype, causal, slack=3, backend=None):
    """q and every rank's ``k, v [B, cap_r, Hkv, D]`` with ``cap_r`` = its longest row +
    ``slack``; the slots past each row's length hold NaN (they must never be read)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, lq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    ks, vs = [], []
    for rank_rows in rows:
        cap = max(rank_rows) + slack
        k = torch.randn(B, cap, hkv, d, generator=g, dtype=torch.float64).to(dtype)
        v = torch.randn(B, cap, hkv, d, generator=g, dtype=torch.float64).to(dtype)
        for b, n in enumerate(rank_rows):
            k[b, n:] = float("nan")
            v[b, n:] = float("nan")
        ks.append(k)
        vs.append(v)
    return dict(q=q, k=ks, v=vs, rows=rows, causal=causal)


def oracle(case):
    """Dense float64 attention of every row over its own cache (the concatenation of its
    filled pieces in rank order), as one padded call with a per-row mask."""
    rows = np.asarray(case["rows"])
    total = rows.sum(0)  # N[b]
    n_max = max(int(total.max()), 1)
    q = case["q"].double().numpy()
    lq, hkv, d = q.shape[1], case["k"][0].shape[2], q.shape[3]
    k = np.zeros((B, n_max, hkv, d))
    v = np.zeros((B, n_max, hkv, d))
    for b in range(B):
        k_b = [case["k"][r][b, :n].double().numpy() for r, n in enumerate(rows[:, b])]
        v_b = [case["v"][r][b, :n].double().numpy() for r, n in enumerate(rows[:, b])]
        k[b, :total[b]] = np.concatenate(k_b)
        v[b, :total[b]] = np.concatenate(v_b)
    j = np.arange(n_max)[None, None, :]
    t = np.arange(lq)[None, :, None]
    n = total[:, None, None]
    mask = j < n
    if case["causal"]:
        mask = mask & (j <= n - lq + t)
    return attention(q, k, v, mask=mask[:, None])


def _decode_worker(rank, world, specs):
    """Every case's tree and ring decode on this rank (each rank builds the cases from their
    seeds: sending the caches would cost more than the decoding): a dict of methods per case."""
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    res = []
    for spec in specs:
        c = make_case(**spec)
        seqlens = torch.tensor(c["rows"][rank], dtype=torch.int32)
        kw = dict(group=dist.group.WORLD, causal=c["causal"], return_lse=True,
                  cache_seqlens=seqlens, backend=spec.get("backend", "auto"))
        k, v = c["k"][rank], c["v"][rank]
        res.append({"tree": tree_decode(c["q"], k, v, **kw)})
        if world == 4:
            res[-1]["tree hierarchy (2, 2)"] = tree_decode(c["q"], k, v, hierarchy=(2, 2), **kw)
        if "backend" not in spec:  # the interpreted kernel only in the tree (CPU time)
            res[-1]["ring"] = ring_decode(c["q"], k, v, **kw)
    return res


def _check(cases, results, tol):
    worst = 0.0
    for ci, c in enumerate(cases):
        ref_out, ref_lse = oracle(c)
        empty = np.asarray(c["rows"]).sum(0) == 0
        for per_rank in results:
            for name, (out, lse) in per_rank[ci].items():
                dtype = c["q"].dtype
                assert out.dtype == dtype and lse.dtype == lse_dtype(dtype), name
                assert not torch.isnan(out).any() and not torch.isnan(lse).any(), (name, ci)
                errs = rel_error(out, ref_out), rel_error(lse, ref_lse)
                assert max(errs) <= tol, (name, ci, errs, c["rows"])
                worst = max(worst, *errs)
                # a row empty on every rank: exactly out 0, lse -inf
                assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
                assert torch.equal(out, results[0][ci][name][0]), name  # same bits everywhere
    return worst


@pytest.mark.parametrize("world", [2, 3])
def test_cache_seqlens_match_oracle(world):
    """B = 5 rows of lengths 0 to 3,000 per rank (empty pieces, a row empty on every rank, a
    row shorter than Lq), GQA (4 q heads over 2 KV heads), Lq 1 and 4, causal or not: tree and
    ring decoding with the shared kernels match float64 dense attention of every row over
    its own cache (float64 within 1e-10, bf16 within 2e-2); the slots past each row's length
    hold NaN and are never read. Then tree decoding with the split-K Triton kernel
    (interpreted, so small lengths) in float32 (1e-5) and bf16 (2e-2)."""
    rng = np.random.default_rng(world)
    specs, tols = [], []
    for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 2e-2)):
        for i, (lq, causal) in enumerate(((1, True), (4, True), (4, False))):
            specs.append(dict(seed=10 * world + i, rows=row_lengths(rng, world, 3000), lq=lq,
                              hq=4, hkv=2, d=16, dtype=dtype, causal=causal))
            tols.append(tol)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        specs.append(dict(seed=7 * world, rows=row_lengths(rng, world, 40), lq=4, hq=4,
                          hkv=2, d=16, dtype=dtype, causal=True, backend="triton_decode"))
        tols.append(tol)
    res = run_world(world, _decode_worker, specs, timeout=300)
    worst = {}
    for ci, (spec, tol) in enumerate(zip(specs, tols)):
        key = (str(spec["dtype"]), spec.get("backend", "auto"))
        worst[key] = max(worst.get(key, 0.0), _check([make_case(**spec)],
                                                     [[per_rank[ci]] for per_rank in res], tol))
    print(f"\nworld {world}: " + ", ".join(f"{k} {e:.2e}" for k, e in worst.items()))


def test_cache_seqlens_hierarchical_tree():
    """The hierarchical combine (2 nodes of 2 ranks) takes per-row partials like the flat one:
    float64 within 1e-10 of the oracle, Lq 4 causal and Lq 1."""
    rng = np.random.default_rng(4)
    specs = [dict(seed=40 + lq, rows=row_lengths(rng, 4, 50), lq=lq, hq=4, hkv=2, d=8,
                  dtype=torch.float64, causal=True) for lq in (1, 4)]
    res = run_world(4, _decode_worker, specs, timeout=120)
    for ci, spec in enumerate(specs):
        _check([make_case(**spec)], [[per_rank[ci]] for per_rank in res], 1e-10)


def _uniform_worker(rank, world, q, k, v):
    """With every row alike, cache_seqlens takes the one-call path: the same bits as the
    plain call on the filled prefix."""
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    n = k.shape[1] - rank  # every row holds n of this rank's slots
    kw = dict(group=dist.group.WORLD, return_lse=True)
    full = torch.full((B,), n, dtype=torch.int32)
    pairs = []
    for fn in (tree_decode, ring_decode):
        pairs.append((fn(q, k, v, cache_seqlens=full, **kw), fn(q, k[:, :n], v[:, :n], **kw)))
    return pairs


def test_uniform_cache_seqlens_equal_the_plain_call():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, 4, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, 9, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for per_rank in run_world(2, _uniform_worker, q, k, v):
        for (o1, l1), (o2, l2) in per_rank:
            assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_cache_seqlens_in_one_process():
    """No process group: one rank holds every row (tree and ring)."""
    from longattn.tree import ring_decode, tree_decode

    rows = [[0, 7, 3, 1, 12]]
    c = make_case(5, rows=rows, lq=4, hq=6, hkv=2, d=8, dtype=torch.float64, causal=True)
    ref_out, ref_lse = oracle(c)
    seqlens = torch.tensor(rows[0], dtype=torch.int32)
    for fn in (tree_decode, ring_decode):
        out, lse = fn(c["q"], c["k"][0], c["v"][0], cache_seqlens=seqlens, return_lse=True)
        assert rel_error(out, ref_out) <= 1e-10 and rel_error(lse, ref_lse) <= 1e-10


BAD_SEQLENS = [  # (case, error class, a word the message must hold)
    ("int64", "TypeError", "int32"), ("list", "TypeError", "cache_seqlens"),
    ("shape", "ValueError", "[batch]"), ("too_long", "ValueError", "[0, 6]"),
    ("negative", "ValueError", "[0, 6]"), ("given_on_one_rank", "ValueError", "cache_seqlens"),
]


def _bad_seqlens_worker(rank, world, fn_name, which, bad):
    import torch.distributed as dist

    from longattn import tree

    fn = getattr(tree, fn_name)
    q = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    k = v = torch.randn(2, 6, 2, 8)
    seqlens = torch.tensor([6, 3], dtype=torch.int32)
    if rank == bad:
        seqlens = {"int64": seqlens.long(), "list": [6, 3], "shape": seqlens[:1],
                   "too_long": torch.tensor([6, 7], dtype=torch.int32),
                   "negative": torch.tensor([-1, 3], dtype=torch.int32),
                   "given_on_one_rank": None}[which]
    try:
        fn(q, k, v, group=dist.group.WORLD, cache_seqlens=seqlens)
        err = None
    except (TypeError, ValueError) as e:
        err = (type(e).__name__, str(e))
    # the world is still in step: a good call works afterwards
    ok = fn(q, k, v, group=dist.group.WORLD, cache_seqlens=torch.tensor([2, 0], dtype=torch.int32))
    return err, bool(torch.isfinite(ok).all())


@pytest.mark.faults
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("which,cls,word", BAD_SEQLENS)
@pytest.mark.parametrize("fn_name", ["tree_decode", "ring_decode"])
def test_bad_cache_seqlens_on_one_rank_raises_on_every_rank(fn_name, which, cls, word, world):
    """A bad ``cache_seqlens`` (wrong dtype, not a tensor, wrong shape, longer than this rank's
    capacity, negative, or given on one rank only) on the last rank of a 2-, 3- or 4-rank
    world: every rank raises the same error naming it, before any communication of the
    decode; the world works afterwards."""
    res = run_world(world, _bad_seqlens_worker, fn_name, which, world - 1, timeout=60)
    for r, (err, ok) in enumerate(res):
        assert err is not None, f"rank {r} did not raise for {which}"
        assert ok
    assert len({err for err, _ in res}) == 1, [e for e, _ in res]  # the same everywhere
    assert res[0][0][0] == cls and word in res[0][0][1], res[0][0]
    assert "cache_seqlens" in res[0][0][1]
