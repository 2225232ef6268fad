"""Exact communication volume of tree / ring decoding, and bad input on worlds."""

from __future__ import annotations

import pytest
import torch

from longattn.common.testing import run_world


def _gather_bytes():
    """Bytes each rank sends in the argument-agreement all-gather (one fixed int64 row)."""
    from longattn.common.dist import agreement_nbytes

    return agreement_nbytes()


def _bytes_worker(rank, world, cfgs):
    import torch.distributed as dist

    from longattn.common.comm import counting
    from longattn.tree import ring_decode, tree_decode

    out = []
    for method, b, lq, hq, hkv, d, lens, hierarchy, pass_lens in cfgs:
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(b, lq, hq, d, generator=torch.Generator().manual_seed(0))
        k = torch.randn(b, lens[rank], hkv, d, generator=g)
        v = torch.randn(b, lens[rank], hkv, d, generator=g)
        kw = dict(group=dist.group.WORLD)
        if pass_lens:
            kw["shard_lens"] = lens
        with counting() as c:
            if method == "tree":
                tree_decode(q, k, v, hierarchy=hierarchy, **kw)
            else:
                ring_decode(q, k, v, **kw)
        out.append((dict(c.sent), dict(c.recv), len(c.messages)))
    return out


def test_tree_bytes_independent_of_context_length():
    world, b, lq, hq, hkv, d = 4, 3, 2, 4, 2, 8
    cfgs = [("tree", b, lq, hq, hkv, d, [n, n + 3, 0, 2 * n], None, False) for n in (16, 2048)]
    cfgs += [("tree", b, lq, hq, hkv, d, [n, n + 3, 0, 2 * n], None, True) for n in (16, 2048)]
    res = run_world(world, _bytes_worker, cfgs)
    gather = _gather_bytes()
    mx = b * hq * lq * 4  # fp32 lse
    sm = b * lq * hq * (d + 1) * 4  # fp32 [num | den]
    for rank_res in res:
        short, long_, fast_short, fast_long = rank_res
        assert short == long_
        assert short[0] == {"all_gather": gather, "all_reduce_max": mx, "all_reduce_sum": sm}
        assert short[1] == {"all_gather": gather * (world - 1), "all_reduce_max": mx,
                            "all_reduce_sum": sm}
        assert short[2] == 6  # three collectives, each counted as a send and a receive
        # with shard_lens known the call still agrees (shard_lens is checked there): the
        # agreement all-gather and the two all-reduces of the math, nothing else
        assert fast_short == fast_long == short


def test_ring_moves_the_kv():
    world, b, lq, hq, hkv, d = 4, 2, 1, 4, 2, 8
    kv = 2 * b * hkv * d * 4  # bytes of one token of k and v, fp32
    for n in (16, 512):
        lens = [n, 0, n + 5, 3]
        res = run_world(world, _bytes_worker, [("ring", b, lq, hq, hkv, d, lens, None, True)])
        for r, ((sent, recv, _),) in enumerate(res):
            assert sent.pop("all_gather") == _gather_bytes()  # the argument agreement
            assert recv.pop("all_gather") == _gather_bytes() * (world - 1)
            # rank r forwards the shards of r, r-1, ..., r-(p-2): all but the next rank's
            want_sent = kv * sum(lens[(r - s) % world] for s in range(world - 1))
            want_recv = kv * sum(lens[(r - s) % world] for s in range(1, world))
            assert sum(sent.values()) == want_sent
            assert sum(recv.values()) == want_recv
            assert set(sent) <= {(r + 1) % world}
        total = sum(sum(x[0][0].values()) for x in res)  # all_gather popped above
        assert total == kv * (world - 1) * sum(lens)  # every shard visits every other rank


def test_tree_hierarchy_bytes():
    world, b, lq, hq, hkv, d = 4, 1, 1, 4, 2, 8
    msg = b * lq * hq * (d + 1) * 4  # one rank's packed (out, lse)
    res = run_world(world, _bytes_worker,
                    [("tree", b, lq, hq, hkv, d, [n] * 4, (2, 2), True) for n in (8, 1024)])
    gather = _gather_bytes()
    for r, (short, long_) in enumerate(res):
        assert short == long_
        sent, recv, _ = short
        assert sent.pop("all_gather") == gather and recv.pop("all_gather") == 3 * gather
        if r % 2:  # not a node leader: one gather message up, one broadcast down
            assert sent == {"gather": msg} and recv == {"broadcast": msg}
        else:
            mx, sm = b * hq * lq * 4, msg
            assert sent == {"all_reduce_max": mx, "all_reduce_sum": sm, "broadcast": msg}
            assert recv == {"gather": msg, "all_reduce_max": mx, "all_reduce_sum": sm}


def _bad_worker(rank, world, which):
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    b, lq, hq, hkv, d = 2, 1, 4, 2, 8
    q = torch.randn(b, lq, hq, d, generator=torch.Generator().manual_seed(0))
    k = torch.randn(b, 5, hkv, d)
    v = torch.randn(b, 5, hkv, d)
    fn, kw = tree_decode, dict(group=dist.group.WORLD)
    if which == "head_dim" and rank == 1:
        k = torch.randn(b, 5, hkv, d + 1)
    elif which == "lq" and rank == 2:
        q = torch.randn(b, 2, hq, d)
    elif which == "dtype" and rank == 0:
        q, k, v = q.double(), k.double(), v.double()
    elif which == "not_tensor" and rank == 0:
        k = k.numpy()
    elif which == "empty_q":
        q = q[:, :0]
    elif which == "gqa" and rank == 2:
        k, v = torch.randn(b, 5, 3, d), torch.randn(b, 5, 3, d)
    elif which == "hierarchy":
        kw["hierarchy"] = (2, 2)
    elif which == "hierarchy_differs":
        kw["hierarchy"] = (1, 3) if rank else (3, 1)
    elif which == "ring_heads" and rank == 1:
        fn, q = ring_decode, torch.randn(b, lq, 2 * hq, d)
    elif which == "ring_heads":
        fn = ring_decode
    elif which == "scale" and rank == 2:
        kw["softmax_scale"] = float("nan")
    elif which == "scale_differs":
        kw["softmax_scale"] = 0.5 if rank == 1 else 0.25
    elif which == "causal_not_bool" and rank == 1:
        kw["causal"] = 1
    elif which == "causal_differs":
        kw["causal"] = rank != 0
    elif which == "q_differs" and rank == 2:
        q = q.clone()
        q[0, 0, 0, 0] += 1e-3
    elif which == "q_permuted" and rank == 1:
        q = q.flip(-1)  # same sum, other order: the weighted checksum sees it
    elif which == "shard_lens_wrong":
        kw["shard_lens"] = [5, 5, 4]  # rank 2 holds 5 keys
    elif which == "shard_lens_differs":
        kw["shard_lens"] = [5, 5, 5] if rank else None
    elif which == "backend" and rank == 0:
        kw["backend"] = "no_such_kernel"
    elif which == "ring_backend" and rank == 2:
        fn, kw["backend"] = ring_decode, "triton_decode"
    elif which == "ring_backend":
        fn = ring_decode
    try:
        fn(q, k, v, **kw)
        err = None
    except (TypeError, ValueError) as e:
        err = (type(e).__name__, str(e))
    # the world is still in step: a good call works afterwards
    ok = tree_decode(torch.ones(1, 1, 2, 4), torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4),
                     group=dist.group.WORLD)
    return err, float(ok.sum())


@pytest.mark.parametrize("which,word", [
    ("head_dim", "head_dim"), ("lq", "q.shape"), ("dtype", "dtype"), ("not_tensor", "Tensor"),
    ("empty_q", "Lq"), ("gqa", "heads"), ("hierarchy", "hierarchy"),
    ("hierarchy_differs", "hierarchy"), ("ring_heads", "q.shape"), ("scale", "softmax_scale"),
    ("scale_differs", "softmax_scale"), ("causal_not_bool", "causal"),
    ("causal_differs", "causal"), ("q_differs", "q values"), ("q_permuted", "q values"),
    ("shard_lens_wrong", "shard_lens"), ("shard_lens_differs", "shard_lens"),
    ("backend", "backend"), ("ring_backend", "backend"),
])
def test_bad_input_raises_on_every_rank(which, word):
    res = run_world(3, _bad_worker, which, timeout=60)
    for r, (err, ok) in enumerate(res):
        assert err is not None, f"rank {r} did not raise for {which}"
        assert err[0] in ("ValueError", "TypeError")
        assert ok == 8.0
    # the same error class on every rank, naming the argument (a differing value's message
    # also says what this rank holds)
    assert len({err[0] for err, _ in res}) == 1, [e for e, _ in res]
    assert all(word in err[1] for err, _ in res), [e for e, _ in res]


def _group_worker(rank, world, how):
    import torch.distributed as dist

    from longattn.tree import empty_cache, ring_decode, tree_decode

    q = torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(0))
    k = v = torch.full((1, 3, 2, 4), float(rank))
    if how == "none":
        out = []
        for call in (lambda: tree_decode(q, k, v), lambda: ring_decode(q, k, v),
                     lambda: empty_cache(1, 2, 4)):
            try:
                call()
                out.append(None)
            except ValueError as e:
                out.append(str(e))
        return out
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    res = [fn(q, k, v, group=g, return_lse=True) for fn in (tree_decode, ring_decode)
           for g in (mesh, dist.group.WORLD)]
    cache = empty_cache(1, 2, 4, group=mesh)
    return res, (cache.lens, cache.rank)


def test_group_none_raises_on_every_rank_and_a_mesh_works():
    res = run_world(2, _group_worker, "none", timeout=60)
    for errs in res:
        assert all(e is not None and "group" in e for e in errs), errs
    res = run_world(2, _group_worker, "mesh", timeout=60)
    for r, (outs, (lens, rank)) in enumerate(res):
        assert lens == [0, 0] and rank == r
        (tm, tm_lse), (tw, tw_lse), (rm, rm_lse), (rw, rw_lse) = outs
        assert torch.equal(tm, tw) and torch.equal(tm_lse, tw_lse)
        assert torch.equal(rm, rw) and torch.equal(rm_lse, rw_lse)
        assert torch.allclose(tm, rm, atol=1e-6) and torch.equal(tm, res[0][0][0][0])
