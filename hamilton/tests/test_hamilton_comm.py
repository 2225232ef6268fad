"""Exact communication volume, bad input raising on every rank, shard/unshard, autograd details."""

from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch
import torch.distributed as tdist

from longattn.common.comm import counting
from longattn.common.testing import run_world
from longattn.hamilton import (
    hamilton_attn,
    multi_ring_schedule,
    ring_schedule,
    shard,
    two_level_schedule,
    unshard,
)

B, HQ, HKV, D, DV = 2, 4, 1, 8, 6


def _world_attn():
    """hamilton_attn over the whole gloo world of a test (group=None is an error there)."""
    return functools.partial(hamilton_attn, group=tdist.group.WORLD)


def _local(rank, n, lk, dtype, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed + rank)
    q = torch.randn(B, lk, HQ, D, generator=g).to(dtype)
    k = torch.randn(B, lk, HKV, D, generator=g).to(dtype)
    v = torch.randn(B, lk, HKV, DV, generator=g).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _send_groups(messages):
    """The sends of each exchange call, in order (each call records its sends, then its recvs)."""
    groups = []
    for kind, grp in itertools.groupby(messages, key=lambda m: m[0]):
        if kind == "send":
            groups.append([(p, b) for _, p, b in grp])
    return groups


def _volume(rank, n):
    hamilton_attn = _world_attn()
    out = {}
    for sched, causal in itertools.product(("tasp", "ring", "two_level"), (False, True)):
        if sched == "two_level" and n != 4:
            continue
        s = {"tasp": multi_ring_schedule(n), "ring": ring_schedule(n),
             "two_level": two_level_schedule(2, 2) if n == 4 else None}[sched]
        lk = 2 * s.num_slots * 3
        q, k, v = _local(rank, n, lk, torch.bfloat16)
        with counting() as fwd:
            o = hamilton_attn(q, k, v, causal=causal, schedule=s)
        with counting() as bwd:
            o.float().square().sum().backward()
        out[(sched, causal)] = (_send_groups(fwd.messages), _send_groups(bwd.messages),
                                fwd.bytes_sent, fwd.bytes_received, bwd.bytes_sent,
                                bwd.bytes_received, lk)
    return out


@pytest.mark.parametrize("n", [3, 4, 8])
def test_exact_volume(n):
    res = run_world(n, _volume)
    for rank, per in enumerate(res):
        for (sched, causal), (fwd, bwd, fs, fr, bs, br, lk) in per.items():
            block = lk * B * HKV * (D + DV) * 2  # one local KV block in bf16
            block32 = 2 * block  # dK/dV accumulators travel in fp32
            k = {"tasp": n - 1, "ring": 1, "two_level": 2}[sched]
            pieces = 2 if causal and k > 1 else 1
            assert len(fwd) == n - 1, (sched, causal)
            for step in fwd:  # one KV block per step, k slots to k distinct peers
                peers = [p for p, _ in step]
                assert len(step) == k * pieces
                assert len(set(peers)) == k and rank not in peers
                assert all(b == block // (k * pieces) for _, b in step), (sched, causal, step)
                if sched == "ring":
                    assert peers == [(rank + 1) % n]
                if sched == "tasp":
                    assert sorted(set(peers)) == sorted(set(range(n)) - {rank})
            assert fs == fr == (n - 1) * block
            # backward: KV back along the reversed schedule for n - 2 steps, dK/dV for n - 1
            assert len(bwd) == 2 * (n - 2) + 1
            assert bs == br == (n - 2) * block + (n - 1) * block32
            for i, step in enumerate(bwd):
                size = block32 if (i % 2 == 1 or i == len(bwd) - 1) else block
                assert sum(b for _, b in step) == size, (sched, causal, i)
                assert len({p for p, _ in step}) == k


# ---------------------------------------------------------------------------------------------
# bad input: every rank raises, nobody hangs, and the world is usable afterwards


def _bad_calls(rank, n):
    hamilton_attn = _world_attn()
    lk = 2 * (n - 1) * 2
    results = []

    def attempt(name, fn):
        try:
            fn()
        except (TypeError, ValueError) as e:
            results.append((name, type(e).__name__, str(e)))
        else:
            results.append((name, None, ""))

    q, k, v = _local(rank, n, lk, torch.float32)
    ql = _local(rank, n, lk + 2 * (n - 1) * (rank == 0), torch.float32)
    attempt("length differs on rank 0", lambda: hamilton_attn(*ql, causal=True, schedule="tasp"))
    qo = _local(rank, n, lk + 1, torch.float32)
    attempt("not divisible", lambda: hamilton_attn(*qo, causal=True, schedule="tasp"))
    attempt("not divisible ring", lambda: hamilton_attn(*_local(rank, n, 3, torch.float32),
                                                        causal=True, schedule="ring"))
    kd = k.detach().double() if rank == 1 else k
    attempt("dtype on rank 1", lambda: hamilton_attn(q, kd, v))
    attempt("schedule for other n", lambda: hamilton_attn(q, k, v,
                                                          schedule=multi_ring_schedule(n + 1)))
    attempt("schedule name", lambda: hamilton_attn(q, k, v, schedule="hamilton"))
    attempt("causal differs", lambda: hamilton_attn(q, k, v, causal=rank == 0))
    attempt("causal not bool", lambda: hamilton_attn(q, k, v, causal=1))
    nog = [t.detach() for t in (q, k, v)] if rank == n - 1 else (q, k, v)
    attempt("requires_grad differs", lambda: hamilton_attn(*nog))
    attempt("scale differs", lambda: hamilton_attn(q, k, v, softmax_scale=0.1 * (rank + 1)))
    attempt("heads", lambda: hamilton_attn(q[:, :, :3], k.expand(-1, -1, 2, -1), v))
    attempt("causal lengths", lambda: hamilton_attn(q[:, :2 * (n - 1)], k, v, causal=True))
    attempt("not a tensor", lambda: hamilton_attn(q, k.tolist() if rank == 0 else k, v))
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    attempt("two_level without LOCAL_WORLD_SIZE", lambda: hamilton_attn(q, k, v,
                                                                        schedule="two_level"))
    attempt("backend", lambda: hamilton_attn(q, k, v, backend="nope"))
    # head dim 0 or no query heads on one rank: the default scale (0 ** -0.5) and Ulysses'
    # head split failed inside the checks with other errors, leaving the others waiting
    z = (q[..., :0], k[..., :0], v) if rank == n - 1 else (q, k, v)
    for sched in ("ring", "allgather"):
        attempt(f"head_dim 0 on the last rank, {sched}",
                lambda sched=sched: hamilton_attn(*z, causal=True, schedule=sched))
    h0 = q[:, :, :0] if rank == 0 else q
    attempt("no query heads on rank 0, ulysses", lambda: hamilton_attn(h0, k, v,
                                                                      schedule="ulysses"))
    # the world still works: a good call after all the bad ones
    out = hamilton_attn(q, k, v, causal=True)
    out.sum().backward()
    return results, tuple(out.shape)


@pytest.mark.parametrize("n", [2, 3])
def test_bad_input_raises_on_every_rank(n):
    res = run_world(n, _bad_calls, timeout=120)
    names = [r[0] for r in res[0][0]]
    for i, name in enumerate(names):
        kinds = [per[0][i][1] for per in res]
        assert all(kind is not None for kind in kinds), (name, kinds)
        assert len(set(kinds)) == 1, (name, kinds)  # the same class on every rank
    msgs = {r[0]: r[2] for r in res[0][0]}
    assert "divisible by" in msgs["not divisible"] and "pad the global" in msgs["not divisible"]
    assert "q.shape must be the same" in msgs["length differs on rank 0"]
    assert "causal must be the same" in msgs["causal differs"]
    assert "requires_grad must be the same" in msgs["requires_grad differs"]
    assert "softmax_scale must be the same" in msgs["scale differs"]
    assert "schedule must be" in msgs["schedule name"]
    assert "LOCAL_WORLD_SIZE" in msgs["two_level without LOCAL_WORLD_SIZE"]
    assert res[1][0][names.index("dtype on rank 1")][1] == "TypeError"
    assert "rank(s) [1]" in res[0][0][names.index("dtype on rank 1")][2]


# ---------------------------------------------------------------------------------------------
# shard / unshard, retain_graph, no_grad, world size 1 without a process group


def _shard_roundtrip(rank, n):
    x = torch.arange(2 * 4 * n * 3, dtype=torch.float64).reshape(2, 4 * n, 3)
    ok = []
    world = tdist.group.WORLD
    for causal in (False, True):
        loc = shard(x, group=world, causal=causal)
        with counting() as c:
            back = unshard(loc, group=world, causal=causal)
        ok.append(torch.equal(back, x) and c.bytes_sent == (n - 1) * loc.numel() * 8)
    return ok


def test_shard_unshard_roundtrip():
    assert all(all(r) for r in run_world(4, _shard_roundtrip))
    x = torch.randn(1, 24, 2, 2)
    for causal in (False, True):
        parts = [torch.cat([x[:, r * 3:(r + 1) * 3], x[:, 21 - r * 3:24 - r * 3]], 1)
                 if causal else x[:, r * 6:(r + 1) * 6] for r in range(4)]
        assert torch.equal(unshard(parts, causal=causal), x)


def _twice(rank, n):
    hamilton_attn = _world_attn()
    q, k, v = _local(rank, n, 2 * (n - 1) * 2, torch.float64)
    out = hamilton_attn(q, k, v, causal=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(rank), dtype=out.dtype)
    out.backward(dout, retain_graph=True)
    first = [t.grad.clone() for t in (q, k, v)]
    out.backward(dout)
    same = all(torch.allclose(t.grad, 2 * f, rtol=0, atol=1e-14) for t, f in zip((q, k, v),
                                                                                  first))
    with torch.no_grad():
        again = hamilton_attn(q, k, v, causal=True)
    return same, torch.equal(again, out.detach())


def test_backward_twice_and_no_grad():
    assert all(a and b for a, b in run_world(3, _twice))


def test_world_size_one_without_process_group():
    from longattn.common.kernels import attention

    q, k, v = _local(0, 1, 5, torch.float64)
    for causal in (False, True):
        out = hamilton_attn(q, k, v, causal=causal)
        ref = attention(q, k, v, causal=causal)
        assert torch.allclose(out, ref, rtol=0, atol=1e-14)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        hamilton_attn(q, k, v, group=object())


def _group_none(rank, n):
    """group=None in a world of n > 1 ranks: a ValueError naming group, on every rank, from
    hamilton_attn, shard and unshard; group=LOCAL runs on this process alone."""
    from longattn.common.dist import LOCAL
    from longattn.common.kernels import attention

    q, k, v = _local(rank, n, 4, torch.float64, requires_grad=False)
    errs = []
    for fn in (lambda: hamilton_attn(q, k, v), lambda: shard(q), lambda: unshard(q)):
        try:
            fn()
        except ValueError as e:
            errs.append(str(e))
        else:
            errs.append(None)
    out = hamilton_attn(q, k, v, group=LOCAL, causal=True)
    same = torch.allclose(out, attention(q, k, v, causal=True), rtol=0, atol=1e-14)
    return errs, same


def test_group_none_in_a_world_raises_on_every_rank():
    for errs, local_ok in run_world(2, _group_none):
        assert all(e is not None and "group=None" in e and "group.WORLD" in e for e in errs), errs
        assert local_ok


def _mesh(rank, n):
    """A 1-D DeviceMesh as group: the "cp" dimension of a 2 x (n/2) mesh (two problems, one
    per "dp" row) and a 1-D mesh over the world; compared with single-process attention."""
    from torch.distributed.device_mesh import init_device_mesh

    from longattn.common.kernels import attention

    errs = []
    mesh2 = init_device_mesh("cpu", (2, n // 2), mesh_dim_names=("dp", "cp"))
    mesh1 = init_device_mesh("cpu", (n,))
    for mesh, seed in ((mesh2["cp"], rank // (n // 2)), (mesh1, 7)):
        g = torch.Generator().manual_seed(seed)
        full = [torch.randn(1, 24 * n, 2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
        for causal in (False, True):
            loc = [shard(t, group=mesh, causal=causal) for t in full]
            out = hamilton_attn(*loc, group=mesh, causal=causal, schedule="tasp")
            got = unshard(out, group=mesh, causal=causal)
            errs.append(float((got - attention(*full, causal=causal)).abs().max()))
    try:
        hamilton_attn(*loc, group=mesh2, causal=True)
    except ValueError as e:
        two_d = str(e)
    else:
        two_d = None
    return errs, two_d


def test_device_mesh_as_group():
    for errs, two_d in run_world(4, _mesh):
        assert len(errs) == 4 and max(errs) <= 1e-12, errs
        assert two_d is not None and "1-D DeviceMesh" in two_d


_STRICT = "contiguous_kv_test"


def _contiguous_only():
    """Register (once per process) a backend that refuses strided K/V, else the torch one."""
    from longattn.common.kernels import BACKENDS, Backend, register_backend

    if _STRICT not in BACKENDS:
        torch_b = BACKENDS["torch"]

        def supports(req):
            if not (req.k.is_contiguous() and req.v.is_contiguous()):
                return "needs contiguous K/V"
            return torch_b.supports(req)

        register_backend(_STRICT, Backend(torch_b.forward, torch_b.backward, supports))


def _config_settings(rank, n):
    """Both contiguous_kv settings and both merge backends give the same result as the default
    call; a backend that refuses strided K/V views raises on every rank (saying which setting
    serves it) with the default config, and serves contiguous_kv=True."""
    from longattn.hamilton import HamiltonConfig

    _contiguous_only()
    hamilton_attn = _world_attn()
    lk = 2 * (n - 1) * 2
    q, k, v = _local(rank, n, lk, torch.float64)
    dout = torch.randn(q.shape[:-1] + (DV,), generator=torch.Generator().manual_seed(rank),
                       dtype=torch.float64)
    results = {}
    for causal in (False, True):
        for name, backend, config in (
                ("default", "auto", None),
                ("contiguous", "auto", HamiltonConfig(contiguous_kv=True)),
                ("strided", "torch", HamiltonConfig(contiguous_kv=False)),
                ("merge torch", "auto", HamiltonConfig(merge_backend="torch")),
                ("strict contiguous", _STRICT, HamiltonConfig(contiguous_kv=True))):
            for t in (q, k, v):
                t.grad = None
            out = hamilton_attn(q, k, v, causal=causal, backend=backend, config=config)
            out.backward(dout)
            results[(causal, name)] = [out.detach()] + [t.grad for t in (q, k, v)]
    errs = {key: max(float((a - b).abs().max()) for a, b in zip(r, results[(key[0], "default")]))
            for key, r in results.items()}
    refused = []
    for config in (None, HamiltonConfig()):
        try:
            hamilton_attn(q, k, v, causal=True, backend=_STRICT, config=config)
        except ValueError as e:
            refused.append(str(e))
        else:
            refused.append(None)
    return errs, refused


@pytest.mark.parametrize("n", [2, 3])
def test_config_contiguous_kv_and_merge_backend(n):
    for errs, refused in run_world(n, _config_settings):
        assert max(errs.values()) <= 1e-13, errs
        for msg in refused:
            assert msg is not None and "needs contiguous K/V" in msg, msg
            assert "contiguous_kv=True" in msg and "rank(s)" in msg, msg


def test_config_record():
    from longattn.hamilton import HamiltonConfig

    assert HamiltonConfig() == HamiltonConfig(merge_backend="auto", contiguous_kv=False)
    with pytest.raises(ValueError, match="merge_backend"):
        HamiltonConfig(merge_backend="fused")
    with pytest.raises(TypeError, match="contiguous_kv"):
        HamiltonConfig(contiguous_kv=1)
    with pytest.raises(AttributeError):
        HamiltonConfig().contiguous_kv = True  # frozen
    q, k, v = _local(0, 1, 4, torch.float64)
    with pytest.raises(TypeError, match="config must be a longattn.hamilton.HamiltonConfig"):
        hamilton_attn(q, k, v, config={"contiguous_kv": True})


def _config_differs(rank, n):
    from longattn.hamilton import HamiltonConfig

    hamilton_attn = _world_attn()
    q, k, v = _local(rank, n, 2 * (n - 1) * 2, torch.float64)
    out = []
    for config in (HamiltonConfig(contiguous_kv=rank == 0),
                   HamiltonConfig(merge_backend="torch" if rank == 0 else "auto"),
                   HamiltonConfig(merge_backend="triton")):
        try:
            hamilton_attn(q, k, v, causal=True, config=config)
        except ValueError as e:
            out.append(str(e))
        else:
            out.append(None)
    return out


def test_config_must_agree():
    for msgs in run_world(2, _config_differs):
        assert "config.contiguous_kv must be the same on every rank" in msgs[0], msgs
        assert "config.merge_backend must be the same on every rank" in msgs[1], msgs
        # float64 accumulators: the one-pass Triton merge cannot serve them (or no triton)
        assert "merge_backend='triton'" in msgs[2], msgs


def _subgroups(rank, n):
    """Two groups of 2 (ranks {0, 2} and {1, 3}, so group ranks differ from global ranks)
    each run their own problem; compare with single-device attention of the full sequence."""
    import torch.distributed as dist

    from longattn.common.kernels import attention

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    group = groups[rank % 2]
    g = torch.Generator().manual_seed(rank % 2)
    full = [torch.randn(1, 24, 2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    errs = []
    for causal in (False, True):
        for sched in ("tasp", "ring"):
            loc = [shard(t, group=group, causal=causal).requires_grad_() for t in full]
            out = hamilton_attn(*loc, group=group, causal=causal, schedule=sched)
            got = unshard(out.detach(), group=group, causal=causal)
            fg = [t.clone().requires_grad_() for t in full]
            ref = attention(*fg, causal=causal)
            errs.append(float((got - ref.detach()).abs().max()))
            out.square().sum().backward()
            ref.square().sum().backward()
            for lt, ft in zip(loc, fg):
                errs.append(float((lt.grad - shard(ft.grad, group=group, causal=causal))
                                  .abs().max()))
    return errs


def test_subgroups():
    for errs in run_world(4, _subgroups):
        assert max(abs(e) for e in errs) <= 1e-12, errs


def _empty_batch(rank, n):
    """Batch 0 on every schedule, forward and backward: empty results of the right shapes, as
    one process gives (allgather's reshape of the KV rows failed on it)."""
    hamilton_attn = _world_attn()
    res = {}
    for sched, causal in itertools.product(("tasp", "ring", "allgather", "ulysses"),
                                           (False, True)):
        q, k, v = (t.detach()[:0].requires_grad_() for t in _local(rank, n, 4, torch.float64))
        out, lse = hamilton_attn(q, k, v, causal=causal, schedule=sched, return_lse=True)
        (out.sum() + lse.sum()).backward()
        res[(sched, causal)] = (tuple(out.shape), tuple(lse.shape),
                                tuple(t.grad.shape for t in (q, k, v)))
    return res


def test_empty_batch_on_every_schedule():
    for res in run_world(2, _empty_batch, timeout=120):
        for key, (out, lse, grads) in res.items():
            assert out == (0, 4, HQ, DV) and lse == (0, HQ, 4), (key, out, lse)
            assert grads == ((0, 4, HQ, D), (0, 4, HKV, D), (0, 4, HKV, DV)), (key, grads)
