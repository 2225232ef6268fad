"""Tree Attention decoding: exact attention over a sequence-sharded KV cache, one
all-reduce MAX and one all-reduce SUM per call (Shyam et al., arXiv 2408.04093).

Each rank attends the replicated new queries to its own KV shard, giving ``(o_r, lse_r)``.
Attention over the union of the shards is then, exactly,

    m   = max_r lse_r                      (all-reduce MAX, B*Hq*Lq values)
    w_r = exp(lse_r - m)                   (<= 1: no overflow; -inf shards give 0)
    den = sum_r w_r,  num = sum_r w_r o_r  (ONE all-reduce SUM of [num | den], B*Lq*Hq*(D+1))
    out = num / den,  lse = m + log(den)

in float32 (float64 for float64 inputs). The reference implementations use a third all-reduce
for ``den``; it rides along with ``num`` here. Message sizes do not depend on the context
length. With ``hierarchy=(nodes, gpus_per_node)`` each node first gathers its ranks' partials
at its leader (local rank 0), which merges them exactly; the leaders run the MAX / SUM pair
across nodes; each leader broadcasts the result inside its node.

Forward only (inference): nothing here records autograd history.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.common import comm
from longattn.tree._args import agree
from longattn.tree.local import local_attention, shard_right

# (global ranks of the group, nodes, gpus_per_node) -> (node group, leader group or None)
_SUBGROUPS: dict = {}


@torch.no_grad()
def tree_decode(q, k, v, *, group=None, scale=None, hierarchy=None, causal=True,
                shard_lens=None, return_lse=False, backend="auto"):
    """Exact decode attention of replicated new tokens over a sequence-sharded KV cache.

    Args:
        q: ``[B, Lq, Hq, D]`` the new tokens' queries, identical on every rank.
        k, v: ``[B, n_r, Hkv, D]`` this rank's KV-cache shard; ``n_r`` may differ per rank and
            may be 0. Shards are contiguous in group-rank order; the new tokens' own keys are
            the last ``Lq`` keys of the global cache (see :mod:`longattn.tree.local`).
        group: process group (None: the default group).
        scale: softmax scale, default ``D ** -0.5``.
        hierarchy: ``(nodes, gpus_per_node)`` with product the group size; group rank
            ``i`` is on node ``i // gpus_per_node``. Reduce inside nodes, then across, then
            broadcast inside.
        causal: new token ``t`` sees global keys ``<= N - Lq + t`` (no effect at ``Lq = 1``).
        shard_lens: every rank's ``n_r`` if the caller knows them (e.g. from a
            :class:`~longattn.tree.cache.KVCache`): skips the argument-agreement all-gather,
            the caller vouching that all ranks pass consistent arguments.
        return_lse: also return ``lse [B, Hq, Lq]`` (float32; float64 for float64 inputs).
        backend: local kernel, see :func:`longattn.tree.local.local_attention`.

    Returns ``out [B, Lq, Hq, D]`` in q's dtype, identical on every rank (and ``lse``).
    A new token that sees no key gets ``out = 0``, ``lse = -inf``.
    """
    scale, lens, hier = agree("tree_decode", q, k, v, scale=scale, group=group,
                              hierarchy=hierarchy, shard_lens=shard_lens)
    rank = dist.get_rank(group) if len(lens) > 1 else 0
    right = shard_right(lens, rank, q.shape[1], causal)
    o, lse = local_attention(q, k, v, scale=scale, right=right, backend=backend)
    if len(lens) > 1:
        if hier is None or hier[0] == 1 or hier[1] == 1:
            o, lse = _allreduce_combine(o, lse, group)
        else:
            o, lse = _hierarchical_combine(o, lse, group, *hier)
    out = o.to(q.dtype)
    return (out, lse) if return_lse else out


def merge_stack(os_, lses):
    """Exact merge of stacked partials ``os_ [n, B, Lq, H, D]``, ``lses [n, B, H, Lq]``
    (the same max / weighted-sum rule as the collectives, done locally)."""
    m = lses.amax(0)
    w = torch.exp(lses - _finite(m))
    den = w.sum(0)
    num = (os_ * w.transpose(-1, -2).unsqueeze(-1)).sum(0)
    return _finish(num, den, m)


def _finite(m):
    # A row no rank has a key for has m = -inf; exp(-inf - 0) = 0 keeps it 0 / -inf, not NaN.
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _finish(num, den, m):
    """out = num / den and lse = m + log(den); rows with den = 0 give 0 / -inf."""
    live = den > 0
    inv = torch.where(live, 1.0 / torch.where(live, den, torch.ones_like(den)),
                      torch.zeros_like(den))
    out = num * inv.transpose(-1, -2).unsqueeze(-1)
    lse = torch.where(live, _finite(m) + torch.log(torch.where(live, den, torch.ones_like(den))),
                      torch.full_like(den, float("-inf")))
    return out, lse


def _all_reduce(t, op, group, what):
    dist.all_reduce(t, op=op, group=group)
    n = comm.nbytes(t)
    comm.record("send", what, n)
    comm.record("recv", what, n)


def _allreduce_combine(o, lse, group):
    """The flat combine: MAX of lse, then one SUM of ``[num | den]``."""
    m = lse.clone(memory_format=torch.contiguous_format)  # collectives need contiguous
    _all_reduce(m, dist.ReduceOp.MAX, group, "all_reduce_max")
    w = torch.exp(lse - _finite(m))  # [B, H, Lq]
    wt = w.transpose(1, 2).unsqueeze(-1)  # [B, Lq, H, 1]
    buf = torch.cat([o * wt, wt], dim=-1)  # [B, Lq, H, D + 1]: den rides along with num
    _all_reduce(buf, dist.ReduceOp.SUM, group, "all_reduce_sum")
    num, den = buf[..., :-1], buf[..., -1].transpose(1, 2)
    return _finish(num, den, m)


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


def _subgroups(group, nodes, gpn):
    world = dist.get_world_size(group)
    if group is None or world == dist.get_world_size():
        granks = list(range(world)) if group is None else [dist.get_global_rank(group, i)
                                                           for i in range(world)]
        if granks == list(range(world)):
            return hierarchy_groups(nodes, gpn)
    granks = [dist.get_global_rank(group, i) for i in range(world)]
    key = (tuple(granks), nodes, gpn)
    if key not in _SUBGROUPS:
        raise ValueError(f"hierarchy {(nodes, gpn)} over a sub-group needs its process groups: "
                         f"call longattn.tree.hierarchy_groups({nodes}, {gpn}, ranks={granks}) on "
                         f"every rank of the world first")
    return _SUBGROUPS[key]


def _hierarchical_combine(o, lse, group, nodes, gpn):
    """Gather each node's partials at its leader and merge there; MAX / SUM across the
    leaders; broadcast the result inside each node."""
    node_group, leaders = _subgroups(group, nodes, gpn)
    me = dist.get_rank(group)
    leader_global = dist.get_global_rank(node_group, 0)
    b, lq, h, d = o.shape
    # pack (o, lse) into one message: [B, Lq, H, D + 1]
    mine = torch.cat([o, lse.transpose(1, 2).unsqueeze(-1)], dim=-1).contiguous()
    nb = comm.nbytes(mine)
    if me % gpn == 0:
        parts = [torch.empty_like(mine) for _ in range(gpn)]
        dist.gather(mine, parts, dst=leader_global, group=node_group)
        for _ in range(1, gpn):
            comm.record("recv", "gather", nb)
        stack = torch.stack(parts)
        o, lse = merge_stack(stack[..., :-1], stack[..., -1].transpose(-1, -2))
        o, lse = _allreduce_combine(o, lse, leaders)
        res = torch.cat([o, lse.transpose(1, 2).unsqueeze(-1)], dim=-1).contiguous()
        comm.record("send", "broadcast", comm.nbytes(res))
    else:
        dist.gather(mine, None, dst=leader_global, group=node_group)
        comm.record("send", "gather", nb)
        res = torch.empty(b, lq, h, d + 1, dtype=o.dtype, device=o.device)
        comm.record("recv", "broadcast", comm.nbytes(res))
    dist.broadcast(res, src=leader_global, group=node_group)
    return res[..., :-1], res[..., -1].transpose(1, 2)


__all__ = ["tree_decode", "hierarchy_groups", "merge_stack"]
