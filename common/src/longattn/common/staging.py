"""The staged transport: CUDA tensors over a process group whose backend cannot carry them.

gloo moves host memory only (``batch_isend_irecv`` of CUDA tensors fails with ``writev ...
Bad address``), and NCCL refuses two ranks on one GPU. So that the same code runs with NCCL on
many GPUs and with gloo on one (N processes sharing ``cuda:0``), every exchange and collective
of :mod:`longattn.common.comm` stages the CUDA tensors of a group that cannot carry them through
pinned host buffers:

1. **Post.** Each CUDA tensor to be sent is copied device-to-host (D2H) into a pinned buffer on
   the current stream (on ``stream=`` after that stream has waited for the current one, as the
   NCCL path does); an event is recorded after the copies and the host waits for it, and only
   then is the transfer posted. So the data sent is the tensor as of the work queued on the
   current stream when the call was made, exactly as with NCCL, and mutating the tensor
   afterwards (stream-ordered) cannot reach the message.
2. **Wait.** ``Handle.wait()`` waits for the transfer on the host, then issues the
   host-to-device (H2D) copies into the CUDA receive tensors on the current stream (on
   ``stream=``, followed by the current stream waiting for it). Work queued on the current
   stream afterwards sees the data, as with NCCL; the host does not wait for the H2D copies.
3. **Buffers.** Pinned buffers come from a pool (:class:`HostPool`). A :class:`Stage` holds
   its buffers until ``wait()``; they then go back to the pool together with the event recorded
   after the H2D copies, and the pool hands a buffer out again only once that event has
   completed. A handle that is never waited keeps its buffers (they are neither reused nor
   freed while it lives). A rank must not drop an unwaited handle while its transfer is in
   flight (the same holds for the NCCL path).

Which groups: :func:`carries_cuda` reads the group's backend config: a group carries CUDA
tensors when its ``cuda`` device maps to ``nccl`` (``"nccl"``, or ``"cpu:gloo,cuda:nccl"``).
Every other backend (``gloo``, whose config says ``"cpu:gloo,cuda:gloo"``, and any custom or
MPI backend) is staged: staging is always correct, only slower. Which tensors: those the device
seam calls device tensors (``t.is_cuda``); CPU tensors go to gloo as they are. The copies run on
the streams of the current CUDA device, so CUDA tensors must live on it (as under NCCL).

Byte counters (:func:`longattn.common.comm.counting`) count the messages of the algorithm, never
the staging copies: the counts are identical staged or not.

**The device seam.** Everything device-specific (is this a device tensor, pinned allocation,
the copies, streams, event record / query / synchronize) goes through one object,
:class:`CudaDevice` in real use. :func:`use` swaps in another for a block: tests and the CPU
smoke mode of ``common/bench/check_staging.py`` use :class:`SimulatedDevice`, which treats CPU
tensors as device tensors, logs every operation in order and can defer copies until an event is
synchronized, so the ordering rules above can be checked on a CPU.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict

import torch
import torch.distributed as dist

# Backends that move CUDA tensors themselves (a fact about the backends, not a knob).
_CUDA_BACKENDS = frozenset({"nccl"})
# Finished buffers kept per size class in a pool; buffers still in use are always kept.
_KEEP_FREE = 4
_MIN_BUCKET = 4096


def carries_cuda_config(config: str) -> bool:
    """Whether a backend config string (``"cpu:gloo,cuda:nccl"``, ``"nccl"``, ``"gloo"``) moves
    CUDA tensors itself."""
    config = str(config).lower().replace(" ", "")
    if ":" not in config:
        return config in _CUDA_BACKENDS
    pairs = dict(p.split(":", 1) for p in config.split(",") if ":" in p)
    return pairs.get("cuda") in _CUDA_BACKENDS


def carries_cuda(pg) -> bool:
    """Whether process group ``pg`` moves CUDA tensors itself (else they are staged)."""
    if pg is None:  # this process alone: nothing travels
        return True
    return carries_cuda_config(dist.get_backend_config(pg))


def _bucket(nbytes: int) -> int:
    """Size class of a buffer: at least 4 KiB, else ``nbytes`` rounded up to 1/16 of its power
    of two (at most 1/16 wasted, few classes when sizes vary)."""
    if nbytes <= _MIN_BUCKET:
        return _MIN_BUCKET
    step = 1 << (nbytes.bit_length() - 5)
    return -(-nbytes // step) * step


class HostPool:
    """Pinned host buffers (flat ``uint8``) by size class; a buffer is handed out again only once
    the event it was given back with has completed."""

    def __init__(self, device):
        self.device = device
        self.free = defaultdict(list)  # size class -> [(buffer, event or None)]

    def take(self, nbytes: int) -> torch.Tensor:
        size = _bucket(nbytes)
        entries = self.free[size]
        for i, (buf, event) in enumerate(entries):
            if event is None or self.device.query(event):
                del entries[i]
                return buf
        return self.device.host_empty(size)

    def give(self, buf: torch.Tensor, event) -> None:
        entries = self.free[buf.numel()]
        entries.append((buf, event))
        extra = len(entries) - _KEEP_FREE
        if extra > 0:  # drop finished ones only: a pending copy may still read the others
            done = [i for i, (_, e) in enumerate(entries) if e is None or self.device.query(e)]
            for i in reversed(done[:extra]):
                del entries[i]


class CudaDevice:
    """The real device operations of the staged transport (the seam :func:`use` replaces)."""

    def __init__(self):
        self.pool = HostPool(self)

    def is_device(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def host_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def current_stream(self):
        return torch.cuda.current_stream()

    def wait_stream(self, waiter, other) -> None:
        waiter.wait_stream(other)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def query(self, event) -> bool:
        return event.query()

    def synchronize(self, event) -> None:
        event.synchronize()


class SimStream:
    """A named stream of :class:`SimulatedDevice` (only its name matters: the log)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"SimStream({self.name!r})"


class SimEvent:
    def __init__(self, seq: int, ident: int):
        self.seq, self.id = seq, ident


class SimulatedDevice:
    """A stand-in device on the CPU, for tests and the CPU smoke mode.

    Every CPU tensor that is not one of its own host buffers counts as a device tensor, so a
    gloo world of CPU ranks runs the staged path. Each operation is appended to :attr:`log`:
    ``("alloc", buf)``, ``("d2h" | "h2d", stream name, buf)``, ``("record", stream name, event
    id)``, ``("sync", event id)``, ``("wait_stream", waiter name, other name)``, where ``buf``
    identifies a host buffer (its storage address). New host buffers are filled with ``0xA5``
    bytes, so a message posted before its D2H copy ran is visibly wrong.

    ``deferred=True``: copies are queued, in issue order, and run only when an event recorded
    after them is synchronized or :meth:`flush` is called (a device that runs behind the host);
    :meth:`query` reports a queued copy's event as pending, and a D2H copy into, or a transfer
    through, a host buffer that a queued copy still reads raises ``AssertionError``
    (:meth:`busy`). ``deferred=False``: copies run when issued, so host code computing on the
    results in between (a whole algorithm) sees them.
    """

    def __init__(self, *, deferred: bool = False):
        self.deferred = deferred
        self.log: list[tuple] = []
        self.pool = HostPool(self)
        self.current = SimStream("current")
        self._queue: list[tuple] = []  # (seq, dst, src, host buffer address)
        self._issued = 0
        self._events = itertools.count()
        self._hosts: dict[int, torch.Tensor] = {}  # kept alive: an address is never reused

    @staticmethod
    def address(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def is_device(self, t: torch.Tensor) -> bool:
        return self.address(t) not in self._hosts

    def host_empty(self, nbytes: int) -> torch.Tensor:
        buf = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
        self._hosts[self.address(buf)] = buf
        self.log.append(("alloc", self.address(buf)))
        return buf

    def current_stream(self):
        return self.current

    def wait_stream(self, waiter, other) -> None:
        self.log.append(("wait_stream", waiter.name, other.name))

    def busy(self, t: torch.Tensor) -> bool:
        """Whether a queued (not yet run) copy reads or writes host buffer ``t``."""
        return any(a == self.address(t) for *_, a in self._queue)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        d2h = not self.is_device(dst)
        host = dst if d2h else src
        if d2h and self.busy(host):
            raise AssertionError("a staging buffer was reused while a queued copy uses it")
        self.log.append(("d2h" if d2h else "h2d", stream.name, self.address(host)))
        self._issued += 1
        self._queue.append((self._issued, dst, src, self.address(host)))
        if not self.deferred:
            self._run(self._issued)

    def record(self, stream):
        event = SimEvent(self._issued, next(self._events))
        self.log.append(("record", stream.name, event.id))
        return event

    def query(self, event) -> bool:
        return not any(seq <= event.seq for seq, *_ in self._queue)

    def synchronize(self, event) -> None:
        self.log.append(("sync", event.id))
        self._run(event.seq)

    def flush(self) -> None:
        """Run every queued copy (the device catching up, like ``torch.cuda.synchronize()``)."""
        self._run(self._issued)

    def _run(self, upto: int) -> None:
        while self._queue and self._queue[0][0] <= upto:
            _, dst, src, _ = self._queue.pop(0)
            dst.copy_(src)


_DEVICES: list = []


def device():
    """The device seam in use: the innermost :func:`use`, else the process's CudaDevice."""
    if not _DEVICES:
        _DEVICES.append(CudaDevice())
    return _DEVICES[-1]


@contextlib.contextmanager
def use(dev):
    """Stage through ``dev`` (e.g. a :class:`SimulatedDevice`) inside the block."""
    device()  # the real device stays at the bottom
    _DEVICES.append(dev)
    try:
        yield dev
    finally:
        _DEVICES.remove(dev)


class Stage:
    """The staging of one call on group ``g`` (a resolved ``dist.Group``), optionally on side
    stream ``stream``.

    ``out(t)`` is what the transport reads for ``t`` (a pinned copy of a device tensor, made by
    a D2H copy; ``t`` itself when no staging is needed), ``into(t)`` what it writes for ``t``
    (a pinned buffer copied into ``t`` by :meth:`finish`), ``inout(t)`` both. Call
    :meth:`ready` before posting (the host waits for the D2H copies) and :meth:`finish` once
    the transfer is done (H2D copies, stream join, buffers back to the pool)."""

    def __init__(self, g, stream=None):
        self.dev = device()
        self.staged = not carries_cuda(g.pg)
        self.side = stream
        self.held: list[torch.Tensor] = []  # pool buffers, kept until finish()
        self.back: list[tuple] = []  # (host view, device tensor) copied at finish()
        self._stream = None
        self._d2h = False

    def needs(self, t: torch.Tensor) -> bool:
        return self.staged and self.dev.is_device(t)

    @property
    def active(self) -> bool:
        return bool(self.held)

    def stream(self):
        """The stream of this call's copies: the current one, or ``stream=`` after it has
        waited for the current one (once, at the first copy, i.e. when posting)."""
        if self._stream is None:
            cur = self.dev.current_stream()
            if self.side is not None:
                self.dev.wait_stream(self.side, cur)
            self._stream = self.side if self.side is not None else cur
        return self._stream

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        buf = self.dev.pool.take(n)
        self.held.append(buf)
        return buf[:n].view(t.dtype).view(t.shape)

    def out(self, t: torch.Tensor) -> torch.Tensor:
        if not self.needs(t):
            return t
        host = self._host(t)
        self.dev.copy(host, t, self.stream())
        self._d2h = True
        return host

    def into(self, t: torch.Tensor) -> torch.Tensor:
        if not self.needs(t):
            return t
        self.stream()  # the side stream waits for the current one when posting
        host = self._host(t)
        self.back.append((host, t))
        return host

    def inout(self, t: torch.Tensor) -> torch.Tensor:
        host = self.out(t)
        if host is not t:
            self.back.append((host, t))
        return host

    def ready(self) -> None:
        """Before posting: the host waits until the D2H copies are done."""
        if self._d2h:
            self.dev.synchronize(self.dev.record(self.stream()))
            self._d2h = False

    def finish(self) -> None:
        """After the transfer has completed on the host: the H2D copies on the call's stream,
        the current stream joined to ``stream=``, the buffers back to the pool guarded by the
        event after the copies. Idempotent."""
        if not self.held:
            return
        event = None
        if self.back:  # wait() orders the stream current when it is called, as with NCCL
            s = self.side if self.side is not None else self.dev.current_stream()
            for host, t in self.back:
                self.dev.copy(t, host, s)
            event = self.dev.record(s)
        if self.side is not None:
            self.dev.wait_stream(self.dev.current_stream(), self.side)
        for buf in self.held:
            self.dev.pool.give(buf, event)
        self.held, self.back = [], []


__all__ = ["CudaDevice", "HostPool", "SimulatedDevice", "Stage", "carries_cuda",
           "carries_cuda_config", "device", "use"]
