"""What one rank does at every step of a schedule: the messages it posts and the kernel calls.

The KV block of a rank (``L`` tokens) lives in one contiguous buffer ``[L, B, Hkv*(D+Dv)]``
(token rows outermost, so any row range is one contiguous message and K / V are strided views
``[B, rows, Hkv, D]``). The buffer is cut into *units* of rows:

* non-causal: ``K`` units of ``L/K`` rows; slot ``c`` always sits in unit ``c``;
* causal (zigzag layout, the local tokens are the blocks ``r`` and ``2n-1-r``): ``2K`` units of
  ``L/(2K)`` rows; the slot at *position* ``p`` keeps its front half in unit ``p`` and its
  back half in unit ``2K-1-p``. At step ``s >= 1`` rank ``r`` orders the slots it receives so
  the ones from ranks ``o < r`` (set M: only their front half is visible, to all of r's rows)
  take positions ``0..|M|-1`` and the others (set P: both halves visible, to r's back rows)
  the rest. Then the M fronts are units ``[0, |M|)`` and the whole P slots are units
  ``[|M|, 2K-|M|)``: two contiguous ranges, two kernel calls, no copy. Work per step is
  ``|M| * L * h + |P| * (L/2) * 2h = K * L * h`` on every rank (``h`` = rows per unit).

A received slot is written straight into its place for the next step, so each transition is
one batch of point-to-point messages (slot ``c``: one message, or front + back halves as two
messages when causal with ``K > 1``) and nothing is copied per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from longattn.hamilton.schedules import Schedule, origins


@dataclass(frozen=True)
class Transfer:
    """One transition for one rank: ``sends`` / ``recvs`` are ``(peer, unit_start, unit_stop)``
    in slot order (both ends of a link list their messages in the same order)."""

    sends: tuple
    recvs: tuple


@dataclass(frozen=True)
class Call:
    """One kernel call: query rows ``"all"`` or ``"back"`` (the zigzag back half) against the
    key units ``[start, stop)`` of the current buffer, without mask."""

    rows: str
    start: int
    stop: int


@dataclass(frozen=True)
class Plan:
    """Everything rank ``rank`` does for ``schedule`` (causal or not), in buffer units.

    ``units``: units per buffer; ``own_units[i]``: which local token unit buffer unit ``i``
    holds at step 0; ``transfers[s]``: transition ``s -> s+1``; ``calls[s]``: the kernel calls
    of step ``s >= 1`` (step 0 is one call on the local q, k, v, causal when causal).
    """

    n: int
    rank: int
    num_slots: int
    causal: bool
    units: int
    own_units: tuple
    transfers: tuple
    calls: tuple


def new_buffer(rows, b, hkv, d, dv, dtype, device):
    """KV buffer ``[rows, B, Hkv*(D+Dv)]``: a row range is one contiguous message."""
    return torch.empty(rows, b, hkv * (d + dv), dtype=dtype, device=device)


def kv_views(buf, r0, r1, hkv, d):
    """K ``[B, r1-r0, Hkv, D]`` and V ``[B, r1-r0, Hkv, Dv]`` views of buffer rows (strided:
    the token stride is ``B*Hkv*(D+Dv)``, the head_dim stride 1)."""
    x = buf[r0:r1]
    kk = x[..., :hkv * d].unflatten(-1, (hkv, -1)).transpose(0, 1)
    vv = x[..., hkv * d:].unflatten(-1, (hkv, -1)).transpose(0, 1)
    return kk, vv


def _positions(o_s, rank, causal):
    """Position of each slot at one step (``o_s[c]`` = origin of slot c held by ``rank``)."""
    k = len(o_s)
    if not causal:
        return list(range(k))
    m = [c for c in range(k) if o_s[c] < rank]
    p = [c for c in range(k) if o_s[c] >= rank]
    pos = [0] * k
    for i, c in enumerate(m + p):
        pos[c] = i
    return pos


def _pieces(pos, k, causal):
    """Buffer unit ranges of the slot at position ``pos``."""
    if not causal:
        return [(pos, pos + 1)]
    if k == 1:
        return [(0, 2)]  # front and back are adjacent: one message
    return [(pos, pos + 1), (2 * k - 1 - pos, 2 * k - pos)]


@lru_cache(maxsize=256)
def make_plan(schedule: Schedule, rank: int, causal: bool) -> Plan:
    """The :class:`Plan` of ``rank`` (cached per schedule, rank and causal)."""
    n, k = schedule.n, schedule.num_slots
    o = origins(schedule)
    t = schedule.dst
    src = np.empty_like(t)
    if n > 1:  # src[s, c, t[s, c, r]] = r
        np.put_along_axis(src, t, np.broadcast_to(np.arange(n), t.shape), axis=2)
    # where each slot sits in this rank's buffer at every step (each end of a message uses
    # its own layout: the sender reads its units, the receiver writes its units)
    pos = [list(range(k))] + [_positions(o[s, :, rank], rank, causal) for s in range(1, n)]
    transfers = []
    for s in range(n - 1):
        sends, recvs = [], []
        for c in range(k):
            d, f = int(t[s, c, rank]), int(src[s, c, rank])
            sends += [(d, a, b) for a, b in _pieces(pos[s][c], k, causal)]
            recvs += [(f, a, b) for a, b in _pieces(pos[s + 1][c], k, causal)]
        transfers.append(Transfer(tuple(sends), tuple(recvs)))
    calls = [()]
    for s in range(1, n):
        if not causal:
            calls.append((Call("all", 0, k),))
            continue
        nm = int(np.sum(o[s, :, rank] < rank))
        step = []
        if nm:
            step.append(Call("all", 0, nm))
        if nm < k:
            step.append(Call("back", nm, 2 * k - nm))
        calls.append(tuple(step))
    units = 2 * k if causal else k
    own = tuple(range(k)) + (tuple(range(2 * k - 1, k - 1, -1)) if causal else ())
    return Plan(n, rank, k, causal, units, own, tuple(transfers), tuple(calls))


def unit_labels(schedule: Schedule, causal: bool):
    """Symbolic run of every rank's plan: ``labels[s][r][u] = (origin, origin_unit)`` says that
    unit ``u`` of rank ``r``'s buffer at step ``s`` holds unit ``origin_unit`` of rank
    ``origin``'s step-0 buffer (whose local tokens are ``own_units[origin_unit]``). Used by the
    benchmark to feed single-GPU step sequences with the data a real run would hold."""
    n = schedule.n
    plans = [make_plan(schedule, r, causal) for r in range(n)]
    units = plans[0].units
    bufs = [[(r, u) for u in range(units)] for r in range(n)]
    labels = [bufs]
    for s in range(n - 1):
        msgs = {}
        for r in range(n):
            for peer, a, b in plans[r].transfers[s].sends:
                msgs.setdefault((r, peer), []).append(bufs[r][a:b])
        new = [[None] * units for _ in range(n)]
        for r in range(n):
            for peer, a, b in plans[r].transfers[s].recvs:
                new[r][a:b] = msgs[(peer, r)].pop(0)
        bufs = new
        labels.append(bufs)
    return labels
