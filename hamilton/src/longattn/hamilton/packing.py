"""Packed documents (``cu_seqlens``): the balanced layout, the pad helpers, and each rank's plan.

A packed sequence of ``T`` tokens holds documents ``cu_seqlens = [0, e_1, ..., T]``; attention
stays inside each document (causal inside it with ``causal=True``).

**Layout** (:func:`packed_layout`). ``T`` must be divisible by the group size ``n`` (every rank
holds ``L = T / n`` tokens; :func:`pad_packed` pads the rest). The sequence is cut into
``n * m`` equal *chunks* and each rank gets ``m`` of them, in increasing token order. The work
of a chunk is the number of (query, key) pairs its queries see: a query at position ``p`` of
its document sees ``p + 1`` keys when causal, the whole document otherwise. ``m`` is the
smallest divisor of ``L`` up to :data:`MAX_CHUNKS_PER_RANK` whose assignment leaves no rank
more than ``tolerance`` (5%) above the mean work (else the most balanced one): ``m = 1`` is
the contiguous layout (documents stay whole, only the ones crossing a rank boundary need
another rank); larger ``m`` assign the chunks heaviest first to the least loaded rank that
still has room, which for one causal document and ``m = 2`` is exactly the zigzag layout.

**Plan** (:func:`make_packed_plan`). A rank's tokens form *segments*: maximal runs of one
document that are consecutive in the packed sequence. A key of another rank is visible to a
segment iff it is in the same document (and, causal, before the segment's first token), so
every (segment, key) pair of another rank is either fully visible or not at all. At step
``s`` the schedule gives the rank the slot ``c`` of rank ``origin[s, c]`` (each rank's ``L``
tokens cut into ``num_slots`` slots); the origin sends it *directly* the rows of that slot
that some query of the rank sees, and nothing when there are none. One varlen kernel call per
step covers every segment (its keys gathered from the received rows, bottom-right causal on the
diagonal step 0), on the row range of the segments that see any key; a step that receives no
row makes no call. The backward sends the same rows again (except for the last step, whose
buffer the forward keeps) and returns their dK/dV to the origin.

**All-gather plan** (:func:`make_allgather_plan`, ``schedule="allgather"``). Same layout; every
rank's rows are gathered (origin order: row ``p * L + i`` is rank ``p``'s local row ``i``) and
the rank makes ONE varlen call: each of its segments against its document's keys from the
document's start to the segment's end (causal: bottom-right aligned, the segment is the last
of its keys) or the whole document, gathered by ``kidx`` into one packed key buffer (a key
several segments see is gathered once for each; keys no query of the rank sees are not
gathered). Execution: :mod:`longattn.hamilton.packed_allgather`.

**Counts that predict a plan's time** (both plans): ``kernel_calls``, ``segment_steps``
((segment, call) pairs whose call gives the segment keys), ``tiles()`` (``128 x 128`` (query,
key) tiles the calls visit, :func:`call_tiles`) and ``query_rows`` (rows the calls cover).
"""

from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from longattn.common.checks import check_cu_seqlens
from longattn.common.kernels.rows import distinct_layers
from longattn.hamilton.schedules import Schedule, origins

MAX_CHUNKS_PER_RANK = 64
"""The finest layout :func:`packed_layout` tries: ``m`` chunks per rank, ``m <= 64`` (more
chunks cut more documents across ranks and fragment the kernel calls)."""

TOLERANCE = 0.05
"""Default ``tolerance`` of :func:`packed_layout`: the largest rank's work may exceed the mean
by 5% (not tuned: the share of the ideal rate a rank may lose to imbalance)."""

TILE = 128
"""The edge of the (query, key) tiles :func:`call_tiles` counts: 128 x 128, a unit of the time
model of the plans' counts (not any kernel's block size, which differ by kernel and
direction)."""


# ---------------------------------------------------------------------------------------------
# cu_seqlens


def check_packed_cu_seqlens(cu_seqlens, total: int, what: str = "") -> tuple:
    """``cu_seqlens`` as a tuple of ints: an int32 1-D tensor ``[num_docs + 1]`` starting at 0,
    non-decreasing, ending at ``total`` (``what`` says where ``total`` comes from)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)
        raise TypeError(f"cu_seqlens must be an int32 torch.Tensor [num_docs + 1] (the global "
                        f"cumulative document lengths), got {got}")
    if cu_seqlens.ndim == 1 and cu_seqlens.numel() >= 2 and int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must end at the packed sequence's total length {total}"
                         f"{what}, got {int(cu_seqlens[-1])}")
    return tuple(check_cu_seqlens(cu_seqlens, total, "cu_seqlens"))


def as_cu(cu_seqlens) -> tuple:
    """A checked tuple from an int32 tensor (a tuple passes through: already checked)."""
    if isinstance(cu_seqlens, tuple):
        return cu_seqlens
    ok = isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.ndim == 1 and cu_seqlens.numel()
    return check_packed_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if ok else 0)


def cu_field(cu: tuple) -> tuple:
    """What the ranks agree on for ``cu_seqlens``: (number of documents, total, CRC-32)."""
    return (len(cu) - 1, cu[-1], zlib.crc32(np.asarray(cu, dtype=np.int64).tobytes()))


def check_divisible(total: int, n: int) -> None:
    if total % n:
        raise ValueError(f"the total length of cu_seqlens must be divisible by the group size "
                         f"{n}, got {total}; pad it with longattn.hamilton.pad_packed(x, "
                         f"cu_seqlens, multiple={n})")


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, multiple: int, *, dim: int = 1):
    """``(x_padded, cu_seqlens_padded)``: ``x`` padded with zeros along ``dim`` to a multiple of
    ``multiple`` tokens, the padding as one-token documents (each sees only itself, so it costs
    one (query, key) pair per token and never crosses a rank). Drop the padded rows of the
    output with :func:`unpad_packed`. ``multiple``: the group size at least; ``64 * n`` lets
    :func:`packed_layout` try every chunk count up to :data:`MAX_CHUNKS_PER_RANK` that is a
    power of two."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int in [-{x.ndim}, {x.ndim}), got {dim!r}")
    total = x.shape[dim]
    cu = check_packed_cu_seqlens(cu_seqlens, total, f" (x.shape[{dim}])")
    pad = -total % multiple
    shape = list(x.shape)
    shape[dim] = pad
    xp = torch.cat([x, x.new_zeros(shape)], dim=dim)
    cup = torch.tensor(list(cu) + [total + i for i in range(1, pad + 1)], dtype=torch.int32,
                       device=cu_seqlens.device)
    return xp, cup


def unpad_packed(x: torch.Tensor, total: int, *, dim: int = 1) -> torch.Tensor:
    """The first ``total`` tokens of ``x`` along ``dim`` (undoes :func:`pad_packed`)."""
    return x.narrow(dim, 0, total)


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class PackedLayout:
    """``n`` ranks, ``total`` tokens in chunks of ``chunk`` tokens; ``owner[j]`` is the rank of
    chunk ``j``; ``imbalance`` = largest rank work / mean - 1."""

    n: int
    total: int
    causal: bool
    chunk: int
    owner: tuple
    imbalance: float

    @property
    def chunks_per_rank(self) -> int:
        return self.total // (self.n * self.chunk)

    def chunks_of(self, rank: int) -> list:
        return [j for j, r in enumerate(self.owner) if r == rank]

    def positions(self, rank: int) -> np.ndarray:
        """Global token indices rank ``rank`` holds, in local order (increasing)."""
        c = self.chunk
        return np.concatenate([np.arange(j * c, (j + 1) * c) for j in self.chunks_of(rank)])


def token_work(cu: tuple, causal: bool) -> np.ndarray:
    """(query, key) pairs each token's query sees: its position in its document + 1 (causal)
    or its document's length."""
    lens = np.diff(np.asarray(cu, dtype=np.int64))
    if not causal:
        return np.repeat(lens, lens)
    starts = np.repeat(np.asarray(cu[:-1], dtype=np.int64), lens)
    return np.arange(cu[-1], dtype=np.int64) - starts + 1


def _assign(work: np.ndarray, n: int, m: int) -> list:
    """Heaviest chunk first to the least loaded rank (lowest rank on ties) with room."""
    if m == 1:
        return list(range(n))
    owner = [0] * len(work)
    heap = [(0, r, 0) for r in range(n)]
    for j in sorted(range(len(work)), key=lambda j: (-work[j], j)):
        load, r, cnt = heapq.heappop(heap)
        owner[j] = r
        if cnt + 1 < m:
            heapq.heappush(heap, (load + int(work[j]), r, cnt + 1))
    return owner


def _imbalance(work, owner, n):
    loads = np.zeros(n, dtype=np.float64)
    np.add.at(loads, np.asarray(owner), work)
    return float(loads.max() / loads.mean() - 1.0)


@lru_cache(maxsize=64)
def _layout(cu: tuple, n: int, causal: bool, tolerance: float) -> PackedLayout:
    total = cu[-1]
    per = total // n
    prefix = np.concatenate([[0], np.cumsum(token_work(cu, causal))])
    best = None
    for m in (m for m in range(1, min(per, MAX_CHUNKS_PER_RANK) + 1) if per % m == 0):
        c = per // m
        work = prefix[c::c] - prefix[:-1:c][: n * m]
        owner = _assign(work, n, m)
        lay = PackedLayout(n, total, causal, c, tuple(owner), _imbalance(work, owner, n))
        if best is None or lay.imbalance < best.imbalance:
            best = lay
        if lay.imbalance <= tolerance:
            return lay
    return best


def packed_layout(cu_seqlens, n: int, causal: bool, *, tolerance: float = TOLERANCE):
    """The :class:`PackedLayout` of a packed sequence over ``n`` ranks (module docstring).
    ``cu_seqlens``: an int32 tensor or a tuple of ints; the total must be divisible by ``n``."""
    cu = as_cu(cu_seqlens)
    check_divisible(cu[-1], n)
    if cu[-1] == 0:
        raise ValueError("cu_seqlens describes no token")
    return _layout(cu, n, bool(causal), float(tolerance))


# ---------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class KernelCall:
    """One varlen call: query rows ``[r0, r1)`` (segments ``cu_q``, relative to ``r0``) against
    the step's KV rows ``kidx`` (None: all of them in order), keys per segment ``cu_k``."""

    r0: int
    r1: int
    cu_q: tuple
    cu_k: tuple
    kidx: np.ndarray | None
    causal: bool
    pairs: int  # (query, key) pairs the call computes

    def tensors(self, device):
        """``(cu_q, cu_k, kidx)`` as tensors (cu on the CPU, kidx on ``device``)."""
        return _call_tensors(self.cu_q, self.cu_k, self.kidx, device)

    @property
    def query_rows(self) -> int:
        return self.r1 - self.r0

    @property
    def segments_with_keys(self) -> int:
        return int(np.count_nonzero(np.diff(self.cu_k)))

    def tiles(self, tile: int = TILE) -> int:
        """:func:`call_tiles` of this call."""
        return call_tiles(self.cu_q, self.cu_k, self.causal, tile)


def _call_tensors(cu_q, cu_k, kidx, device):
    cq = torch.tensor(cu_q, dtype=torch.int32)
    ck = torch.tensor(cu_k, dtype=torch.int32)
    ki = None if kidx is None else torch.from_numpy(kidx).to(device)
    return cq, ck, ki


def call_tiles(cu_q, cu_k, causal: bool, tile: int = TILE) -> int:
    """The ``tile x tile`` (query, key) tiles a varlen call with these ``cu_seqlens`` visits:
    per sequence of ``lq`` queries and ``nk`` keys, each block of ``tile`` query rows times the
    key blocks up to the last key its last row sees (``causal``: bottom-right aligned, row
    ``i`` sees keys ``0 .. i + nk - lq``; else all ``nk``). A sequence without queries or keys
    has none."""
    lq = np.diff(np.asarray(cu_q, dtype=np.int64))
    nk = np.diff(np.asarray(cu_k, dtype=np.int64))
    live = (lq > 0) & (nk > 0)
    lq, nk = lq[live], nk[live]
    if not causal:
        return int(np.sum(-(-lq // tile) * -(-nk // tile)))
    nb = -(-lq // tile)  # query blocks per sequence
    s = np.repeat(np.arange(len(lq)), nb)
    i = np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)
    last = np.minimum((i + 1) * tile, lq[s]) - 1  # the block's last row
    seen = np.clip(last + nk[s] - lq[s] + 1, 0, nk[s])
    return int(np.sum(-(-seen // tile)))


@dataclass(frozen=True)
class PackedStep:
    """Step ``s``: ``recvs`` ``(origin, rows, offset)`` into the step's KV buffer of ``rows``
    rows, ``sends`` ``(holder, local_rows)`` of this rank's own rows, one per nonempty slot in
    slot order; ``call`` the kernel call (None: no query of this rank sees any received row)."""

    recvs: tuple
    sends: tuple
    rows: int
    call: KernelCall | None


@dataclass(frozen=True, eq=False)
class PackedPlan:
    """Everything one rank does for a packed call. ``steps[0]`` is the local (diagonal) step.

    Counts: ``blocks`` the (step >= 1, slot) blocks this rank is given by the schedule (nonempty
    slots), ``blocks_sent`` those that arrive with at least one visible row, ``blocks_skipped``
    the rest (neither sent nor computed); ``rows_received`` the KV rows that arrive in the
    forward; ``kernel_calls`` and ``pairs`` the forward's varlen calls and the (query, key)
    pairs they compute (each backward makes the same calls); the counts that predict the
    calls' time: ``segment_steps``, ``tiles()`` and ``query_rows``."""

    n: int
    rank: int
    causal: bool
    layout: PackedLayout
    steps: tuple
    blocks: int
    blocks_sent: int
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def blocks_skipped(self) -> int:
        return self.blocks - self.blocks_sent

    @property
    def rows_received(self) -> int:
        return sum(st.rows for st in self.steps[1:])

    @property
    def rows_sent(self) -> int:
        return sum(len(idx) for st in self.steps[1:] for _, idx in st.sends)

    @property
    def kernel_calls(self) -> int:
        return sum(st.call is not None for st in self.steps)

    @property
    def pairs(self) -> int:
        return sum(st.call.pairs for st in self.steps if st.call is not None)

    @property
    def segment_steps(self) -> int:
        """(segment, step) pairs whose call gives the segment at least one key."""
        return sum(st.call.segments_with_keys for st in self.steps if st.call is not None)

    @property
    def query_rows(self) -> int:
        """Query rows of the forward's calls (the row ranges they cover)."""
        return sum(st.call.query_rows for st in self.steps if st.call is not None)

    def tiles(self, tile: int = TILE) -> int:
        """The ``tile x tile`` tiles of the forward's calls (:func:`call_tiles`)."""
        return sum(st.call.tiles(tile) for st in self.steps if st.call is not None)

    def call_tensors(self, s: int, device):
        """The cached :meth:`KernelCall.tensors` of step ``s`` on ``device``."""
        key = (s, str(device))
        if key not in self._tensors:
            self._tensors[key] = self.steps[s].call.tensors(device)
        return self._tensors[key]

    def send_index(self, s: int, i: int, device):
        """The local rows of send ``i`` of step ``s`` as an index tensor on ``device``."""
        key = ("send", s, i, str(device))
        if key not in self._tensors:
            self._tensors[key] = torch.from_numpy(self.steps[s].sends[i][1]).to(device)
        return self._tensors[key]


@dataclass(frozen=True)
class _Rank:
    pos: np.ndarray  # global positions, local order
    doc: np.ndarray  # document of each local token
    seg: np.ndarray  # segment boundaries (local rows), [num_segments + 1]
    last: np.ndarray  # last global position of each document on this rank (-1: none)


def _rank_info(layout, docs, rank, ndocs):
    pos = layout.positions(rank)
    doc = docs[pos]
    cut = np.flatnonzero((np.diff(doc) != 0) | (np.diff(pos) != 1)) + 1
    seg = np.concatenate([[0], cut, [len(pos)]])
    last = np.full(ndocs, -1, dtype=np.int64)
    np.maximum.at(last, doc[seg[1:] - 1], pos[seg[1:] - 1])
    return _Rank(pos, doc, seg, last)


def _visible(src: _Rank, dst: _Rank, rows: np.ndarray, causal: bool) -> np.ndarray:
    """The rows (local to ``src``, another rank) that some query of ``dst`` sees."""
    last = dst.last[src.doc[rows]]
    keep = last > src.pos[rows] if causal else last >= 0
    return rows[keep]


def _call(me: _Rank, kpos, kdoc, total, causal, diag) -> KernelCall | None:
    """The varlen call of this rank's segments against keys at ``kpos`` / ``kdoc``."""
    key = kdoc * (total + 1) + kpos
    order = np.argsort(key, kind="stable")
    skey = key[order]
    seg = me.seg
    d, a, b = me.doc[seg[:-1]], me.pos[seg[:-1]], me.pos[seg[1:] - 1] + 1
    lo = np.searchsorted(skey, d * (total + 1))
    if causal:  # keys before the segment's first token (and, on the diagonal, the segment)
        hi = np.searchsorted(skey, d * (total + 1) + (b if diag else a))
    else:
        hi = np.searchsorted(skey, (d + 1) * (total + 1))
    nk = hi - lo
    live = np.flatnonzero(nk > 0)
    if not len(live):
        return None
    first, stop = live[0], live[-1] + 1
    kidx = np.concatenate([order[lo[i]:hi[i]] for i in range(first, stop)])
    lq = np.diff(seg)[first:stop]
    nk = nk[first:stop]
    pairs = _pairs(lq, nk, diag and causal)
    cu_q = tuple(int(x) for x in np.concatenate([[0], np.cumsum(lq)]))
    cu_k = tuple(int(x) for x in np.concatenate([[0], np.cumsum(nk)]))
    if len(kidx) == len(kpos) and np.array_equal(kidx, np.arange(len(kpos))):
        kidx = None
    return KernelCall(int(seg[first]), int(seg[stop]), cu_q, cu_k, kidx, causal and diag, pairs)


def _pairs(lq, nk, causal: bool) -> int:
    """(query, key) pairs of a varlen call of ``lq`` queries and ``nk`` keys per sequence:
    bottom-right causal (``lq <= nk``) or all of them."""
    if causal:
        return int(np.sum(lq * (nk - lq) + lq * (lq + 1) // 2))
    return int(np.sum(lq * nk))


def _slot_rows(per: int, k: int, c: int) -> np.ndarray:
    return np.arange(c * per // k, (c + 1) * per // k)


@lru_cache(maxsize=128)
def _plan(cu: tuple, n: int, rank: int, causal: bool, schedule: Schedule,
          tolerance: float) -> PackedPlan:
    layout = _layout(cu, n, causal, tolerance)
    total, per, k = cu[-1], cu[-1] // n, schedule.num_slots
    lens = np.diff(np.asarray(cu, dtype=np.int64))
    docs = np.repeat(np.arange(len(lens)), lens)
    info = {}

    def get(r):
        if r not in info:
            info[r] = _rank_info(layout, docs, r, len(lens))
        return info[r]

    me = get(rank)
    steps = [PackedStep((), (), 0, _call(me, me.pos, me.doc, total, causal, True))]
    o = origins(schedule)
    holder = np.argsort(o, axis=2)  # holder[s, c, origin]: who holds origin's slot c at step s
    blocks = sent = 0
    for s in range(1, n):
        recvs, sends, bufs, off = [], [], [], 0
        for c in range(k):
            rows = _slot_rows(per, k, c)
            src = get(int(o[s, c, rank]))
            vis = _visible(src, me, rows, causal)
            blocks += len(rows) > 0
            if len(vis):
                sent += 1
                recvs.append((int(o[s, c, rank]), len(vis), off))
                bufs.append((src.pos[vis], src.doc[vis]))
                off += len(vis)
            h = int(holder[s, c, rank])
            out = _visible(me, get(h), rows, causal)
            if len(out):
                sends.append((h, out))
        call = None
        if bufs:
            kpos = np.concatenate([p for p, _ in bufs])
            kdoc = np.concatenate([d for _, d in bufs])
            call = _call(me, kpos, kdoc, total, causal, False)
        steps.append(PackedStep(tuple(recvs), tuple(sends), off, call))
    return PackedPlan(n, rank, causal, layout, tuple(steps), blocks, sent)


def make_packed_plan(cu_seqlens, n: int, rank: int, causal: bool, schedule: Schedule, *,
                     tolerance: float = TOLERANCE) -> PackedPlan:
    """The :class:`PackedPlan` of ``rank`` (cached per ``cu_seqlens``, ``n``, ``rank``,
    ``causal``, schedule): the same on every rank for the same arguments, so both ends of every
    message know its size."""
    cu = as_cu(cu_seqlens)
    packed_layout(cu, n, causal, tolerance=tolerance)
    if schedule.n != n:
        raise ValueError(f"schedule {schedule.name!r} is for {schedule.n} ranks, not {n}")
    return _plan(cu, n, rank, bool(causal), schedule, float(tolerance))


# ---------------------------------------------------------------------------------------------
# schedule="allgather": one call per rank


@dataclass(frozen=True, eq=False)
class AllgatherPlan:
    """One rank's packed call with ``schedule="allgather"``: every rank's K/V rows gathered
    into one buffer in *origin order* (row ``p * L + i`` is rank ``p``'s local row ``i``), then
    ONE varlen call: query segments ``cu_q`` (local rows, every row of the rank) against, per
    segment, the keys ``cu_k`` gathered from the buffer by ``kidx`` (None: the buffer itself,
    in order) -- its document's keys from the document's start to the segment's end
    (``causal``, bottom-right aligned) or the whole document.

    Only the rows some key of the call comes from travel: ``rows_from[p]``, the local rows of
    rank ``p``'s share this rank's keys come from (sorted; the distinct rows of ``kidx``), which
    ``p`` sends in the forward and gets the dK/dV of in the backward; ``rows_to[q]``, the rows
    of this rank's share rank ``q``'s keys come from (the same from ``q``'s side; every plan is
    a pure function of ``cu_seqlens``, so each rank knows the others' without a message).
    The rank's buffer holds ``rows_from[0]``, ``rows_from[1]``, ... one after the other
    (:meth:`route_tensors`).

    Counts: ``pairs`` the (query, key) pairs the call computes, ``keys`` the rows of the packed
    key buffer (a key several segments see is gathered once for each), ``rows_received`` /
    ``rows_sent`` the K/V rows that arrive / leave in the forward (the dK/dV rows leave /
    arrive in the backward), and those of :class:`PackedPlan`: ``kernel_calls`` (1),
    ``segment_steps`` (the segments), ``tiles()`` and ``query_rows`` (``L``)."""

    n: int
    rank: int
    causal: bool
    layout: PackedLayout
    cu_q: tuple
    cu_k: tuple
    kidx: np.ndarray | None
    pairs: int
    rows_from: tuple = field(repr=False)  # per owner p: rows of p's share this rank's keys use
    rows_to: tuple = field(repr=False)  # per rank q: rows of this rank's share q's keys use
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rows(self) -> int:
        """Local rows (``L``)."""
        return self.layout.total // self.n

    @property
    def rows_received(self) -> int:
        """K/V rows that arrive in the forward (from the other ranks): as many dK/dV rows
        leave in the backward."""
        return sum(len(r) for p, r in enumerate(self.rows_from) if p != self.rank)

    @property
    def rows_sent(self) -> int:
        """K/V rows sent in the forward (to the other ranks): as many dK/dV rows arrive in the
        backward."""
        return sum(len(r) for q, r in enumerate(self.rows_to) if q != self.rank)

    def route_tensors(self, device):
        """``(inverse, offsets, rows_to)``: the row of the rank's buffer each packed key comes
        from (None: the keys are the buffer itself, in order), owner ``p``'s slice of that
        buffer (``offsets[p]:offsets[p + 1]``, ``rows_from[p]``) and :attr:`rows_to` as index
        tensors (on ``device``), cached."""
        key = ("routes", str(device))
        if key not in self._tensors:
            inv = None
            if self.kidx is not None:
                inv = torch.from_numpy(np.unique(self.kidx, return_inverse=True)[1]
                                       .reshape(-1)).to(device)
            off = np.concatenate([[0], np.cumsum([len(r) for r in self.rows_from])])
            to = tuple(torch.from_numpy(r).to(device) for r in self.rows_to)
            self._tensors[key] = (inv, tuple(int(x) for x in off), to)
        return self._tensors[key]

    @property
    def keys(self) -> int:
        return self.cu_k[-1]

    @property
    def kernel_calls(self) -> int:
        return 1

    @property
    def segment_steps(self) -> int:
        return len(self.cu_q) - 1

    @property
    def query_rows(self) -> int:
        return self.cu_q[-1]

    def tiles(self, tile: int = TILE) -> int:
        return call_tiles(self.cu_q, self.cu_k, self.causal, tile)

    def tensors(self, device):
        """``(cu_q, cu_k)`` as tensors (on the CPU), cached; the keys are gathered through
        :meth:`route_tensors`."""
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = _call_tensors(self.cu_q, self.cu_k, None, device)[:2]
        return self._tensors[key]

    def scatter_layers(self, past: bool, device):
        """``(layers, bare, own_layers)`` for summing key gradients onto the rows of the
        rank's buffer (:func:`longattn.common.kernels.rows.distinct_layers` of each key's row:
        the packed key buffer's, or with ``past`` the causal backward's unmasked call's), as
        ``[(positions, rows), ...]`` index tensors on ``device``; ``bare``: the buffer rows no
        such key reaches (they are zero). With ``past`` the keys of the rank's own rows go to
        its local rows instead (``own_layers``, rows local; None without ``past``) and
        ``layers`` reaches only the other owners' rows, every one of them; cached."""
        key = ("layers", bool(past), str(device))
        if key not in self._tensors:
            off = self.route_tensors("cpu")[1]
            if past:
                rows = self.past_tensors("cpu")[2].numpy()
            else:
                inv = self.route_tensors("cpu")[0]
                rows = np.arange(self.keys) if inv is None else inv.numpy()
            pos = np.arange(len(rows))
            mine = np.zeros(len(rows), bool)
            if past:
                mine = (rows >= off[self.rank]) & (rows < off[self.rank + 1])
                slots = np.setdiff1d(np.arange(off[-1]), np.arange(off[self.rank],
                                                                   off[self.rank + 1]))
            else:
                slots = np.arange(off[-1])

            def tensors(p, r):
                return [(torch.from_numpy(pos[p][q]).to(device), torch.from_numpy(rr).to(device))
                        for q, rr in distinct_layers(r)]

            own_layers = None
            if past:
                local = self.rows_from[self.rank][rows[mine] - off[self.rank]]
                own_layers = tensors(mine, local)
            bare = np.setdiff1d(slots, rows[~mine])
            self._tensors[key] = (tensors(~mine, rows[~mine]), torch.from_numpy(bare).to(device),
                                  own_layers)
        return self._tensors[key]

    @property
    def cu_past(self) -> tuple:
        """Causal: per segment, the keys before its own rows (its document's start up to the
        segment's first row; the segment's last ``lq`` keys are its own rows, the rank's local
        rows ``cu_q[j]:cu_q[j + 1]``) as ``cu_seqlens`` (zero-length where the document starts
        in the segment). The backward runs the causal call as two: each segment against its
        own rows (square, so the band is top-left aligned) and, without a mask, against these
        keys; cuDNN's backward is much slower with a bottom-right aligned band."""
        if not self.causal:
            raise ValueError("cu_past is the causal plan's split; this plan is not causal")
        nk = np.diff(np.asarray(self.cu_k, dtype=np.int64)) - np.diff(self.cu_q)
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(nk)]))

    @property
    def past_keys(self) -> int:
        """Causal: the keys of the backward's unmasked call (:attr:`cu_past`)."""
        return self.cu_past[-1]

    def past_tensors(self, device):
        """``(cu_past, key_pos, inv)``: :attr:`cu_past` (on the CPU), each past key's position
        in the packed key buffer and its row of the rank's buffer (:meth:`route_tensors`),
        both on ``device``; cached."""
        key = ("past", str(device))
        if key not in self._tensors:
            cp = self.cu_past
            lp = np.diff(np.asarray(cp, dtype=np.int64))
            starts = np.repeat(np.asarray(self.cu_k[:-1], dtype=np.int64) - cp[:-1], lp)
            pos = np.arange(cp[-1], dtype=np.int64) + starts
            inv = self.route_tensors("cpu")[0]
            rows = pos if inv is None else inv.numpy()[pos]
            self._tensors[key] = (torch.tensor(cp, dtype=torch.int32),
                                  torch.from_numpy(pos).to(device),
                                  torch.from_numpy(np.ascontiguousarray(rows)).to(device))
        return self._tensors[key]


@lru_cache(maxsize=128)
def _allgather_plan(cu: tuple, n: int, rank: int, causal: bool,
                    tolerance: float) -> AllgatherPlan:
    layout, seg, cu_k, kidx, pairs = _allgather_call(cu, n, rank, causal, tolerance)
    per = cu[-1] // n

    def touched(r):  # the distinct gathered rows rank r's keys come from, sorted
        ki = _allgather_call(cu, n, r, causal, tolerance)[3]
        return np.arange(n * per) if ki is None else np.unique(ki)

    def share(rows, p):
        return rows[(rows >= p * per) & (rows < (p + 1) * per)] - p * per

    mine = touched(rank)
    rows_from = tuple(share(mine, p) for p in range(n))
    rows_to = tuple(rows_from[q] if q == rank else share(touched(q), rank) for q in range(n))
    return AllgatherPlan(n, rank, causal, layout, seg, cu_k, kidx, pairs, rows_from, rows_to)


@lru_cache(maxsize=128)
def _allgather_call(cu: tuple, n: int, rank: int, causal: bool, tolerance: float):
    """``(layout, cu_q, cu_k, kidx, pairs)`` of rank ``rank``'s one call."""
    layout = _layout(cu, n, causal, tolerance)
    per = cu[-1] // n
    bounds = np.asarray(cu, dtype=np.int64)
    lens = np.diff(bounds)
    me = _rank_info(layout, np.repeat(np.arange(len(lens)), lens), rank, len(lens))
    row = np.empty(cu[-1], dtype=np.int64)  # global position -> row of the gathered buffer
    for r in range(n):
        row[layout.positions(r)] = r * per + np.arange(per)
    seg = me.seg
    doc = me.doc[seg[:-1]]
    start = bounds[doc]
    stop = me.pos[seg[1:] - 1] + 1 if causal else bounds[doc + 1]
    nk, lq = stop - start, np.diff(seg)
    # the key positions: segment j's range [start_j, stop_j), the ranges one after the other
    kpos = np.arange(int(nk.sum())) - np.repeat(np.cumsum(nk) - nk - start, nk)
    kidx = row[kpos]
    pairs = _pairs(lq, nk, causal)  # causal: lq <= nk, the segment is the last lq keys
    if len(kidx) == n * per and np.array_equal(kidx, np.arange(n * per)):
        kidx = None
    cu_k = tuple(int(x) for x in np.concatenate([[0], np.cumsum(nk)]))
    return layout, tuple(int(x) for x in seg), cu_k, kidx, pairs


def make_allgather_plan(cu_seqlens, n: int, rank: int, causal: bool, *,
                        tolerance: float = TOLERANCE) -> AllgatherPlan:
    """The :class:`AllgatherPlan` of ``rank`` for packed documents with
    ``schedule="allgather"`` (cached per ``cu_seqlens``, ``n``, ``rank``, ``causal``): the
    layout is :func:`packed_layout`'s, as for the step schedules."""
    cu = as_cu(cu_seqlens)
    packed_layout(cu, n, causal, tolerance=tolerance)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < n:
        raise ValueError(f"rank must be an int in [0, {n}), got {rank!r}")
    return _allgather_plan(cu, n, rank, bool(causal), float(tolerance))
