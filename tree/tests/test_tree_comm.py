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
    for method, b, lq, hq, hkv, d, lens, hierarchy, pass_lens, *dtype in cfgs:
        dtype = dtype[0] if dtype else torch.float32
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(b, lq, hq, d, generator=torch.Generator().manual_seed(0)).to(dtype)
        k = torch.randn(b, lens[rank], hkv, d, generator=g).to(dtype)
        v = torch.randn(b, lens[rank], hkv, d, generator=g).to(dtype)
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
    # float32 inputs: the statistics (lse_dtype) are float64, and num rides with den
    mx = b * hq * lq * 8  # float64 lse
    sm = b * lq * hq * (d + 1) * 8  # float64 [num | den]
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


def test_tree_bytes_of_low_precision_inputs_unchanged():
    """bf16 / fp16 inputs keep float32 statistics (lse_dtype): 4-byte MAX and SUM words."""
    world, b, lq, hq, hkv, d = 2, 2, 1, 4, 2, 8
    cfgs = [("tree", b, lq, hq, hkv, d, [5, 7], None, True, dt)
            for dt in (torch.bfloat16, torch.float16)]
    for rank_res in run_world(world, _bytes_worker, cfgs):
        for sent, _recv, _ in rank_res:
            assert sent["all_reduce_max"] == b * hq * lq * 4
            assert sent["all_reduce_sum"] == b * lq * hq * (d + 1) * 4


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
    msg = b * lq * hq * (d + 1) * 8  # one rank's packed (out, lse), float64 for fp32 inputs
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
            mx, sm = b * hq * lq * 8, msg
            assert sent == {"all_reduce_max": mx, "all_reduce_sum": sm, "broadcast": msg}
            assert recv == {"gather": msg, "all_reduce_max": mx, "all_reduce_sum": sm}


def _bad_worker(rank, world, which, bad):
    """One decode call with a bad (or differing) argument on rank ``bad`` only; every other
    rank makes the good call. Returns this rank's error (or None) and the sum of a good call
    made afterwards (the world is still in step)."""
    import torch.distributed as dist

    from longattn.tree import ring_decode, tree_decode

    b, lq, hq, hkv, d = 2, 1, 4, 2, 8
    q = torch.randn(b, lq, hq, d, generator=torch.Generator().manual_seed(0))
    k = torch.randn(b, 5, hkv, d)
    v = torch.randn(b, 5, hkv, d)
    fn, kw = tree_decode, dict(group=dist.group.WORLD)
    if which.startswith("ring_"):
        fn = ring_decode
    me = rank == bad
    if which == "shard_lens_wrong":  # every rank passes shard_lens, rank `bad`'s own is wrong
        kw["shard_lens"] = [4 if me and r == bad else 5 for r in range(world)]
    elif which == "shard_lens_differs":
        kw["shard_lens"] = None if me else [5] * world
    elif which in ("hierarchy_differs", "ring_hierarchy_differs"):
        kw["hierarchy"] = (world, 1) if me else (1, world)
    elif which == "scale_differs":
        kw["softmax_scale"] = 0.5 if me else 0.25
    elif which == "causal_differs":
        kw["causal"] = not me
    elif not me:
        pass  # the other cases: only rank `bad` holds the bad value
    elif which in ("head_dim", "ring_head_dim"):
        k = torch.randn(b, 5, hkv, d + 1)
    elif which == "v_head_dim":
        v = torch.randn(b, 5, hkv, d + 2)
    elif which == "lq":
        q = torch.randn(b, 2, hq, d)
    elif which == "dtype":
        q, k, v = q.double(), k.double(), v.double()
    elif which == "v_dtype":
        v = v.double()
    elif which in ("int_qkv", "ring_int_qkv"):
        q, k, v = q.long(), k.long(), v.long()
    elif which == "not_tensor":
        k = k.numpy()
    elif which == "k_3d":
        k = k[0]
    elif which == "empty_q":
        q = q[:, :0]
    elif which == "gqa":
        k, v = torch.randn(b, 5, 3, d), torch.randn(b, 5, 3, d)
    elif which == "batch":
        k, v = torch.randn(b + 1, 5, hkv, d), torch.randn(b + 1, 5, hkv, d)
    elif which == "hierarchy":
        kw["hierarchy"] = (world, 2)  # does not multiply to the group size
    elif which == "hierarchy_type":
        kw["hierarchy"] = "2x2"
    elif which == "ring_heads":
        q = torch.randn(b, lq, 2 * hq, d)
    elif which == "scale":
        kw["softmax_scale"] = float("nan")
    elif which == "scale_type":
        kw["softmax_scale"] = "0.5"
    elif which in ("causal_not_bool", "ring_causal_not_bool"):
        kw["causal"] = 1
    elif which == "q_differs":
        q = q.clone()
        q[0, 0, 0, 0] += 1e-3
    elif which == "q_permuted":
        q = q.flip(-1)  # same sum, other order: the weighted checksum sees it
    elif which == "q_nan":  # a NaN in q on one rank only: q is not replicated
        q = q.clone()
        q[1, 0, 2, 3] = float("nan")
    elif which == "shard_lens_len":
        kw["shard_lens"] = [5] * (world + 1)
    elif which == "backend":
        kw["backend"] = "no_such_kernel"
    elif which == "backend_type":
        kw["backend"] = 3
    elif which == "ring_backend":
        kw["backend"] = "triton_decode"  # cannot serve head_dim 8
    else:
        raise AssertionError(which)
    try:
        fn(q, k, v, **kw)
        err = None
    except (TypeError, ValueError) as e:
        err = (type(e).__name__, str(e))
    # the world is still in step: a good call works afterwards
    ok = tree_decode(torch.ones(1, 1, 2, 4), torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4),
                     group=dist.group.WORLD)
    return err, float(ok.sum())


BAD_DECODE = [  # (case, a word the message must hold)
    ("head_dim", "head_dim"), ("v_head_dim", "head_dim"), ("lq", "q.shape"),
    ("dtype", "dtype"), ("v_dtype", "dtype"), ("int_qkv", "dtype"), ("not_tensor", "Tensor"),
    ("k_3d", "k must be"), ("empty_q", "Lq"), ("gqa", "heads"), ("batch", "batch"),
    ("hierarchy", "hierarchy"), ("hierarchy_type", "hierarchy"),
    ("hierarchy_differs", "hierarchy"), ("scale", "softmax_scale"),
    ("scale_type", "softmax_scale"), ("scale_differs", "softmax_scale"),
    ("causal_not_bool", "causal"), ("causal_differs", "causal"), ("q_differs", "q values"),
    ("q_permuted", "q values"), ("q_nan", "q values"), ("shard_lens_wrong", "shard_lens"),
    ("shard_lens_len", "shard_lens"), ("shard_lens_differs", "shard_lens"),
    ("backend", "backend"), ("backend_type", "backend"),
    ("ring_heads", "q.shape"), ("ring_head_dim", "head_dim"), ("ring_int_qkv", "dtype"),
    ("ring_causal_not_bool", "causal"), ("ring_backend", "backend"),
]


@pytest.mark.faults
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("which,word", BAD_DECODE)
def test_bad_decode_argument_on_one_rank_raises_on_every_rank(which, word, world):
    """tree_decode / ring_decode (``ring_*`` cases) with the bad value on ONE rank (the last
    rank, and rank 0 too for the first world) of a 2-, 3- or 4-rank world: every rank raises
    the same error (class and message) naming the argument, none returns, none hangs, and the
    world works afterwards."""
    for bad in ((0, world - 1) if world == 2 else (world - 1,)):
        res = run_world(world, _bad_worker, which, bad, timeout=60)
        for r, (err, ok) in enumerate(res):
            assert err is not None, f"rank {r} did not raise for {which} (bad rank {bad})"
            assert err[0] in ("ValueError", "TypeError")
            assert ok == 8.0
        assert len({err for err, _ in res}) == 1, [e for e, _ in res]  # the same everywhere
        assert word in res[0][0][1], res[0][0]


def _bad_append_worker(rank, world, which, bad):
    """KVCache.append with a bad argument (or a cache out of step) on rank ``bad`` only, after
    a good prefill. Returns this rank's error, whether its cache (lens and buffers) is
    unchanged, and the lens after a good append made afterwards."""
    import torch.distributed as dist

    from longattn.tree import empty_cache

    b, hkv, d = 2, 2, 8
    cache = empty_cache(b, hkv, d, capacity=4, group=dist.group.WORLD)
    g = torch.Generator().manual_seed(0)  # the same new keys / values on every rank
    cache.append(torch.randn(b, 5, hkv, d, generator=g), torch.randn(b, 5, hkv, d, generator=g))
    k_new, v_new = torch.randn(b, 2, hkv, d, generator=g), torch.randn(b, 2, hkv, d, generator=g)
    if rank == bad:
        if which == "int_k":
            k_new = k_new.long()
        elif which == "int_both":
            k_new, v_new = k_new.long(), v_new.long()
        elif which == "v_head_dim":
            v_new = torch.randn(b, 2, hkv, d + 1)
        elif which == "v_dtype":
            v_new = v_new.double()
        elif which == "k_dtype":
            k_new = k_new.half()
        elif which == "k_heads":
            k_new = torch.randn(b, 2, hkv + 1, d)
        elif which == "k_batch":
            k_new = torch.randn(b + 1, 2, hkv, d)
        elif which == "k_3d":
            k_new = k_new[0]
        elif which == "not_tensor":
            v_new = v_new.tolist()
        elif which == "v_tokens":
            v_new = torch.randn(b, 3, hkv, d)
        elif which == "tokens_differ":  # a valid append of another length
            k_new, v_new = k_new[:, :1], v_new[:, :1]
        elif which == "device":
            k_new = k_new.to("meta")
        elif which == "lens_out_of_step":
            cache.lens[0] -= 1
        elif which == "too_many":  # does not fit on this rank's view of the cache
            k_new, v_new = (torch.randn(b, 20, hkv, d) for _ in range(2))
        else:
            raise AssertionError(which)
    def raw(t):  # the bytes: unfilled slots of the buffers may hold NaN
        return t.view(torch.uint8).clone()

    before = (list(cache.lens), raw(cache.k), raw(cache.v))
    try:
        cache.append(k_new, v_new)
        err = None
    except (TypeError, ValueError) as e:
        err = (type(e).__name__, str(e))
    unchanged = (cache.lens == before[0] and torch.equal(raw(cache.k), before[1])
                 and torch.equal(raw(cache.v), before[2]))
    if which == "lens_out_of_step" and rank == bad:
        cache.lens[0] += 1  # back in step
    ok = torch.ones(b, 1, hkv, d)
    cache.append(ok, ok)
    return err, unchanged, list(cache.lens)


BAD_APPEND = [
    ("int_k", "k_new"), ("int_both", "k_new"), ("v_head_dim", "v_new"), ("v_dtype", "v_new"),
    ("k_dtype", "k_new"), ("k_heads", "k_new"), ("k_batch", "k_new"), ("k_3d", "k_new"),
    ("not_tensor", "v_new"), ("v_tokens", "same number"), ("tokens_differ", "k_new.shape"),
    ("device", "k_new"), ("lens_out_of_step", "lens"), ("too_many", "full"),
]


@pytest.mark.faults
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("which,word", BAD_APPEND)
def test_bad_append_on_one_rank_raises_on_every_rank(which, word, world):
    """KVCache.append with the bad value on ONE rank (the last) of a 2-, 3- or 4-rank world:
    every rank raises the same error before any rank writes or counts a token, and the caches
    stay in step (a good append afterwards gives the same lens everywhere)."""
    res = run_world(world, _bad_append_worker, which, world - 1, timeout=60)
    for r, (err, unchanged, _lens) in enumerate(res):
        assert err is not None, f"rank {r} did not raise for {which}"
        assert err[0] in ("ValueError", "TypeError")
        assert unchanged, f"rank {r} changed its cache for {which}"
    assert len({err for err, _, _ in res}) == 1, [e for e, _, _ in res]
    assert word in res[0][0][1], res[0][0]
    assert all(lens == res[0][2] for _, _, lens in res)
    assert sum(res[0][2]) == 6


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
