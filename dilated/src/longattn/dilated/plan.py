"""Index plans: which rows each dense kernel call of dilated attention reads and writes.

A rank holds the contiguous chunk ``[a, a + l)`` of a sequence of ``S = l * world`` tokens
(single process: ``a = 0``, ``l = S``). For each branch ``(w, r)`` the segments are
``[i*w, min((i+1)*w, S))``; query head ``h`` keeps, in each segment, the rows whose distance
from the segment start is ``h mod r`` modulo ``r``. Each sparsified segment is one dense
attention problem; problems with equal shapes become one batched kernel call (:class:`Call`).

Rows are flat indices: queries index ``q.reshape(B, l*Hq, D)`` (row ``pos*Hq + h``), keys
index a *pool* ``[B, M, D]`` = the local ``k.reshape(B, l*Hkv, D)`` followed by the sparsified
K rows received from other ranks (``recv`` order). A call's kv heads are *virtual*: one per
(kv head, offset) pair, so query heads that share a kv head but use different offsets read
different rows; query heads with the same (kv head, offset) share it (GQA inside the call).

Rows kept by no branch are never written (out 0, lse -inf). Plans are pure numpy, cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Call:
    """One batched dense attention call.

    ``strided = (start, nseg, length, r, o)``: the call reads and writes strided *views* (no
    gather): segment ``i`` of the batch starts at local position ``start + i*length``, rows
    ``o, o+r, ...`` of it, heads ``o, o+r, ...`` (all heads when ``r == 1``; used for r = 1, and
    for r > 1 when Hq == Hkv). Otherwise ``qrows [nseg, nq, C]`` and ``krows [nseg, nk, P]``
    are gather indices (see the module docstring); ``C % P == 0``. ``causal`` is bottom-right
    aligned (queries are the last ``nq`` of the ``nk`` keys when causal).
    """

    branch: int
    causal: bool
    strided: tuple | None = None
    qrows: np.ndarray | None = None
    krows: np.ndarray | None = None
    heads: tuple = ()  # strided: (query heads, kv heads) of the call

    @property
    def shape(self):
        """(nseg, nq, nk, C, P) of the kernel problem."""
        if self.strided is not None:
            _, nseg, length, r, o = self.strided
            n = len(range(o, length, r))
            return nseg, n, n, self.heads[0], self.heads[1]
        return (self.qrows.shape[0], self.qrows.shape[1], self.krows.shape[1],
                self.qrows.shape[2], self.krows.shape[2])


@dataclass
class Plan:
    """Everything one rank does for one dilated attention call."""

    calls: list
    # dst -> int64 rows of the local k.reshape(B, l*Hkv, D) to send (all branches, in order)
    send_rows: dict = field(default_factory=dict)
    # [(src, count)]: received buffers, appended to the key pool in this order
    recv: list = field(default_factory=list)
    pool_rows: int = 0  # M: local rows + received rows
    # calls[0] is strided with r = 1 and covers every local row and key: results of later
    # calls are added to what it writes (no zero-filled accumulators needed)
    first_covers: bool = False


def _positions(lo, hi, r, o):
    """Relative positions x in [lo, hi) with x % r == o."""
    first = lo + ((o - lo) % r)
    return np.arange(first, hi, r, dtype=np.int64)


def _head_groups(hq, hkv, r):
    """offset -> (query heads, virtual kv heads, group size). Query heads with the same kv head
    and offset share one virtual kv head when every kv head has equally many of them."""
    g = hq // hkv
    out = {}
    for o in range(min(r, hq)):
        heads = np.arange(o, hq, r, dtype=np.int64)
        kv = heads // g
        uniq, counts = np.unique(kv, return_counts=True)
        if np.all(counts == counts[0]):
            out[o] = (heads, uniq, int(counts[0]))
        else:
            out[o] = (heads, kv, 1)
    return out


def _segments(a, b, S, w, causal):
    """Segments meeting [a, b): (start, q_lo, q_hi, k_lo, k_hi) in absolute positions."""
    res = []
    for s in range(a // w, (b - 1) // w + 1):
        s0, s1 = s * w, min(s * w + w, S)
        qlo, qhi = max(a, s0), min(b, s1)
        klo, khi = s0, (qhi if causal else s1)
        res.append((s0, qlo, qhi, klo, khi))
    return res


def _needed_rows(S, l, dst, src, w, r, hq, hkv, causal):
    """Sorted rows of src's local k.reshape(l*Hkv) that dst needs for branch (w, r)."""
    a, b = dst * l, dst * l + l
    a2, b2 = src * l, src * l + l
    groups = _head_groups(hq, hkv, r)
    segs = _segments(a, b, S, w, causal)
    rows = []
    for s0, qlo, qhi, klo, khi in {segs[0], segs[-1]}:  # only edge segments reach others
        lo, hi = max(klo, a2), min(khi, b2)
        if lo >= hi:
            continue
        for o, (_, kvs, _) in groups.items():
            if _positions(qlo - s0, qhi - s0, r, o).size == 0:
                continue  # dst keeps no query of this offset here: it needs none of its keys
            p = s0 + _positions(lo - s0, hi - s0, r, o)
            u = np.unique(kvs)
            rows.append(((p - a2)[:, None] * hkv + u[None, :]).ravel())
    if not rows:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(rows))


@functools.lru_cache(maxsize=64)
def make_plan(S, l, rank, world, hq, hkv, segment_lengths, dilation_rates, causal) -> Plan:
    """The plan of ``rank`` (chunk ``[rank*l, rank*l + l)`` of ``S = l*world`` tokens)."""
    a, b = rank * l, rank * l + l
    # Pool layout: local rows, then per source rank (ascending) the rows of every branch.
    needs = {}  # (src, branch) -> sorted src rows
    base = {}  # (src, branch) -> offset in the pool
    recv = []
    off = l * hkv
    for src in range(world):
        if src == rank:
            continue
        cnt = 0
        for bi, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
            rows = _needed_rows(S, l, rank, src, w, r, hq, hkv, causal)
            needs[(src, bi)] = rows
            base[(src, bi)] = off + cnt
            cnt += rows.size
        if cnt:
            recv.append((src, cnt))
        off += cnt
    send_rows = {}
    for dst in range(world):
        if dst == rank:
            continue
        parts = [_needed_rows(S, l, dst, rank, w, r, hq, hkv, causal)
                 for w, r in zip(segment_lengths, dilation_rates)]
        rows = np.concatenate(parts)
        if rows.size:
            send_rows[dst] = rows

    calls = []
    for bi, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        groups = _head_groups(hq, hkv, r)
        # batch segments whose relative ranges (and locality) agree
        batches = {}
        for s0, qlo, qhi, klo, khi in _segments(a, b, S, w, causal):
            local = klo >= a and khi <= b
            key = (qlo - s0, qhi - s0, klo - s0, khi - s0, local)
            batches.setdefault(key, []).append(s0)
        for (qlo, qhi, klo, khi, local), starts in batches.items():
            starts = np.asarray(starts, dtype=np.int64)
            if local and qlo == klo == 0 and qhi == khi and (r == 1 or hq == hkv):
                # whole segments, consecutive (interior batches are): strided views
                s0 = int(starts[0] - a)
                if r == 1:
                    calls.append(Call(bi, causal, strided=(s0, starts.size, qhi, 1, 0),
                                      heads=(hq, hkv)))
                    continue
                for o in range(min(r, hq, qhi)):
                    ho = len(range(o, hq, r))
                    calls.append(Call(bi, causal, strided=(s0, starts.size, qhi, r, o),
                                      heads=(ho, ho)))
                continue
            # group offsets by call shape (nq, nk, group size)
            by_shape = {}
            for o, (_, _, c) in groups.items():
                qpos = _positions(qlo, qhi, r, o)
                if qpos.size == 0:
                    continue
                kpos = _positions(klo, khi, r, o)
                by_shape.setdefault((qpos.size, kpos.size, c), []).append((o, qpos, kpos))
            for items in by_shape.values():
                qcols, kcols = [], []  # (positions [n], head) per column
                for o, qpos, kpos in items:
                    heads, kvs, _ = groups[o]
                    qcols += [(qpos, h) for h in heads]
                    kcols += [(kpos, u) for u in kvs]
                qp = np.stack([p for p, _ in qcols], axis=1)  # [nq, C]
                qh = np.array([h for _, h in qcols], dtype=np.int64)
                qrows = (starts[:, None, None] + qp[None] - a) * hq + qh  # [nseg, nq, C]
                kp = starts[:, None, None] + np.stack([p for p, _ in kcols], axis=1)[None]
                ku = np.broadcast_to(np.array([u for _, u in kcols], dtype=np.int64), kp.shape)
                krows = (kp - a) * hkv + ku
                if not local:
                    krows = krows.copy()
                    src = np.where(kp < a, kp // l, np.where(kp >= b, kp // l, rank))
                    for s in np.unique(src):
                        if s == rank:
                            continue
                        sel = src == s
                        srow = (kp[sel] - s * l) * hkv + ku[sel]
                        ref = needs[(int(s), bi)]
                        at = np.searchsorted(ref, srow)
                        if not np.array_equal(ref[np.minimum(at, ref.size - 1)], srow):
                            raise AssertionError("plan: a remote key row was not requested")
                        krows[sel] = base[(int(s), bi)] + at
                calls.append(Call(bi, causal, qrows=qrows, krows=krows))
    covering = [i for i, c in enumerate(calls) if c.strided is not None and c.strided[3] == 1
                and c.strided[0] == 0 and c.strided[1] * c.strided[2] == l]
    if covering:
        calls.insert(0, calls.pop(covering[0]))
    return Plan(calls=calls, send_rows=send_rows, recv=recv, pool_rows=off,
                first_covers=bool(covering))
