"""How a sequence is split over the ranks of a context-parallel group: local index arithmetic
and slicing, no communication.

    positions(seq_len, rank, world_size, layout)         # global token indices of a rank
    take_shard(x, rank, world_size, *, layout, dim)       # a rank's part of a full tensor
    join_shards(parts, *, layout, dim)                    # the full tensor from every part
    varlen_positions / take_shard_varlen / join_shards_varlen   # the same for packed batches

(The distributed layout functions, this rank's part of a global tensor over a group and the
gather back, are hamilton's ``shard`` / ``unshard``.)

Layouts (``n`` ranks):

* ``contiguous`` -- rank r holds tokens ``[r*S/n, (r+1)*S/n)``.
* ``zigzag`` -- the sequence is cut into ``2n`` blocks; rank r holds blocks ``r`` and
  ``2n-1-r`` (in that order). Balances causal work: every rank gets one early, one late block.
* ``striped`` -- rank r holds tokens ``r, r+n, r+2n, ...``.

Dense tensors are split along ``dim`` (default 1, the sequence axis of BSHD). Varlen (packed,
``cu_seqlens``) tensors are split along ``dim`` (default 0): ``contiguous`` cuts the packed
token stream into ``n`` equal parts, so sequences may cross ranks; ``zigzag`` / ``striped``
apply the layout to every sequence separately (each sequence length divisible by ``2n`` /
``n``), so the local tensor is again a packed batch with ``cu_seqlens // n``.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag", "striped")


def _check(seq_len, rank, world_size, layout, what="sequence length"):
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f"{what} (seq_len) must be an int, got {seq_len!r}")
    if seq_len < 0:
        raise ValueError(f"{what} (seq_len) must be >= 0, got {seq_len}")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    div = 2 * world_size if layout == "zigzag" else world_size
    if seq_len % div != 0:
        raise ValueError(
            f"{what} {seq_len} must be divisible by {div} for the {layout} layout over "
            f"{world_size} ranks"
        )


def positions(seq_len: int, rank: int, world_size: int, layout: str = "contiguous"):
    """Global token indices (int64, in local order) that ``rank`` holds."""
    _check(seq_len, rank, world_size, layout)
    n = world_size
    if layout == "contiguous":
        m = seq_len // n
        return torch.arange(rank * m, (rank + 1) * m)
    if layout == "striped":
        return torch.arange(seq_len // n) * n + rank
    b = seq_len // (2 * n)
    return torch.cat([torch.arange(rank * b, (rank + 1) * b),
                      torch.arange((2 * n - 1 - rank) * b, (2 * n - rank) * b)])


def _check_x(x, dim, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int in [-{x.ndim}, {x.ndim}), got {dim!r}")


def take_shard(x: torch.Tensor, rank: int, world_size: int, *, layout: str = "contiguous",
               dim: int = 1):
    """Rank ``rank``'s part of the full tensor ``x`` along ``dim`` (a contiguous copy)."""
    _check_x(x, dim)
    idx = positions(x.shape[dim], rank, world_size, layout).to(x.device)
    return x.index_select(dim, idx).contiguous()


def join_shards(chunks, *, layout: str = "contiguous", dim: int = 1):
    """Inverse of :func:`take_shard`: the full tensor from every rank's part (rank order)."""
    n = _check_chunks(chunks, dim)
    local = chunks[0].shape[dim]
    if any(c.shape[dim] != local for c in chunks):
        raise ValueError(f"join_shards: chunks differ in size along dim {dim}")
    seq_len = local * n
    cat = torch.cat(list(chunks), dim=dim)
    idx = torch.cat([positions(seq_len, r, n, layout) for r in range(n)]).to(cat.device)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(seq_len, device=cat.device)
    return cat.index_select(dim, inv)


def _check_chunks(chunks, dim):
    if not isinstance(chunks, (list, tuple)) or not chunks:
        raise ValueError("chunks must be a non-empty list of tensors (one per rank)")
    for c in chunks:
        _check_x(c, dim, "chunks[i]")
    ref = chunks[0]
    d = dim % ref.ndim
    for c in chunks:
        if c.ndim != ref.ndim or any(a != b for i, (a, b) in enumerate(zip(c.shape, ref.shape))
                                     if i != d):
            raise ValueError(f"chunks must agree in every dim but {dim}: "
                             f"{[tuple(c.shape) for c in chunks]}")
    return len(chunks)


def _cu_list(cu_seqlens, total=None):
    from longattn.common.checks import check_cu_seqlens

    if not isinstance(cu_seqlens, torch.Tensor):
        if not isinstance(cu_seqlens, (list, tuple)) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in cu_seqlens):
            raise TypeError(f"cu_seqlens must be an int tensor or a list of ints, got "
                            f"{cu_seqlens!r}")
        cu_seqlens = torch.tensor(list(cu_seqlens), dtype=torch.int64)
    if total is None:
        total = int(cu_seqlens[-1]) if cu_seqlens.ndim == 1 and cu_seqlens.numel() else 0
    return check_cu_seqlens(cu_seqlens, total)


def varlen_positions(cu_seqlens, rank: int, world_size: int, layout: str = "contiguous"):
    """``(idx, local_cu_seqlens)``: packed-token indices this rank holds and, for zigzag /
    striped, the local ``cu_seqlens`` (int32). For contiguous, ``local_cu_seqlens`` holds the
    boundaries of the sequence pieces that fall on this rank (a sequence may start on an earlier
    rank), relative to the rank's first token."""
    cu = _cu_list(cu_seqlens)
    total = cu[-1]
    if layout == "contiguous":
        _check(total, rank, world_size, layout, "total token count")
        m = total // world_size
        lo, hi = rank * m, (rank + 1) * m
        cuts = sorted({lo, hi, *[c for c in cu if lo < c < hi]})
        return torch.arange(lo, hi), torch.tensor([c - lo for c in cuts], dtype=torch.int32)
    idx, local = [], [0]
    for a, b in zip(cu, cu[1:]):
        _check(b - a, rank, world_size, layout, f"sequence length (tokens {a}..{b})")
        p = positions(b - a, rank, world_size, layout) + a
        idx.append(p)
        local.append(local[-1] + len(p))
    idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    return idx, torch.tensor(local, dtype=torch.int32)


def take_shard_varlen(x, cu_seqlens, rank, world_size, *, layout="contiguous", dim=0):
    """``(x_local, local_cu_seqlens)`` for a packed varlen tensor; see :func:`varlen_positions`."""
    _check_x(x, dim)
    _cu_list(cu_seqlens, x.shape[dim])  # must end exactly at the token count
    idx, local_cu = varlen_positions(cu_seqlens, rank, world_size, layout)
    return x.index_select(dim, idx.to(x.device)).contiguous(), local_cu.to(x.device)


def join_shards_varlen(chunks, cu_seqlens, *, layout="contiguous", dim=0):
    """Inverse of :func:`take_shard_varlen`."""
    n = _check_chunks(chunks, dim)
    idx = torch.cat([varlen_positions(cu_seqlens, r, n, layout)[0] for r in range(n)])
    cat = torch.cat(list(chunks), dim=dim)
    if cat.shape[dim] != idx.numel():
        raise ValueError(
            f"join_shards_varlen: {cat.shape[dim]} tokens in chunks, expected {idx.numel()}")
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel())
    return cat.index_select(dim, inv.to(cat.device))


