"""``schedule="ulysses"``: all-to-all from sequence-sharded to head-sharded, attention over the
whole sequence, all-to-all back (DeepSpeed-Ulysses).

Rank ``p`` gets query heads ``[p * Hq/n, (p+1) * Hq/n)`` of every rank's tokens (``Hq % n ==
0``) and the KV heads those query heads use: ``[p*Hq/n // G, ((p+1)*Hq/n - 1) // G]`` with ``G
= Hq / Hkv``. When ``Hkv`` is smaller than ``n`` (or does not divide it) a KV head is needed by
several ranks and travels to each of them (repetition; never split along the head dim); the
backward sends each copy's gradient back and the owner sums them. Where a rank's query heads do
not map onto its KV heads in equal groups, the KV heads are repeated locally to one per query
head (:func:`local_kv_index`).

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


def local_kv_index(hq: int, hkv: int, n: int, rank: int):
    """None when this rank's query heads use its KV heads in equal consecutive groups (GQA
    as is), else the KV head (local index) of each local query head."""
    per, grp = hq // n, hq // hkv
    lo = rank * per // grp
    idx = [(rank * per + i) // grp - lo for i in range(per)]
    m = idx[-1] + 1
    if per % m == 0 and idx == [j for j in range(m) for _ in range(per // m)]:
        return None
    return torch.tensor(idx)


def specs(hq, hkv, n):
    """The :func:`to_heads` specs of q, k, v (``[B, L, H, D]``) and of out, lse."""
    qr, kvr = head_ranges(hq, hkv, n)
    return ((qr, 1, 2, hq), (kvr, 1, 2, hkv), (kvr, 1, 2, hkv)), ((qr, 1, 2, hq), (qr, 2, 1, hq))


def around_heads(q, k, v, g, attend, return_lse):
    """All-to-all to heads, ``attend(qh, kh, vh) -> (out, lse)``, all-to-all back. The lse
    travels back only with ``return_lse`` (else None is returned for it)."""
    hq, hkv = q.shape[2], k.shape[2]
    spec_in, spec_out = specs(hq, hkv, g.size)
    qh, kh, vh = to_heads(g, spec_in, q, k, v)
    idx = local_kv_index(hq, hkv, g.size, g.rank)
    if idx is not None:
        kh, vh = kh.index_select(2, idx.to(kh.device)), vh.index_select(2, idx.to(vh.device))
    out_h, lse_h = attend(qh, kh, vh)
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


def requests(q, k, v, n, rank, causal):
    """``(q, k, v, causal)`` shaped like the local kernel call of this rank (local token
    counts), for backend resolution."""
    hq, hkv = q.shape[2], k.shape[2]
    (qa, qb), (ka, kb) = (r[rank] for r in head_ranges(hq, hkv, n))
    kk, vv = k[:, :, ka:kb], v[:, :, ka:kb]
    idx = local_kv_index(hq, hkv, n, rank)
    if idx is not None:
        kk, vv = kk.index_select(2, idx.to(k.device)), vv.index_select(2, idx.to(v.device))
    return [(q[:, :, qa:qb].contiguous(), kk.contiguous(), vv.contiguous(), causal)]
