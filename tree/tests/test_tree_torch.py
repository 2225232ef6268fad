"""tree_decode / ring_decode on gloo worlds against the float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longattn.common.testing import rel_error, run_world
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
            want_lse = torch.float64 if dtype == torch.float64 else torch.float32
            assert lse.dtype == want_lse
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
