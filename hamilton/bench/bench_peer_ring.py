"""Peers side by side on one GPU: ring-flash-attention's ring and zigzag ring against
longattn's ring (hamilton), the compute of one rank of an n-rank causal ring.

    bash common/bench/fetch_peers.sh    # once, where the index and GitHub are reachable
    PYTHONPATH=.peers:common/src:reference/src:hamilton/src \
        python hamilton/bench/bench_peer_ring.py [--out DIR] [--ranks 8] [--tokens 8192]
    ... --check    # CPU: the peer and longattn in real gloo worlds of 2, 3 and 4 processes
    ... --smoke    # a tiny run of the whole script on the CPU

Default: 8 ranks x 8192 tokens per rank (65,536 tokens), H=32, D=128, bf16, B=1, causal, as
``bench_hamilton.py``.

The peer is ring-flash-attention (``ring_flash_attn``, the wheel ``fetch_peers.sh`` puts into
``.peers/``) run unchanged: ``ring_flash_attn_func`` (contiguous layout: rank r holds tokens
``[rL, (r+1)L)``, and causal rank r computes r + 1 of the n blocks) and
``zigzag_ring_flash_attn_func`` (rank r holds blocks r and 2n-1-r of 2n, longattn's causal
layout). Two things are given to it:

* flash-attn: none exists for the GPU machine's torch, so ``common/bench/flash_shim.py`` supplies
  ``flash_attn.flash_attn_interface`` on ``longattn.common.kernels`` (``backend="auto"``: the
  kernels longattn uses). The shim's backward copies the gradients into the peer's ``dq / dk /
  dv`` buffers (flash-attn writes them in place, torch's ops return new tensors) and sums
  ``dout * out`` per row; that cost per kernel call is measured beside the run ("shim cost").
* messages: free on both sides. The peer's ``RingComm`` (looked up in its module's namespace) is
  replaced by :class:`StandInRingComm`, which hands rank r, at every step, the KV (and in the
  backward the dK/dV buffers) that rank r receives in an n-rank run, with no copy and no wait.
  Those tensors are recorded from all n ranks run in threads of this process
  (:class:`ThreadWorld`: the peer's own forward and backward functions with the stand-in
  exchanging tensors between threads), so the first timed call computes exactly rank r's
  result (compared, below). The zigzag backward adds its gradients into the received dK/dV
  buffer in place, so later calls start from other values: the same work.

longattn's side is ``bench_hamilton.py``'s simulation of the same rank (``make_sequence``,
imported from it: exactly the kernel calls, merges and accumulations ``hamilton_attn`` makes on
that rank, ``schedule="ring"``, the zigzag ring when causal), with ``HamiltonConfig``'s defaults
(``--variants`` adds ``bench_hamilton``'s others). Baseline in the same run: one dense cuDNN
causal call over all n*L tokens, divided by n. All contenders alternate round by round
(``bench.time_interleaved``); ranks 0, n/2 and n-1 are timed. Efficiency = (dense ms / n) / the
rank's ms. In a real run every rank waits for the slowest, so a schedule's time is its worst
rank: for the plain ring that is rank n-1 (n blocks), for the zigzag rings every rank does the
same work.

Correctness first, in the same run: every rank of both peers (threads) and of longattn
(``bench_hamilton.check``) on a small case against the float64 oracle, and the first timed
results of the stand-in against the thread world's rank.

``--check`` (CPU, bf16 and fp16 inputs, gloo worlds of 2, 3 and 4 processes through
``longattn.common.testing.run_world``) shows that the GPU run times the right computation: the
real peer with its real ``RingComm`` (recording what each rank receives) and ``hamilton_attn``
compute the same causal attention, each compared with the float64 oracle forward and backward;
the thread world gives every rank the same results as the real world, bit for bit, and the
stand-in replaying what rank r received in the real world gives rank r's results, bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import statistics
import sys
import threading
import time
import traceback

import torch

from longattn.common import bench
from longattn.common.kernels import pick_backend
from longattn.common.layout import join_shards, take_shard
from longattn.common.testing import rel_error, shared_script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEERS_DIR = os.path.join(ROOT, ".peers")

# The peer's functions and its layouts (module and attribute names: picklable, resolved in
# each process by load_peer). "func" is the public autograd entry point (timed); "forward" /
# "backward" the module functions it calls (the thread world calls these: autograd runs CUDA
# backward nodes on one device thread, where ranks waiting for each other would deadlock).
PEER = {
    "ring": {"module": "ring_flash_attn.ring_flash_attn", "func": "ring_flash_attn_func",
             "forward": "ring_flash_attn_forward", "backward": "ring_flash_attn_backward",
             "layout": "contiguous"},
    "zigzag": {"module": "ring_flash_attn.zigzag_ring_flash_attn",
               "func": "zigzag_ring_flash_attn_func",
               "forward": "zigzag_ring_flash_attn_forward",
               "backward": "zigzag_ring_flash_attn_backward", "layout": "zigzag"},
}
PEER_DIST = "ring_flash_attn"  # the distribution whose version is reported
TIMEOUT = 600.0  # seconds a thread-world rank waits for a message before the run fails


# ---------------------------------------------------------------------------------------------
# loading: the shim, the peer, bench_hamilton


def _shim():
    return shared_script(os.path.join(ROOT, "common", "bench", "flash_shim.py"))


def _bench_hamilton():
    return shared_script(os.path.join(HERE, "bench_hamilton.py"))


def _package_without_init(name):
    """Register package ``name`` (found on ``sys.path``) without running its ``__init__``.

    ring-flash-attention's ``__init__`` imports its Hugging Face adapter, which needs
    ``is_flash_attn_greater_or_equal_2_10`` from ``transformers.modeling_flash_attention_utils``
    (gone in transformers 5): ``import ring_flash_attn`` fails there. The ring modules used here
    do not touch the adapter, so the package is registered bare and they import as published."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(
            f"{name} is not importable: run common/bench/fetch_peers.sh and put .peers on "
            "PYTHONPATH")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    return mod


class Peer:
    """One peer schedule, resolved: ``func`` (autograd), ``forward`` / ``backward`` (the module
    functions), ``module`` (where ``RingComm`` is looked up), ``layout``."""

    def __init__(self, name, entry):
        self.name = name
        self.layout = entry["layout"]
        self.module = importlib.import_module(entry["module"])
        self.func = getattr(self.module, entry["func"])
        self.forward = getattr(self.module, entry["forward"])
        self.backward = getattr(self.module, entry["backward"])


def load_peer(spec=None):
    """``{name: Peer}`` for the spec (default :data:`PEER`), with the flash-attn shim installed
    first and ``.peers`` on ``sys.path`` when it exists."""
    spec = PEER if spec is None else spec
    if os.path.isdir(PEERS_DIR) and PEERS_DIR not in sys.path:
        sys.path.append(PEERS_DIR)
    _shim().install()
    for entry in spec.values():
        top = entry["module"].split(".")[0]
        if top == "ring_flash_attn":
            _package_without_init(top)
    return {name: Peer(name, entry) for name, entry in spec.items()}


def peer_version(spec=None):
    spec = PEER if spec is None else spec
    if spec is not PEER:
        return "in-test peer"
    try:
        return f"{PEER_DIST} {importlib.metadata.version(PEER_DIST)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{PEER_DIST} (version unknown)"


# ---------------------------------------------------------------------------------------------
# the stand-in RingComm and the simulated groups it serves


class SimGroup:
    """What :class:`StandInRingComm` gets as ``process_group``: the simulated rank and where its
    messages come from. Each ``RingComm`` a peer call creates is one "instance" (forward: 0;
    backward: 1 for K/V, 2 for dK/dV), numbered per rank in creation order."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size
        self.instances = 0

    def new_instance(self):
        i = self.instances
        self.instances += 1
        return i

    def post(self, comm, call, to_send, recv_tensor):  # pragma: no cover - interface
        raise NotImplementedError

    def receive(self, comm, reqs):  # pragma: no cover - interface
        raise NotImplementedError


class StandInRingComm:
    """ring-flash-attention's ``RingComm`` (``send_recv``, ``commit``, ``wait``,
    ``send_recv_kv``, ``rank``, ``world_size``, ``send_rank``, ``recv_rank``) for a simulated
    rank: ``process_group`` is a :class:`SimGroup`, which supplies what the rank receives."""

    def __init__(self, process_group):
        if not isinstance(process_group, SimGroup):
            raise TypeError("the stand-in RingComm serves simulated ranks: pass group= a "
                            f"SimGroup (ThreadWorld.group / ReplayGroup), got {process_group!r}")
        self._group = process_group
        self.rank, self.world_size = process_group.rank, process_group.world_size
        self.send_rank = (self.rank + 1) % self.world_size
        self.recv_rank = (self.rank - 1) % self.world_size
        self.instance = process_group.new_instance()
        self._calls = 0
        self._ops = []
        self._reqs = None

    def send_recv(self, to_send, recv_tensor=None):
        res = self._group.post(self, self._calls, to_send, recv_tensor)
        self._ops.append((self._calls, res))
        self._calls += 1
        return res

    def commit(self):
        if self._reqs is not None:
            raise RuntimeError("commit called twice")
        self._reqs = self._ops

    def wait(self):
        if self._reqs is None:
            raise RuntimeError("wait called before commit")
        self._group.receive(self, self._reqs)
        self._reqs = None
        self._ops = []

    def send_recv_kv(self, k, v, k_buffer=None, v_buffer=None):
        next_k, next_v = self.send_recv(k, k_buffer), self.send_recv(v, v_buffer)
        self.commit()
        return next_k, next_v


class ThreadWorld:
    """n simulated ranks in threads of this process, exchanging tensors through mailboxes:
    a send posts a copy of the tensor to the next rank, ``wait`` copies what arrived into the
    receive buffer (the real ``RingComm``'s semantics). ``record`` ranks keep every tensor they
    receive, keyed ``(instance, call)``: the replay of :class:`ReplayGroup`."""

    def __init__(self, n, record=()):
        self.n = n
        self.records = {r: {} for r in record}
        self._box = {}
        self._cond = threading.Condition()
        self._failed = None
        # One rank runs at a time (it hands the baton on while it waits for a message): the
        # libraries underneath (kernel caches, TorchScript) are never entered by two threads.
        self._baton = threading.Lock()

    def group(self, rank):
        return _ThreadGroup(self, rank)

    def _put(self, dest, key, tensor):
        with self._cond:
            self._box[(dest, key)] = tensor
            self._cond.notify_all()

    def _take(self, rank, key):
        deadline = time.monotonic() + TIMEOUT
        self._baton.release()
        try:
            with self._cond:
                while (rank, key) not in self._box:
                    if self._failed is not None:
                        raise RuntimeError(f"rank {rank}: another rank failed") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"rank {rank}: no message {key} in {TIMEOUT:.0f} s")
                    self._cond.wait(0.5)
                return self._box.pop((rank, key))
        finally:
            self._baton.acquire()

    def run(self, fn):
        """``[fn(rank, group) for every rank]``, each rank in its own thread."""
        out, errors = [None] * self.n, {}

        def body(r):
            self._baton.acquire()
            try:
                out[r] = fn(r, self.group(r))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors[r] = traceback.format_exc()
                with self._cond:
                    self._failed = e
                    self._cond.notify_all()
            finally:
                self._baton.release()

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            r = min(errors)
            raise RuntimeError(f"thread-world rank {r} raised:\n{errors[r]}")
        if self._box:
            raise RuntimeError(f"messages sent but never received: {sorted(self._box)[:4]}")
        return out


class _ThreadGroup(SimGroup):
    def __init__(self, world, rank):
        super().__init__(rank, world.n)
        self.world = world

    def post(self, comm, call, to_send, recv_tensor):
        self.world._put(comm.send_rank, (comm.instance, call), to_send.clone())
        return torch.empty_like(to_send) if recv_tensor is None else recv_tensor

    def receive(self, comm, reqs):
        rec = self.world.records.get(self.rank)
        for call, res in reqs:
            data = self.world._take(self.rank, (comm.instance, call))
            res.copy_(data)
            if rec is not None:
                rec[(comm.instance, call)] = data


class ReplayGroup(SimGroup):
    """Rank ``rank`` fed from a record ``{(instance, call): tensor}``: each received tensor is
    handed over as it is (no copy, no wait). ``cycle`` maps the instances of one timed call
    onto the record's (forward only: ``(0,)``; forward and backward: ``(0, 1, 2)``);
    :meth:`reset` starts a call."""

    def __init__(self, rank, world_size, record, cycle):
        super().__init__(rank, world_size)
        self.record, self.cycle = record, tuple(cycle)

    def reset(self):
        self.instances = 0

    def new_instance(self):
        i = super().new_instance()
        return self.cycle[i % len(self.cycle)]

    def post(self, comm, call, to_send, recv_tensor):
        try:
            got = self.record[(comm.instance, call)]
        except KeyError:
            raise RuntimeError(f"rank {self.rank}: nothing recorded for RingComm instance "
                               f"{comm.instance}, message {call}") from None
        if got.shape != to_send.shape or got.dtype != to_send.dtype:
            raise RuntimeError(f"rank {self.rank}: recorded message {(comm.instance, call)} is "
                               f"{tuple(got.shape)} {got.dtype}, the peer sends "
                               f"{tuple(to_send.shape)} {to_send.dtype}")
        return got

    def receive(self, comm, reqs):
        pass


@contextlib.contextmanager
def standin(peers):
    """Every peer module's ``RingComm`` replaced by :class:`StandInRingComm` meanwhile."""
    mods = list({id(p.module): p.module for p in peers.values()}.values())
    saved = [(m, m.RingComm) for m in mods]
    for m in mods:
        m.RingComm = StandInRingComm
    try:
        yield
    finally:
        for m, c in saved:
            m.RingComm = c


def share_repeats(record):
    """The backward's K/V (instance 1) is the forward's (instance 0): keep one copy of each
    equal tensor. Returns how many were shared."""
    shared = 0
    for (inst, call), t in list(record.items()):
        if inst == 1 and (0, call) in record and torch.equal(record[(0, call)], t):
            record[(inst, call)] = record[(0, call)]
            shared += 1
    return shared


# ---------------------------------------------------------------------------------------------
# running the peer


def thread_world(peer, glob, n, *, scale, record=(), backward=True):
    """Every rank of ``peer`` in a :class:`ThreadWorld` on the global ``(q, k, v, dout)``.
    Returns ``(per-rank results {"out", "lse", "dq", "dk", "dv"}, records)``."""
    world = ThreadWorld(n, record)

    def rank(r, group):
        q, k, v, do = (take_shard(t, r, n, layout=peer.layout, dim=1) for t in glob)
        out, lse = peer.forward(group, q, k, v, softmax_scale=scale, causal=True)
        res = {"out": out, "lse": lse}
        if backward:
            res["dq"], res["dk"], res["dv"] = peer.backward(group, do, q, k, v, out, lse,
                                                            softmax_scale=scale, causal=True)
        return res

    return world.run(rank), world.records


def peer_call(peer, q, k, v, do, group):
    """The peer's public function on one rank through autograd: out, lse and the gradients."""
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = peer.func(qg, kg, vg, causal=True, group=group, return_attn_probs=True)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


def peer_sequence(peer, record, rank, n, q, k, v, do):
    """(fwd, fwd_bwd) closures: rank ``rank``'s call of the peer's public function, fed by a
    :class:`ReplayGroup` from ``record``."""
    g_fwd = ReplayGroup(rank, n, record, (0,))
    g_bwd = ReplayGroup(rank, n, record, (0, 1, 2))
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd():
        g_fwd.reset()
        with torch.no_grad():
            return peer.func(q, k, v, causal=True, group=g_fwd)

    def fwd_bwd():
        g_bwd.reset()
        out = peer.func(qg, kg, vg, causal=True, group=g_bwd)
        dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
        return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}

    return fwd, fwd_bwd


def _global(parts, layout, key):
    dim = 2 if key == "lse" else 1
    return join_shards([p[key].double().cpu() for p in parts], layout=layout, dim=dim)


def oracle(glob, scale):
    """The float64 oracle of causal attention over the global tensors."""
    from longattn.reference import attention, attention_backward, causal_mask

    q, k, v, do = (t.double().cpu().numpy() for t in glob)
    mask = causal_mask(q.shape[1], q.shape[1])
    out, lse = attention(q, k, v, mask=mask, scale=scale)
    dq, dk, dv = attention_backward(do, q, k, v, mask=mask, scale=scale)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def errors_vs(parts, layout, ref, keys=("out", "lse", "dq", "dk", "dv")):
    return {key: rel_error(_global(parts, layout, key), ref[key]) for key in keys}


def max_diff(a, b, keys):
    """Largest absolute difference over ``keys`` (0.0: the same numbers)."""
    worst = 0.0
    for key in keys:
        x, y = a[key].double().cpu(), b[key].double().cpu()
        if x.shape != y.shape:
            return float("inf")
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        worst = max(worst, float((x - y).abs().masked_fill(same, 0.0).max()))
    return worst


def random_global(n, length, heads, dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, n * length, heads, dim, generator=g, device=device).to(dtype)
            for _ in range(4)]


# ---------------------------------------------------------------------------------------------
# --check: real gloo worlds on the CPU


def _recording(real, record):
    """A subclass of the real ``RingComm`` that keeps, in ``record[(instance, call)]``, a copy of
    everything this rank receives (instances numbered in creation order)."""

    class Recording(real):
        count = 0

        def __init__(self, pg):
            super().__init__(pg)
            self.instance, Recording.count = Recording.count, Recording.count + 1
            self._calls, self._got = 0, []

        def send_recv(self, to_send, recv_tensor=None):
            got = super().send_recv(to_send, recv_tensor)
            self._got.append((self._calls, got))
            self._calls += 1
            return got

        def wait(self):
            super().wait()
            for call, got in self._got:
                record[(self.instance, call)] = got.clone()
            self._got = []

    return Recording


def _check_rank(rank, world_size, spec, glob, with_float64):
    """One gloo rank: the peer's public functions with the real ``RingComm`` (recording what
    this rank receives), and ``hamilton_attn``."""
    import torch.distributed as dist

    from longattn.hamilton import hamilton_attn

    torch.set_num_threads(1)
    peers = load_peer(spec)
    scale = glob[0].shape[-1] ** -0.5
    res = {}
    for name, peer in peers.items():
        real = peer.module.RingComm
        record = {}
        peer.module.RingComm = _recording(real, record)
        try:
            q, k, v, do = (take_shard(t, rank, world_size, layout=peer.layout, dim=1)
                           for t in glob)
            res[name] = peer_call(peer, q, k, v, do, dist.group.WORLD)
        finally:
            peer.module.RingComm = real
        res[name]["record"] = record
    runs = [("longattn", glob[0].dtype)] + ([("longattn float64", torch.float64)]
                                            if with_float64 else [])
    for label, dtype in runs:
        q, k, v, do = (take_shard(t, rank, world_size, layout="zigzag", dim=1).to(dtype)
                       for t in glob)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = hamilton_attn(qg, kg, vg, group=dist.group.WORLD, causal=True,
                                 schedule="ring", softmax_scale=scale, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
        res[label] = {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}
    return res


def _self_module():
    """This script as an importable module (gloo ranks unpickle ``_check_rank`` by name)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module("bench_peer_ring")


def run_check(out_dir, spec=None, worlds=(2, 3, 4), length=8, heads=2, dim=8):
    """The CPU check (see the module docstring). Returns True when everything holds."""
    from longattn.common.testing import TOLERANCES, run_world

    torch.set_num_threads(1)
    spec = PEER if spec is None else spec
    peers = load_peer(spec)
    me = _self_module()
    scale = dim ** -0.5
    keys = ("out", "lse", "dq", "dk", "dv")
    print(f"{bench.device_name()}, {time.strftime('%Y-%m-%d', time.gmtime())}, commit "
          f"{bench.git_sha()}")
    print(f"check: {peer_version(spec)} through the flash-attn shim "
          f"({'real flash-attn' if not _shim().is_shim(_shim().install()) else 'longattn kernels'}"
          f"); torch {torch.__version__}; {length} tokens per rank, H={heads}, D={dim}, causal; "
          f"gloo worlds of {', '.join(map(str, worlds))} processes; the peer and longattn on "
          "the same bf16 and fp16 inputs, longattn also on the bf16 values in float64")
    # The peer in float32 (flash-attn has no float32; only the shim makes it possible):
    # its `.to(torch.float32)` of a float32 gradient buffer returns the buffer itself, which
    # the next kernel call overwrites (and, in a real world, the pending send reads).
    glob = random_global(2, length, heads, dim, torch.float32, "cpu", seed=99)
    with standin(peers):
        for name, peer in peers.items():
            tw, _ = thread_world(peer, glob, 2, scale=scale)
            errs = errors_vs(tw, peer.layout, oracle(glob, scale))
            print(f"note: ring-flash-attn {name} with float32 inputs (2 ranks, thread world): "
                  + ", ".join(f"{k} {e:.2e}" for k, e in errs.items())
                  + " -- wrong gradients outside flash-attn's fp16 / bf16; not used below")
    ok, results = True, []
    for n in worlds:
        for dtype in (torch.bfloat16, torch.float16):
            glob = random_global(n, length, heads, dim, dtype, "cpu", seed=n)
            ref = oracle(glob, scale)
            first = dtype == torch.bfloat16
            t0 = time.perf_counter()
            ranks = run_world(n, me._check_rank, spec, glob, first, timeout=300)
            print(f"\n== world of {n} gloo processes, {str(dtype).replace('torch.', '')} "
                  f"({time.perf_counter() - t0:.1f} s)")
            for name in [*peers, "longattn"] + (["longattn float64"] if first else []):
                layout = peers[name].layout if name in peers else "zigzag"
                errs = errors_vs([r[name] for r in ranks], layout, ref)
                lim = {key: 1e-10 if name == "longattn float64" else TOLERANCES[dtype]
                       for key in errs}
                if name == "ring" and dtype == torch.float16:
                    lim["dq"] = TOLERANCES[torch.bfloat16]  # the peer returns a bf16 dq
                good = all(errs[key] <= lim[key] for key in errs)
                ok &= good
                what = (f"ring-flash-attn {name}" if name in peers else
                        name.replace("longattn", "longattn hamilton ring"))
                print(f"{what:35s} vs float64 oracle: "
                      + ", ".join(f"{key} {e:.2e}" for key, e in errs.items())
                      + f"  (tolerance {max(lim.values()):g})" + ("  OK" if good else "  FAILED")
                      + ("  (the peer's ring backward returns dq in bf16)"
                         if name == "ring" and dtype != torch.bfloat16 else ""))
                results.append(bench.result(
                    "peer_ring", f"check n={n} {what} vs oracle", median_ms=None,
                    dtype=torch.float64 if name == "longattn float64" else dtype, errors=errs,
                    ok=good, tolerance=lim))
            with standin(peers):
                for name, peer in peers.items():
                    real = [r[name] for r in ranks]
                    # what the real RingComm delivered: the K/V of rank r - 1 - step
                    kv_ok = all(torch.equal(
                        real[r]["record"][(0, 2 * s + i)],
                        take_shard(glob[1 + i], (r - 1 - s) % n, n, layout=peer.layout, dim=1))
                        for r in range(n) for s in range(n - 1) for i in (0, 1))
                    # the thread world (the GPU run's source of what a rank receives)
                    tw, recs = thread_world(peer, glob, n, scale=scale, record=range(n))
                    tw_diff = max(max_diff(tw[r], real[r], keys) for r in range(n))
                    rec_same = all(real[r]["record"].keys() == recs[r].keys() and all(
                        torch.equal(real[r]["record"][key], recs[r][key]) for key in recs[r])
                        for r in range(n))
                    # the replay of one rank from the real world's record
                    replay = {}
                    for r in sorted({0, n - 1}):
                        q, k, v, do = (take_shard(t, r, n, layout=peer.layout, dim=1)
                                       for t in glob)
                        rec = {key: t.clone() for key, t in real[r]["record"].items()}
                        replay[r] = max_diff(peer_call(peer, q, k, v, do,
                                                       ReplayGroup(r, n, rec, (0, 1, 2))),
                                             real[r], keys)
                    good = kv_ok and rec_same and tw_diff == 0.0 and all(
                        d == 0.0 for d in replay.values())
                    ok &= good
                    print(f"stand-in, ring-flash-attn {name}: the real RingComm delivered rank "
                          f"r-1-step's K/V: {kv_ok}; thread world = real world on every rank "
                          f"(largest difference {tw_diff:.1e}), the same messages received: "
                          f"{rec_same}; "
                          + "; ".join(f"replay of rank {r} = real rank {r} (largest difference "
                                      f"{d:.1e})" for r, d in replay.items())
                          + ("  OK" if good else "  FAILED"))
                    results.append(bench.result(
                        "peer_ring", f"check n={n} stand-in {name}", median_ms=None,
                        dtype=dtype, kv_from_previous_rank=kv_ok,
                        thread_world_max_diff=tw_diff, same_messages=rec_same,
                        replay_max_diff={str(r): d for r, d in replay.items()}, ok=good))
    path = bench.write_results(results, os.path.join(out_dir, "peer_ring_check.json"))
    print(f"\ncheck: {'PASS' if ok else 'FAIL'} (the peer and longattn within the bf16 / fp16 "
          "tolerances of longattn.common.testing, the peer's ring dq within bf16's; longattn in "
          "float64 within 1e-10; the stand-in bit for bit)")
    print(f"wrote {path}")
    return ok


# ---------------------------------------------------------------------------------------------
# timing


def shim_cost(device, dtype, length, heads, dim):
    """Per kernel call on one full L x L block: the shim's ``_flash_attn_forward`` /
    ``_flash_attn_backward`` (into the caller's buffers) against the kernels called directly."""
    from longattn.common.kernels import attention_backward, attention_forward

    fa = _shim().install()
    g = torch.Generator(device=device).manual_seed(7)
    q, k, v, do = (torch.randn(1, length, heads, dim, generator=g, device=device).to(dtype)
                   for _ in range(4))
    out, lse = attention_forward(q, k, v)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    fns = {
        "shim fwd": lambda: fa._flash_attn_forward(q, k, v, 0.0, None, False, -1, -1, 0.0, None,
                                                   False),
        "kernel fwd": lambda: attention_forward(q, k, v),
        "shim bwd": lambda: fa._flash_attn_backward(do, q, k, v, out, lse, dq, dk, dv, 0.0, None,
                                                    False, -1, -1, 0.0, None, False),
        "kernel bwd": lambda: attention_backward(do, q, k, v, out, lse),
    }
    return bench.time_interleaved(fns, device=device, rounds=3, **bench.timing_kw(device))


def main(argv=None, peer=None):
    p = bench.simulated_ranks_parser(__doc__, tokens=8192)
    p.add_argument("--check", action="store_true",
                   help="CPU: the peer and longattn in gloo worlds of 2-4 processes against "
                        "the float64 oracle, and the stand-in RingComm against the real one")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="merge",
                   help="longattn's bench_hamilton +merge variants to time (comma-separated: "
                        "merge, overlap, defer, overlap+defer)")
    a = p.parse_args(argv)
    spec = PEER if peer is None else peer
    out_dir = bench.out_dir(os.path.join(HERE, "results"), a.out)
    if a.check:
        return 0 if run_check(out_dir, spec) else 1
    bh = _bench_hamilton()
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in bh.VARIANTS]
    if bad or not variants:
        p.error(f"--variants: {bad or a.variants!r} not among {', '.join(bh.VARIANTS)}")
    if a.smoke:
        device = torch.device("cpu")
        a.ranks, a.tokens, a.heads, a.dim, a.rounds = 4, 16, 2, 16, 1
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device; use --smoke or --check on the CPU")
        device = torch.device("cuda")
    dtype = torch.bfloat16
    n, length, heads, dim = a.ranks, a.tokens, a.heads, a.dim
    if length % 2:
        p.error(f"--tokens {length}: the zigzag layouts need an even length per rank")
    from longattn.hamilton import HamiltonConfig

    peers = load_peer(spec)
    fa = _shim().install()
    print(f"device: {bench.device_name(device)}; torch {torch.__version__}; {n} ranks x {length} "
          f"tokens, H={heads}, D={dim}, bf16, causal; peer: {peer_version(spec)} with "
          + ("flash-attn" if not _shim().is_shim(fa) else "the flash-attn shim on "
             "longattn.common.kernels") + f" (local kernel backend: "
          f"{pick_backend(*(torch.zeros(1, 8, heads, dim, device=device, dtype=dtype),) * 3)}"
          ")")
    scale = dim ** -0.5
    t_start = time.time()
    results, ok = [], True
    shape = {"ranks": n, "tokens_per_rank": length, "heads": heads, "head_dim": dim, "batch": 1}
    timed = sorted({0, n // 2, n - 1})

    # 1. correctness: every rank on a small case against the float64 oracle
    clen = 8 if a.smoke else 128
    chead = 2 if a.smoke else 4
    glob = random_global(n, clen, chead, dim, dtype, device, seed=1)
    ref = oracle(glob, scale)
    with standin(peers):
        for name, peer_ in peers.items():
            try:
                tw, _ = thread_world(peer_, glob, n, scale=scale)
                errs = errors_vs(tw, peer_.layout, ref)
                good = max(errs.values()) <= 2e-2
                ok &= good
                print(f"correctness (ring-flash-attn {name}, {n} ranks, bf16 vs float64 oracle): "
                      + ", ".join(f"{k} {e:.2e}" for k, e in errs.items())
                      + ("  OK" if good else "  FAILED"))
                results.append(bench.result("peer_ring", f"correctness ring-flash-attn {name}",
                                            median_ms=None, device=device, dtype=dtype,
                                            errors=errs, ok=good))
            except Exception:  # noqa: BLE001 - report and go on
                ok = False
                print(f"correctness ring-flash-attn {name} failed:\n" + traceback.format_exc())
    try:
        errs, _ = bh.check(device, dtype, n, clen, chead, dim, "ring")
        good = max(errs.values()) <= 2e-2
        ok &= good
        print(f"correctness (longattn ring, {n} ranks, bf16 vs float64 oracle): "
              + ", ".join(f"{k} {e:.2e}" for k, e in errs.items()) + ("  OK" if good else
                                                                      "  FAILED"))
        results.append(bench.result("peer_ring", "correctness longattn ring", median_ms=None,
                                    device=device, dtype=dtype, errors=errs, ok=good))
    except Exception:  # noqa: BLE001
        ok = False
        print("correctness longattn failed:\n" + traceback.format_exc())
    del glob, ref

    # 2. the timed ranks: the peer fed from its thread world, longattn's simulated rank
    contenders = {}
    for dname, (f, fb) in bh.dense_baselines(device, dtype, n * length, heads, dim,
                                             False).items():
        base = dname
        contenders[(dname, "fwd")] = f
        contenders[(dname, "fwd+bwd")] = fb
    glob = random_global(n, length, heads, dim, dtype, device, seed=2)
    with standin(peers):
        for name, peer_ in peers.items():
            try:
                tw, recs = thread_world(peer_, glob, n, scale=scale, record=timed)
                for r in timed:
                    shared = share_repeats(recs[r])
                    q, k, v, do = (take_shard(t, r, n, layout=peer_.layout, dim=1)
                                   for t in glob)
                    f, fb = peer_sequence(peer_, recs[r], r, n, q, k, v, do)
                    first = {"out": f()}
                    first.update(fb())
                    diff = {key: rel_error(first[key], tw[r][key])
                            for key in ("out", "dq", "dk", "dv")}
                    same = max(diff.values()) <= 1e-2  # bf16; atomics may reorder sums
                    ok &= same
                    print(f"rank{r} ring-flash-attn {name}: stand-in's first results vs the "
                          "thread world's rank: " + ", ".join(f"{k} {e:.1e}" for k, e in
                                                               diff.items())
                          + f" ({shared} K/V messages shared by forward and backward)"
                          + ("  OK" if same else "  FAILED"))
                    results.append(bench.result(
                        "peer_ring", f"rank{r} ring-flash-attn {name} stand-in vs thread world",
                        median_ms=None, device=device, dtype=dtype, rel_diff=diff, ok=same))
                    contenders[(f"rank{r} ring-flash-attn {name}", "fwd")] = f
                    contenders[(f"rank{r} ring-flash-attn {name}", "fwd+bwd")] = fb
                    del first
                del tw
            except Exception:  # noqa: BLE001
                ok = False
                print(f"ring-flash-attn {name} setup failed:\n" + traceback.format_exc())
        del glob
        for r in timed:
            for v in variants:
                mode = bh.VARIANTS[v][0]
                cfg = HamiltonConfig(**bh.VARIANTS[v][1])
                try:
                    f, fb = bh.make_sequence(device, dtype, n, length, heads, dim, r, "ring",
                                             mode, cfg)
                    f(), fb()  # warm-up outside the timings
                    contenders[(f"rank{r} longattn ring {mode}", "fwd")] = f
                    contenders[(f"rank{r} longattn ring {mode}", "fwd+bwd")] = fb
                except Exception:  # noqa: BLE001
                    ok = False
                    print(f"longattn rank {r} {mode} failed:\n" + traceback.format_exc())

        # 3. timing: all contenders of a direction alternate, round by round
        times = {}
        for direction in ("fwd", "fwd+bwd"):
            fns = {name: fn for (name, d), fn in contenders.items() if d == direction}
            per = {name: [] for name in fns}
            for _ in bench.progress(range(a.rounds), desc=f"timing {direction}"):
                try:
                    got = bench.time_interleaved(fns, device=device, rounds=1,
                                                 **bench.timing_kw(device))
                except Exception:  # noqa: BLE001
                    ok = False
                    print(f"timing {direction} failed:\n" + traceback.format_exc())
                    break
                for name in fns:
                    per[name].append(got[name])
            for name, ts in per.items():
                if ts:
                    times[(name, direction)] = (statistics.median(ts), max(ts) / min(ts))
    rows = []
    for (name, direction), (ms, spread) in sorted(times.items(), key=lambda x: (x[0][1],
                                                                                  x[0][0])):
        dense = times.get((base, direction), (None,))[0]
        per_rank = None if dense is None else dense / n
        is_base = name == base
        rank = name.split(" ", 1)[0] if name.startswith("rank") else None
        rel = None  # this contender's time over longattn's on the same rank
        if rank is not None and "ring-flash-attn" in name:
            mine = times.get((f"{rank} longattn ring +merge", direction))
            rel = None if mine is None else ms / mine[0]
        row = {"contender": name, "dir": direction, "ms": ms,
               "dense/n ms": ms / n if is_base else per_rank,
               "efficiency": None if is_base or per_rank is None else per_rank / ms,
               "ms / longattn ms": rel, "spread": spread}
        rows.append(row)
        results.append(bench.result(
            "peer_ring", f"{direction} {name}", median_ms=ms, device=device, dtype=dtype,
            shape=shape, efficiency=row["efficiency"], dense_over_n_ms=row["dense/n ms"],
            baseline=base, over_longattn=rel, spread=spread,
            peer=peer_version(spec) if "ring-flash-attn" in name else None))
    print(bench.format_table(rows))
    for direction in ("fwd", "fwd+bwd"):
        for who in [f"ring-flash-attn {nm}" for nm in peers] + [
                f"longattn ring {bh.VARIANTS[v][0]}" for v in variants]:
            effs = {r["contender"].split(" ", 1)[0]: r["efficiency"] for r in rows
                    if r["dir"] == direction and r["contender"].endswith(" " + who)
                    and r["efficiency"] is not None}
            if effs:
                worst = min(effs, key=effs.get)
                print(f"efficiency {direction:8s} {who:34s}: worst rank {worst} "
                      f"{effs[worst]:.3f}, best {max(effs.values()):.3f}")

    # 4. what the shim adds per kernel call of the peer
    try:
        c = shim_cost(device, dtype, length, heads, dim)
        for d in ("fwd", "bwd"):
            extra = c[f"shim {d}"] - c[f"kernel {d}"]
            print(f"shim cost per {d} call on one {length} x {length} block: "
                  f"{c[f'shim {d}']:.4g} ms through the shim, {c[f'kernel {d}']:.4g} ms "
                  f"direct ({extra:+.4g} ms)")
            results.append(bench.result(
                "peer_ring", f"shim cost {d}", median_ms=c[f"shim {d}"], device=device,
                dtype=dtype, shape={"tokens": length, "heads": heads, "head_dim": dim},
                direct_ms=c[f"kernel {d}"], extra_ms=extra))
    except Exception:  # noqa: BLE001
        print("shim cost failed:\n" + traceback.format_exc())
    path = bench.write_results(results, os.path.join(out_dir, "bench_peer_ring.json"))
    print(f"correctness and stand-in: {'PASS' if ok else 'FAIL'}")
    print(f"wrote {path} ({time.time() - t_start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
