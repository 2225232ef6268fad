"""Ring decoding, the baseline Tree Attention is measured against.

The replicated new queries stay put and the KV shards travel: in ``p - 1`` steps every rank
passes the shard it holds to ``rank + 1`` and receives one from ``rank - 1`` (double buffered:
the next transfer is posted before the current shard is attended). The ``p`` partials are
merged once, in shard order, by :func:`longattn.common.merge.merge_stacked`, so every rank
returns the same bits (the next layer's queries stay replicated). Every rank attends all ``N``
keys and moves ``O(N)`` bytes, against the tree's ``O(N / p)`` work and ``O(B * H * D)`` bytes.

Shards may be uneven or empty: every rank knows every shard's length (from the argument
agreement, or ``shard_lens``), so each message is sized exactly -- no padding keys enter the
softmax (unlike the padded reference baseline) -- and empty shards are not sent at all. With
per-row lengths (``cache_seqlens``) a shard travels as its longest row's prefix (with
``cache_leftpad``, the slots before a row's start travel too and are not read).
Forward only.
"""

from __future__ import annotations

import torch

from longattn.common import comm
from longattn.common.merge import merge_stacked
from longattn.tree._args import check_call
from longattn.tree.local import local_attention, row_rights, shard_right


@torch.no_grad()
def ring_decode(q, k, v, *, group=None, softmax_scale=None, causal=True, shard_lens=None,
                cache_seqlens=None, cache_leftpad=None, return_lse=False, backend="auto"):
    """Same contract as :func:`longattn.tree.tree_decode` (without ``hierarchy``), computed by
    passing the KV shards around a ring. Returns ``out [B, Lq, Hq, D]`` in q's dtype (and
    ``lse``), identical on every rank."""
    call = check_call("ring_decode", q, k, v, group=group, softmax_scale=softmax_scale,
                      causal=causal, hierarchy=None, shard_lens=shard_lens, backend=backend,
                      return_lse=return_lse, cache_seqlens=cache_seqlens,
                      cache_leftpad=cache_leftpad)
    g, lens, scale, table = call.group, call.lens, call.softmax_scale, call.seqlens
    counts, pads = call.counts(), call.leftpads
    p, me, lq = g.size, g.rank, q.shape[1]
    if table is not None:  # each shard travels as its longest row's prefix
        lens = [max(rows, default=0) for rows in table]
        k, v = k[:, :lens[me]], v[:, :lens[me]]

    def attend(kk, vv, src):
        if table is None:
            return local_attention(q, kk, vv, softmax_scale=scale,
                                   right=shard_right(lens, src, lq, call.causal),
                                   backend=call.backend)
        return local_attention(q, kk, vv, softmax_scale=scale, seqlens=table[src],
                               starts=None if pads is None else pads[src],
                               right=row_rights(counts, src, lq, call.causal),
                               backend=call.backend)

    if p == 1:
        out, lse = attend(k, v, 0)
    else:
        # every rank attends shard r from the same contiguous tensor the ring carries
        held = (k.contiguous(), v.contiguous())
        pending = _post(*held, 1, lens, me, g.pg)
        parts = {me: attend(*held, me)} if lens[me] else {}
        for step in range(1, p):
            handle, held = pending
            handle.wait()
            # forward the shard just received while attending it (both only read it)
            if step < p - 1:
                pending = _post(*held, step + 1, lens, me, g.pg)
            src = (me - step) % p
            if lens[src]:
                parts[src] = attend(*held, src)
        # the non-empty shards in shard order: the same merge, hence the same bits, everywhere
        order = sorted(parts)
        if order:
            out, lse = merge_stacked(torch.stack([parts[r][0] for r in order]),
                                     torch.stack([parts[r][1].transpose(1, 2) for r in order]))
            # out in the accumulation dtype, lse in the statistics' dtype (lse_dtype: float64
            # for float32 inputs), whatever dtypes the shared merge computes in
            out, lse = out.to(parts[order[0]][0].dtype), lse.to(parts[order[0]][1].dtype)
            lse = lse.transpose(1, 2)
        else:  # no key anywhere: out 0, lse -inf
            out, lse = attend(k, v, me)
    res = out.to(q.dtype)
    return (res, lse) if return_lse else res


def _post(k_held, v_held, step, lens, me, group):
    """Post step ``step``: send the held shard (owner ``me - step + 1``) to ``me + 1`` and
    receive the shard of owner ``me - step`` from ``me - 1``; empty shards are not sent."""
    p = len(lens)
    src = (me - step) % p
    sends, recvs = [], []
    if lens[(me - step + 1) % p]:
        sends = [(k_held, (me + 1) % p), (v_held, (me + 1) % p)]
    b, _, h, d = k_held.shape
    k_in = k_held.new_empty((b, lens[src], h, d))
    v_in = v_held.new_empty((b, lens[src], h, v_held.shape[3]))
    if lens[src]:
        recvs = [(k_in, (me - 1) % p), (v_in, (me - 1) % p)]
    return comm.exchange(sends, recvs, group), (k_in, v_in)
