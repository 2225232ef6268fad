"""Tree Attention decoding: exact attention over a sequence-sharded KV cache, one
all-reduce MAX and one all-reduce SUM per call (Shyam et al., arXiv 2408.04093).

Each rank attends the replicated new queries to its own KV shard, giving ``(o_r, lse_r)``.
Attention over the union of the shards is then, exactly,

    m   = max_r lse_r                      (all-reduce MAX, B*Hq*Lq values)
    w_r = exp(lse_r - m)                   (<= 1: no overflow; -inf shards give 0)
    den = sum_r w_r,  num = sum_r w_r o_r  (ONE all-reduce SUM of [num | den], B*Lq*Hq*(D+1))
    out = num / den,  lse = m + log(den)

with every statistic (``lse_r``, ``m``, ``w_r``, ``den``) in ``common.dtypes.lse_dtype``:
float32 for fp16 / bf16 inputs, float64 for float32 and float64 inputs (a float32 ``lse``
near 1e4 is only good to ~1e-3, and ``exp(lse_r - m)`` turns that into a relative error of
1e-4 and more in ``out``: ``tree/bench/results/precision_cpu.log``). ``num`` rides along with
``den`` in one message, so the SUM buffer is in the statistics' dtype too (float64 for float32
inputs; fp16 / bf16 send float32 as ever). The reference implementations use a third
all-reduce for ``den``; it rides along with ``num`` here. Message sizes do not depend on the
context length. With ``hierarchy=(nodes, gpus_per_node)`` each node first gathers its ranks'
partials at its leader (local rank 0), which merges them exactly; the leaders run the MAX / SUM
pair across nodes; each leader broadcasts the result inside its node.

Forward only (inference): nothing here records autograd history.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.common import comm
from longattn.common import dist as dist_mod
from longattn.common.merge import finish_rows, merge_stacked
from longattn.tree._args import check_call
from longattn.tree.local import local_attention, row_rights, shard_right

# (global ranks of the group, nodes, gpus_per_node) -> (node group, leader group or None)
_SUBGROUPS: dict = {}


@torch.no_grad()
def tree_decode(q, k, v, *, group=None, softmax_scale=None, hierarchy=None, causal=True,
                shard_lens=None, cache_seqlens=None, cache_leftpad=None, return_lse=False,
                backend="auto"):
    """Exact decode attention of replicated new tokens over a sequence-sharded KV cache.

    Args:
        q: ``[B, Lq, Hq, D]`` the new tokens' queries, identical on every rank (checked: a
            float64 checksum of ``q`` is part of the argument agreement).
        k, v: ``[B, n_r, Hkv, D]`` this rank's KV-cache shard; ``n_r`` may differ per rank and
            may be 0. Shards are contiguous in group-rank order; the new tokens' own keys are
            the last ``Lq`` keys of the global cache (see :mod:`longattn.tree.local`).
        group: a ``ProcessGroup``, a 1-D ``DeviceMesh``, ``longattn.common.dist.LOCAL`` or
            None. None means this process alone, and is an error in an initialised world of
            more than one rank (pass ``torch.distributed.group.WORLD`` to shard over it).
        softmax_scale: default ``D ** -0.5``.
        hierarchy: ``(nodes, gpus_per_node)`` with product the group size; group rank
            ``i`` is on node ``i // gpus_per_node``. Reduce inside nodes, then across, then
            broadcast inside.
        causal: a bool; new token ``t`` sees global keys ``<= N - Lq + t`` (no effect at
            ``Lq = 1``).
        shard_lens: every rank's ``n_r`` if the caller knows them (e.g. a
            :class:`~longattn.tree.cache.KVCache`'s ``lens``); checked inside the argument
            agreement (the same on every rank, ``shard_lens[rank] == n_r``).
        cache_seqlens: None, or an int32 tensor ``[B]`` (as in flash-attn's
            ``flash_attn_with_kvcache``): row ``b`` of this rank's ``k, v`` holds its first
            ``cache_seqlens[b]`` slots (``0 <= cache_seqlens[b] <= n_r``; ``n_r`` is then this
            rank's capacity). Row ``b``'s cache is the concatenation of its filled prefixes in
            group-rank order, so each row has its own length ``N[b]`` and causal mask; a row
            may be empty on some ranks or on all (out 0, lse -inf). Checked inside the
            argument agreement, then all-gathered (``B`` int64 words per rank).
        cache_leftpad: None, or an int32 tensor ``[B]`` (flash-attn's ``cache_leftpad``):
            row ``b``'s keys on this rank start at slot ``cache_leftpad[b]`` (``<=`` its
            ``cache_seqlens[b]``, or ``n_r`` without them); the slots before are not read (a
            left-padded batch's padding). Row ``b``'s cache is then the concatenation of its
            slots ``[cache_leftpad[b], cache_seqlens[b])`` in group-rank order. Checked inside
            the agreement and all-gathered with ``cache_seqlens`` (``2 B`` words per rank).
        return_lse: also return ``lse [B, Hq, Lq]`` in ``common.dtypes.lse_dtype``
            (float32 for fp16 / bf16, float64 for float32 and float64 inputs).
        backend: local kernel, see :func:`longattn.tree.local.local_attention`.

    Returns ``out [B, Lq, Hq, D]`` in q's dtype, identical on every rank (and ``lse``).
    A new token that sees no key gets ``out = 0``, ``lse = -inf``; a NaN in any rank's keys or
    values makes the rows that see it NaN in ``out`` and ``lse``.

    Every argument is checked on every rank inside one all-gather before the first collective
    (:func:`longattn.common.dist.agree`): a bad argument on any rank raises the same
    ``ValueError`` / ``TypeError`` on every rank.
    """
    return _tree_decode(q, k, v, group=group, softmax_scale=softmax_scale, hierarchy=hierarchy,
                        causal=causal, shard_lens=shard_lens, cache_seqlens=cache_seqlens,
                        cache_leftpad=cache_leftpad, return_lse=return_lse, backend=backend)


def _tree_decode(q, k, v, *, group, softmax_scale, hierarchy, causal, shard_lens,
                 cache_seqlens, cache_leftpad, return_lse, backend, extra=None, op="tree_decode"):
    """:func:`tree_decode`; ``extra``: a caller's own checks, agreed in the same all-gather
    (:func:`longattn.tree._args.check_call`)."""
    call = check_call(op, q, k, v, group=group, softmax_scale=softmax_scale,
                      causal=causal, hierarchy=hierarchy, shard_lens=shard_lens,
                      backend=backend, return_lse=return_lse, cache_seqlens=cache_seqlens,
                      cache_leftpad=cache_leftpad, extra=extra)
    g, lens, hier = call.group, call.lens, call.hierarchy
    starts = None
    if call.seqlens is None:
        right, rows = shard_right(lens, g.rank, q.shape[1], call.causal), None
    else:  # the causal cut counts every rank's keys per row (ends minus starts)
        right = row_rights(call.counts(), g.rank, q.shape[1], call.causal)
        rows = call.seqlens[g.rank]
        starts = None if call.leftpads is None else call.leftpads[g.rank]
    o, lse = local_attention(q, k, v, softmax_scale=call.softmax_scale, right=right,
                             backend=call.backend, seqlens=rows, starts=starts)
    o, lse = _combine(o, lse, g, hier)
    out = o.to(q.dtype)
    return (out, lse) if return_lse else out


@torch.no_grad()
def combine_partials(out, lse, *, group):
    """The exact combine of :func:`tree_decode` on partials a caller computed itself: every
    rank's ``out [B, Lq, Hq, D]`` (the accumulation dtype) and ``lse [B, Hq, Lq]`` (the
    statistics' dtype, ``common.dtypes.lse_dtype``) over its own keys, e.g. from
    :func:`longattn.tree.local.local_attention`. Returns ``(out, lse)`` over every rank's keys,
    identical on every rank: one all-reduce MAX and one SUM.

    No agreement runs here: the caller must have agreed the shapes and dtypes on every rank
    first (the transformers integration does, once per layer call), or a mismatch hangs.
    ``group``: a :class:`longattn.common.dist.Group` or what ``resolve_group`` takes."""
    g = group if isinstance(group, dist_mod.Group) else dist_mod.resolve_group(group)
    return _combine(out, lse, g, None)


def _combine(o, lse, g, hier):
    """Every rank's partial combined over ``g``: flat, or by ``hier`` (nodes, gpus per node)."""
    if not g.distributed:
        return o, lse
    if hier is None or hier[0] == 1 or hier[1] == 1:
        return _allreduce_combine(o, lse, g.pg)
    return _hierarchical_combine(o, lse, g.pg, *hier)


def _all_reduce(t, op, group, what):
    comm.all_reduce(t, op=op, group=group)
    n = comm.nbytes(t)
    comm.record("send", what, n)
    comm.record("recv", what, n)


def _allreduce_combine(o, lse, group):
    """The flat combine: MAX of lse, then one SUM of ``[num | den]``, finished by
    :func:`longattn.common.merge.finish_rows` (empty rows 0 / -inf, NaN stays NaN).

    ``lse`` is in the statistics' dtype (``lse_dtype``); the MAX, the weights and the SUM run in
    it, and ``out`` comes back in ``o``'s dtype."""
    m = lse.clone(memory_format=torch.contiguous_format)  # collectives need contiguous
    _all_reduce(m, dist.ReduceOp.MAX, group, "all_reduce_max")
    m = m.transpose(1, 2)  # [B, Lq, H], the row order of o
    # A row no rank has a key for has m = -inf: shift by 0 there (exp(-inf) = 0, not NaN).
    # A NaN lse makes its w NaN, so the SUM carries it into num and den whatever MAX did.
    w = torch.exp(lse.transpose(1, 2) - torch.where(torch.isneginf(m), 0.0, m))
    wt = w.unsqueeze(-1)  # [B, Lq, H, 1]
    # [B, Lq, H, D + 1] in the statistics' dtype: den rides along with num
    buf = torch.cat([o.to(w.dtype) * wt, wt], dim=-1)
    _all_reduce(buf, dist.ReduceOp.SUM, group, "all_reduce_sum")
    out, lse = finish_rows(buf[..., :-1], buf[..., -1], m)
    return out.to(o.dtype), lse.transpose(1, 2)


def hierarchy_groups(nodes: int, gpus_per_node: int, ranks=None):
    """Create the process groups of ``hierarchy=(nodes, gpus_per_node)`` over the global
    ``ranks`` (default: the whole world) and cache them for :func:`tree_decode`.

    ``torch.distributed.new_group`` must be called by every rank of the default group, so this
    is a collective setup step: call it on every rank, in the same order, before decoding with
    a ``group`` that is not the whole world. (With the default group, :func:`tree_decode`
    calls it itself on first use.) Returns this rank's ``(node_group, leader_group)``; the
    leader group is None off the node leaders (local rank 0) and for ranks outside ``ranks``.
    """
    world = dist.get_world_size()
    ranks = list(range(world)) if ranks is None else [int(r) for r in ranks]
    if len(ranks) != nodes * gpus_per_node:
        raise ValueError(f"hierarchy ({nodes}, {gpus_per_node}) must multiply to the number "
                         f"of ranks {len(ranks)}")
    key = (tuple(ranks), nodes, gpus_per_node)
    if key not in _SUBGROUPS:
        me = dist.get_rank()
        node_groups = [dist.new_group(ranks[n * gpus_per_node:(n + 1) * gpus_per_node])
                       for n in range(nodes)]
        leaders = dist.new_group(ranks[::gpus_per_node])
        if me in ranks:
            i = ranks.index(me)
            res = (node_groups[i // gpus_per_node], leaders if i % gpus_per_node == 0 else None)
        else:
            res = (None, None)
        _SUBGROUPS[key] = res
    return _SUBGROUPS[key]


def _subgroups(pg, nodes, gpn):
    world = dist.get_world_size(pg)
    granks = [dist.get_global_rank(pg, i) for i in range(world)]
    if granks == list(range(dist.get_world_size())):  # the whole world, in order
        return hierarchy_groups(nodes, gpn)
    key = (tuple(granks), nodes, gpn)
    if key not in _SUBGROUPS:
        raise ValueError(f"hierarchy {(nodes, gpn)} over a sub-group needs its process groups: "
                         f"call longattn.tree.hierarchy_groups({nodes}, {gpn}, ranks={granks}) on "
                         f"every rank of the world first")
    return _SUBGROUPS[key]


def _hierarchical_combine(o, lse, group, nodes, gpn):
    """Gather each node's partials at its leader and merge there; MAX / SUM across the
    leaders; broadcast the result inside each node. Every message packs ``(o, lse)`` in the
    statistics' dtype (``lse``'s: float64 for float32 inputs); ``out`` comes back in ``o``'s
    dtype, ``lse`` in ``lse``'s."""
    node_group, leaders = _subgroups(group, nodes, gpn)
    me = dist.get_rank(group)
    leader = 0  # the node leader is rank 0 of its node group (comm takes group ranks)
    b, lq, h, d = o.shape
    # pack (o, lse) into one message: [B, Lq, H, D + 1]
    acc, stat = o.dtype, lse.dtype
    mine = torch.cat([o.to(stat), lse.transpose(1, 2).unsqueeze(-1)], dim=-1).contiguous()
    nb = comm.nbytes(mine)
    if me % gpn == 0:
        parts = [torch.empty_like(mine) for _ in range(gpn)]
        comm.gather(mine, parts, dst=leader, group=node_group)
        for _ in range(1, gpn):
            comm.record("recv", "gather", nb)
        stack = torch.stack(parts)  # [gpn, B, Lq, H, D + 1]
        o, lse = merge_stacked(stack[..., :-1], stack[..., -1])
        o, lse = o.to(stat), lse.to(stat).transpose(1, 2)
        o, lse = _allreduce_combine(o, lse, leaders)
        res = torch.cat([o, lse.transpose(1, 2).unsqueeze(-1)], dim=-1).contiguous()
        comm.record("send", "broadcast", comm.nbytes(res))
    else:
        comm.gather(mine, None, dst=leader, group=node_group)
        comm.record("send", "gather", nb)
        res = torch.empty(b, lq, h, d + 1, dtype=stat, device=o.device)
        comm.record("recv", "broadcast", comm.nbytes(res))
    comm.broadcast(res, src=leader, group=node_group)
    return res[..., :-1].to(acc), res[..., -1].transpose(1, 2)


__all__ = ["tree_decode", "hierarchy_groups", "combine_partials"]
