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

Agreement: the checks of a call are local (no extra collective), so a bad argument on one rank
raises there while the other ranks wait on messages that never come. Each function takes
``agree=True`` to run its checks through :func:`longattn.common.dist.agree` instead (one small
all-gather and a host sync before anything is posted): then a bad argument on any rank, an
argument that must be shared but differs (``shift``, the ring's block shape and dtype), or a
message pattern that does not pair up (rank r sends k messages of b bytes to rank p, and p
receives exactly that from r; checked for groups of up to 30 ranks) raises the same error on
every rank. Entry points that have already agreed their arguments leave it off (the default)
so their steps keep overlapping.

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

from longattn.common.dist import agree as _agree
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


def _validate(sends, recvs, me, n, op="exchange"):
    """Local checks of a batch (raise naming the problem; nothing posted or counted)."""
    for kind, pairs in (("send", sends), ("recv", recvs)):
        for t, peer in pairs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {kind} buffers must be tensors, got {type(t).__name__}")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {kind} tensors must be contiguous")
            if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < n:
                raise ValueError(
                    f"{op}: {kind} peer must be a group rank in [0, {n}), got {peer!r}")
            if peer == me:
                raise ValueError(f"{op}: {kind} to/from self (rank {me}); copy locally")


_COUNT_BITS = 16  # messages per peer and direction in one word: count + bytes << 16
_MAX_PATTERN_RANKS = 30  # 2 words per peer + 2 lengths within dist.agree's 64 values


def _pattern(pairs, n):
    """One word per group rank: (bytes << 16) + number of messages with that peer."""
    words = [0] * n
    for t, peer in pairs:
        words[peer] += (nbytes(t) << _COUNT_BITS) + 1
    return tuple(words)


def _say(word):
    return f"{word & ((1 << _COUNT_BITS) - 1)} message(s) of {word >> _COUNT_BITS} bytes"


def _checked(op, g, check, agree):
    """``(sends, recvs)`` of ``check()``, validated before anything is posted or counted (so a
    rejected call does neither): agreed by every rank with ``agree``, else locally."""
    if agree:
        return _agreed(op, g, check)
    sends, recvs, _ = check()
    _validate(sends, recvs, g.rank, g.size)
    return sends, recvs


def _agreed(op, g, check):
    """Run ``check() -> (sends, recvs, shared fields)`` through dist.agree and check that the
    ranks' messages pair up; returns ``(sends, recvs)``. The same error on every rank."""
    pattern = g.size <= _MAX_PATTERN_RANKS

    def run():
        sends, recvs, fields = check()
        _validate(sends, recvs, g.rank, g.size, op)
        fields = dict(fields)
        if pattern:
            fields["sends"] = _pattern(sends, g.size)
            fields["recvs"] = _pattern(recvs, g.size)
        return (sends, recvs), fields

    (sends, recvs), views = _agree(op, g, run, vary=("sends", "recvs") if pattern else ())
    if pattern:
        for r in range(g.size):
            for p in range(g.size):
                sw, rw = views[f"sends[{p}]"][r], views[f"recvs[{r}]"][p]
                if sw != rw:
                    raise ValueError(
                        f"{op}: the messages do not pair up: rank {r} sends {_say(sw)} to rank "
                        f"{p}, which receives {_say(rw)} from it [raised on every rank]")
    return sends, recvs


def _post(g, sends, recvs, stream) -> Handle:
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


def _check_agree(agree):
    if not isinstance(agree, bool):
        raise TypeError(f"agree must be a bool, got {agree!r}")


def exchange(sends, recvs, group=None, *, stream=None, agree: bool = False) -> Handle:
    """Post ``sends`` = [(tensor, dst)], ``recvs`` = [(tensor, src)] (group ranks) as one batch.

    Tensors must be contiguous. Messages to or from this rank itself are not allowed (copy
    locally instead). ``agree=True``: the checks and the pairing of the messages are agreed by
    every rank first (module docstring). Returns a :class:`Handle`.
    """
    _check_agree(agree)
    g = resolve_group(group)
    sends, recvs = list(sends), list(recvs)
    return _post(g, *_checked("exchange", g, lambda: (sends, recvs, {}), agree), stream)


def ring_exchange(send_buf, recv_buf, group=None, *, shift: int = 1, stream=None,
                  agree: bool = False) -> Handle:
    """Send ``send_buf`` to ``rank + shift`` and receive ``recv_buf`` from ``rank - shift``.
    ``agree=True``: the checks, ``shift`` and the block's shape and dtype are agreed by every
    rank first (module docstring)."""
    _check_agree(agree)
    g = resolve_group(group)
    n, me = g.size, g.rank

    def check():
        if isinstance(shift, bool) or not isinstance(shift, int):
            raise TypeError(f"ring_exchange: shift must be an int, got {shift!r}")
        if n == 1 or shift % n == 0:
            raise ValueError(f"ring_exchange needs a peer: world size {n}, shift {shift}")
        for name, t in (("send_buf", send_buf), ("recv_buf", recv_buf)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"ring_exchange: {name} must be a tensor, got "
                                f"{type(t).__name__}")
        if send_buf.dtype != recv_buf.dtype or send_buf.shape != recv_buf.shape:
            raise ValueError(
                f"ring_exchange: recv_buf {tuple(recv_buf.shape)} {recv_buf.dtype} must match "
                f"the shape and dtype of send_buf {tuple(send_buf.shape)} {send_buf.dtype} "
                "(every rank sends the same kind of block)")
        sends, recvs = [(send_buf, (me + shift) % n)], [(recv_buf, (me - shift) % n)]
        return sends, recvs, {"shift": shift % n, "shape": tuple(send_buf.shape),
                              "dtype": send_buf.dtype}

    return _post(g, *_checked("ring_exchange", g, check, agree), stream)


def all_to_all_step(send_chunks, recv_chunks, group=None, *, stream=None,
                    agree: bool = False) -> Handle:
    """One all-to-all: ``send_chunks[p]`` goes to group rank p and ``recv_chunks[p]`` comes from
    it (entries for this rank are ignored; ``None`` or empty tensors send nothing).
    ``agree=True``: the checks and the pairing of the chunks (sizes included) are agreed by
    every rank first (module docstring)."""
    _check_agree(agree)
    g = resolve_group(group)
    me, n = g.rank, g.size

    def check():
        if len(send_chunks) != n or len(recv_chunks) != n:
            raise ValueError(f"all_to_all_step: send_chunks and recv_chunks need one entry per "
                             f"rank ({n}), got {len(send_chunks)} and {len(recv_chunks)}")
        for name, chunks in (("send_chunks", send_chunks), ("recv_chunks", recv_chunks)):
            for p, t in enumerate(chunks):
                if t is not None and not isinstance(t, torch.Tensor):
                    raise TypeError(f"all_to_all_step: {name}[{p}] must be a tensor or None, "
                                    f"got {type(t).__name__}")
        sends = [(t, p) for p, t in enumerate(send_chunks)
                 if p != me and t is not None and t.numel()]
        recvs = [(t, p) for p, t in enumerate(recv_chunks)
                 if p != me and t is not None and t.numel()]
        return sends, recvs, {}

    return _post(g, *_checked("all_to_all_step", g, check, agree), stream)
