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
    leftpads: list | None = None  # every rank's per-row first slot (``cache_leftpad``)

    def counts(self) -> list | None:
        """Every rank's per-row number of keys, ``[rank][row]`` (ends minus starts)."""
        if self.seqlens is None or self.leftpads is None:
            return self.seqlens
        return [[e - s for e, s in zip(ends, pads)]
                for ends, pads in zip(self.seqlens, self.leftpads)]


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


def _row_ints(name, t, batch: int) -> list[int]:
    """An int32 tensor ``[batch]`` (flash-attn's per-row cache arguments) as ints."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be None or an int32 torch.Tensor [batch], got "
                        f"{type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32 (as in flash_attn_with_kvcache), "
                        f"got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape [batch] = ({batch},), got {tuple(t.shape)}")
    return t.tolist()


def check_cache_seqlens(cache_seqlens, batch: int, capacity: int) -> list[int]:
    """``cache_seqlens``: an int32 tensor ``[B]`` (as flash-attn's ``flash_attn_with_kvcache``)
    with ``0 <= cache_seqlens[b] <= capacity`` (this rank's ``k.shape[1]``). Returns the lengths
    as ints (one device sync, which the range check needs anyway)."""
    rows = _row_ints("cache_seqlens", cache_seqlens, batch)
    bad = [(i, n) for i, n in enumerate(rows) if not 0 <= n <= capacity]
    if bad:
        i, n = bad[0]
        raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (this rank's k.shape[1], "
                         f"its cache capacity), got cache_seqlens[{i}] = {n}")
    return rows


def check_cache_leftpad(cache_leftpad, batch: int, ends: list[int]) -> list[int]:
    """``cache_leftpad``: an int32 tensor ``[B]`` (flash-attn's ``flash_attn_with_kvcache``):
    row ``b``'s keys on this rank start at slot ``cache_leftpad[b]``, with ``0 <=
    cache_leftpad[b] <= ends[b]`` (its ``cache_seqlens``, or ``k.shape[1]``)."""
    pads = _row_ints("cache_leftpad", cache_leftpad, batch)
    bad = [(i, s, e) for i, (s, e) in enumerate(zip(pads, ends)) if not 0 <= s <= e]
    if bad:
        i, s, e = bad[0]
        raise ValueError(f"cache_leftpad[{i}] = {s} must lie in [0, {e}] (the row's end on this "
                         "rank: its cache_seqlens, or k.shape[1])")
    return pads


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
               backend, return_lse=False, cache_seqlens=None, cache_leftpad=None,
               extra=None) -> Call:
    """Validate a distributed decode call on every rank (one all-gather, recorded as the peer
    ``"all_gather"`` for :func:`longattn.common.comm.counting`). Returns the agreed
    :class:`Call`.

    ``shard_lens`` (every rank's KV length, e.g. a :class:`~longattn.tree.KVCache`'s ``lens``)
    is checked inside the same agreement: it must be the same on every rank and match each
    rank's ``k``. So are ``cache_seqlens`` and ``cache_leftpad`` (dtype, shape ``[B]``, range;
    each given on every rank or on none); the agreed per-row ends (and starts) are then
    all-gathered in one message (:func:`gather_seqlens`). ``extra``: a caller's own checks
    (a callable returning more fields to agree, first), run in the same agreement."""
    g = dist.resolve_group(group)

    def check():
        first = {} if extra is None else extra()
        scale = check_local(q, k, v, softmax_scale)
        is_causal = check_bool("causal", causal)
        check_bool("return_lse", return_lse)
        hier = check_hierarchy(hierarchy, g.size)
        lens = None if shard_lens is None else check_shard_lens(shard_lens, g.rank, g.size, k)
        rows = None if cache_seqlens is None else check_cache_seqlens(
            cache_seqlens, q.shape[0], k.shape[1])
        pads = None
        if cache_leftpad is not None:
            rows = [int(k.shape[1])] * q.shape[0] if rows is None else rows
            pads = check_cache_leftpad(cache_leftpad, q.shape[0], rows)
        name = resolve_backend(q, k, v, backend, causal=is_causal)
        b, _, hkv, d = k.shape
        fields = {
            **first,
            "q.shape": tuple(q.shape), "k/v shape [B, *, Hkv, D]": (b, hkv, d),
            "dtype": q.dtype, "q.device.type": q.device.type, "causal": is_causal,
            "softmax_scale": scale, "hierarchy": (0, 0) if hier is None else hier,
            "backend": name,
            # one word whatever the world size: the lengths agree iff their text does
            "shard_lens": None if lens is None else ",".join(map(str, lens)),
            "kv_len": int(k.shape[1]),
            "cache_seqlens given": cache_seqlens is not None,
            "cache_leftpad given": pads is not None,
        }
        if g.distributed:  # q must be replicated: a digest of its values agrees too
            fields["q values (float64 checksum)"] = q_checksum(q)
        return (scale, is_causal, hier, name, rows, pads), fields

    (scale, is_causal, hier, name, rows, pads), views = dist.agree(op, g, check,
                                                                   vary=("kv_len",))
    if g.distributed:
        nb = dist.agreement_nbytes()
        comm.record("send", "all_gather", nb)
        comm.record("recv", "all_gather", nb * (g.size - 1))
    lens = views["kv_len"]
    seqlens = leftpads = None
    if rows is not None:  # one all-gather: every rank's ends, then its starts (cache_leftpad)
        every = gather_seqlens(rows + (pads or []), g)
        seqlens = [r[:len(rows)] for r in every]
        leftpads = None if pads is None else [r[len(rows):] for r in every]
    call = Call(g, scale, is_causal, lens, hier, name, seqlens, leftpads)
    # every rank knows every shard's geometry now: a backend that cannot serve one of them
    # raises here, identically on every rank (no further communication)
    check_backend_geometry(q, k, v, lens, causal=is_causal, backend=name,
                           shards=range(len(lens)), seqlens=call.counts())
    return call
