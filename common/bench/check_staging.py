"""Every exchange and collective of ``longattn.common.comm`` with CUDA tensors, N processes:

    PYTHONPATH=common/src python common/bench/check_staging.py [--ranks 2,4,8] [--out DIR]
    LONGATTN_DIST_BACKEND=nccl python common/bench/check_staging.py --ranks 2   # 2 GPUs
    PYTHONPATH=common/src python common/bench/check_staging.py --device cpu      # smoke test

Backend from ``LONGATTN_DIST_BACKEND`` (default ``gloo``). Under gloo every rank uses
``cuda:0``, so the CUDA tensors go through the staged transport (``longattn.common.staging``);
under nccl each rank takes the GPU of its ``LOCAL_RANK`` (a world larger than the GPU count is
reported as SKIP). Launched by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) it runs that one
world; otherwise it spawns a world for each size in ``--ranks``.

For bf16 and fp32, on the current stream and on a side stream (``stream=``): ``exchange`` (two
peers, two dtypes), ``ring_exchange`` (shift +1 and -1) and a double-buffered ring of N - 1 steps,
``all_to_all_step`` (different sizes, some empty), a 40-step ring stressing the buffer pool; then
``all_reduce`` (SUM, MAX), ``all_gather``, ``gather``, ``broadcast`` and ``dist.agree`` on CUDA
inputs. Every send buffer is written by the current stream behind a long ``torch.cuda._sleep``
just before the call, every receive buffer is read by a kernel queued just before the call and
the result is copied by a kernel queued right after ``wait()``: a transport that did not keep
the streams' order sends or reads the wrong bytes. Staged, the send buffers are also changed on
the current stream right after posting (the message must not see it). Results must equal the
expected bytes exactly; the byte counters must equal the bytes the algorithm sends. Prints one
row per (N, check), writes ``DIR/check_staging.json`` with ``--out``, exits 1 on any failure.

``--device cpu`` runs the same checks on CPU ranks through ``staging.SimulatedDevice`` (CPU
tensors treated as device tensors), so the staged code path runs without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

from longattn.common import comm, staging
from longattn.common import dist as ldist

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SLEEP_CYCLES = 5_000_000  # a few ms of GPU time before each call: the producer still runs


class Env:
    """Where the tensors live and how the device is driven (CUDA, or the simulated device)."""

    def __init__(self, device, backend, rank):
        self.kind = device
        if device == "cuda":
            index = int(os.environ.get("LOCAL_RANK", rank)) if backend == "nccl" else 0
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", index)
            self.sim = None
        else:
            self.device = torch.device("cpu")
            self.sim = staging.SimulatedDevice()

    def side(self):
        return torch.cuda.Stream() if self.sim is None else staging.SimStream("side")

    def busy(self):
        """Queue a long kernel on the current stream (the work a transfer must wait for)."""
        if self.sim is None:
            torch.cuda._sleep(SLEEP_CYCLES)

    def host(self, t):
        return t.cpu() if self.sim is None else t.clone()


def _payload(src, dst, numel, dtype, salt):
    """Integer values in [-8, 8] (sums of up to 8 of them are exact in bf16), per (src, dst)."""
    g = torch.Generator().manual_seed(7919 * salt + 101 * src + dst)
    return torch.randint(-8, 9, (numel,), generator=g).to(dtype)


def _same(a, b):
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.uint8), b.view(torch.uint8))


def _produce(env, expected):
    """A device tensor whose value is written by the current stream behind a long kernel."""
    t = torch.full(expected.shape, -99, dtype=expected.dtype, device=env.device)
    src = expected.to(env.device)
    env.busy()
    t.copy_(src)
    return t


def _landing(env, shape, dtype):
    """A receive buffer holding a sentinel, with a read of it queued behind a long kernel (a
    transfer that wrote into it before that read would change what the read sees)."""
    t = torch.full(shape, -77, dtype=dtype, device=env.device)
    env.busy()
    return t, t.clone()


def _finish(env, recvs, reads, expected):
    """After wait(): copy each result by a kernel queued now; check everything on the host (the
    reads queued before the call must still see the sentinel)."""
    got = [env.host(r.clone()) for r in recvs]
    ok = len(got) == len(expected) and all(_same(g, e) for g, e in zip(got, expected))
    return ok and all(bool((env.host(x) == -77).all()) for x in reads)


def _mutate(staged, sends):
    """Staged, the message is the send buffer as of posting: change it right after (NCCL reads
    the buffer until wait(), so this is only done staged)."""
    if staged:
        for t in sends:
            t.add_(1)


def check_exchange(env, g, dtype, stream, staged):
    me, n = g.rank, g.size
    peers = sorted({(me + 1) % n, (me + 2) % n} - {me})
    froms = sorted({(me - 1) % n, (me - 2) % n} - {me})
    sends = [(_produce(env, _payload(me, p, 64 + 8 * p, dtype, 1)), p) for p in peers]
    sends += [(_produce(env, _payload(me, p, 33, torch.float32, 2)), p) for p in peers]
    recvs, reads = [], []
    for p in froms:
        t, r = _landing(env, (64 + 8 * me,), dtype)
        recvs.append((t, p))
        reads.append(r)
    for p in froms:
        t, r = _landing(env, (33,), torch.float32)
        recvs.append((t, p))
        reads.append(r)
    expected = [_payload(p, me, 64 + 8 * me, dtype, 1) for p in froms]
    expected += [_payload(p, me, 33, torch.float32, 2) for p in froms]
    with comm.counting() as c:
        h = comm.exchange(sends, recvs, g, stream=stream)
        _mutate(staged, [t for t, _ in sends])
        h.wait()
    ok = _finish(env, [t for t, _ in recvs], reads, expected)
    want = sum(comm.nbytes(t) for t, _ in sends)
    return ok and c.bytes_sent == want and c.bytes_received == sum(
        comm.nbytes(t) for t, _ in recvs)


def check_ring(env, g, dtype, stream, staged):
    me, n = g.rank, g.size
    ok = True
    for shift in (1, -1):
        send = _produce(env, _payload(me, (me + shift) % n, 4096, dtype, 3))
        recv, read = _landing(env, (4096,), dtype)
        with comm.counting() as c:
            h = comm.ring_exchange(send, recv, g, shift=shift, stream=stream)
            _mutate(staged, [send])
            h.wait()
        exp = _payload((me - shift) % n, me, 4096, dtype, 3)
        ok &= _finish(env, [recv], [read], [exp])
        ok &= c.bytes_sent == comm.nbytes(send) == c.bytes_received
    # n - 1 double-buffered steps with compute in between: every block visits every rank
    bufs = [_produce(env, _payload(me, 0, 2048, dtype, 4)), torch.empty(2048, dtype=dtype,
                                                                         device=env.device)]
    x = torch.randn(256, 256, device=env.device)
    for step in range(n - 1):
        h = comm.ring_exchange(bufs[step % 2], bufs[(step + 1) % 2], g, stream=stream)
        x = x @ x / 16  # overlapping compute
        h.wait()
        got = env.host(bufs[(step + 1) % 2].clone())
        ok &= _same(got, _payload((me - step - 1) % n, 0, 2048, dtype, 4))
    return ok


def _numel(src, dst):
    return 0 if (src + 2 * dst) % 5 == 4 else 16 * (1 + src + 3 * dst)


def check_a2a(env, g, dtype, stream, staged):
    me, n = g.rank, g.size
    sends = [_produce(env, _payload(me, p, _numel(me, p), dtype, 5)) for p in range(n)]
    landed = [_landing(env, (_numel(p, me),), dtype) for p in range(n)]
    recvs = [t for t, _ in landed]
    with comm.counting() as c:
        h = comm.all_to_all_step(sends, recvs, g, stream=stream)
        _mutate(staged, sends)
        h.wait()
    others = [p for p in range(n) if p != me]
    ok = _finish(env, [recvs[p] for p in others], [landed[p][1] for p in others],
                 [_payload(p, me, _numel(p, me), dtype, 5) for p in others])
    return ok and c.bytes_sent == sum(comm.nbytes(sends[p]) for p in others)


def check_pool_stress(env, g, dtype, stream, staged):
    """40 ring steps of varying sizes, no host sync in between: buffers are reused through the
    pool while earlier H2D copies may still be queued."""
    me, n = g.rank, g.size
    outs = []
    for i in range(40):
        numel = 512 * (1 + i % 5)
        send = _produce(env, _payload(me, (me + 1) % n, numel, dtype, 100 + i))
        recv = torch.empty(numel, dtype=dtype, device=env.device)
        h = comm.ring_exchange(send, recv, g, stream=stream)
        h.wait()
        outs.append(recv.clone())
    return all(_same(env.host(o), _payload((me - 1) % n, me, 512 * (1 + i % 5), dtype, 100 + i))
               for i, o in enumerate(outs))


def check_collectives(env, g, dtype):
    me, n = g.rank, g.size
    ok = True
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.MAX):
        t = _produce(env, _payload(me, 0, 1000, dtype, 6))
        comm.all_reduce(t, op=op, group=g)
        every = torch.stack([_payload(r, 0, 1000, dtype, 6).double() for r in range(n)])
        exp = (every.sum(0) if op == dist.ReduceOp.SUM else every.amax(0)).to(dtype)
        ok &= _same(env.host(t.clone()), exp)
    parts = [torch.empty(300, dtype=dtype, device=env.device) for _ in range(n)]
    comm.all_gather(parts, _produce(env, _payload(me, 0, 300, dtype, 7)), group=g)
    ok &= all(_same(env.host(p.clone()), _payload(r, 0, 300, dtype, 7))
              for r, p in enumerate(parts))
    dst = n - 1
    gl = [torch.empty(200, dtype=dtype, device=env.device) for _ in range(n)] if me == dst \
        else None
    comm.gather(_produce(env, _payload(me, dst, 200, dtype, 8)), gl, dst=dst, group=g)
    if me == dst:
        ok &= all(_same(env.host(p.clone()), _payload(r, dst, 200, dtype, 8))
                  for r, p in enumerate(gl))
    src = 1 % n
    b = _produce(env, _payload(me, 0, 500, dtype, 9))
    comm.broadcast(b, src=src, group=g)
    ok &= _same(env.host(b.clone()), _payload(src, 0, 500, dtype, 9))
    return ok


def check_agree(env, g):
    x = torch.zeros(3, 4, device=env.device)
    _, views = ldist.agree("check_staging", g, lambda: (None, {
        "x.shape": tuple(x.shape), "x.device.type": x.device.type, "rank": g.rank}),
        vary=("rank",))
    return views["rank"] == list(range(g.size))


def _timed(fn, *args):
    t0 = time.perf_counter()
    try:
        ok, err = bool(fn(*args)), ""
    except Exception as e:  # noqa: BLE001 - a failing check is a row, not a crash
        ok, err = False, f"{type(e).__name__}: {e}"[:200]
        traceback.print_exc()
    return ok, (time.perf_counter() - t0) * 1e3, err


def run_checks(env, g, staged):
    rows = []
    for dname, dtype in DTYPES.items():
        for sname in ("current", "side"):
            stream = env.side() if sname == "side" else None
            for cname, fn in (("exchange", check_exchange), ("ring_exchange", check_ring),
                              ("all_to_all_step", check_a2a), ("pool_stress", check_pool_stress)):
                ok, ms, err = _timed(fn, env, g, dtype, stream, staged)
                rows.append({"check": cname, "dtype": dname, "stream": sname, "ok": ok,
                             "ms": ms, "error": err})
        ok, ms, err = _timed(check_collectives, env, g, dtype)
        rows.append({"check": "collectives", "dtype": dname, "stream": "current", "ok": ok,
                     "ms": ms, "error": err})
    ok, ms, err = _timed(check_agree, env, g)
    rows.append({"check": "agree", "dtype": "int64", "stream": "-", "ok": ok, "ms": ms,
                 "error": err})
    return rows


def worker(rank, n, backend, device, init, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        env = Env(device, backend, rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=n)
        g = ldist.resolve_group(dist.group.WORLD)
        staged = not staging.carries_cuda(g.pg)
        if env.sim is not None:
            with staging.use(env.sim):
                rows = run_checks(env, g, staged)
        else:
            rows = run_checks(env, g, staged)
        every = [None] * n
        dist.all_gather_object(every, rows, group=g.pg)
        if rank == 0:
            for i, row in enumerate(rows):  # a row passes when it passed on every rank
                row["ok"] = all(r[i]["ok"] for r in every)
                row["error"] = next((r[i]["error"] for r in every if r[i]["error"]), "")
                row["ms"] = max(r[i]["ms"] for r in every)
                row.update(ranks=n, backend=backend, staged=staged)
            results.put(("rows", rows))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))


def spawn_world(n, backend, device, timeout):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = "file://" + os.path.join(tempfile.mkdtemp(prefix="check_staging_"), "store")
    procs = []
    for r in range(n):  # under nccl, rank r takes GPU r (LOCAL_RANK when under torchrun)
        procs.append(ctx.Process(target=worker, args=(r, n, backend, device, init, results),
                                 daemon=True))
        procs[-1].start()
    rows, errors = None, []
    deadline = time.monotonic() + timeout
    while rows is None and len(errors) < n and time.monotonic() < deadline:
        try:
            kind, payload = results.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if kind == "rows":
            rows = payload
        else:
            errors.append(payload)
            break
    for p in procs:
        p.join(timeout=5 if rows is not None else 0.1)
        if p.is_alive():
            p.kill()
    if rows is None:
        why = errors[0] if errors else f"no result within {timeout:.0f} s (hang?)"
        rows = [{"check": "world", "dtype": "-", "stream": "-", "ok": False, "ms": 0.0,
                 "error": why.strip().splitlines()[-1][:200], "ranks": n, "backend": backend,
                 "staged": None}]
        print(why, file=sys.stderr)
    return rows


def print_table(rows):
    head = f"{'N':>2} {'backend':7} {'staged':6} {'dtype':5} {'stream':7} {'check':16} " \
           f"{'result':6} {'ms':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        res = "SKIP" if r.get("skip") else ("ok" if r["ok"] else "FAIL")
        print(f"{r['ranks']:>2} {r['backend']:7} {str(r['staged']):6} {r['dtype']:5} "
              f"{r['stream']:7} {r['check']:16} {res:6} {r['ms']:8.1f}"
              + (f"  {r['error']}" if r["error"] else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--ranks", default="2,4,8", help="world sizes to spawn, comma separated")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per world")
    ap.add_argument("--out", default=None, help="directory for check_staging.json")
    args = ap.parse_args(argv)
    backend = os.environ.get("LONGATTN_DIST_BACKEND", "gloo")
    if args.device == "cpu" and backend != "gloo":
        ap.error("--device cpu needs LONGATTN_DIST_BACKEND=gloo")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: use --device cpu for the smoke test")
    t0 = time.perf_counter()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        q = queue.Queue()
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), backend, args.device,
               "env://", q)
        if int(os.environ["RANK"]) != 0:
            return 0
        kind, rows = q.get()
        if kind != "rows":
            print(rows, file=sys.stderr)
            return 1
    else:
        rows = []
        for n in (int(x) for x in args.ranks.split(",")):
            if args.device == "cuda" and backend == "nccl" and n > torch.cuda.device_count():
                rows.append({"check": "world", "dtype": "-", "stream": "-", "ok": True,
                             "skip": True, "ms": 0.0, "ranks": n, "backend": backend,
                             "staged": False,
                             "error": f"needs {n} GPUs, {torch.cuda.device_count()} here"})
                continue
            rows += spawn_world(n, backend, args.device, args.timeout)
    print_table(rows)
    failed = [r for r in rows if not r["ok"]]
    wall = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (simulated device)"
    print(f"\n{len(rows) - len(failed)}/{len(rows)} ok on {name}, {wall:.1f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check_staging.json"), "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "device": name, "backend": backend, "torch": torch.__version__,
                       "wall_s": wall, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
