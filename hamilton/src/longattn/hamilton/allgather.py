"""``schedule="allgather"``: K/V all-gathered once, local attention, dK/dV reduce-scattered.

Every rank sends its K/V shard (only the ``Hkv`` heads, K and V in one message per piece) to
every other rank in one exchange, then attends its own queries to the part of the sequence they
can see: all of it for full attention; with ``causal`` and the zigzag layout of
:func:`longattn.hamilton.shard` (rank ``r`` holds blocks ``r`` and ``2n-1-r`` of ``2n``) its
front half sees keys ``[0, (r+1)h)`` and its back half ``[0, (2n-r)h)`` (``h = L / 2``), both
causal with bottom-right alignment: two local kernel calls (on cuDNN each backward runs as
two graphs, the block before the diagonal unmasked and the diagonal square, see
:func:`longattn.common.kernels.cudnn_backend.backward`). The backward reduce-scatters the
gradient of the gathered K/V (:func:`longattn.hamilton.collectives.gather_rows`).

Memory per rank: the gathered K/V, ``B * S * Hkv * (D + Dv)`` elements (``S = n * L``), kept
for the backward, plus a transient copy of the same size while it is split into K and V.
"""

from __future__ import annotations

import torch

from longattn.common.kernels import attention
from longattn.hamilton.collectives import gather_rows


def kv_pieces(n: int, length: int, causal: bool) -> tuple:
    """Per rank, the ``(a, b, start)`` pieces of its ``length`` local rows in the global
    sequence: one contiguous piece, or the two zigzag halves when ``causal`` (``n > 1``)."""
    if not causal or n == 1:
        return tuple(((0, length, p * length),) for p in range(n))
    h = length // 2
    return tuple(((0, h, p * h), (h, length, (2 * n - 1 - p) * h)) for p in range(n))


def query_calls(n: int, rank: int, lq: int, lk: int, causal: bool) -> list:
    """The local kernel calls of a rank: ``(q_start, q_stop, key_stop, causal)``."""
    if not causal or n == 1:
        return [(0, lq, n * lk, causal)]
    h = lq // 2
    return [(0, h, (rank + 1) * h, True), (h, lq, (2 * n - rank) * h, True)]


def allgather_attention(q, k, v, g, *, causal, softmax_scale, backend):
    """``(out, lse)`` of this rank's queries (see the module docstring); differentiable."""
    n = g.size
    b, lk, hkv, d = k.shape
    # explicit widths: a -1 cannot be inferred from an empty batch
    rows = torch.cat([k.reshape(b, lk, hkv * d), v.reshape(b, lk, hkv * v.shape[3])],
                     -1).transpose(0, 1)
    glob = gather_rows(rows.contiguous(), g, kv_pieces(n, lk, causal)).transpose(0, 1)
    kg = glob[..., :hkv * d].unflatten(-1, (hkv, d)).contiguous()
    vg = glob[..., hkv * d:].unflatten(-1, (hkv, v.shape[3])).contiguous()
    outs, lses = [], []
    for qa, qb, stop, c in query_calls(n, g.rank, q.shape[1], lk, causal):
        o, lse = attention(q[:, qa:qb], kg[:, :stop], vg[:, :stop], softmax_scale=softmax_scale,
                           causal=c, return_lse=True, backend=backend)
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 1), torch.cat(lses, 2)


def requests(q, k, v, n, rank, causal):
    """``(q, k, v, causal)`` shaped like this rank's kernel calls (key lengths shortened to the
    local ones: no backend's rule depends on them), for backend resolution."""
    lk = k.shape[1]
    out = []
    for qa, qb, stop, c in query_calls(n, rank, q.shape[1], lk, causal):
        stop = min(stop, lk)
        out.append((q[:, qa:qb], k[:, :stop], v[:, :stop], c))
    return out
