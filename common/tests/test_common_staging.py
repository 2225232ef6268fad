"""The staged transport (longattn.common.staging) on gloo worlds of 2, 3 and 4 ranks, without a
GPU: ``staging.SimulatedDevice`` treats CPU tensors as device tensors, so the staged path runs
on CPU ranks; its copies are deferred (a device running behind the host) and every device
operation is logged, and ``_logged`` adds the transfers (posts, work waits) to the same log.

One ``run_world`` call per world size runs every check; the ranks return plain data and the
assertions are made here. Checked, for exchange / ring_exchange (current stream and ``stream=``)
/ all_to_all_step and every collective: the received bytes equal those of the unstaged path
(with the send tensors changed right after posting, which must not reach the message); the
byte counters are identical; the order of operations (D2H copies before an event the host
synchronizes before the post, H2D copies only after the transfer completed, on the current
stream or on ``stream=`` joined back to it); a staging buffer is not handed out again while a
copy using it is pending; an unwaited handle keeps its buffers.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from longattn.common import comm, staging
from longattn.common.dist import LOCAL
from longattn.common.testing import run_world

SIZES = [2, 3, 4]


def _w():
    return dist.group.WORLD


def _data(src, dst, numel, dtype, salt=0):
    """Random content that depends on (sender, receiver, salt); a NaN in float messages."""
    g = torch.Generator().manual_seed(7919 * salt + 101 * src + dst)
    if not dtype.is_floating_point:
        return torch.randint(-2**40, 2**40, (numel,), generator=g, dtype=dtype)
    t = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    if numel > 3:
        t[3] = float("nan")
    return t


def _bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------------------------
# the cases: each runs one kind of call and returns the tensors it received


def _case_exchange(rank, n, stream, flush, mutate):
    peers = sorted({(rank + 1) % n, (rank + 2) % n} - {rank})
    froms = sorted({(rank - 1) % n, (rank - 2) % n} - {rank})
    sends = [(_data(rank, p, 5 + 3 * p, torch.float32), p) for p in peers]
    sends += [(_data(rank, p, 4, torch.bfloat16, 1), p) for p in peers]
    recvs = [(torch.empty(5 + 3 * rank, dtype=torch.float32), p) for p in froms]
    recvs += [(torch.empty(4, dtype=torch.bfloat16), p) for p in froms]
    h = comm.exchange(sends, recvs, _w(), stream=stream)
    mutate([t for t, _ in sends])
    h.wait()
    flush()
    return [t for t, _ in recvs]


def _case_ring(rank, n, stream, flush, mutate):
    out = []
    for shift, dtype in ((1, torch.bfloat16), (-1, torch.float64)):
        send = _data(rank, (rank + shift) % n, 15, dtype, 2).reshape(3, 5)
        recv = torch.empty_like(send)
        h = comm.ring_exchange(send, recv, _w(), shift=shift, stream=stream)
        mutate([send])
        h.wait()
        flush()
        out.append(recv)
    # n - 1 double-buffered steps: every block passes through every rank
    bufs = [_data(rank, 0, 8, torch.float32, 3), torch.empty(8)]
    for step in range(n - 1):
        h = comm.ring_exchange(bufs[step % 2], bufs[(step + 1) % 2], _w(), stream=stream)
        h.wait()
        flush()
        out.append(bufs[(step + 1) % 2].clone())
    return out


def _numel(src, dst):
    return 0 if (src + 2 * dst) % 5 == 4 else 1 + src + 3 * dst


def _case_a2a(rank, n, stream, flush, mutate):
    sends = [_data(rank, p, _numel(rank, p), torch.float32, 4) for p in range(n)]
    recvs = [torch.empty(_numel(p, rank)) for p in range(n)]
    h = comm.all_to_all_step(sends, recvs, _w(), stream=stream)
    mutate(sends)
    h.wait()
    flush()
    return [r for p, r in enumerate(recvs) if p != rank]


def _case_collectives(rank, n, stream, flush, mutate):
    out = []
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
        t = _data(rank, 0, 6, torch.float32, 5)
        comm.all_reduce(t, op=op, group=_w())
        flush()
        out.append(t)
    parts = [torch.empty(4, dtype=torch.float64) for _ in range(n)]
    comm.all_gather(parts, _data(rank, 0, 4, torch.float64, 6), group=_w())
    flush()
    out += parts
    dst = n - 1
    gl = [torch.empty(3, dtype=torch.int64) for _ in range(n)] if rank == dst else None
    comm.gather(_data(rank, dst, 3, torch.int64, 7), gl, dst=dst, group=_w())
    flush()
    out += gl or []
    b = _data(rank, 0, 5, torch.bfloat16, 8)
    comm.broadcast(b, src=1 % n, group=_w())
    flush()
    out.append(b)
    return out


CASES = {"exchange": _case_exchange, "ring_exchange": _case_ring,
         "all_to_all_step": _case_a2a, "collectives": _case_collectives}


# --------------------------------------------------------------------------------------------
# running a case staged and unstaged


class _Work:
    """A transfer's work whose ``wait`` is logged."""

    def __init__(self, work, log, batch):
        self.work, self.log, self.batch = work, log, batch

    def wait(self):
        self.work.wait()
        self.log.append(("work_wait", self.batch))


def _flat(args, kwargs):
    out = []
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                out.append(y.tensor if isinstance(y, dist.P2POp) else y)
    return [t for t in out if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def _logged(dev):
    """Log every transfer into ``dev.log``: ``("post", name, batch, host buffers)`` when posted,
    ``("works", batch, count)`` after a p2p batch is posted, ``("work_wait", batch)`` when one
    of its works is waited, ``("done", batch)`` when a blocking collective returns; a transfer
    through a buffer that a queued copy still uses fails."""
    names = ["batch_isend_irecv", "all_reduce", "all_gather", "gather", "broadcast"]
    saved = {name: getattr(dist, name) for name in names}
    batches = iter(range(10**9))

    def wrap(name, fn):
        def call(*args, **kwargs):
            hosts = [t for t in _flat(args, kwargs) if not dev.is_device(t)]
            assert not any(dev.busy(t) for t in hosts), f"{name} through a busy staging buffer"
            batch = next(batches)
            dev.log.append(("post", name, batch, tuple(dev.address(t) for t in hosts)))
            res = fn(*args, **kwargs)
            if name == "batch_isend_irecv":
                dev.log.append(("works", batch, len(res)))
                return [_Work(w, dev.log, batch) for w in res]
            dev.log.append(("done", batch))
            return res
        return call

    for name in names:
        setattr(dist, name, wrap(name, saved[name]))
    try:
        yield
    finally:
        for name in names:
            setattr(dist, name, saved[name])


def _counts(c):
    return {"sent": dict(c.sent), "recv": dict(c.recv), "messages": list(c.messages),
            "calls": c.calls}


def _run_case(case, rank, n, *, staged, side):
    if not staged:
        with comm.counting() as c:
            outs = case(rank, n, None, lambda: None, lambda ts: None)
        return [_bytes(t) for t in outs], _counts(c), None

    def mutate(ts):  # after posting: must not reach the messages
        for t in ts:
            t.add_(1)

    dev = staging.SimulatedDevice(deferred=True)
    with staging.use(dev), _logged(dev), comm.counting() as c:
        stream = staging.SimStream("side") if side else None
        outs = case(rank, n, stream, dev.flush, mutate)
    return [_bytes(t) for t in outs], _counts(c), dev.log


# --------------------------------------------------------------------------------------------
# buffer reuse


def _addrs(h):
    return {staging.SimulatedDevice.address(b) for b in h.stage.held}


def _ring(rank, n, salt):
    send = _data(rank, (rank + 1) % n, 6, torch.float32, salt)
    return send, torch.empty_like(send), _data((rank - 1) % n, rank, 6, torch.float32, salt)


def _reuse_checks(rank, n):
    """A buffer whose H2D copy is pending is not handed out; once done it is; an unwaited
    handle holds its buffers while others come and go."""
    dev = staging.SimulatedDevice(deferred=True)
    res = {}
    with staging.use(dev):
        s1, r1, e1 = _ring(rank, n, 10)
        h1 = comm.ring_exchange(s1, r1, _w())
        a1 = _addrs(h1)
        h1.wait()  # H2D queued, not run: a1 is still in use by the device
        s2, r2, e2 = _ring(rank, n, 11)
        h2 = comm.ring_exchange(s2, r2, _w())
        a2 = _addrs(h2)
        h2.wait()
        dev.flush()
        s3, r3, e3 = _ring(rank, n, 12)
        h3 = comm.ring_exchange(s3, r3, _w())
        a3 = _addrs(h3)
        h3.wait()
        dev.flush()
        res["pending_disjoint"] = not (a1 & a2)
        res["reused_when_done"] = bool(a3) and a3 <= (a1 | a2)
        res["pending_data"] = [_bytes(r) == _bytes(e) for r, e in ((r1, e1), (r2, e2), (r3, e3))]

        s0, r0, e0 = _ring(rank, n, 20)
        h0 = comm.ring_exchange(s0, r0, _w())  # never waited until the end
        a0 = _addrs(h0)
        later = []
        for salt in (21, 22, 23):
            s, r, e = _ring(rank, n, salt)
            h = comm.ring_exchange(s, r, _w())
            later.append(_addrs(h))
            h.wait()
            dev.flush()
            later.append(_bytes(r) == _bytes(e))
        res["unwaited_held"] = len(h0.stage.held) == 2 and _addrs(h0) == a0
        res["unwaited_disjoint"] = all(not (a & a0) for a in later[0::2])
        res["later_data"] = later[1::2]
        h0.wait()
        dev.flush()
        res["unwaited_data"] = _bytes(r0) == _bytes(e0)
        res["released"] = h0.stage.held == []
    return res


def _all_checks(rank, n):
    out = {"cases": {}, "reuse": _reuse_checks(rank, n)}
    for name, case in CASES.items():
        sides = (False,) if name == "collectives" else (False, True)
        for side in sides:
            plain = _run_case(case, rank, n, staged=False, side=side)
            staged = _run_case(case, rank, n, staged=True, side=side)
            out["cases"][(name, side)] = (plain, staged)
    out["carries_world"] = staging.carries_cuda(dist.group.WORLD)
    return out


# --------------------------------------------------------------------------------------------
# the order of operations, read from a staged case's log


def _order_problems(log, side):
    """Every rule of the staged transport that the log breaks (an empty list if none)."""
    problems = []
    want = "side" if side else "current"
    copied, synced = set(), True  # hosts D2H-copied since the last sync
    inflight = {}  # host buffer -> batch whose transfer has not completed on the host
    works = {}  # batch -> works not waited yet
    joined = True  # the current stream has waited for the side stream after its H2D copies
    side_waits = 0
    for i, e in enumerate(log):
        kind = e[0]
        if kind == "wait_stream":
            if e[1:] == ("side", "current"):
                side_waits += 1
            elif e[1:] == ("current", "side"):
                joined = True
        elif kind == "d2h":
            if e[1] != want:
                problems.append(f"{i}: D2H on {e[1]}, not {want}")
            if side and side_waits == 0:
                problems.append(f"{i}: D2H on the side stream before it waited for current")
            copied.add(e[2])
            synced = False
        elif kind == "sync":
            if not log[i - 1][0] == "record":
                problems.append(f"{i}: sync of an event not recorded after the copies")
            synced, copied = True, set()
        elif kind == "post":
            if not synced:
                problems.append(f"{i}: {e[1]} posted before the host waited for the D2H copies")
            if side and not joined:
                problems.append(f"{i}: posted before the current stream joined the side one")
            for a in e[3]:
                inflight[a] = e[2]
        elif kind == "works":
            works[e[1]] = e[2]
        elif kind in ("work_wait", "done"):
            works[e[1]] = works.get(e[1], 1) - 1
            if works[e[1]] <= 0:  # the transfer has completed on the host
                for a in [a for a, b in inflight.items() if b == e[1]]:
                    del inflight[a]
        elif kind == "h2d":
            if e[1] != want:
                problems.append(f"{i}: H2D on {e[1]}, not {want}")
            if e[2] in inflight:
                problems.append(f"{i}: H2D from a buffer whose transfer has not completed")
            if side:
                joined = False
    if side and not joined:
        problems.append("the current stream never joined the side stream after its copies")
    return problems


# --------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module", params=SIZES)
def world(request):
    n = request.param
    return n, run_world(n, _all_checks)


def test_staged_bytes_and_counts_equal_unstaged(world):
    n, results = world
    for rank, res in enumerate(results):
        for (name, side), (plain, staged) in res["cases"].items():
            where = f"{name} side={side} rank {rank} of {n}"
            assert staged[0] == plain[0], f"{where}: received bytes differ"
            assert staged[1] == plain[1], f"{where}: byte counters differ"
            assert plain[0], where


def test_staged_order_of_operations(world):
    n, results = world
    for rank, res in enumerate(results):
        for (name, side), (_, staged) in res["cases"].items():
            log = staged[2]
            kinds = {e[0] for e in log}
            assert {"d2h", "h2d", "sync", "post"} <= kinds, (name, kinds)
            assert _order_problems(log, side) == [], f"{name} side={side} rank {rank} of {n}"


def test_staging_buffers_not_reused_while_pending(world):
    n, results = world
    for rank, res in enumerate(results):
        r = res["reuse"]
        assert r["pending_disjoint"] and r["reused_when_done"], (rank, r)
        assert all(r["pending_data"]) and all(r["later_data"]), (rank, r)
        assert r["unwaited_held"] and r["unwaited_disjoint"], (rank, r)
        assert r["unwaited_data"] and r["released"], (rank, r)


def test_gloo_world_is_staged(world):
    _, results = world
    assert not any(res["carries_world"] for res in results)


def test_order_checker_catches_violations():
    """The log checker itself fails on a post before the host waited and on an early H2D."""
    early_post = [("d2h", "current", 1), ("post", "batch_isend_irecv", 0, (1, 2)),
                  ("works", 0, 2), ("record", "current", 0), ("sync", 0), ("work_wait", 0),
                  ("work_wait", 0), ("h2d", "current", 2)]
    assert _order_problems(early_post, False)
    early_h2d = [("d2h", "current", 1), ("record", "current", 0), ("sync", 0),
                 ("post", "batch_isend_irecv", 0, (1, 2)), ("works", 0, 2),
                 ("work_wait", 0), ("h2d", "current", 2), ("work_wait", 0)]
    assert _order_problems(early_h2d, False)
    unjoined = [("wait_stream", "side", "current"), ("d2h", "side", 1),
                ("record", "side", 0), ("sync", 0), ("post", "batch_isend_irecv", 0, (1, 2)),
                ("works", 0, 1), ("work_wait", 0), ("h2d", "side", 2), ("record", "side", 1)]
    assert _order_problems(unjoined, True)
    assert _order_problems(unjoined + [("wait_stream", "current", "side")], True) == []


@pytest.mark.parametrize("config,carries", [
    ("gloo", False), ("cpu:gloo,cuda:gloo", False), ("nccl", True), ("cuda:nccl", True),
    ("cpu:gloo,cuda:nccl", True), ("cuda:nccl,cpu:gloo", True), ("cpu:gloo", False),
    ("mpi", False), ("cpu:gloo,cuda:ucc", False)])
def test_carries_cuda_config(config, carries):
    assert staging.carries_cuda_config(config) is carries


def test_pool_reuses_only_finished_buffers():
    dev = staging.SimulatedDevice(deferred=True)
    pool = dev.pool
    a = pool.take(100)
    dst = torch.empty(100, dtype=torch.uint8)
    dev.copy(dst, a[:100], dev.current)  # an H2D copy reading a, queued
    pool.give(a, dev.record(dev.current))
    b = pool.take(100)
    assert b.data_ptr() != a.data_ptr()
    dev.flush()
    pool.give(b, None)
    assert {pool.take(100).data_ptr(), pool.take(100).data_ptr()} == {a.data_ptr(),
                                                                      b.data_ptr()}
    assert staging._bucket(1) == staging._bucket(4096) == 4096
    for nb in (4097, 10**6, 3 * 2**20 + 7):
        assert nb <= staging._bucket(nb) <= nb * 17 // 16 + 1


def test_simulated_device_defers_and_guards():
    dev = staging.SimulatedDevice(deferred=True)
    host = dev.host_empty(8)
    src = torch.arange(8, dtype=torch.uint8)
    dev.copy(host, src, dev.current)
    ev = dev.record(dev.current)
    assert not dev.query(ev) and host[0].item() == 0xA5 and dev.busy(host)
    with pytest.raises(AssertionError, match="reused"):
        dev.copy(host, src, dev.current)
    dev.synchronize(ev)
    assert dev.query(ev) and torch.equal(host, src) and not dev.busy(host)
    assert dev.is_device(src) and not dev.is_device(host[2:])


def test_collectives_local_and_bad_arguments():
    t = torch.arange(4.0)
    comm.all_reduce(t, group=LOCAL)
    assert torch.equal(t, torch.arange(4.0))
    out = [torch.empty(4)]
    comm.all_gather(out, t, group=LOCAL)
    gl = [torch.empty(4)]
    comm.gather(t, gl, dst=0, group=LOCAL)
    comm.broadcast(t, src=0, group=LOCAL)
    assert torch.equal(out[0], t) and torch.equal(gl[0], t)
    with pytest.raises(ValueError, match="dst"):
        comm.gather(t, gl, dst=1, group=LOCAL)
    with pytest.raises(ValueError, match="src"):
        comm.broadcast(t, src=True, group=LOCAL)
    with pytest.raises(ValueError, match="out_list"):
        comm.all_gather([torch.empty(3)], t, group=LOCAL)
    with pytest.raises(ValueError, match="contiguous"):
        comm.all_reduce(torch.empty(4, 4).t(), group=LOCAL)
    with pytest.raises(TypeError, match="tensor"):
        comm.broadcast([1.0], src=0, group=LOCAL)


def _bench_checks(rank, n):
    """The checks of ``common/bench/check_staging.py --device cpu``, in this test's world."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "check_staging.py"
    spec = importlib.util.spec_from_file_location("check_staging", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    env = mod.Env("cpu", "gloo", rank)
    from longattn.common.dist import resolve_group

    with staging.use(env.sim):
        rows = mod.run_checks(env, resolve_group(_w()), True)
    return [(r["check"], r["dtype"], r["stream"], r["ok"], r["error"]) for r in rows]


def test_check_staging_script_cpu_mode():
    for rank, rows in enumerate(run_world(3, _bench_checks)):
        assert len(rows) == 19
        bad = [r for r in rows if not r[3]]
        assert not bad, f"rank {rank}: {bad}"
