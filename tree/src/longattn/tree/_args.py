"""Argument checks of the distributed decode functions, agreed on by every rank.

A decode call is valid only if every rank's view agrees (shapes, dtype, device type, causal,
softmax scale, hierarchy, backend, the replicated queries themselves, ``shard_lens``) and each
rank's own tensors are well formed. :func:`check_call` runs all of it inside one
:func:`longattn.common.dist.agree`, so a bad argument on *any* rank raises on *every* rank
before the first real collective and nothing hangs. The same all-gather delivers each rank's
KV-shard length (a ``vary`` field), which the causal mask of ``Lq > 1`` new tokens needs (the
global position of every shard). With ``cache_seqlens`` (per-row valid lengths) the agreed call
then all-gathers every rank's ``[B]`` lengths (:func:`gather_seqlens`), so every rank knows every
row's position on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.common import comm, dist
from longattn.common.checks import check_bool, check_qkv, check_scale
from longattn.tree.local import check_backend_geometry, resolve_backend


@dataclass(frozen=True)
class Call:
    """An agreed decode call: the resolved group, softmax scale, causal flag, every rank's
    KV-shard length (group-rank order), hierarchy (or None), local-kernel backend name and,
    with ``cache_seqlens``, every rank's per-row valid lengths (``seqlens[rank][row]``)."""

    group: dist.Group
    softmax_scale: float
    causal: bool
    lens: list
    hierarchy: tuple | None
    backend: str
    seqlens: list | None = None


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


def check_local(q, k, v, softmax_scale):
    """Checks of this rank's own tensors. Returns the resolved softmax scale."""
    check_qkv(q, k, v)
    if q.shape[1] < 1:
        raise ValueError(f"q must hold at least one new token (Lq >= 1), got shape "
                         f"{tuple(q.shape)}")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v head_dim ({v.shape[-1]}) must equal q head_dim ({q.shape[-1]})")
    try:
        return check_scale(softmax_scale, q.shape[-1])
    except (TypeError, ValueError) as e:  # name the argument by its public name
        if "softmax_scale" in str(e):
            raise
        raise type(e)(f"softmax_scale: {e}") from None


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


def check_cache_seqlens(cache_seqlens, batch: int, capacity: int) -> list[int]:
    """``cache_seqlens``: an int32 tensor ``[B]`` (as flash-attn's ``flash_attn_with_kvcache``)
    with ``0 <= cache_seqlens[b] <= capacity`` (this rank's ``k.shape[1]``). Returns the lengths
    as ints (one device sync, which the range check needs anyway)."""
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be None or an int32 torch.Tensor [batch], got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be torch.int32 (as in flash_attn_with_kvcache), "
                        f"got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens must have shape [batch] = ({batch},), got "
                         f"{tuple(cache_seqlens.shape)}")
    rows = cache_seqlens.tolist()
    bad = [(i, n) for i, n in enumerate(rows) if not 0 <= n <= capacity]
    if bad:
        i, n = bad[0]
        raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (this rank's k.shape[1], "
                         f"its cache capacity), got cache_seqlens[{i}] = {n}")
    return rows


def gather_seqlens(rows: list[int], g: dist.Group) -> list[list[int]]:
    """Every rank's per-row lengths, ``[rank][row]``: one all-gather of ``B`` int64 words per
    rank (recorded under the peer ``"all_gather"``), nothing without a distributed group."""
    if not g.distributed:
        return [list(rows)]
    mine = torch.tensor(rows, dtype=torch.int64, device=g.device)
    every = [torch.empty_like(mine) for _ in range(g.size)]
    comm.all_gather(every, mine, group=g.pg)
    nb = comm.nbytes(mine)
    comm.record("send", "all_gather", nb)
    comm.record("recv", "all_gather", nb * (g.size - 1))
    return [t.tolist() for t in every]


def q_checksum(q: torch.Tensor) -> tuple[float, float]:
    """A cheap digest of the replicated queries: the float64 sum of ``q`` and of ``q`` times
    its flat position (so a permuted or shifted ``q`` differs too)."""
    x = q.detach().reshape(-1).to(torch.float64)
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device) / x.numel()
    total, weighted = torch.stack([x.sum(), (x * w).sum()]).tolist()  # one device sync
    return total, weighted


def check_call(op, q, k, v, *, group, softmax_scale, causal, hierarchy, shard_lens,
               backend, return_lse=False, cache_seqlens=None) -> Call:
    """Validate a distributed decode call on every rank (one all-gather, recorded as the peer
    ``"all_gather"`` for :func:`longattn.common.comm.counting`). Returns the agreed
    :class:`Call`.

    ``shard_lens`` (every rank's KV length, e.g. a :class:`~longattn.tree.KVCache`'s ``lens``)
    is checked inside the same agreement: it must be the same on every rank and match each
    rank's ``k``. So is ``cache_seqlens`` (dtype, shape ``[B]``, range; given on every rank or
    on none); the agreed per-row lengths are then all-gathered (:func:`gather_seqlens`)."""
    g = dist.resolve_group(group)

    def check():
        scale = check_local(q, k, v, softmax_scale)
        is_causal = check_bool("causal", causal)
        check_bool("return_lse", return_lse)
        hier = check_hierarchy(hierarchy, g.size)
        lens = None if shard_lens is None else check_shard_lens(shard_lens, g.rank, g.size, k)
        rows = None if cache_seqlens is None else check_cache_seqlens(
            cache_seqlens, q.shape[0], k.shape[1])
        name = resolve_backend(q, k, v, backend, causal=is_causal)
        b, _, hkv, d = k.shape
        fields = {
            "q.shape": tuple(q.shape), "k/v shape [B, *, Hkv, D]": (b, hkv, d),
            "dtype": q.dtype, "q.device.type": q.device.type, "causal": is_causal,
            "softmax_scale": scale, "hierarchy": (0, 0) if hier is None else hier,
            "backend": name,
            # one word whatever the world size: the lengths agree iff their text does
            "shard_lens": None if lens is None else ",".join(map(str, lens)),
            "kv_len": int(k.shape[1]),
            "cache_seqlens given": rows is not None,
        }
        if g.distributed:  # q must be replicated: a digest of its values agrees too
            fields["q values (float64 checksum)"] = q_checksum(q)
        return (scale, is_causal, hier, name, rows), fields

    (scale, is_causal, hier, name, rows), views = dist.agree(op, g, check, vary=("kv_len",))
    if g.distributed:
        nb = dist.agreement_nbytes()
        comm.record("send", "all_gather", nb)
        comm.record("recv", "all_gather", nb * (g.size - 1))
    lens = views["kv_len"]
    seqlens = None if rows is None else gather_seqlens(rows, g)
    # every rank knows every shard's geometry now: a backend that cannot serve one of them
    # raises here, identically on every rank (no further communication)
    check_backend_geometry(q, k, v, lens, causal=is_causal, backend=name,
                           shards=range(len(lens)), seqlens=seqlens)
    return Call(g, scale, is_causal, lens, hier, name, seqlens)
