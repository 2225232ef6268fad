"""tree_decode / ring_decode on gloo worlds against the float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longattn.common.dtypes import lse_dtype
from longattn.common.testing import large_logit_qkv, rel_error, run_world
from longattn.reference import attention, causal_mask

WORLDS = [1, 2, 3, 4, 5, 6, 7, 8]


def make_case(seed, *, b, lq, hq, hkv, d, lens, dtype, causal=True, scale=None):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = torch.randn(b, lq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, n, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, hkv, d, generator=g, dtype=torch.float64)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), lens=list(lens), causal=causal,
                scale=scale)


def oracle(case):
    q, k, v = (case[x].double().numpy() for x in "qkv")
    mask = causal_mask(q.shape[1], k.shape[1]) if case["causal"] else None
    return attention(q, k, v, mask=mask, scale=case["scale"])


def shard_of(case, rank):
    off = sum(case["lens"][:rank])
    n = case["lens"][rank]
    return case["k"][:, off:off + n], case["v"][:, off:off + n]


def run_cases(rank, world, cases, method, hierarchy=None, pass_lens=False):
    """Worker: run every case, return [(out, lse)] for this rank."""
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    res = []
    for c in cases:
        k, v = shard_of(c, rank)
        kw = dict(group=dist.group.WORLD, softmax_scale=c["scale"], causal=c["causal"],
                  return_lse=True)
        if pass_lens:
            kw["shard_lens"] = c["lens"]
        if method == "tree":
            out, lse = tree_decode(c["q"], k, v, hierarchy=hierarchy, **kw)
        else:
            out, lse = ring_decode(c["q"], k, v, **kw)
        res.append((out, lse))
    return res


def split_lens(rng, n, world, empties):
    """Random uneven split of n keys over world ranks; ``empties`` ranks get none."""
    lens = [0] * world
    live = sorted(rng.choice(world, size=max(1, world - empties), replace=False).tolist())
    cuts = np.sort(rng.integers(0, n + 1, size=len(live) - 1))
    parts = np.diff(np.concatenate([[0], cuts, [n]]))
    for r, x in zip(live, parts):
        lens[r] = int(x)
    return lens


def case_list(world, dtype, seed):
    rng = np.random.default_rng(seed + 100 * world)
    cases = []
    i = 0
    for b in (1, 3):
        for lq in (1, 4):
            for hq, hkv in ((4, 2), (3, 3)):
                n = int(rng.integers(5, 40))
                empties = int(rng.integers(0, world))  # some ranks hold nothing
                lens = split_lens(rng, n, world, empties)
                cases.append(make_case(seed + i, b=b, lq=lq, hq=hq, hkv=hkv, d=8, lens=lens,
                                       dtype=dtype, causal=bool(i % 3 != 2)))
                i += 1
    # the new tokens' own keys spread over the last ranks; fewer keys than new tokens
    # (the earliest new tokens then see nothing: out 0, lse -inf); a custom scale
    tail = [0] * world
    tail[-1] = 2
    if world > 1:
        tail[-2] = 1
    cases.append(make_case(seed + 50, b=2, lq=4, hq=4, hkv=1, d=8, lens=tail, dtype=dtype))
    cases.append(make_case(seed + 51, b=1, lq=3, hq=2, hkv=2, d=16, lens=[3] * world,
                           dtype=dtype, scale=0.3))
    return cases


def check(cases, results, dtype, tol):
    worst = 0.0
    for ci, c in enumerate(cases):
        ref_out, ref_lse = oracle(c)
        for r, per_rank in enumerate(results):
            out, lse = per_rank[ci]
            assert out.dtype == dtype and out.shape == c["q"].shape
            assert lse.dtype == lse_dtype(dtype)  # float64 for float32, float32 for bf16
            e_out, e_lse = rel_error(out, ref_out), rel_error(lse, ref_lse)
            assert e_out <= tol, (ci, r, e_out, c["lens"])
            assert e_lse <= tol, (ci, r, e_lse, c["lens"])
            worst = max(worst, e_out, e_lse)
            assert torch.equal(out, results[0][ci][0])  # identical on every rank
    return worst


@pytest.mark.parametrize("world", WORLDS)
def test_tree_and_ring_match_oracle(world):
    for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 2e-2)):
        cases = case_list(world, dtype, seed=7)
        tree = run_world(world, run_cases, cases, "tree")
        check(cases, tree, dtype, tol)
        ring = run_world(world, run_cases, cases, "ring")
        check(cases, ring, dtype, tol)  # ring merges in shard order: the same bits too
        if dtype != torch.float64:
            continue
        fast = run_world(world, run_cases, cases, "tree", None, True)
        for a, b in zip(fast, tree):
            for (oa, la), (ob, lb) in zip(a, b):
                assert torch.equal(oa, ob) and torch.equal(la, lb)


@pytest.mark.parametrize("world,hierarchy", [(4, (2, 2)), (6, (2, 3)), (6, (3, 2)),
                                             (8, (2, 4)), (8, (4, 2)), (4, (1, 4)),
                                             (4, (4, 1))])
def test_tree_hierarchy_matches_oracle(world, hierarchy):
    for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 2e-2)):
        cases = case_list(world, dtype, seed=11)
        res = run_world(world, run_cases, cases, "tree", hierarchy)
        check(cases, res, dtype, tol)


def test_tree_hierarchy_of_subgroups():
    """Two 4-rank groups of an 8-rank world decode independently, each with hierarchy (2, 2)."""
    cases = [case_list(4, torch.float64, seed=s) for s in (3, 4)]
    res = run_world(8, _subgroup_worker, cases)
    for half in range(2):
        check(cases[half], [res[4 * half + r] for r in range(4)], torch.float64, 1e-10)


def _subgroup_worker(rank, world, cases):
    import torch.distributed as dist

    from longattn.tree import hierarchy_groups, tree_decode

    groups = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
    if not cases[0][0].get("skip_setup"):
        hierarchy_groups(2, 2, ranks=[0, 1, 2, 3])
        hierarchy_groups(2, 2, ranks=[4, 5, 6, 7])
    half = rank // 4
    grp, r = groups[half], rank % 4
    out = []
    for c in cases[half]:
        k, v = shard_of(c, r)
        out.append(tree_decode(c["q"], k, v, group=grp, hierarchy=(2, 2), causal=c["causal"],
                               softmax_scale=c["scale"], return_lse=True))
    return out


def test_tree_world_of_one_equals_local_attention_without_dist():
    """No process group at all: a single device is a world of one."""
    from longattn.tree import ring_decode, tree_decode

    c = case_list(1, torch.float64, seed=5)[3]
    ref_out, _ = oracle(c)
    for fn in (tree_decode, ring_decode):
        assert rel_error(fn(c["q"], c["k"], c["v"]), ref_out) <= 1e-10


def _nan_worker(rank, world, case, nan_at):
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    k, v = shard_of(case, rank)
    off = sum(case["lens"][:rank])
    if off <= nan_at < off + k.shape[1]:
        k = k.clone()
        k[0, nan_at - off, 0, 3] = float("nan")  # batch 0, KV head 0
    kw = dict(group=dist.group.WORLD, causal=True, return_lse=True)
    return [tree_decode(case["q"], k, v, **kw), ring_decode(case["q"], k, v, **kw),
            tree_decode(case["q"], k, v, hierarchy=(2, 2), **kw)]


def test_nan_key_makes_the_rows_that_see_it_nan():
    """A NaN in one key on one rank: exactly the rows that see that key (causal: the later
    new tokens; GQA: the q heads of its KV head; batch 0) are NaN in out and lse, on every
    rank, for the flat and hierarchical tree and the ring; every other row is exact."""
    lens, nan_at = [4, 4, 3, 1], 9  # N = 12, Lq = 3: token t sees keys <= 9 + t
    case = make_case(21, b=2, lq=3, hq=4, hkv=2, d=8, lens=lens, dtype=torch.float64)
    ref_out, ref_lse = (torch.from_numpy(x) for x in oracle(case))
    want = torch.zeros(2, 3, 4, dtype=torch.bool)  # [B, Lq, Hq]
    want[0, :, :2] = True  # every token sees key 9 (it is <= 9 + 0); q heads 0, 1
    for per_rank in run_world(4, _nan_worker, case, nan_at):
        for out, lse in per_rank:
            assert torch.equal(torch.isnan(out).any(-1), want)
            assert torch.equal(torch.isnan(out).all(-1), want)
            assert torch.equal(torch.isnan(lse).transpose(1, 2), want)
            assert rel_error(out[~want], ref_out[~want]) <= 1e-10
            assert rel_error(lse.transpose(1, 2)[~want], ref_lse.transpose(1, 2)[~want]) <= 1e-10
    # a NaN key seen only by the last new token
    want_late = torch.zeros(2, 3, 4, dtype=torch.bool)
    want_late[0, 2, :2] = True
    for per_rank in run_world(4, _nan_worker, case, 11):
        for out, lse in per_rank:
            assert torch.equal(torch.isnan(out).any(-1), want_late)
            assert torch.equal(torch.isnan(lse).transpose(1, 2), want_late)


def _large_logit_worker(rank, world, q, k, v, lens):
    """Every merged decode path on this rank's shard of a float32 large-logit cache."""
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    off = sum(lens[:rank])
    kk, vv = k[:, off:off + lens[rank]], v[:, off:off + lens[rank]]
    kw = dict(group=dist.group.WORLD, softmax_scale=1.0, causal=True, return_lse=True)
    res = {"tree": tree_decode(q, kk, vv, **kw), "ring": ring_decode(q, kk, vv, **kw),
           "tree triton_decode": tree_decode(q, kk, vv, backend="triton_decode", **kw),
           "ring triton_decode": ring_decode(q, kk, vv, backend="triton_decode", **kw)}
    if world == 4:
        res["tree hierarchy (2, 2)"] = tree_decode(q, kk, vv, hierarchy=(2, 2), **kw)
    return res


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("logit", [1e2, 1e4])
def test_float32_large_logits_match_float64_dense(world, logit):
    """float32 inputs whose scores sit near ``logit`` (exact in float32, softmax_scale=1.0),
    a KV cache sharded unevenly over ``world`` ranks: tree_decode (flat, hierarchical, with the
    shared kernels and the split-K Triton kernel, interpreted) and ring_decode are within 1e-5
    of float64 dense attention in out and lse. With float32 statistics the merge of the
    shards' partials alone would be ~1e-4 off at 1e4 (lse_dtype makes them float64)."""
    b, lq, hq, hkv, d, n = 2, 3, 4, 2, 16, 150
    q, k, v = large_logit_qkv(b, lq, n, hq, hkv, d, logit=logit, seed=int(logit) + world)
    lens = [37, 60, 53] if world == 2 else [37, 0, 60, 53]
    lens = lens[:1] + [lens[1] + lens[2]] if world == 2 else lens
    ref_out, ref_lse = attention(q.double().numpy(), k.double().numpy(), v.double().numpy(),
                                 mask=causal_mask(lq, n), scale=1.0)
    worst = {}
    for per_rank in run_world(world, _large_logit_worker, q, k, v, lens, timeout=300):
        for name, (out, lse) in per_rank.items():
            assert out.dtype == torch.float32 and lse.dtype == torch.float64, name
            errs = (rel_error(out, ref_out), rel_error(lse, ref_lse))
            worst[name] = max(worst.get(name, 0.0), *errs)
            assert max(errs) <= 1e-5, (name, errs)
    # the same shards' partials merged with float32 statistics: what lse_dtype prevents
    from longattn.common.merge import merge_stacked
    from longattn.tree.local import local_attention

    offs = [sum(lens[:r]) for r in range(world)]
    parts = [local_attention(q, k[:, o:o + n], v[:, o:o + n], softmax_scale=1.0,
                             right=sum(lens[r + 1:]))
             for r, (o, n) in enumerate(zip(offs, lens)) if n]
    f32, _ = merge_stacked(torch.stack([p[0] for p in parts]),
                           torch.stack([p[1].float().transpose(1, 2) for p in parts]))
    worst["float32-statistics merge (ablation)"] = rel_error(f32, ref_out)
    if logit == 1e4:
        assert worst["float32-statistics merge (ablation)"] > 1e-5  # the test can tell
    print(f"\nlarge logits {logit:g}, world {world}: " +
          ", ".join(f"{name} {e:.2e}" for name, e in worst.items()))


def _nan_qv_worker(rank, world, case, where, hierarchy):
    """Decode with one NaN placed by ``where = (tensor, index)``: in ``"q"`` (replicated: the
    same NaN on every rank) or in ``"v"`` / ``"k"`` at a global key index (on the rank
    holding it)."""
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    q = case["q"].clone()
    k, v = (t.clone() for t in shard_of(case, rank))
    what, idx = where
    off = sum(case["lens"][:rank])
    if what == "q":
        q[idx] = float("nan")
    elif off <= idx[1] < off + k.shape[1]:
        t = k if what == "k" else v
        t[(idx[0], idx[1] - off) + tuple(idx[2:])] = float("nan")
    kw = dict(group=dist.group.WORLD, causal=case["causal"], return_lse=True)
    res = [tree_decode(q, k, v, **kw), ring_decode(q, k, v, **kw)]
    if hierarchy is not None:
        res.append(tree_decode(q, k, v, hierarchy=hierarchy, **kw))
    return res


NAN_CASES = [  # (world, lens, (tensor, index)): one NaN on one rank (or in the replicated q)
    (4, [4, 4, 3, 1], ("v", (0, 5, 1, 2))),  # rank 1's values, seen by every token
    (4, [4, 4, 3, 1], ("v", (1, 0, 0, 7))),  # rank 0's first value
    (4, [4, 4, 3, 1], ("v", (0, 11, 0, 0))),  # the last key's value (rank 3)
    (4, [4, 4, 3, 1], ("k", (1, 8, 1, 0))),  # rank 2's keys
    (4, [4, 4, 3, 1], ("q", (0, 1, 2, 3))),  # the replicated queries
    (2, [7, 5], ("v", (1, 9, 0, 4))),
    (2, [7, 5], ("q", (1, 2, 0, 0))),
    (3, [0, 8, 4], ("v", (0, 3, 1, 1))),
    (3, [0, 8, 4], ("k", (0, 10, 0, 5))),
]


@pytest.mark.parametrize("world,lens,where", NAN_CASES)
def test_nan_in_q_k_or_v_matches_float64_dense(world, lens, where):
    """One NaN in q, k or v (on the rank holding it; q is replicated): out and lse are NaN
    exactly where float64 dense attention (longattn.reference.attention) is NaN, and every
    other entry equals it (float64 inputs, 1e-10), for tree_decode (flat, and hierarchical on
    4 ranks) and ring_decode, on every rank. The keys at the NaN's position are visible to
    every new token here (non-causal), so the dense oracle's rows are the rows that see it.

    A NaN in q or k makes a row's scores NaN: dense ``out`` is NaN in the whole row and its
    ``lse`` must be NaN too (the oracle returns ``-inf`` there, so those rows' lse is checked
    against NaN directly). A NaN in v makes one column of ``out`` NaN and leaves ``lse``
    finite, as in dense attention."""
    case = make_case(31, b=2, lq=3, hq=4, hkv=2, d=8, lens=lens, dtype=torch.float64,
                     causal=False)
    what, idx = where
    dense = {x: case[x].clone() for x in "qkv"}
    dense[what][idx] = float("nan")
    ref_out, ref_lse = (torch.from_numpy(x) for x in attention(
        *(dense[x].numpy() for x in "qkv")))
    assert torch.isnan(ref_out).any()  # the case makes NaN rows, and finite ones
    assert not torch.isnan(ref_out).all()
    nan_rows = torch.isnan(ref_out).all(-1).transpose(1, 2)  # [B, Hq, Lq]: a NaN score
    assert nan_rows.any() == (what != "v")
    hierarchy = (2, 2) if world == 4 else None
    for per_rank in run_world(world, _nan_qv_worker, case, where, hierarchy):
        for out, lse in per_rank:
            assert torch.equal(torch.isnan(out), torch.isnan(ref_out)), (where, out)
            keep = ~torch.isnan(ref_out)
            assert rel_error(out[keep], ref_out[keep]) <= 1e-10
            assert torch.equal(torch.isnan(lse), nan_rows), (where, lse)
            assert rel_error(lse[~nan_rows], ref_lse[~nan_rows]) <= 1e-10


def _nan_q_one_rank_worker(rank, world, bad):
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    q = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    k = v = torch.randn(1, 3, 2, 8, generator=torch.Generator().manual_seed(rank))
    if rank == bad:
        q[0, 1, 3, 0] = float("nan")
    errs = []
    for fn in (tree_decode, ring_decode):
        try:
            fn(q, k, v, group=dist.group.WORLD)
            errs.append(None)
        except ValueError as e:
            errs.append(str(e))
    return errs


@pytest.mark.faults
@pytest.mark.parametrize("world", [2, 3, 4])
def test_nan_in_q_on_one_rank_only_raises_on_every_rank(world):
    """A NaN in q on one rank only means q is not replicated: every rank raises the same
    ValueError (the q checksum of the agreement), none returns a half-NaN answer."""
    res = run_world(world, _nan_q_one_rank_worker, world - 1, timeout=60)
    for errs in res:
        assert errs == res[0] and all(e is not None and "q values" in e for e in errs), errs


def test_return_lse_must_be_a_bool():
    from longattn.common.dist import LOCAL
    from longattn.tree import ring_decode, tree_decode

    q, k, v = (torch.randn(1, n, 2, 8, dtype=torch.float64) for n in (1, 5, 5))
    for fn in (tree_decode, ring_decode):
        with pytest.raises(TypeError, match="return_lse must be a bool"):
            fn(q, k, v, group=LOCAL, return_lse="yes")
