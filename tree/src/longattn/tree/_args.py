"""Argument checks of the distributed decode functions, agreed on by every rank.

A decode call is valid only if every rank's view agrees (batch, query length, heads, head dim,
dtype, hierarchy) and each rank's own tensors are well formed. Each rank checks its own
arguments locally, then one small all-gather of ints (:func:`agree`) shares the verdicts and
shapes, so a bad argument on *any* rank raises on *every* rank before the real communication
and nothing hangs. The same gather delivers each rank's KV-shard length, which the causal mask
of ``Lq > 1`` new tokens needs (the global position of every shard).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.common import comm
from longattn.common.checks import check_qkv, check_scale

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def world_of(group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_hierarchy(hierarchy, world: int):
    """``None`` or ``(nodes, gpus_per_node)`` positive ints with ``nodes * gpus_per_node ==
    world``. Returns the tuple (or None)."""
    if hierarchy is None:
        return None
    if not isinstance(hierarchy, (tuple, list)) or len(hierarchy) != 2:
        raise TypeError(f"hierarchy must be None or (nodes, gpus_per_node), got {hierarchy!r}")
    for name, x in zip(("nodes", "gpus_per_node"), hierarchy):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"hierarchy {name} must be a positive int, got {x!r}")
    nodes, gpn = hierarchy
    if nodes * gpn != world:
        raise ValueError(
            f"hierarchy {tuple(hierarchy)} must multiply to the group size {world}, "
            f"got {nodes * gpn}"
        )
    return (int(nodes), int(gpn))


def check_local(q, k, v, scale, *, lq_max=None):
    """Checks of this rank's own tensors. Returns the resolved scale."""
    check_qkv(q, k, v)
    if q.shape[1] < 1:
        raise ValueError(f"q must hold at least one new token (Lq >= 1), got shape "
                         f"{tuple(q.shape)}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v head_dim ({v.shape[-1]}) must equal q head_dim ({q.shape[-1]})")
    return check_scale(scale, q.shape[-1])


def check_shard_lens(shard_lens, rank: int, world: int, k) -> list[int]:
    if not isinstance(shard_lens, (list, tuple)) or len(shard_lens) != world:
        raise ValueError(f"shard_lens must be a list of {world} ints (one per rank), got "
                         f"{shard_lens!r}")
    lens = []
    for x in shard_lens:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"shard_lens entries must be ints >= 0, got {shard_lens!r}")
        lens.append(int(x))
    if lens[rank] != k.shape[1]:
        raise ValueError(f"shard_lens[{rank}] = {lens[rank]} but this rank's k holds "
                         f"{k.shape[1]} tokens")
    return lens


def _collective_device(group, q):
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(name, q, k, v, *, scale, group, hierarchy, shard_lens):
    """Validate a distributed decode call on every rank.

    Returns ``(scale, lens, hierarchy)`` where ``lens`` lists every rank's KV-shard length (group
    rank order). With ``shard_lens`` given, the caller vouches that all ranks agree: only local
    checks run and no communication happens (the fast path of a generation loop whose
    :class:`~longattn.tree.cache.KVCache` already knows every length).
    """
    rank, world = world_of(group)
    if shard_lens is not None:
        scale = check_local(q, k, v, scale)
        return scale, check_shard_lens(shard_lens, rank, world, k), check_hierarchy(hierarchy,
                                                                                    world)
    err = None
    try:
        scale = check_local(q, k, v, scale)
        hier = check_hierarchy(hierarchy, world)
    except (TypeError, ValueError) as e:
        err = e
    if world == 1:
        if err is not None:
            raise err
        return scale, [k.shape[1]], hier
    if err is None:
        b, lq, hq, d = q.shape
        nodes, gpn = hier if hier is not None else (0, 0)
        mine = [1, b, lq, hq, d, k.shape[2], _DTYPE_CODE[q.dtype], nodes, gpn, k.shape[1]]
    else:
        mine = [0] + [-1] * 9
    t = torch.tensor(mine, dtype=torch.int64, device=_collective_device(group, q))
    every = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(every, t, group=group)
    nb = t.numel() * t.element_size()
    comm.record("send", "all_gather", nb)
    comm.record("recv", "all_gather", nb * (world - 1))
    rows = [x.tolist() for x in every]
    bad = [r for r, row in enumerate(rows) if row[0] != 1]
    if err is not None:
        raise err
    if bad:
        raise ValueError(f"{name}: invalid arguments on rank(s) {bad} (see their errors)")
    shapes = [tuple(row[1:9]) for row in rows]
    if any(s != shapes[0] for s in shapes):
        fields = "(batch, Lq, Hq, head_dim, Hkv, dtype, nodes, gpus_per_node)"
        raise ValueError(f"{name}: q/k/v shapes, dtype and hierarchy must agree on every rank; "
                         f"per rank {fields}: {shapes}")
    return scale, [row[9] for row in rows], hier
