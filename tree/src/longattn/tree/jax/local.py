"""The local decode step in JAX: new tokens' queries against one KV block, with lse.

``local_attention(q, k, v, *, softmax_scale, valid_len, limit, backend, splits)``: q
``[B, Lq, Hq, D]``, k / v
``[B, S, Hkv, D]`` (BSHD, GQA without repeating KV). Key ``j`` of the block is visible to new
token ``t`` iff ``j < valid_len`` and (``limit`` is None or ``j <= limit + t``); both may be
traced, so a growing cache does not recompile, and each is a scalar (every batch row alike) or
``[B]`` (per batch row, as ``cache_seqlens``). Returns ``out [B, Lq, Hq, D]`` and
``lse [B, Hq, Lq]`` in the accumulation dtype (float32; float64 for float64 inputs); a token
that sees no key gets ``out = 0``, ``lse = -inf``.

Backends (``backend``):

* ``"xla"`` (default, every platform): split-K in plain XLA. The key axis is cut into
  ``splits`` chunks (the same idea as flash-decoding), each chunk computes its max, sum and
  weighted values, and the chunks merge exactly
  (:func:`longattn.tree.jax.merge.merge_stacked`), so a GPU gets ``B * Hkv * splits``
  independent reductions instead of ``B * Hkv``.
* ``"xla_reduce"``: the same with scores and values as fused multiply-reduce instead of dots
  (no layout change of K / V for a dot; XLA fuses it into one read of each).
* ``"pallas"``: a Pallas (Triton) split-K kernel reading BSHD K / V in place
  (:mod:`longattn.tree.jax.pallas_decode`); GPU, or anywhere with ``interpret=True``.
* ``"cudnn"`` / ``"dpa"``: ``jax.nn.dot_product_attention(..., return_residual=True)`` with
  ``implementation="cudnn"`` / the default; only when ``limit`` is None or ``Lq == 1`` (the
  valid length goes in as ``key_value_seq_lengths``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longattn.tree.jax.merge import acc_dtype, merge_stacked

BACKENDS = ("xla", "xla_reduce", "pallas", "cudnn", "dpa")


def check_splits(splits):
    """``splits`` must be None (chosen from the block length) or a positive int."""
    if splits is None:
        return None
    if isinstance(splits, bool) or not isinstance(splits, int):
        raise TypeError(f"splits must be None or a positive int, got {splits!r}")
    if splits < 1:
        raise ValueError(f"splits must be None or a positive int, got {splits!r}")
    return int(splits)


def check_backend(backend):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def default_splits(s: int, target_chunk: int = 4096, max_splits: int = 256) -> int:
    """Number of key chunks: a power of two dividing ``s`` near ``s / target_chunk``."""
    want = max(1, min(max_splits, s // target_chunk))
    n = 1
    while n * 2 <= want and s % (n * 2) == 0:
        n *= 2
    return n


def local_attention(q, k, v, *, softmax_scale, valid_len=None, limit=None, backend="xla",
                    splits=None):
    """``(out [B, Lq, Hq, D], lse [B, Hq, Lq])`` in the accumulation dtype; see the module
    docstring. ``splits``: key chunks of the split-K backends (None: chosen from the length;
    the ``"xla"`` backends need it to divide the block length)."""
    b, lq, hq, _ = q.shape
    s = k.shape[1]
    check_backend(backend)
    splits = check_splits(splits)
    if s == 0:
        acc = acc_dtype(q.dtype)
        return (jnp.zeros((b, lq, hq, v.shape[-1]), acc),
                jnp.full((b, hq, lq), -jnp.inf, acc))
    if backend in ("cudnn", "dpa"):
        return _dpa(q, k, v, scale=softmax_scale, valid_len=valid_len, limit=limit,
                    backend=backend)
    if backend == "pallas":
        from longattn.tree.jax.pallas_decode import decode

        return decode(q, k, v, softmax_scale=softmax_scale, valid_len=valid_len, limit=limit,
                      splits=splits)
    return _xla(q, k, v, scale=softmax_scale, valid_len=valid_len, limit=limit, splits=splits,
                reduce_form=backend == "xla_reduce")


def _per_row(x):
    """A scalar or ``[B]`` bound as ``[1 or B, 1, 1, 1]`` (batch row first)."""
    return jnp.reshape(jnp.asarray(x), (-1, 1, 1, 1))


def _visible(ns, cs, lq, valid_len, limit):
    """``[1 or B, ns, cs, Lq]`` visibility of key (split, c) to token t (per batch row when a
    bound is ``[B]``), or None if all visible."""
    if valid_len is None and limit is None:
        return None
    j = (jnp.arange(ns)[:, None] * cs + jnp.arange(cs)[None, :])[None, :, :, None]
    vis = jnp.ones((1, ns, cs, lq), bool)
    if valid_len is not None:
        vis &= j < _per_row(valid_len)
    if limit is not None:
        vis &= j <= _per_row(limit) + jnp.arange(lq)
    return vis


def _precision(dtype):
    """float32 dots in full float32: JAX's default on GPUs is TF32 (a 10-bit mantissa), which
    measured 3e-4 to 5e-4 relative error on the H200 (bench/results/check_gpu_h200.log) where
    the torch kernels are IEEE float32."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _xla(q, k, v, *, scale, valid_len, limit, splits, reduce_form):
    b, lq, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    ns = default_splits(s) if splits is None else splits
    if s % ns:
        raise ValueError(f"splits ({ns}) must divide the block length {s}")
    cs = s // ns
    kc = k.reshape(b, ns, cs, hkv, d)
    vc = v.reshape(b, ns, cs, hkv, v.shape[-1])
    qg = q.reshape(b, lq, hkv, g, d)
    if reduce_form:
        # [b, n, c, h, 1, 1, d] * [b, 1, 1, h, g, t, d] -> sum over d; then to [b, n, h, g, t, c]
        qr = jnp.transpose(qg, (0, 2, 3, 1, 4))[:, None, None].astype(acc)
        sc = jnp.sum(kc[:, :, :, :, None, None, :].astype(acc) * qr, axis=-1)
        sc = jnp.transpose(sc, (0, 1, 3, 4, 5, 2))
    else:
        sc = jnp.einsum("bnchd,bthgd->bnhgtc", kc, qg, preferred_element_type=acc,
                        precision=_precision(q.dtype))
    sc = sc * scale
    vis = _visible(ns, cs, lq, valid_len, limit)
    if vis is not None:  # [b, n, c, t] -> [b, n, 1, 1, t, c]
        sc = jnp.where(jnp.transpose(vis, (0, 1, 3, 2))[:, :, None, None], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1)  # [b, n, h, g, t]
    m_safe = jnp.where(jnp.isneginf(m), 0.0, m)
    p = jnp.exp(sc - m_safe[..., None])
    l_ = jnp.sum(p, axis=-1)
    pv = p if q.dtype == acc else p.astype(v.dtype)  # bf16 / fp16 P for the PV product
    if reduce_form:
        o = jnp.sum(jnp.transpose(pv, (0, 1, 5, 2, 3, 4))[..., None].astype(acc)
                    * vc[:, :, :, :, None, None, :].astype(acc), axis=2)  # [b, n, h, g, t, d]
    else:
        o = jnp.einsum("bnhgtc,bnchd->bnhgtd", pv, vc, preferred_element_type=acc,
                       precision=_precision(q.dtype))
    # exact merge of the splits: each split's normalised partial (o / l, m + log l); a split
    # that saw no key has l = 0, m = -inf, hence lse -inf, and merge_stacked drops it
    lse_s = m + jnp.log(l_)  # [b, n, h, g, t]
    o_s = o / l_[..., None]
    out, lse = merge_stacked(jnp.moveaxis(o_s, 1, 0), jnp.moveaxis(lse_s, 1, 0))
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, lq, hq, v.shape[-1])
    lse = lse.reshape(b, hq, lq)
    return out.astype(acc), lse.astype(acc)


def _dpa(q, k, v, *, scale, valid_len, limit, backend):
    b, lq, hq, _ = q.shape
    if limit is not None and lq != 1:
        raise ValueError(f"backend={backend!r} serves causal decoding only at Lq = 1, got "
                         f"Lq = {lq}")
    acc = acc_dtype(q.dtype)
    kv_len = None if valid_len is None else jnp.broadcast_to(
        jnp.asarray(valid_len, jnp.int32), (b,))
    out, lse = jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=kv_len, return_residual=True,
        implementation="cudnn" if backend == "cudnn" else None)
    lse = jnp.transpose(lse, (0, 2, 1)).astype(acc)  # BTN -> BNT
    out = out.astype(acc)
    if valid_len is not None:  # an empty block or row: the kernel's value is undefined
        empty = _per_row(valid_len) <= 0  # [1 or B, 1, 1, 1]
        out = jnp.where(empty, 0.0, out)
        lse = jnp.where(empty[..., 0], -jnp.inf, lse)
    return out, lse
