"""Ring decoding, the baseline Tree Attention is measured against.

The replicated new queries stay put and the KV shards travel: in ``p - 1`` steps every rank
passes the shard it holds to ``rank + 1`` and receives one from ``rank - 1`` (double buffered:
the next transfer is posted before the current shard is attended), merging each partial into
its running ``(out, lse)`` with the shared log-sum-exp merge. Every rank attends all ``N``
keys and moves ``O(N)`` bytes, against the tree's ``O(N / p)`` work and ``O(B * H * D)`` bytes.

Shards may be uneven or empty: every rank knows every shard's length (from the argument
agreement, or ``shard_lens``), so each message is sized exactly -- no padding keys enter the
softmax (unlike the padded reference baseline) -- and empty shards are not sent at all.
Forward only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.common import comm
from longattn.common.merge import merge_partials_
from longattn.tree._args import agree
from longattn.tree.local import local_attention, shard_right


@torch.no_grad()
def ring_decode(q, k, v, *, group=None, scale=None, causal=True, shard_lens=None,
                return_lse=False, backend="auto"):
    """Same contract as :func:`longattn.tree.tree_decode` (without ``hierarchy``), computed by
    passing the KV shards around a ring. Returns ``out [B, Lq, Hq, D]`` in q's dtype (and
    ``lse``); every rank gets the full result."""
    scale, lens, _ = agree("ring_decode", q, k, v, scale=scale, group=group, hierarchy=None,
                           shard_lens=shard_lens)
    p = len(lens)
    lq = q.shape[1]
    me = dist.get_rank(group) if p > 1 else 0
    pending = _post(k.contiguous(), v.contiguous(), 1, lens, me, group) if p > 1 else None
    out, lse = local_attention(q, k, v, scale=scale, right=shard_right(lens, me, lq, causal),
                               backend=backend)
    for step in range(1, p):
        handle, held = pending
        handle.wait()
        # forward the shard just received while attending it (both only read it)
        if step < p - 1:
            pending = _post(*held, step + 1, lens, me, group)
        src = (me - step) % p
        if lens[src]:
            o_s, lse_s = local_attention(q, held[0], held[1], scale=scale,
                                         right=shard_right(lens, src, lq, causal),
                                         backend=backend)
            merge_partials_(out, lse, o_s, lse_s)
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
