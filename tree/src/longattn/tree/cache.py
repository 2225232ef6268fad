"""A sequence-sharded KV cache for distributed decoding (one per attention layer per rank).

The one sharded-cache home of longattn: the global cache is the concatenation of the ranks'
shards in group-rank order (the layout :func:`~longattn.tree.tree_decode` assumes). Every rank
keeps every rank's filled length in ``lens``, so decode calls pass ``shard_lens=cache.lens``
(checked inside the call's argument agreement).

New tokens go to the rank owning the sequence tail: the last rank holding any token (rank 0
while the cache is empty). With a per-rank ``capacity``, tokens that do not fit spill onto the
following ranks in order, so the tail moves through the ranks as the sequence grows and the
shards stay contiguous; without one the tail rank's buffer grows.

``append`` takes the new tokens' keys and values *on every rank*: in tree decoding the
attention output is replicated, so every rank computes the same next hidden states and the same
new keys / values; each rank stores only the part that lands on it. Its checks run inside one
:func:`longattn.common.dist.agree` over the cache's ``group`` (one small all-gather): a bad
argument on any one rank (a wrong shape, dtype, device, a non-float tensor, a cache out of step)
raises the same error on every rank, before anything is written or any length changes.

Public API (stable): the fields ``k``, ``v``, ``lens``, ``rank``, ``capacity``, ``group``; the
properties ``local_k``, ``local_v``, ``seq_len``; the methods ``tail_rank()``,
``placement(n)``, ``append(k_new, v_new)``; and :func:`empty_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from longattn.common import dist
from longattn.common.dtypes import FLOAT_DTYPES


@dataclass
class KVCache:
    """This rank's shard of a sequence-sharded KV cache.

    Fields:
        k, v: ``[B, allocated, Hkv, D]`` buffers of this rank; the first ``lens[rank]``
            positions are filled.
        lens: every rank's filled length (group-rank order), the same list on every rank.
        rank: this process's rank in the group.
        capacity: tokens per rank, or None (the tail rank's buffer grows).
        group: the ranks that append together (``len(lens)`` of them; a ``ProcessGroup``, a
            1-D ``DeviceMesh`` or ``longattn.common.dist.LOCAL``): :meth:`append` agrees on its
            arguments over it. :func:`empty_cache` sets it; a cache built by hand defaults to
            ``LOCAL`` (each rank checks its own arguments, no agreement).
    """

    k: torch.Tensor
    v: torch.Tensor
    lens: list
    rank: int
    capacity: int | None = None
    group: Any = field(default=dist.LOCAL, repr=False, compare=False)

    @property
    def local_k(self) -> torch.Tensor:
        """``[B, lens[rank], Hkv, D]`` view of this rank's filled keys."""
        return self.k[:, : self.lens[self.rank]]

    @property
    def local_v(self) -> torch.Tensor:
        """``[B, lens[rank], Hkv, D]`` view of this rank's filled values."""
        return self.v[:, : self.lens[self.rank]]

    @property
    def seq_len(self) -> int:
        """Tokens in the whole (global) cache."""
        return sum(self.lens)

    def tail_rank(self) -> int:
        """The rank the next token goes to."""
        live = [r for r, n in enumerate(self.lens) if n]
        t = live[-1] if live else 0
        if self.capacity is not None and self.lens[t] >= self.capacity:
            t += 1
        return t

    def placement(self, n: int) -> list:
        """``[(rank, start_in_new, count)]``: where ``n`` new tokens go. Raises ``ValueError``
        if they do not fit (``len(lens)`` ranks of ``capacity`` tokens)."""
        t, done, out = self.tail_rank(), 0, []
        while done < n:
            if t >= len(self.lens):
                raise ValueError(f"KV cache full: {self.seq_len} + {n} tokens exceed "
                                 f"{len(self.lens)} ranks x capacity {self.capacity}")
            room = n - done if self.capacity is None else self.capacity - self.lens[t]
            take = min(room, n - done)
            if take > 0:
                out.append((t, done, take))
                done += take
            t += 1
        return out

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add ``k_new, v_new [B, n, Hkv, D]`` (the same on every rank) at the global tail.
        Both must be floating-point tensors matching the cache's batch, heads, head dim, dtype
        and device. Every check (and the placement) runs inside one agreement over ``group``
        before anything is written: a bad argument on any rank raises the same
        ``ValueError`` / ``TypeError`` on every rank, and no rank writes or counts a token."""
        g = dist.resolve_group(self.group)

        def check():
            return self._check_append(k_new, v_new, g), {
                "k_new.shape": tuple(k_new.shape), "v_new.shape": tuple(v_new.shape),
                "dtype": k_new.dtype, "device type": k_new.device.type,
                "capacity": self.capacity,
                # one word whatever the world size: the lengths agree iff their text does
                "lens": ",".join(map(str, self.lens)),
            }

        where, _ = dist.agree("KVCache.append", g, check)
        for r, start, count in where:
            if r == self.rank:
                self._write(k_new[:, start:start + count], v_new[:, start:start + count])
            self.lens[r] += count

    def _check_append(self, k_new, v_new, g):
        """This rank's checks of :meth:`append`; returns the placement."""
        # LOCAL (a cache built by hand): this rank checks alone, whatever len(lens) is
        if g.distributed and (g.size != len(self.lens) or g.rank != self.rank):
            raise ValueError(f"the cache's group has {g.size} ranks and this is rank {g.rank}, "
                             f"but the cache holds lens for {len(self.lens)} ranks with rank "
                             f"{self.rank}")
        for name, t, buf in (("k_new", k_new, self.k), ("v_new", v_new, self.v)):
            check_new_tokens(name, t, buf)
        if v_new.shape[-1] != k_new.shape[-1]:
            raise ValueError(f"v_new head_dim ({v_new.shape[-1]}) must equal k_new head_dim "
                             f"({k_new.shape[-1]})")
        if v_new.dtype != k_new.dtype:
            raise TypeError(f"v_new dtype {v_new.dtype} must be k_new's {k_new.dtype}")
        if k_new.shape[1] != v_new.shape[1]:
            raise ValueError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} must "
                             "hold the same number of new tokens")
        return self.placement(k_new.shape[1])

    def _write(self, k, v):
        n0, n = self.lens[self.rank], k.shape[1]
        if n0 + n > self.k.shape[1]:  # only without a capacity: grow geometrically
            size = max(n0 + n, 2 * self.k.shape[1], 16)
            self.k = _grow(self.k, size)
            self.v = _grow(self.v, size)
        self.k[:, n0:n0 + n] = k
        self.v[:, n0:n0 + n] = v


def check_new_tokens(name, t, buf, *, seq_dim=1):
    """New tokens ``t`` for the cache buffer ``buf [B, S, Hkv, D]``: a floating-point 4-D tensor
    with buf's batch, KV heads, head dim, dtype and device. ``seq_dim`` is where ``t`` keeps its
    tokens: 1 for ``[B, n, Hkv, D]``, 2 for transformers' ``[B, Hkv, n, D]``. The one home of
    these checks for every sharded cache (tree's and the transformers one)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor "
                        f"({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    want = "[B, n, Hkv, D]" if seq_dim == 1 else "[batch, kv_heads, n, head_dim]"
    if t.ndim != 4:
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    b, _, h, d = buf.shape
    if (t.shape[0], *t.movedim(seq_dim, 1).shape[2:]) != (b, h, d):
        cache = ("[B, *, Hkv, D] = " + str(tuple(buf.shape)) if seq_dim == 1
                 else f"[batch, kv_heads, *, head_dim] = [{b}, {h}, *, {d}]")
        raise ValueError(f"{name} {tuple(t.shape)} does not match the cache's {cache}")
    if t.dtype != buf.dtype:
        raise TypeError(f"{name} dtype {t.dtype} must be the cache's {buf.dtype}")
    if t.device != buf.device:
        raise ValueError(f"{name} is on {t.device}, the cache on {buf.device}")


def _grow(t, size):
    new = t.new_empty((t.shape[0], size) + tuple(t.shape[2:]))
    new[:, : t.shape[1]] = t
    return new


def empty_cache(batch: int, kv_heads: int, head_dim: int, *, capacity: int | None = None,
                group=None, dtype=torch.float32, device=None) -> KVCache:
    """An empty cache for this rank of ``group`` (a ``ProcessGroup``, a 1-D ``DeviceMesh``,
    ``longattn.common.dist.LOCAL`` or None: this process alone; None is an error in an
    initialised world of more than one rank). ``capacity`` tokens per rank (None: grow).
    The cache keeps ``group`` for the agreement of :meth:`KVCache.append`. No communication."""
    for name, x in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 1):
        raise ValueError(f"capacity must be None or a positive int, got {capacity!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got "
                        f"{dtype!r}")
    g = dist.resolve_group(group)
    shape = (batch, 0 if capacity is None else capacity, kv_heads, head_dim)
    return KVCache(torch.empty(shape, dtype=dtype, device=device),
                   torch.empty(shape, dtype=dtype, device=device), [0] * g.size, g.rank,
                   capacity, dist.LOCAL if group is None else group)
