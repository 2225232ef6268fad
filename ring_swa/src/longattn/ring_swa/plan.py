"""Which keys each rank needs from which other rank (pure Python, no communication).

Layout (contiguous): the packed token stream ``[0, total)`` is cut into consecutive pieces in
rank order; rank r holds ``[offsets[r], offsets[r+1])`` (any length >= 0). ``cu_seqlens`` is
the global sequence boundary list (flash-attn's convention, the same on every rank); the dense
API is one sequence ``[0, n*S_local)`` per batch row.

For ``window_size = w`` and ``ns`` sinks, a query at packed position p of the sequence starting
at s0 sees the keys ``[max(s0, p - w), p]`` and ``[s0, s0 + ns)`` (causal). Only the rank's
*first* local sequence can start on an earlier rank, so the keys a rank needs from others are
two intervals of that sequence:

* remote sinks ``[s0, min(s0 + ns, p0))`` -- seen by every local query of that sequence;
* the halo ``[max(s0 + ns, p0 - w), p0)`` -- the window tail, without the sinks.

Every rank computes every rank's needs from the same integers, so each one knows exactly what to
send to whom and what it will receive: no hop forwards a block nobody uses, and a rank whose
window needs nothing from a neighbour neither sends nor computes it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankPlan:
    """What one rank holds, computes and exchanges. Intervals are global ``(lo, hi)``."""

    rank: int
    start: int  # global position of the first local token
    length: int  # local tokens
    local_cu: tuple  # boundaries of the local sequence pieces, relative to ``start``
    local_sinks: tuple  # sink tokens at the start of each local piece (per piece)
    first_len: int  # tokens of the first local piece (the only one that may need remote keys)
    remote_sinks: tuple  # (lo, hi): the first piece's sinks held by earlier ranks
    halo: tuple  # (lo, hi): window keys (not sinks) held by earlier ranks
    recv: dict = field(default_factory=dict)  # src -> [(lo, hi), ...] received, in order
    send: dict = field(default_factory=dict)  # dst -> [(lo, hi), ...] sent, in order

    @property
    def num_remote_sinks(self) -> int:
        return self.remote_sinks[1] - self.remote_sinks[0]

    @property
    def num_halo(self) -> int:
        return self.halo[1] - self.halo[0]


def _first_sequence(cu, p0):
    """(start, end) of the sequence holding packed position p0 (skips empty sequences)."""
    s = bisect.bisect_right(cu, p0) - 1
    return cu[s], cu[s + 1]


def _needs(p0, p1, cu, w, ns):
    """(first_len, first-piece local sinks, remote sinks, halo) for the range [p0, p1)."""
    if p1 <= p0:
        return 0, 0, (p0, p0), (p0, p0)
    s0, end = _first_sequence(cu, p0)
    first_len = min(end, p1) - p0
    if s0 == p0:
        return first_len, min(ns, first_len), (p0, p0), (p0, p0)
    sinks = (s0, min(s0 + ns, p0))
    halo_lo = min(max(s0 + ns, p0 - w), p0)
    local_sinks = max(0, min(s0 + ns - p0, first_len))
    return first_len, local_sinks, sinks, (halo_lo, p0)


def _pieces(intervals, offsets):
    """Split global intervals by owner rank: {rank: [(lo, hi), ...]} in position order."""
    out: dict = {}
    for lo, hi in intervals:
        if hi <= lo:
            continue
        r = bisect.bisect_right(offsets, lo) - 1
        while lo < hi:
            while offsets[r + 1] <= lo:  # skip ranks holding no tokens
                r += 1
            cut = min(hi, offsets[r + 1])
            out.setdefault(r, []).append((lo, cut))
            lo = cut
            r += 1
    return out


def make_plan(offsets, cu_seqlens, window_size: int, num_sink_tokens: int = 0):
    """The plan of the whole group: one :class:`RankPlan` per rank (a list in rank order).

    ``offsets`` are the ``n + 1`` prefix sums of the per-rank token counts; ``cu_seqlens`` the
    global sequence boundaries (ending at ``offsets[-1]``); ``window_size`` the integer ``w``
    of the causal window (query p sees keys ``[p - w, p]``; pass the total token count for an
    unbounded window).
    """
    offsets = [int(o) for o in offsets]
    cu = [int(c) for c in cu_seqlens]
    w, ns = int(window_size), int(num_sink_tokens)
    n = len(offsets) - 1
    plans = []
    for r in range(n):
        p0, p1 = offsets[r], offsets[r + 1]
        first_len, first_sinks, sinks, halo = _needs(p0, p1, cu, w, ns)
        cuts = sorted({0, p1 - p0, *[c - p0 for c in cu if p0 < c < p1]})
        local_sinks = tuple([first_sinks] + [ns] * (len(cuts) - 2)) if p1 > p0 else ()
        recv = _pieces([sinks, halo], offsets)
        plans.append(RankPlan(r, p0, p1 - p0, tuple(cuts) if p1 > p0 else (0,), local_sinks,
                              first_len, sinks, halo, recv, {}))
    for p in plans:
        for src, iv in p.recv.items():
            plans[src].send[p.rank] = iv
    return plans
