"""A sequence-sharded KV cache for distributed decoding (one per attention layer per rank).

The one sharded-cache home of longattn (the transformers ``ShardedCache`` stores each of its
layers in one). Every rank keeps every rank's filled length in ``lens`` and the global
position of each of its own keys in ``local_positions``.

**Placement: balanced blocks.** The global positions are cut into blocks of ``block`` tokens
(``p // block``); each block goes whole to one rank, the rank holding the fewest tokens when
the block starts (the lowest such rank on a tie; with a per-rank ``capacity``, among the ranks
with room). Started balanced (empty, or a prefill split evenly), every rank's length stays
within ``block`` tokens of every other's, however long the sequence grows: the decode work and
the memory of every rank grow together. The rule reads only ``lens``, ``block``, ``capacity``
and the rank of the last token (``tail``), which every rank has, so every rank computes the
same placement without communication.

The shards are therefore *not* contiguous pieces of the sequence in group-rank order (the
layout :func:`~longattn.tree.tree_decode`'s ``causal`` mask assumes): attend with
:meth:`KVCache.attend` (or :func:`attend`), which reads the keys' positions, so causal
masks among several new tokens and sliding windows stay exact. A single new token sees every
cached key, so it is one :func:`~longattn.tree.tree_decode` call either way.

``append`` takes the new tokens' keys and values *on every rank*: in tree decoding the
attention output is replicated, so every rank computes the same next hidden states and the same
new keys / values; each rank stores only the part that lands on it. Its checks run inside one
:func:`longattn.common.dist.agree` over the cache's ``group`` (one small all-gather): a bad
argument on any one rank (a wrong shape, dtype, device, a non-float tensor, a cache out of step)
raises the same error on every rank, before anything is written or any length changes.

Public API (stable): the fields ``k``, ``v``, ``lens``, ``rank``, ``capacity``, ``group``,
``block``, ``tail``; the properties ``local_k``, ``local_v``, ``local_positions``,
``seq_len``; the methods ``tail_rank()``, ``placement(n)``, ``append(k_new, v_new)``,
``attend(q, ...)``; and the functions :func:`empty_cache`, :func:`attend`.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from longattn.common import dist
from longattn.common.checks import check_bool, check_window
from longattn.common.dtypes import FLOAT_DTYPES


@dataclass
class KVCache:
    """This rank's shard of a sequence-sharded KV cache.

    Fields:
        k, v: ``[B, allocated, Hkv, D]`` buffers of this rank; the first ``lens[rank]``
            positions are filled.
        lens: every rank's filled length (group-rank order), the same list on every rank.
        rank: this process's rank in the group.
        capacity: tokens per rank, or None (the buffers grow).
        group: the ranks that append together (``len(lens)`` of them; a ``ProcessGroup``, a
            1-D ``DeviceMesh`` or ``longattn.common.dist.LOCAL``): :meth:`append` agrees on its
            arguments over it. :func:`empty_cache` sets it; a cache built by hand defaults to
            ``LOCAL`` (each rank checks its own arguments, no agreement).
        block: tokens per placement block (a positive int; see the module docstring).
        positions: (init only; then :attr:`local_positions`) ``[lens[rank]]`` int64 global
            positions of this rank's filled keys, or None:
            the filled keys are contiguous pieces in group-rank order (rank ``r`` holds
            ``lens[0] + ... + lens[r-1]`` onwards), e.g. a prefill split that way.
        tail: the rank holding the last token, or None (the next token starts a block).
    """

    k: torch.Tensor
    v: torch.Tensor
    lens: list
    rank: int
    capacity: int | None = None
    group: Any = field(default=dist.LOCAL, repr=False, compare=False)
    block: int = 1
    positions: InitVar[torch.Tensor | None] = None
    tail: int | None = None

    def __post_init__(self, positions):
        _check_block(self.block)
        n = self.lens[self.rank]
        if positions is None:
            off = sum(self.lens[:self.rank])
            positions = torch.arange(off, off + n)
        elif tuple(positions.shape) != (n,):
            raise ValueError(f"positions must hold lens[rank] = {n} positions, got "
                             f"{tuple(positions.shape)}")
        self._pos = positions.to(torch.int64).cpu().clone()

    @property
    def local_k(self) -> torch.Tensor:
        """``[B, lens[rank], Hkv, D]`` view of this rank's filled keys."""
        return self.k[:, : self.lens[self.rank]]

    @property
    def local_v(self) -> torch.Tensor:
        """``[B, lens[rank], Hkv, D]`` view of this rank's filled values."""
        return self.v[:, : self.lens[self.rank]]

    @property
    def local_positions(self) -> torch.Tensor:
        """``[lens[rank]]`` int64 (CPU) global positions of this rank's filled keys."""
        return self._pos[: self.lens[self.rank]]

    @property
    def seq_len(self) -> int:
        """Tokens in the whole (global) cache."""
        return sum(self.lens)

    def tail_rank(self) -> int:
        """The rank the next token goes to (``ValueError`` if the cache is full)."""
        return self.placement(1)[0][0]

    def placement(self, n: int) -> list:
        """``[(rank, start_in_new, count)]``: where ``n`` new tokens go (balanced blocks, see
        the module docstring). Raises ``ValueError`` if they do not fit (``capacity``)."""
        lens, tail, p, out, done = list(self.lens), self.tail, self.seq_len, [], 0
        cap, block = self.capacity, self.block
        while done < n:
            if tail is None or p % block == 0 or (cap is not None and lens[tail] >= cap):
                room = [r for r, m in enumerate(lens) if cap is None or m < cap]
                if not room:
                    raise ValueError(f"KV cache full: {self.seq_len} + {n} tokens exceed "
                                     f"{len(lens)} ranks x capacity {cap}")
                tail = min(room, key=lambda r: (lens[r], r))
            take = min(n - done, block - p % block, n if cap is None else cap - lens[tail])
            if out and out[-1][0] == tail:  # the same rank continues: one run
                out[-1] = (tail, out[-1][1], out[-1][2] + take)
            else:
                out.append((tail, done, take))
            lens[tail] += take
            done += take
            p += take
        return out

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add ``k_new, v_new [B, n, Hkv, D]`` (the same on every rank) at the global
        positions ``seq_len .. seq_len + n - 1``, each token on the rank :meth:`placement`
        gives. Both must be floating-point tensors matching the cache's batch, heads, head dim,
        dtype and device. Every check (and the placement) runs inside one agreement over
        ``group`` before anything is written: a bad argument on any rank raises the same
        ``ValueError`` / ``TypeError`` on every rank, and no rank writes or counts a token."""
        g = dist.resolve_group(self.group)

        def check():
            return self._check_append(k_new, v_new, g), {
                "k_new.shape": tuple(k_new.shape), "v_new.shape": tuple(v_new.shape),
                "dtype": k_new.dtype, "device type": k_new.device.type,
                "capacity": self.capacity, "block": self.block,
                "tail": -1 if self.tail is None else self.tail,
                # one word whatever the world size: the lengths agree iff their text does
                "lens": ",".join(map(str, self.lens)),
            }

        where, _ = dist.agree("KVCache.append", g, check)
        self.place(k_new, v_new, where)

    def place(self, k_new, v_new, where) -> None:
        """Store ``k_new, v_new`` where :meth:`placement` said (no checks: :meth:`append`
        checks and agrees first; the transformers cache agrees on its own call)."""
        p0 = self.seq_len
        for r, start, count in where:
            if r == self.rank:
                self._write(k_new[:, start:start + count], v_new[:, start:start + count],
                            torch.arange(p0 + start, p0 + start + count))
            self.lens[r] += count
        if where:
            self.tail = where[-1][0]

    def attend(self, q, *, softmax_scale=None, causal=True, window_size=(-1, -1),
               return_lse=False, backend="auto"):
        """Exact attention of the newest ``Lq`` tokens' queries ``q [B, Lq, Hq, D]`` (the same
        on every rank; their keys appended already, so they sit at the global positions
        ``seq_len - Lq ..``) over the whole cache: :func:`attend` with this cache's
        positions, lengths and group. Returns ``out [B, Lq, Hq, D]`` (and ``lse``), identical on
        every rank."""
        # q is checked inside attend's agreement (a bad q on one rank must not hang the rest)
        lq = q.shape[1] if isinstance(q, torch.Tensor) and q.ndim == 4 else 0
        return attend(q, self.local_k, self.local_v, positions=self.local_positions,
                      query_positions=torch.arange(self.seq_len - lq, self.seq_len),
                      lens=self.lens, group=self.group, softmax_scale=softmax_scale,
                      causal=causal, window_size=window_size, return_lse=return_lse,
                      backend=backend)

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

    def _write(self, k, v, pos):
        n0, n = self.lens[self.rank], k.shape[1]
        if n0 + n > self.k.shape[1]:  # only without a capacity: grow geometrically
            size = max(n0 + n, 2 * self.k.shape[1], 16)
            self.k = _grow(self.k, size)
            self.v = _grow(self.v, size)
        if n0 + n > self._pos.shape[0]:
            new = torch.empty(max(n0 + n, 2 * self._pos.shape[0], 16), dtype=torch.int64)
            new[:n0] = self._pos[:n0]
            self._pos = new
        self.k[:, n0:n0 + n] = k
        self.v[:, n0:n0 + n] = v
        self._pos[n0:n0 + n] = pos


def attend(q, k, v, *, positions, query_positions, lens, group, softmax_scale=None,
           causal=True, window_size=(-1, -1), return_lse=False, backend="auto"):
    """Exact attention of replicated new tokens over a sharded cache in *any* placement.

    ``q [B, Lq, Hq, D]``: the same on every rank; token ``t`` sits at the global position
    ``query_positions[t]`` (its own key is in the cache). ``k, v [B, n_r, Hkv, D]``: this
    rank's keys, at the global positions ``positions [n_r]`` (int64, any order). ``lens``:
    every rank's ``n_r``. ``window_size=(left, right)``: -1 unbounded; a key at position ``j``
    is seen by the token at ``p`` if ``p - left <= j`` (``left >= 0``) and ``j <= p + right``
    (``right >= 0``; ``causal`` caps ``right`` at 0, flash-attn's rule). ``group``: the ranks
    holding the cache, ``len(lens)`` of them. Every argument that picks a rank's keys (``q``'s
    shape, ``causal``, the window, ``lens``) is agreed on over ``group`` first: a bad or
    differing one on any rank raises the same error on every rank. Returns ``out [B, Lq, Hq,
    D]`` (and ``lse [B, Hq, Lq]``) identical on every rank.

    With every cached key visible to every token (one token, or no causal mask, and no window)
    this is one :func:`~longattn.tree.tree_decode` call; otherwise one call per new token on the
    keys it sees, selected on every rank from their positions (the placement then does not
    matter)."""
    from longattn.tree.decode import _tree_decode

    g = dist.resolve_group(group)
    try:
        left, right = _check_attend(q, k, positions, query_positions, lens, g, causal,
                                    window_size)
        err = None
    except (TypeError, ValueError) as e:  # raised inside the first call's agreement
        err, left, right = e, -1, -1

    def extra():
        # the window, causal and lens pick each rank's keys before the decode calls: agreed in
        # the first call's all-gather (the calls agree on q, k, v, the scale, the backend)
        if err is not None:
            raise err
        return {"attend causal": causal, "attend window_size": (left, right),
                "attend lq": q.shape[1], "attend lens": ",".join(map(str, lens))}

    kw = {"group": g, "softmax_scale": softmax_scale, "hierarchy": None, "causal": False,
          "cache_seqlens": None, "cache_leftpad": None, "backend": backend, "op": "attend"}
    if err is not None or (left < 0 and (right < 0 if not causal else q.shape[1] == 1)):
        return _tree_decode(q, k, v, shard_lens=None if err is not None else list(lens),
                            return_lse=return_lse, extra=extra, **kw)
    outs, lses = [], []
    pos = positions.to(torch.int64).cpu()
    for t, p in enumerate(query_positions.tolist()):
        seen = torch.ones_like(pos, dtype=torch.bool)
        if left >= 0:
            seen &= pos >= p - left
        if right >= 0:  # causal: right is 0
            seen &= pos <= p + right
        kt, vt = _visible(k, v, seen)
        res = _tree_decode(q[:, t:t + 1], kt, vt, shard_lens=None, return_lse=True,
                           extra=extra if t == 0 else None, **kw)
        outs.append(res[0])
        lses.append(res[1])
    out = torch.cat(outs, dim=1)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def _visible(k, v, seen):
    """The keys and values a token sees (``seen [n_r]``): a view of one slice when they are
    contiguous (ascending positions, as the balanced placement keeps them: a window or a causal
    bound then cuts one range), else a copy of the selected ones."""
    sel = seen.nonzero()[:, 0]
    if sel.numel() == 0:
        return k[:, :0], v[:, :0]
    lo, hi = int(sel[0]), int(sel[-1]) + 1
    if hi - lo == sel.numel():
        return k[:, lo:hi], v[:, lo:hi]
    sel = sel.to(k.device)
    return k.index_select(1, sel), v.index_select(1, sel)


def _check_attend(q, k, positions, query_positions, lens, g, causal, window_size):
    """This rank's checks of :func:`attend`. Returns the window with ``causal`` folded in
    (flash-attn's rule: causal caps ``right`` at 0)."""
    check_bool("causal", causal)
    left, right = check_window(window_size, "window_size")
    if not isinstance(q, torch.Tensor) or q.ndim != 4:
        raise ValueError(f"q must be a [B, Lq, Hq, D] tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q)}")
    if not isinstance(lens, (list, tuple)) or len(lens) != g.size:
        raise ValueError(f"lens must hold one length per rank of the group ({g.size}), got "
                         f"{lens!r}" + ("" if g.distributed else " (the group is this process "
                                        "alone: pass the cache's group)"))
    if not isinstance(k, torch.Tensor) or lens[g.rank] != k.shape[1]:
        raise ValueError(f"lens[{g.rank}] ({lens[g.rank]}) must be this rank's key count "
                         f"{k.shape[1] if isinstance(k, torch.Tensor) else type(k)}")
    if positions.shape != (k.shape[1],):
        raise ValueError(f"positions must be [{k.shape[1]}] (one per key), got "
                         f"{tuple(positions.shape)}")
    if query_positions.shape != (q.shape[1],):
        raise ValueError(f"query_positions must be [{q.shape[1]}] (one per query), got "
                         f"{tuple(query_positions.shape)}")
    return (left, 0) if causal else (left, right)


def _check_block(block):
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


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
                block: int = 1, group=None, dtype=torch.float32, device=None) -> KVCache:
    """An empty cache for this rank of ``group`` (a ``ProcessGroup``, a 1-D ``DeviceMesh``,
    ``longattn.common.dist.LOCAL`` or None: this process alone; None is an error in an
    initialised world of more than one rank). ``capacity`` tokens per rank (None: grow),
    ``block`` tokens per placement block (see the module docstring). The cache keeps
    ``group`` for the agreement of :meth:`KVCache.append`. No communication."""
    for name, x in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                 or capacity < 1):
        raise ValueError(f"capacity must be None or a positive int, got {capacity!r}")
    _check_block(block)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got "
                        f"{dtype!r}")
    g = dist.resolve_group(group)
    shape = (batch, 0 if capacity is None else capacity, kv_heads, head_dim)
    return KVCache(torch.empty(shape, dtype=dtype, device=device),
                   torch.empty(shape, dtype=dtype, device=device), [0] * g.size, g.rank,
                   capacity, dist.LOCAL if group is None else group, block)
