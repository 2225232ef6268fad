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

Collectives: :func:`all_reduce`, :func:`all_gather`, :func:`gather` and :func:`broadcast` are the
one home of the collectives the library issues (blocking, like ``torch.distributed``'s with
``async_op=False``; ``dst`` / ``src`` are group ranks). They do not count bytes: a caller that
accounts for a collective calls :func:`record` with its own model of it.

CUDA tensors over gloo: a group whose backend cannot carry CUDA tensors (gloo) gets them staged
through pinned host buffers (:mod:`longattn.common.staging`), with the ordering guarantees above
(send buffers captured as of the work queued on the current stream when posted, ``wait()``
making the data visible to work queued afterwards on the current stream, ``stream=`` joined
back) and the same byte counts. This is chosen from the group's backend and the tensors' device,
so the same code runs with NCCL on many GPUs and with N gloo processes on one GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from longattn.common import staging
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
        # by identity: counters are dataclasses, equal when their counts are (nested ones)
        del _COUNTERS[next(i for i, x in enumerate(_COUNTERS) if x is c)]


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
    """Pending exchange: ``wait()`` blocks (or orders the current CUDA stream) until done.

    A staged exchange (module docstring) keeps its pinned buffers in ``stage`` until ``wait()``.
    """

    def __init__(self, works, stream=None, stage=None):
        self.works = works
        self.stream = stream
        self.stage = stage

    def wait(self):
        for w in self.works:
            w.wait()
        self.works = []
        if self.stage is not None:  # H2D copies and the stream join, then the buffers go back
            self.stage.finish()
        elif self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)


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


_DIGEST_MOD = 1 << 62


def _digest(pairs, me, sending):
    """One word for the ordered (dtype, element count) sequence of each pair of ranks this rank
    takes part in: the sum over its peers of a hash of (sender, receiver, sequence). Summed over
    every rank, the senders' words equal the receivers' exactly when every pair's messages match
    in order, dtype and size (the byte totals of :func:`_pattern` do not see order or dtype)."""
    seqs = defaultdict(list)
    for t, peer in pairs:
        seqs[peer].append(f"{t.dtype}:{t.numel()}")
    total = 0
    for peer, seq in seqs.items():
        src, dst = (me, peer) if sending else (peer, me)
        key = f"{src}>{dst}|{','.join(seq)}".encode()
        total += int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return total % _DIGEST_MOD


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
        fields["send digest"] = _digest(sends, g.rank, True)
        fields["recv digest"] = _digest(recvs, g.rank, False)
        return (sends, recvs), fields

    vary = ("sends", "recvs") if pattern else ()
    (sends, recvs), views = _agree(op, g, run, vary=vary + ("send digest", "recv digest"))
    if pattern:
        for r in range(g.size):
            for p in range(g.size):
                sw, rw = views[f"sends[{p}]"][r], views[f"recvs[{r}]"][p]
                if sw != rw:
                    raise ValueError(
                        f"{op}: the messages do not pair up: rank {r} sends {_say(sw)} to rank "
                        f"{p}, which receives {_say(rw)} from it [raised on every rank]")
    if sum(views["send digest"]) % _DIGEST_MOD != sum(views["recv digest"]) % _DIGEST_MOD:
        raise ValueError(f"{op}: the messages do not pair up: between some pair of ranks the "
                         "sends and receives differ in order, dtype or element count "
                         "[raised on every rank]")
    return sends, recvs


def _post(g, sends, recvs, stream) -> Handle:
    for t, dst in sends:
        record("send", dst, nbytes(t))
    for t, src in recvs:
        record("recv", src, nbytes(t))
    note_call()
    if not sends and not recvs:
        return Handle([])
    stage = staging.Stage(g, stream)
    if any(stage.needs(t) for t, _ in sends + recvs):
        ops = [dist.P2POp(dist.isend, stage.out(t), g.global_rank(p), g.pg) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, stage.into(t), g.global_rank(p), g.pg) for t, p in recvs]
        stage.ready()  # the host has the send data before the transfer may read it
        return Handle(dist.batch_isend_irecv(ops), stage=stage)
    ops = [dist.P2POp(dist.isend, t, g.global_rank(p), g.pg) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, g.global_rank(p), g.pg) for t, p in recvs]
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
    every rank first (module docstring): per pair of ranks the number of messages, their bytes,
    and their order, dtypes and element counts. Returns a :class:`Handle`.
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


# ---------------------------------------------------------------------------------------------
# Collectives (blocking; staged like the exchanges for groups that cannot carry CUDA tensors)
# ---------------------------------------------------------------------------------------------


def _check_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def _check_list(op, name, ts, g, like):
    if not isinstance(ts, (list, tuple)) or len(ts) != g.size:
        raise ValueError(f"{op}: {name} must be a list of one tensor per rank ({g.size})")
    for i, t in enumerate(ts):
        _check_tensor(op, f"{name}[{i}]", t)
        if t.shape != like.shape or t.dtype != like.dtype:
            raise ValueError(f"{op}: {name}[{i}] {tuple(t.shape)} {t.dtype} must match tensor "
                             f"{tuple(like.shape)} {like.dtype}")


def _check_root(op, name, r, g):
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < g.size:
        raise ValueError(f"{op}: {name} must be a group rank in [0, {g.size}), got {r!r}")


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None) -> None:
    """Reduce ``tensor`` in place over the ranks of ``group`` (``op`` a
    ``torch.distributed.ReduceOp``). Not counted (module docstring)."""
    g = resolve_group(group)
    _check_tensor("all_reduce", "tensor", tensor)
    if not g.distributed:
        return
    stage = staging.Stage(g)
    host = stage.inout(tensor)
    stage.ready()
    dist.all_reduce(host, op=op, group=g.pg)
    stage.finish()


def all_gather(out_list, tensor, group=None) -> None:
    """``out_list[r]`` = rank r's ``tensor``, for every group rank r (one tensor per rank, each
    of ``tensor``'s shape and dtype). Not counted (module docstring)."""
    g = resolve_group(group)
    _check_tensor("all_gather", "tensor", tensor)
    _check_list("all_gather", "out_list", out_list, g, tensor)
    if not g.distributed:
        out_list[0].copy_(tensor)
        return
    stage = staging.Stage(g)
    outs = [stage.into(t) for t in out_list]
    host = stage.out(tensor)
    stage.ready()
    dist.all_gather(outs, host, group=g.pg)
    stage.finish()


def gather(tensor, gather_list, dst: int, group=None) -> None:
    """Rank ``dst`` (a group rank) receives every rank's ``tensor`` in ``gather_list`` (one
    tensor per rank, each of ``tensor``'s shape and dtype); the other ranks pass
    ``gather_list=None``. Not counted (module docstring)."""
    g = resolve_group(group)
    _check_tensor("gather", "tensor", tensor)
    _check_root("gather", "dst", dst, g)
    if g.rank == dst:
        _check_list("gather", "gather_list", gather_list, g, tensor)
    elif gather_list is not None:
        raise ValueError(f"gather: gather_list must be None off the destination rank {dst}")
    if not g.distributed:
        gather_list[0].copy_(tensor)
        return
    stage = staging.Stage(g)
    outs = [stage.into(t) for t in gather_list] if g.rank == dst else None
    host = stage.out(tensor)
    stage.ready()
    dist.gather(host, outs, dst=g.global_rank(dst), group=g.pg)
    stage.finish()


def broadcast(tensor, src: int, group=None) -> None:
    """Every rank's ``tensor`` becomes rank ``src``'s (a group rank), in place. Not counted
    (module docstring)."""
    g = resolve_group(group)
    _check_tensor("broadcast", "tensor", tensor)
    _check_root("broadcast", "src", src, g)
    if not g.distributed:
        return
    stage = staging.Stage(g)
    host = stage.out(tensor) if g.rank == src else stage.into(tensor)
    stage.ready()
    dist.broadcast(host, src=g.global_rank(src), group=g.pg)
    stage.finish()
