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


def _check(q, k, v, mesh, axis_name, softmax_scale, shard_lens, causal, backend, splits):
    """Validate before tracing; returns ``(axes, p, softmax_scale, lens, splits)``."""
    if not hasattr(mesh, "shape") or not hasattr(mesh, "devices"):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    axes = _axes(mesh, axis_name)
    p = math.prod(mesh.shape[a] for a in axes)
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
    if shard_lens is None:
        lens = jnp.full((p,), cap, jnp.int32)
    else:
        lens = jnp.asarray(shard_lens)
        if lens.shape != (p,) or not jnp.issubdtype(lens.dtype, jnp.integer):
            raise ValueError(f"shard_lens must be {p} ints (one per device), got "
                             f"{shard_lens!r}")
        if not isinstance(lens, jax.core.Tracer):
            if bool(jnp.any(lens < 0)) or bool(jnp.any(lens > cap)):
                raise ValueError(f"shard_lens must lie in [0, {cap}] (the block capacity), "
                                 f"got {shard_lens!r}")
        lens = lens.astype(jnp.int32)
    return axes, p, float(softmax_scale), lens, splits


def _position(axes, lens):
    """This device's (block offset, filled length, total length)."""
    idx = jax.lax.axis_index(axes)
    ends = jnp.cumsum(lens)
    n = lens[idx]
    return ends[idx] - n, n, ends[-1]


def _tree_body(q, k, v, lens, *, axes, scale, causal, backend, splits):
    lq = q.shape[1]
    off, n, total = _position(axes, lens)
    limit = total - lq - off if causal else None
    o, lse = local_attention(q, k, v, softmax_scale=scale, valid_len=n, limit=limit,
                             backend=backend, splits=splits)
    m = lse
    for a in reversed(axes):  # inner axis first: reduce inside nodes, then across
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
    return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))


def _ring_body(q, k, v, lens, *, axes, scale, causal, backend, splits, p):
    lq = q.shape[1]
    idx = jax.lax.axis_index(axes)
    ends = jnp.cumsum(lens)
    total = ends[-1]

    def part(kb, vb, src):
        n = lens[src]
        limit = total - lq - (ends[src] - n) if causal else None
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
    return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))


@functools.lru_cache(maxsize=64)
def _compiled(kind, mesh, axes, scale, causal, backend, splits):
    kv = P(None, axes if len(axes) > 1 else axes[0], None, None)
    if kind == "tree":
        body = functools.partial(_tree_body, axes=axes, scale=scale, causal=causal,
                                 backend=backend, splits=splits)
        check = backend not in ("pallas",)
    else:
        p = math.prod(mesh.shape[a] for a in axes)
        body = functools.partial(_ring_body, axes=axes, scale=scale, causal=causal,
                                 backend=backend, splits=splits, p=p)
        check = False  # every device merges in its own order: equal up to rounding
    return jax.jit(_shard_map(body, mesh, (P(), kv, kv, P()), (P(), P()), check))


def tree_decode(q, k, v, *, mesh, axis_name, softmax_scale=None, shard_lens=None, causal=True,
                return_lse=False, backend="xla", splits=None):
    """Exact decode attention over a KV cache sharded along ``axis_name``: a local step per
    device, one ``pmax`` of lse and one ``psum`` of ``[num | den]`` (per axis of a tuple).

    Args:
        q: ``[B, Lq, Hq, D]``, replicated.
        k, v: ``[B, p * cap, Hkv, D]``, the sequence axis sharded over ``axis_name``.
        mesh, axis_name: a ``jax.sharding.Mesh`` and one of its axis names, or a tuple of
            them (outer first).
        softmax_scale: default ``D ** -0.5``.
        shard_lens: ``[p]`` ints, the filled slots of each device's block (default: all);
            may be traced.
        causal: a bool; new token ``t`` sees the global keys ``<= N - Lq + t``.
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
    axes, _, scale, lens, splits = _check(q, k, v, mesh, axis_name, softmax_scale, shard_lens,
                                          causal, backend, splits)
    out, lse = _compiled("tree", mesh, axes, scale, causal, backend, splits)(q, k, v, lens)
    return (out, lse) if return_lse else out


def ring_decode(q, k, v, *, mesh, axis_name, softmax_scale=None, shard_lens=None, causal=True,
                return_lse=False, backend="xla", splits=None):
    """Ring Attention decoding, the baseline: the KV blocks travel ``p - 1`` hops around the
    ring (``ppermute``) and every device attends all of them. Same contract as
    :func:`tree_decode`; JAX's static shapes make every hop move a whole block (its
    capacity), filled or not."""
    axes, _, scale, lens, splits = _check(q, k, v, mesh, axis_name, softmax_scale, shard_lens,
                                          causal, backend, splits)
    out, lse = _compiled("ring", mesh, axes, scale, causal, backend, splits)(q, k, v, lens)
    return (out, lse) if return_lse else out


def lower(kind, q, k, v, *, mesh, axis_name, softmax_scale=None, shard_lens=None, causal=True,
          backend="xla", splits=None):
    """The lowered (not yet compiled) computation of ``kind`` (``"tree"`` or ``"ring"``), e.g.
    for :func:`~longattn.tree.jax.hlo.collective_bytes`."""
    if kind not in ("tree", "ring"):
        raise ValueError(f"kind must be 'tree' or 'ring', got {kind!r}")
    axes, _, scale, lens, splits = _check(q, k, v, mesh, axis_name, softmax_scale, shard_lens,
                                          causal, backend, splits)
    return _compiled(kind, mesh, axes, scale, causal, backend, splits).lower(q, k, v, lens)


__all__ = ["tree_decode", "ring_decode", "lower"]
