"""Split-K decode kernel in Pallas (Triton backend), reading BSHD K / V in place.

JAX's own ``pallas.ops.gpu.decode_attention.gqa`` wants ``[B, Hkv, S, D]`` and transposes a
BSHD cache first, which copies all of K and V (three times the traffic of the attention
itself). This kernel indexes the BSHD arrays directly: program ``(s, b * Hkv + h)`` reads the
``split_len`` keys of split ``s`` of KV head ``h`` (block shape ``(1, split_len, 1, D)``), runs
an online softmax over ``block_k``-key tiles for all ``Lq * G`` query rows of that head, and
writes ``(acc, m, l)``, reading the valid length and limit of its batch row (``[B]`` each, so
rows of different lengths share one launch); :func:`decode` merges the splits exactly with
:func:`longattn.tree.jax.merge.merge_stacked`. ``interpret=True`` runs it on the CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from longattn.tree.jax.merge import acc_dtype, merge_stacked

try:
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

_BIG = 1 << 30


def _dot(a, b, trans_b=False):
    fn = getattr(plgpu, "dot", None) or pl.dot
    # float32 operands in full float32 (the default allows TF32, 3e-4 to 5e-4 off on the H200:
    # bench/results/check_gpu_h200.log); bf16 / fp16 operands are unaffected
    exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return fn(a, b, trans_b=trans_b, allow_tf32=False if exact else None)


def _kernel(q_ref, k_ref, v_ref, len_ref, lim_ref, acc_ref, m_ref, l_ref, *, g, rows, block_k,
            split_len, scale):
    sid = pl.program_id(0)
    f = acc_ref.dtype  # the statistics' dtype: float64 for float64 inputs, else float32
    q = q_ref[...]  # [BLOCK_M, D]
    block_m, d = q.shape
    valid = len_ref[()]
    limit = lim_ref[()]
    t = jnp.arange(block_m) // g  # new-token index of each row
    lo = sid * split_len
    bk = jnp.int32(block_k)
    n_blocks = jnp.clip((valid - lo + bk - 1) // bk, 0, split_len // block_k).astype(jnp.int32)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        sl = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        k = k_ref[sl, :]
        s = _dot(q, k, trans_b=True).astype(f) * scale  # [BLOCK_M, block_k]
        j = lo + i * block_k + jnp.arange(block_k)
        vis = (j[None, :] < valid) & (j[None, :] <= limit + t[:, None])
        s = jnp.where(vis, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m_prev - m_safe)
        v = v_ref[sl, :]
        acc = acc * corr[:, None] + _dot(p.astype(v.dtype), v).astype(f)
        return acc, m_next, l_prev * corr + p.sum(axis=-1)

    init = (jnp.zeros((block_m, d), f), jnp.full((block_m,), -jnp.inf, f),
            jnp.zeros((block_m,), f))
    acc, m, l_ = jax.lax.fori_loop(0, n_blocks, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l_


def make_plan(s: int, programs: int, *, block_k: int = 64, splits=None, sms: int = 132):
    """``(splits, block_k)`` with ``splits * block_k`` dividing ``s``, about 4 programs per
    SM; None if ``s`` has no such factorisation (then the caller uses another backend)."""
    while block_k > 16 and s % block_k:
        block_k //= 2
    if s % block_k:
        return None
    blocks = s // block_k
    want = splits if splits is not None else max(1, -(-4 * sms // max(1, programs)))
    n = 1
    while n * 2 <= min(want, blocks) and blocks % (n * 2) == 0:
        n *= 2
    if splits is not None and blocks % splits == 0:
        n = int(splits)
    return n, block_k


def supports(q, k, v):
    if plgpu is None:
        return "jax.experimental.pallas.triton is unavailable"
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        return f"head_dim must be a power of two in [16, 256], got {d}"
    if make_plan(k.shape[1], 1) is None:
        return f"block length {k.shape[1]} is not a multiple of 16"
    if q.dtype == jnp.float64 and jax.default_backend() == "gpu":
        return "float64 is not supported by the GPU kernel"
    return None


@functools.partial(jax.jit, static_argnames=("scale", "splits", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def _decode(q, k, v, valid_len, limit, *, scale, splits, block_k, num_warps, num_stages,
            interpret):
    b, lq, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    rows = lq * g
    block_m = max(16, pl.next_power_of_2(rows))
    # q rows of KV head h: (t, g) pairs, padded to BLOCK_M; q is tiny, the copy is free
    qr = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, block_m - rows), (0, 0)))
    split_len = s // splits
    kernel = functools.partial(_kernel, g=g, rows=rows, block_k=block_k, split_len=split_len,
                               scale=scale)
    bh = b * hkv
    f = acc_dtype(q.dtype)  # float64 only where the kernel is interpreted (supports())
    params = {}
    if not interpret and plgpu is not None:
        params = dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                                           num_stages=num_stages))
    acc, m, l_ = pl.pallas_call(
        kernel,
        grid=(splits, bh),
        in_specs=[
            pl.BlockSpec((None, None, block_m, d), lambda i, j: (j // hkv, j % hkv, 0, 0)),
            pl.BlockSpec((None, split_len, None, d), lambda i, j: (j // hkv, i, j % hkv, 0)),
            pl.BlockSpec((None, split_len, None, d), lambda i, j: (j // hkv, i, j % hkv, 0)),
            # this program's batch row's valid length and limit ([B] each)
            pl.BlockSpec((None,), lambda i, j: (j // hkv,)),
            pl.BlockSpec((None,), lambda i, j: (j // hkv,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_m, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((None, None, block_m), lambda i, j: (i, j, 0)),
            pl.BlockSpec((None, None, block_m), lambda i, j: (i, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, bh, block_m, d), f),
            jax.ShapeDtypeStruct((splits, bh, block_m), f),
            jax.ShapeDtypeStruct((splits, bh, block_m), f),
        ],
        interpret=interpret,
        name="tree_split_k_decode",
        **params,
    )(qr, k, v, valid_len, limit)
    acc, m, l_ = acc[:, :, :rows], m[:, :, :rows], l_[:, :, :rows]
    # each split's normalised partial (acc / l, m + log l); splits that saw no key have
    # l = 0, m = -inf, so lse = -inf and merge_stacked drops them
    out, lse = merge_stacked(acc / l_[..., None], m + jnp.log(l_))  # [bh, rows(, d)]
    out = out.reshape(b, hkv, lq, g, d).transpose(0, 2, 1, 3, 4).reshape(b, lq, hq, d)
    lse = lse.reshape(b, hkv, lq, g).transpose(0, 1, 3, 2).reshape(b, hq, lq)
    return out, lse


def decode(q, k, v, *, softmax_scale, valid_len=None, limit=None, splits=None, block_k=64,
           num_warps=4, num_stages=3, interpret=None):
    """``(out, lse)`` like :func:`longattn.tree.jax.local.local_attention`, in the statistics'
    dtype (``acc_dtype``: float64 for float64 inputs, which only the interpreter takes)."""
    from longattn.tree.jax.local import check_splits

    splits = check_splits(splits)
    reason = supports(q, k, v)
    if reason is not None:
        raise ValueError(f"backend='pallas' cannot serve this call: {reason}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    sms = 132
    if not interpret:
        sms = getattr(jax.devices()[0], "core_count", None) or 132
    n, bk = make_plan(k.shape[1], q.shape[0] * k.shape[2], block_k=block_k, splits=splits,
                      sms=sms)
    b = q.shape[0]  # scalar bounds (every row alike) or [B] (per row) -> [B]
    valid = jnp.broadcast_to(jnp.asarray(k.shape[1] if valid_len is None else valid_len,
                                         jnp.int32).reshape(-1), (b,))
    lim = jnp.broadcast_to(jnp.asarray(_BIG if limit is None else limit, jnp.int32)
                           .reshape(-1), (b,))
    out, lse = _decode(q, k, v, valid, lim, scale=float(softmax_scale), splits=n, block_k=bk,
                       num_warps=num_warps, num_stages=num_stages, interpret=bool(interpret))
    acc = acc_dtype(q.dtype)
    return out.astype(acc), lse.astype(acc)
