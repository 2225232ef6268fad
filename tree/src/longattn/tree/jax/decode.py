"""Tree and ring decoding in JAX with ``shard_map`` (same contract as the torch functions).

Layout: ``k, v [B, p * cap, Hkv, D]`` are global arrays whose sequence axis is (or gets)
sharded over the mesh axes ``axis_name`` (``p`` devices in all); device ``i`` holds the block
``[i * cap, (i + 1) * cap)``. ``shard_lens [p]`` says how many leading slots of each block are
filled (default: all); the global cache is the concatenation of the filled prefixes in device
order, so blocks may be uneven or empty -- the fixed-capacity KV cache JAX's static shapes
want, which also lets a growing cache run without recompiling. The ``Lq`` new tokens are the
last ``Lq`` positions of the global cache; with ``causal`` token ``t`` sees the keys at global
positions ``<= N - Lq + t`` (``N = sum(shard_lens)``), exactly as in
:mod:`longattn.tree.local`.

``axis_name`` is a mesh axis or a tuple of them (outer first, e.g. ``("node", "gpu")``); with
a tuple the tree combine reduces over the inner axis first, then the outer -- the
topology-aware order (inside a node, then across nodes). ``q [B, Lq, Hq, D]`` is replicated.

``cache_seqlens [p, B]`` instead gives each block's filled slots per batch row (flash-attn's
``cache_seqlens``, per device): row ``b``'s cache is the concatenation of the filled prefixes
of its rows in device order.

Two levels: :func:`tree_decode_per_device` / :func:`ring_decode_per_device` are the per-device
bodies, for a ``shard_map`` of your own (they take the bound ``axis_name``);
:func:`tree_decode` / :func:`ring_decode` wrap them in a ``shard_map`` over a mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longattn.tree.jax.local import check_backend, check_splits, local_attention
from longattn.tree.jax.merge import finish_rows, merge_stacked


def _shard_map(f, mesh, in_specs, out_specs, check):
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check)


def _axes(mesh, axis_name):
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if not axes or any(not isinstance(a, str) for a in axes):
        raise TypeError(f"axis_name must be a mesh axis name or a tuple of them, got "
                        f"{axis_name!r}")
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"axis_name {a!r} is not an axis of the mesh {dict(mesh.shape)}")
    return axes


def _check_arrays(q, k, v, softmax_scale, causal, backend, splits, axis_name, p):
    """The checks of ``q``, ``k``, ``v`` and the knobs shared by the mesh-level and the
    per-device functions (``k, v`` a global array or one device's block). Returns
    ``(softmax_scale, splits)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if getattr(t, "ndim", None) != 4:
            raise ValueError(f"{name} must be 4-d [batch, seq, heads, head_dim], got shape "
                             f"{getattr(t, 'shape', None)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q must be floating point, got {q.dtype}")
    b, lq, hq, d = q.shape
    if lq < 1:
        raise ValueError(f"q must hold at least one new token (Lq >= 1), got {q.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} must be [batch={b}, seq, Hkv, head_dim={d}]")
    if k.shape[2] < 1 or hq % k.shape[2]:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k/v heads "
                         f"({k.shape[2]})")
    if k.shape[1] % p:
        raise ValueError(f"k/v sequence length {k.shape[1]} must be divisible by the {p} "
                         f"devices of axis {axis_name!r} (pad each block to a capacity)")
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    elif (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
          or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    check_backend(backend)
    splits = check_splits(splits)
    cap = k.shape[1] // p
    if splits is not None and backend in ("xla", "xla_reduce") and cap % splits:
        raise ValueError(f"splits ({splits}) must divide the block length {cap} (backend "
                         f"{backend!r})")
    return float(softmax_scale), splits


def _check_lengths(name, x, shape, cap):
    """``shard_lens`` / ``cache_seqlens``: None or integers of ``shape``, each in
    ``[0, cap]`` where the values are known (a traced array is checked by shape and dtype
    only). Returns an int32 array or None."""
    if x is None:
        return None
    arr = jnp.asarray(x)
    if arr.shape != shape or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers of shape {list(shape)}, got {x!r}")
    if not isinstance(arr, jax.core.Tracer):
        if bool(jnp.any(arr < 0)) or bool(jnp.any(arr > cap)):
            raise ValueError(f"{name} must lie in [0, {cap}] (the block capacity), got {x!r}")
    return arr.astype(jnp.int32)


def _check_both(shard_lens, cache_seqlens):
    if shard_lens is not None and cache_seqlens is not None:
        raise ValueError("pass shard_lens (every block's filled length) or cache_seqlens "
                         "(per batch row), not both")


def _check(q, k, v, mesh, axis_name, softmax_scale, shard_lens, cache_seqlens, causal,
           backend, splits):
    """Validate a mesh-level call before tracing; returns ``(axes, scale, lens, rows,
    splits)`` with ``lens [p]`` (None when ``rows [p, B]`` is given)."""
    if not hasattr(mesh, "shape") or not hasattr(mesh, "devices"):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    axes = _axes(mesh, axis_name)
    p = math.prod(mesh.shape[a] for a in axes)
    scale, splits = _check_arrays(q, k, v, softmax_scale, causal, backend, splits, axis_name,
                                  p)
    cap = k.shape[1] // p
    _check_both(shard_lens, cache_seqlens)
    rows = _check_lengths("cache_seqlens", cache_seqlens, (p, q.shape[0]), cap)
    lens = _check_lengths("shard_lens", shard_lens, (p,), cap)
    if lens is None and rows is None:
        lens = jnp.full((p,), cap, jnp.int32)
    return axes, scale, lens, rows, splits


def _device_axes(axis_name):
    """``(axes, p)`` of a per-device call: the named axes must be bound (inside shard_map)."""
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if not axes or any(not isinstance(a, str) for a in axes):
        raise TypeError(f"axis_name must be a mesh axis name or a tuple of them, got "
                        f"{axis_name!r}")
    p = 1
    for a in axes:
        try:
            p *= _axis_size(a)
        except NameError:
            raise ValueError(f"axis_name {a!r} is not bound here: call this function inside "
                             f"shard_map (or pmap) over that axis") from None
    return axes, p


def _axis_size(a) -> int:
    size = getattr(jax.lax, "axis_size", None)
    return int(size(a)) if size is not None else int(jax.lax.psum(1, a))


def _check_device(q, k, v, axis_name, softmax_scale, shard_lens, cache_seqlens, causal,
                  backend, splits):
    """Validate a per-device call (``k, v`` this device's block); returns ``(axes, p, scale,
    lens, rows, splits)``."""
    axes, p = _device_axes(axis_name)
    scale, splits = _check_arrays(q, k, v, softmax_scale, causal, backend, splits, axis_name,
                                  1)
    cap = k.shape[1]
    _check_both(shard_lens, cache_seqlens)
    rows = _check_lengths("cache_seqlens", cache_seqlens, (q.shape[0],), cap)
    lens = _check_lengths("shard_lens", shard_lens, (p,), cap)
    if lens is None and rows is None:
        lens = jnp.full((p,), cap, jnp.int32)
    return axes, p, scale, lens, rows, splits


def _table(axes, lens, rows):
    """Every device's filled lengths, ``[p]`` (``shard_lens``) or ``[p, B]`` (per batch row:
    this device's ``cache_seqlens`` all-gathered over ``axes``)."""
    return lens if rows is None else jax.lax.all_gather(rows, axes)


def _bounds(table, src, lq, causal):
    """``(valid_len, limit)`` of device ``src``'s block (scalars, or ``[B]`` per row)."""
    ends = jnp.cumsum(table, axis=0)
    n = table[src]
    limit = ends[-1] - lq - (ends[src] - n) if causal else None
    return n, limit


def _combine(o, lse, axes):
    """One ``pmax`` of lse and one ``psum`` of ``[num | den]`` per axis, inner axis first
    (inside nodes, then across); returns ``(out, lse [B, Hq, Lq])``."""
    m = lse
    for a in reversed(axes):
        m = jax.lax.pmax(m, a)
    m = jnp.transpose(m, (0, 2, 1))  # [B, Lq, H], the row order of o
    # shift by 0 where no device has a key (exp(-inf) = 0); a NaN lse makes its w NaN, so
    # the psum carries it into num and den
    w = jnp.exp(jnp.transpose(lse, (0, 2, 1)) - jnp.where(jnp.isneginf(m), 0.0, m))
    wt = w[..., None]  # [B, Lq, H, 1]
    buf = jnp.concatenate([o * wt, wt], axis=-1)  # den rides along with num: one SUM
    for a in reversed(axes):
        buf = jax.lax.psum(buf, a)
    out, lse = finish_rows(buf[..., :-1], buf[..., -1], m)
    return out, jnp.transpose(lse, (0, 2, 1))


def tree_decode_per_device(q, k, v, *, axis_name, softmax_scale=None, shard_lens=None,
                           cache_seqlens=None, causal=True, return_lse=False, backend="xla",
                           splits=None):
    """Tree decoding from inside a ``shard_map`` (or ``pmap``) of your own: the per-device
    body of :func:`tree_decode`, so it composes with your model's own sharded code.

    Args:
        q: ``[B, Lq, Hq, D]``, the same on every device of ``axis_name``.
        k, v: ``[B, cap, Hkv, D]``, this device's block of the cache; device ``i`` (in
            ``jax.lax.axis_index(axis_name)`` order) holds the ``i``-th piece.
        axis_name: the bound axis (or tuple of axes, outer first) the cache is sharded over.
        shard_lens: ``[p]`` ints, the filled slots of every device's block, the same on every
            device (default: all full).
        cache_seqlens: ``[B]`` ints, this device's filled slots per batch row (as flash-attn's
            ``flash_attn_with_kvcache``); every row of the cache is the concatenation of its
            filled prefixes in device order. A row may be empty on a device, or everywhere
            (out 0, lse -inf). Not together with ``shard_lens``. Causal ``Lq > 1`` all-gathers
            it over ``axis_name`` (``B`` ints per device) for the rows' global positions.
        softmax_scale, causal, return_lse, backend, splits: as :func:`tree_decode`.

    Shapes, dtypes and knobs are checked when traced; the values of traced lengths cannot be
    (they must lie in ``[0, cap]``). Returns ``out [B, Lq, Hq, D]`` in q's dtype, the same on
    every device (and ``lse [B, Hq, Lq]``).
    """
    axes, p, scale, lens, rows, splits = _check_device(q, k, v, axis_name, softmax_scale,
                                                       shard_lens, cache_seqlens, causal,
                                                       backend, splits)
    lq = q.shape[1]
    idx = jax.lax.axis_index(axes)
    if rows is not None and not (causal and lq > 1):
        # every valid key of a row is visible (Lq = 1 sees the whole cache): no positions
        n, limit = rows, None
    else:
        n, limit = _bounds(_table(axes, lens, rows), idx, lq, causal)
    o, lse = local_attention(q, k, v, softmax_scale=scale, valid_len=n, limit=limit,
                             backend=backend, splits=splits)
    out, lse = _combine(o, lse, axes)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def ring_decode_per_device(q, k, v, *, axis_name, softmax_scale=None, shard_lens=None,
                           cache_seqlens=None, causal=True, return_lse=False, backend="xla",
                           splits=None):
    """Ring decoding from inside a ``shard_map`` of your own: the per-device body of
    :func:`ring_decode` (same arguments as :func:`tree_decode_per_device`; with
    ``cache_seqlens`` every call all-gathers it, since each device attends every block)."""
    axes, p, scale, lens, rows, splits = _check_device(q, k, v, axis_name, softmax_scale,
                                                       shard_lens, cache_seqlens, causal,
                                                       backend, splits)
    lq = q.shape[1]
    idx = jax.lax.axis_index(axes)
    table = _table(axes, lens, rows)

    def part(kb, vb, src):
        n, limit = _bounds(table, src, lq, causal)
        o, lse = local_attention(q, kb, vb, softmax_scale=scale, valid_len=n, limit=limit,
                                 backend=backend, splits=splits)
        return o, jnp.transpose(lse, (0, 2, 1))  # lse in o's row order [B, Lq, H]

    out, lse = part(k, v, idx)
    perm = [(j, (j + 1) % p) for j in range(p)]
    held = (k, v)
    for step in range(1, p):
        held = jax.lax.ppermute(held, axes, perm)  # the block of device idx - step arrives
        o_s, lse_s = part(held[0], held[1], (idx - step) % p)
        out, lse = merge_stacked(jnp.stack([out, o_s]), jnp.stack([lse, lse_s]))
    out, lse = out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))
    return (out, lse) if return_lse else out


@functools.lru_cache(maxsize=64)
def _compiled(kind, mesh, axes, scale, causal, backend, splits, per_row):
    seq = axes if len(axes) > 1 else axes[0]
    kv = P(None, seq, None, None)
    fn = tree_decode_per_device if kind == "tree" else ring_decode_per_device

    def body(q, k, v, lens):
        # per_row: this device's [1, B] row of cache_seqlens; else shard_lens [p], replicated
        kw = dict(cache_seqlens=lens[0]) if per_row else dict(shard_lens=lens)
        return fn(q, k, v, axis_name=axes, softmax_scale=scale, causal=causal,
                  return_lse=True, backend=backend, splits=splits, **kw)

    # the ring merges in each device's own order: equal up to rounding, not replicated bits
    check = kind == "tree" and backend != "pallas"
    lens_spec = P(seq, None) if per_row else P()
    return jax.jit(_shard_map(body, mesh, (P(), kv, kv, lens_spec), (P(), P()), check))


def _run(kind, q, k, v, mesh, axis_name, softmax_scale, shard_lens, cache_seqlens, causal,
         backend, splits):
    axes, scale, lens, rows, splits = _check(q, k, v, mesh, axis_name, softmax_scale,
                                             shard_lens, cache_seqlens, causal, backend,
                                             splits)
    per_row = rows is not None
    fn = _compiled(kind, mesh, axes, scale, causal, backend, splits, per_row)
    return fn, (q, k, v, rows if per_row else lens)


def tree_decode(q, k, v, *, mesh, axis_name, softmax_scale=None, shard_lens=None,
                cache_seqlens=None, causal=True, return_lse=False, backend="xla", splits=None):
    """Exact decode attention over a KV cache sharded along ``axis_name``: a local step per
    device, one ``pmax`` of lse and one ``psum`` of ``[num | den]`` (per axis of a tuple).
    A ``shard_map`` over ``mesh`` of :func:`tree_decode_per_device` (call that one from inside
    a ``shard_map`` of your own).

    Args:
        q: ``[B, Lq, Hq, D]``, replicated.
        k, v: ``[B, p * cap, Hkv, D]``, the sequence axis sharded over ``axis_name``.
        mesh, axis_name: a ``jax.sharding.Mesh`` and one of its axis names, or a tuple of
            them (outer first).
        softmax_scale: default ``D ** -0.5``.
        shard_lens: ``[p]`` ints, the filled slots of each device's block (default: all);
            may be traced.
        cache_seqlens: ``[p, B]`` ints, row ``i`` the filled slots of device ``i``'s block per
            batch row (flash-attn's ``cache_seqlens``, per device); may be traced. Each batch
            row's cache is the concatenation of its filled prefixes in device order; rows
            may be empty on some devices or on all (out 0, lse -inf). Not together with
            ``shard_lens``.
        causal: a bool; new token ``t`` sees the global keys ``<= N - Lq + t`` (``N`` per
            batch row with ``cache_seqlens``).
        return_lse: also return ``lse [B, Hq, Lq]`` (float32, float64 for float64). Unlike
            the torch functions (``common.dtypes.lse_dtype``: float64 statistics for
            float32 inputs), the statistics of float32 inputs stay float32 here: JAX has
            float64 off by default (``jax_enable_x64``).
        backend: the local step, one of :data:`longattn.tree.jax.local.BACKENDS`.
        splits: key chunks of the split-K local step (None: chosen from the block length).

    Returns ``out [B, Lq, Hq, D]`` in q's dtype, replicated (and ``lse``). Works inside
    ``jax.jit``. A token that sees no key gets ``out = 0``, ``lse = -inf``; a NaN in a key it
    sees makes its ``out`` and ``lse`` NaN.
    """
    fn, args = _run("tree", q, k, v, mesh, axis_name, softmax_scale, shard_lens, cache_seqlens,
                    causal, backend, splits)
    out, lse = fn(*args)
    return (out, lse) if return_lse else out


def ring_decode(q, k, v, *, mesh, axis_name, softmax_scale=None, shard_lens=None,
                cache_seqlens=None, causal=True, return_lse=False, backend="xla", splits=None):
    """Ring Attention decoding, the baseline: the KV blocks travel ``p - 1`` hops around the
    ring (``ppermute``) and every device attends all of them. Same contract as
    :func:`tree_decode`; JAX's static shapes make every hop move a whole block (its
    capacity), filled or not. A ``shard_map`` of :func:`ring_decode_per_device`."""
    fn, args = _run("ring", q, k, v, mesh, axis_name, softmax_scale, shard_lens, cache_seqlens,
                    causal, backend, splits)
    out, lse = fn(*args)
    return (out, lse) if return_lse else out


def lower(kind, q, k, v, *, mesh, axis_name, softmax_scale=None, shard_lens=None,
          cache_seqlens=None, causal=True, backend="xla", splits=None):
    """The lowered (not yet compiled) computation of ``kind`` (``"tree"`` or ``"ring"``), e.g.
    for :func:`~longattn.tree.jax.hlo.collective_bytes`."""
    if kind not in ("tree", "ring"):
        raise ValueError(f"kind must be 'tree' or 'ring', got {kind!r}")
    fn, args = _run(kind, q, k, v, mesh, axis_name, softmax_scale, shard_lens, cache_seqlens,
                    causal, backend, splits)
    return fn.lower(*args)


__all__ = ["tree_decode", "ring_decode", "tree_decode_per_device", "ring_decode_per_device",
           "lower"]
