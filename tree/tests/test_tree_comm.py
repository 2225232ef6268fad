"""Exact communication volume of tree / ring decoding, and bad input on worlds."""

from __future__ import annotations

import pytest
import torch

from longattn.common.testing import run_world

GATHER = 10 * 8  # the argument-agreement all-gather: ten int64 per rank


def _bytes_worker(rank, world, cfgs):
    from longattn.common.comm import counting
    from longattn.tree import ring_decode, tree_decode

    out = []
    for method, b, lq, hq, hkv, d, lens, hierarchy, pass_lens in cfgs:
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(b, lq, hq, d, generator=torch.Generator().manual_seed(0))
        k = torch.randn(b, lens[rank], hkv, d, generator=g)
        v = torch.randn(b, lens[rank], hkv, d, generator=g)
        kw = dict(shard_lens=lens) if pass_lens else {}
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
    mx = b * hq * lq * 4  # fp32 lse
    sm = b * lq * hq * (d + 1) * 4  # fp32 [num | den]
    for rank_res in res:
        short, long_, fast_short, fast_long = rank_res
        assert short == long_
        assert short[0] == {"all_gather": GATHER, "all_reduce_max": mx, "all_reduce_sum": sm}
        assert short[1] == {"all_gather": GATHER * (world - 1), "all_reduce_max": mx,
                            "all_reduce_sum": sm}
        # with shard_lens known: exactly the two all-reduces of the math
        assert fast_short == fast_long
        assert fast_short[0] == {"all_reduce_max": mx, "all_reduce_sum": sm}
        assert fast_short[2] == 4  # two collectives, each counted as a send and a receive


def test_ring_moves_the_kv():
    world, b, lq, hq, hkv, d = 4, 2, 1, 4, 2, 8
    kv = 2 * b * hkv * d * 4  # bytes of one token of k and v, fp32
    for n in (16, 512):
        lens = [n, 0, n + 5, 3]
        res = run_world(world, _bytes_worker, [("ring", b, lq, hq, hkv, d, lens, None, True)])
        for r, ((sent, recv, _),) in enumerate(res):
            # rank r forwards the shards of r, r-1, ..., r-(p-2): all but the next rank's
            want_sent = kv * sum(lens[(r - s) % world] for s in range(world - 1))
            want_recv = kv * sum(lens[(r - s) % world] for s in range(1, world))
            assert sum(sent.values()) == want_sent
            assert sum(recv.values()) == want_recv
            assert set(sent) <= {(r + 1) % world}
        total = sum(sum(x[0][0].values()) for x in res)
        assert total == kv * (world - 1) * sum(lens)  # every shard visits every other rank


def test_tree_hierarchy_bytes():
    world, b, lq, hq, hkv, d = 4, 1, 1, 4, 2, 8
    msg = b * lq * hq * (d + 1) * 4  # one rank's packed (out, lse)
    res = run_world(world, _bytes_worker,
                    [("tree", b, lq, hq, hkv, d, [n] * 4, (2, 2), True) for n in (8, 1024)])
    for r, (short, long_) in enumerate(res):
        assert short == long_
        sent, recv, _ = short
        if r % 2:  # not a node leader: one gather message up, one broadcast down
            assert sent == {"gather": msg} and recv == {"broadcast": msg}
        else:
            mx, sm = b * hq * lq * 4, msg
            assert sent == {"all_reduce_max": mx, "all_reduce_sum": sm, "broadcast": msg}
            assert recv == {"gather": msg, "all_reduce_max": mx, "all_reduce_sum": sm}


def _bad_worker(rank, world, which):
    from longattn.tree import ring_decode, tree_decode

    b, lq, hq, hkv, d = 2, 1, 4, 2, 8
    q = torch.randn(b, lq, hq, d)
    k = torch.randn(b, 5, hkv, d)
    v = torch.randn(b, 5, hkv, d)
    fn, kw = tree_decode, {}
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
        kw = dict(hierarchy=(2, 2))
    elif which == "ring_heads" and rank == 1:
        fn, q = ring_decode, torch.randn(b, lq, 2 * hq, d)
    elif which == "ring_heads":
        fn = ring_decode
    elif which == "scale":
        kw = dict(scale=float("nan")) if rank == 2 else {}
    try:
        fn(q, k, v, **kw)
        err = None
    except (TypeError, ValueError) as e:
        err = (type(e).__name__, str(e))
    # the world is still in step: a good call works afterwards
    ok = tree_decode(torch.ones(1, 1, 2, 4), torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))
    return err, float(ok.sum())


@pytest.mark.parametrize("which,word", [
    ("head_dim", "head_dim"), ("lq", "agree"), ("dtype", "agree"), ("not_tensor", "Tensor"),
    ("empty_q", "Lq"), ("gqa", "heads"), ("hierarchy", "hierarchy"),
    ("ring_heads", "agree"), ("scale", "scale"),
])
def test_bad_input_raises_on_every_rank(which, word):
    res = run_world(3, _bad_worker, which, timeout=60)
    for r, (err, ok) in enumerate(res):
        assert err is not None, f"rank {r} did not raise for {which}"
        assert err[0] in ("ValueError", "TypeError")
        assert ok == 8.0
    assert any(word in err[1] for err, _ in res), [e for e, _ in res]
