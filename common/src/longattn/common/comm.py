"""Point-to-point exchanges for context parallelism, with exact byte accounting.

* :func:`exchange` -- post a batch of sends and receives (``batch_isend_irecv``) and return a
  handle; the caller computes on other buffers meanwhile and calls ``wait()`` before reading
  the received ones (double buffering).
* :func:`ring_exchange` -- send one buffer to ``rank + shift``, receive from ``rank - shift``.
* :func:`all_to_all_step` -- every rank sends a (possibly different-sized) chunk to every other
  rank in one batch: one multi-ring (TASP) step.

Ranks are *group* ranks; conversion to global ranks is done here. ``group`` follows the one
rule of :func:`longattn.common.dist.resolve_group`: a ``ProcessGroup``, a 1-D ``DeviceMesh``,
``LOCAL``, an already resolved ``dist.Group``, or ``None`` (this process alone without an
initialised world or in a world of one rank; a ``ValueError`` naming ``group`` in a world of more
ranks: pass ``torch.distributed.group.WORLD`` to exchange over the world).

Streams: NCCL runs batched p2p on its own internal stream, which waits for the work already
queued on the current stream when the batch is posted (so send buffers are complete and recv
buffers are no longer being read), and ``wait()`` makes the current stream wait for the
transfer. Posting from the current stream therefore overlaps with compute queued after it and
needs no extra events. Passing ``stream=`` posts on a side stream instead; then an event
recorded on the current stream orders buffer reuse, and ``wait()`` joins the streams again.

Byte accounting: inside ``with counting() as c:`` every exchange adds the bytes of each
message to ``c`` (``c.sent[peer]``, ``c.recv[peer]``, ``c.messages``), so tests can assert the
exact communication volume of a schedule.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longattn.common.dist import resolve_group


@dataclass
class ByteCounter:
    """Bytes per peer (group ranks) and the list of (kind, peer, bytes) messages, per rank."""

    sent: dict = field(default_factory=lambda: defaultdict(int))
    recv: dict = field(default_factory=lambda: defaultdict(int))
    messages: list = field(default_factory=list)
    calls: int = 0

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.recv.values())

    def add(self, kind, peer, nbytes):
        (self.sent if kind == "send" else self.recv)[peer] += nbytes
        self.messages.append((kind, peer, nbytes))


_COUNTERS: list[ByteCounter] = []


@contextlib.contextmanager
def counting():
    """Count the bytes of every exchange made inside the block (nestable)."""
    c = ByteCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def record(kind: str, peer: int, nbytes: int) -> None:
    """Add a message to every active counter (for collectives issued outside this module)."""
    if kind not in ("send", "recv"):
        raise ValueError(f"kind must be 'send' or 'recv', got {kind!r}")
    for c in _COUNTERS:
        c.add(kind, peer, nbytes)


def note_call() -> None:
    for c in _COUNTERS:
        c.calls += 1


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Handle:
    """Pending exchange: ``wait()`` blocks (or orders the current CUDA stream) until done."""

    def __init__(self, works, stream=None):
        self.works = works
        self.stream = stream

    def wait(self):
        for w in self.works:
            w.wait()
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
        self.works = []


def exchange(sends, recvs, group=None, *, stream=None) -> Handle:
    """Post ``sends`` = [(tensor, dst)], ``recvs`` = [(tensor, src)] (group ranks) as one batch.

    Tensors must be contiguous. Messages to or from this rank itself are not allowed (copy
    locally instead). Returns a :class:`Handle`.
    """
    g = resolve_group(group)
    me, n = g.rank, g.size
    # Validate everything first, so a rejected call neither posts nor counts anything.
    for kind, pairs in (("send", sends), ("recv", recvs)):
        for t, peer in pairs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"exchange: {kind} buffers must be tensors, got {type(t).__name__}")
            if not t.is_contiguous():
                raise ValueError(f"exchange: {kind} tensors must be contiguous")
            if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < n:
                raise ValueError(
                    f"exchange: {kind} peer must be a group rank in [0, {n}), got {peer!r}")
            if peer == me:
                raise ValueError(f"exchange: {kind} to/from self (rank {me}); copy locally")
    ops = []
    for t, dst in sends:
        ops.append(dist.P2POp(dist.isend, t, g.global_rank(dst), g.pg))
        record("send", dst, nbytes(t))
    for t, src in recvs:
        ops.append(dist.P2POp(dist.irecv, t, g.global_rank(src), g.pg))
        record("recv", src, nbytes(t))
    note_call()
    if not ops:
        return Handle([])
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            works = dist.batch_isend_irecv(ops)
        return Handle(works, stream)
    return Handle(dist.batch_isend_irecv(ops))


def ring_exchange(send_buf, recv_buf, group=None, *, shift: int = 1, stream=None) -> Handle:
    """Send ``send_buf`` to ``rank + shift`` and receive ``recv_buf`` from ``rank - shift``."""
    g = resolve_group(group)
    n, me = g.size, g.rank
    if n == 1 or shift % n == 0:
        raise ValueError(f"ring_exchange needs a peer: world size {n}, shift {shift}")
    if send_buf.dtype != recv_buf.dtype or send_buf.shape != recv_buf.shape:
        raise ValueError(
            f"ring_exchange: recv_buf {tuple(recv_buf.shape)} {recv_buf.dtype} must match the "
            f"shape and dtype of send_buf {tuple(send_buf.shape)} {send_buf.dtype} (every rank "
            "sends the same kind of block)")
    return exchange([(send_buf, (me + shift) % n)], [(recv_buf, (me - shift) % n)], g,
                    stream=stream)


def all_to_all_step(send_chunks, recv_chunks, group=None, *, stream=None) -> Handle:
    """One all-to-all: ``send_chunks[p]`` goes to group rank p and ``recv_chunks[p]`` comes from
    it (entries for this rank are ignored; ``None`` or empty tensors send nothing)."""
    g = resolve_group(group)
    me, n = g.rank, g.size
    if len(send_chunks) != n or len(recv_chunks) != n:
        raise ValueError(f"all_to_all_step: send_chunks and recv_chunks need one entry per rank "
                         f"({n}), got {len(send_chunks)} and {len(recv_chunks)}")
    sends = [(t, p) for p, t in enumerate(send_chunks) if p != me and t is not None and t.numel()]
    recvs = [(t, p) for p, t in enumerate(recv_chunks) if p != me and t is not None and t.numel()]
    return exchange(sends, recvs, g, stream=stream)
