"""``schedule="ulysses"``: all-to-all from sequence-sharded to head-sharded, attention over the
whole sequence, all-to-all back (DeepSpeed-Ulysses).

Rank ``p`` gets query heads ``[p * Hq/n, (p+1) * Hq/n)`` of every rank's tokens (``Hq % n ==
0``) and the KV heads those query heads use: ``[p*Hq/n // G, ((p+1)*Hq/n - 1) // G]`` with ``G
= Hq / Hkv``. When ``Hkv`` is smaller than ``n`` (or does not divide it) a KV head is needed by
several ranks and travels to each of them (repetition; never split along the head dim); the
backward sends each copy's gradient back and the owner sums them. Where a rank's query heads do
not map onto its KV heads in equal groups (e.g. ``Hq = 24, Hkv = 6, n = 8``: rank 1 has query
heads 3, 4, 5 on KV heads 0, 1, 1) the local attention runs as up to three calls, each on KV
heads with equal groups (:func:`head_segments`). KV heads are never repeated locally: a
repeated KV head's gradient would be rounded to the input dtype once per copy before the copies
are summed (a bfloat16 error that grows with the number of ranks:
hamilton/tests/test_hamilton_dense_precision.py), and the copies would cost memory.

Causal attention takes the zigzag layout of :func:`longattn.hamilton.shard`: after the
all-to-all the tokens are permuted locally into global order, attended causally, and permuted
back. Memory per rank: q, k, v, out of the whole sequence for ``Hq/n`` query heads (and their
KV heads), kept for the backward.
"""

from __future__ import annotations

import torch

from longattn.common import layout
from longattn.common.kernels import attention
from longattn.hamilton.collectives import to_heads, to_seq


def head_ranges(hq: int, hkv: int, n: int) -> tuple:
    """``(q_ranges, kv_ranges)``: per rank the ``(lo, hi)`` query and KV heads it gets."""
    per, grp = hq // n, hq // hkv
    q_ranges = tuple((p * per, (p + 1) * per) for p in range(n))
    kv_ranges = tuple((p * per // grp, ((p + 1) * per - 1) // grp + 1) for p in range(n))
    return q_ranges, kv_ranges


def head_segments(hq: int, hkv: int, n: int, rank: int) -> tuple:
    """This rank's local attention calls after the all-to-all: ``((q_lo, q_hi), (kv_lo,
    kv_hi))`` local head ranges that tile its query and KV heads, each with the same number of
    query heads on every KV head of the call (GQA as is). One call when the rank's heads are
    such; else one per run of KV heads with equal counts (at most three: a partial group at
    each end, the full groups between)."""
    per, grp = hq // n, hq // hkv
    kv = [(rank * per + i) // grp for i in range(per)]  # the KV head of each query head
    counts = [kv.count(j) for j in range(kv[0], kv[-1] + 1)]
    segs, q0, j0 = [], 0, 0
    for j in range(1, len(counts) + 1):
        if j == len(counts) or counts[j] != counts[j0]:
            q1 = q0 + counts[j0] * (j - j0)
            segs.append(((q0, q1), (j0, j)))
            q0, j0 = q1, j
    return tuple(segs)


def specs(hq, hkv, n):
    """The :func:`to_heads` specs of q, k, v (``[B, L, H, D]``) and of out, lse."""
    qr, kvr = head_ranges(hq, hkv, n)
    return ((qr, 1, 2, hq), (kvr, 1, 2, hkv), (kvr, 1, 2, hkv)), ((qr, 1, 2, hq), (qr, 2, 1, hq))


def _heads(x, r):
    """Heads ``r = (lo, hi)`` of a ``[B, S, H, D]`` tensor, contiguous (a kernel's input)."""
    return x[:, :, r[0]:r[1]].contiguous()


def around_heads(q, k, v, g, attend, return_lse):
    """All-to-all to heads, ``attend(qh, kh, vh) -> (out, lse)`` for each local call of
    :func:`head_segments` (their outputs joined along heads), all-to-all back. The lse travels
    back only with ``return_lse`` (else None is returned for it)."""
    hq, hkv = q.shape[2], k.shape[2]
    spec_in, spec_out = specs(hq, hkv, g.size)
    qh, kh, vh = to_heads(g, spec_in, q, k, v)
    segs = head_segments(hq, hkv, g.size, g.rank)
    if len(segs) == 1:
        out_h, lse_h = attend(qh, kh, vh)
    else:
        parts = [attend(_heads(qh, qr), *(_heads(t, kr) for t in (kh, vh)))
                 for qr, kr in segs]
        out_h = torch.cat([o for o, _ in parts], 2)
        lse_h = torch.cat([lse for _, lse in parts], 1)
    if return_lse:
        return to_seq(g, spec_out, out_h, lse_h)
    return to_seq(g, spec_out[:1], out_h)[0], None


def _global_order(n, length, device):
    """Index of the rank-order concatenation of zigzag shards that puts tokens in global order,
    and its inverse."""
    pos = torch.cat([layout.positions(n * length, p, n, "zigzag") for p in range(n)])
    return torch.argsort(pos).to(device), pos.to(device)


def ulysses_attention(q, k, v, g, *, causal, softmax_scale, backend, return_lse):
    """``(out, lse or None)`` of this rank's tokens (module docstring); differentiable."""
    n = g.size

    def attend(qh, kh, vh):
        if not causal or n == 1:
            return attention(qh, kh, vh, softmax_scale=softmax_scale, causal=causal,
                             return_lse=True, backend=backend)
        to_glob, back = _global_order(n, q.shape[1], q.device)
        qg, kg, vg = (t.index_select(1, to_glob) for t in (qh, kh, vh))
        o, lse = attention(qg, kg, vg, softmax_scale=softmax_scale, causal=True,
                           return_lse=True, backend=backend)
        return o.index_select(1, back), lse.index_select(2, back)

    return around_heads(q, k, v, g, attend, return_lse)


def head_shapes(q, k, v, n, *, tokens=None) -> dict:
    """``{(query heads, KV heads): empty (q, k, v)}`` shaped like the local calls of
    :func:`head_segments` of every rank (the same on every rank, so their backends can be
    agreed on), with ``n`` times the local token counts (or ``tokens`` times): for backend
    resolution."""
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    t = n if tokens is None else tokens
    heads = sorted({(qb - qa, kb - ka) for r in range(n)
                    for (qa, qb), (ka, kb) in head_segments(hq, hkv, n, r)})
    return {(a, m): (q.new_empty(b, t * lq, a, d), k.new_empty(b, t * lk, m, d),
                     v.new_empty(b, t * lk, m, v.shape[3])) for a, m in heads}


def requests(q, k, v, n, rank, causal):
    """``(q, k, v, causal)`` shaped like the local kernel calls of every rank (local token
    counts; the same list on every rank), for backend resolution."""
    return [shapes + (causal,) for shapes in head_shapes(q, k, v, n, tokens=1).values()]
