"""Row scatter-adds of gradients onto the rows they belong to, in a wider dtype, without
atomics: ``dst[rows[i]] (+)= src[i]``.

    add_rows_(dst, rows, src, src_rows=None, *, store=False) -> dst
    distinct_layers(rows) -> [(positions, rows), ...]
    add_kv_(acc, dk, dv, *, store=False) -> acc

Distributed backwards return gradient rows (bf16 dK/dV of gathered keys, or float32 rows a
peer sends back) that must be summed onto their owner's rows in ``acc_dtype``. ``index_add_``
does it with one atomic add per element after a converted copy of the source; on an H200 the
packed all-gather's seven such adds took 6.94 ms of a 56.25 ms step
(``common/bench/results/h200/profile_packed/log.txt``). :func:`add_rows_` reads each source
row once, converts it in registers and adds it with plain loads and stores, which is race-free
because the destination rows of one call are distinct; :func:`distinct_layers` splits an index
with repeats into such calls, in the order of the positions, so the sums are deterministic.

On CUDA the Triton kernel runs (:mod:`longattn.common.kernels.rows_triton`); elsewhere, or
when triton does not import, the slow twin :func:`add_rows_torch_` (``index_copy_`` /
``index_add_`` of the converted rows). ``dst``: ``[R, C]`` with unit column stride (any row
stride: a column slice of a wider buffer); ``src``: ``[N, C]`` likewise, any float dtype;
``rows`` (and ``src_rows``): int64 ``[M]`` on ``dst``'s device, ``rows`` distinct.

:func:`add_kv_` adds one step's K and V gradients into a dK/dV accumulator that holds them
side by side in each row (``[T, B, Hkv * (D + Dv)]``, the layout of the K/V buffer a ring
passes on): one kernel reading each gradient once, where the two strided ``+=`` on the
buffer's K and V views run PyTorch's non-vectorized elementwise kernel (2.24 ms of the 33.81
ms of a zigzag-ring rank's forward + backward on an H100,
``common/bench/results/h100/profile_hamilton/log.txt``). Slow twin :func:`add_kv_torch_`.
"""

from __future__ import annotations

import numpy as np


def add_rows_torch_(dst, rows, src, src_rows=None, store=False):
    """The slow twin of :func:`add_rows_`."""
    part = src if src_rows is None else src.index_select(0, src_rows)
    part = part.to(dst.dtype)
    return dst.index_copy_(0, rows, part) if store else dst.index_add_(0, rows, part)


def _check(dst, rows, src, src_rows):
    if dst.dim() != 2 or src.dim() != 2 or dst.shape[1] != src.shape[1]:
        raise ValueError(f"dst and src must be [rows, C] with one C, got {tuple(dst.shape)} "
                         f"and {tuple(src.shape)}")
    if dst.stride(1) != 1 or src.stride(1) != 1:
        raise ValueError("dst and src need unit column stride")
    n = rows.shape[0] if src_rows is None else src_rows.shape[0]
    if rows.dim() != 1 or n != rows.shape[0] or (src_rows is None and n != src.shape[0]):
        raise ValueError(f"rows ({tuple(rows.shape)}) must give one destination row per "
                         f"source row ({src.shape[0] if src_rows is None else n})")


def add_rows_(dst, rows, src, src_rows=None, *, store=False):
    """``dst[rows[i]] += src[src_rows[i]]`` (``src[i]`` without ``src_rows``; ``=`` with
    ``store``) for every ``i``, in ``dst``'s dtype; ``rows`` must be distinct (split repeats
    with :func:`distinct_layers`). Returns ``dst``."""
    _check(dst, rows, src, src_rows)
    if dst.is_cuda and src.is_cuda:
        try:
            from longattn.common.kernels.rows_triton import add_rows_ as fast
        except ImportError:
            fast = None
        if fast is not None:
            return fast(dst, rows, src, src_rows, store)
    return add_rows_torch_(dst, rows, src, src_rows, store)


def distinct_layers(rows) -> list:
    """``[(positions, rows), ...]``: the positions ``i`` of ``rows`` (a host integer array)
    split into layers whose rows are distinct, layer ``l`` holding each row's ``l``-th
    occurrence (positions in increasing order): calls of :func:`add_rows_` layer after layer
    add every position onto its row, the positions of one row in their order."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    first = np.r_[True, srt[1:] != srt[:-1]] if len(srt) else np.zeros(0, bool)
    start = np.maximum.accumulate(np.where(first, np.arange(len(srt)), 0))
    occ = np.empty(len(rows), dtype=np.int64)
    occ[order] = np.arange(len(srt)) - start  # which occurrence of its row each position is
    layers = []
    for lv in range(int(occ.max()) + 1 if len(occ) else 0):
        pos = np.flatnonzero(occ == lv)
        layers.append((pos, rows[pos]))
    return layers


def _kv_views(acc, wk):
    """K ``[B, T, WK]`` and V ``[B, T, WV]`` views of the accumulator ``[T, B, WK + WV]``."""
    return acc[..., :wk].transpose(0, 1), acc[..., wk:].transpose(0, 1)


def add_kv_torch_(acc, dk, dv, store=False):
    """The slow twin of :func:`add_kv_`."""
    gk, gv = _kv_views(acc, dk.shape[2] * dk.shape[3])
    for g, x in ((gk, dk), (gv, dv)):
        x = x.flatten(2)
        if store:
            g.copy_(x)
        else:
            g += x
    return acc


def _kv_layout_ok(acc, dk, dv):
    """Whether the Triton kernel can address these tensors: each row of ``dk`` / ``dv`` (one
    batch, one token) and of ``acc`` contiguous."""
    def rows_contiguous(x):
        return x.stride(3) == 1 and x.stride(2) == x.shape[3]

    return acc.stride(2) == 1 and rows_contiguous(dk) and rows_contiguous(dv)


def add_kv_(acc, dk, dv, *, store=False):
    """``acc[t, b] (+)= concat(dk[b, t].flatten(), dv[b, t].flatten())`` for every token ``t``
    and batch row ``b``, in ``acc``'s dtype (``=`` with ``store``). ``acc``: ``[T, B, Hkv *
    (D + Dv)]``, any row strides; ``dk``: ``[B, T, Hkv, D]``, ``dv``: ``[B, T, Hkv, Dv]``, any
    float dtype. Bitwise what ``+=`` on the two views gives (each element one conversion and
    one add). Returns ``acc``."""
    b, t = dk.shape[:2]
    wk, wv = dk.shape[2] * dk.shape[3], dv.shape[2] * dv.shape[3]
    if (acc.dim() != 3 or dk.dim() != 4 or dv.dim() != 4 or dv.shape[:2] != (b, t)
            or tuple(acc.shape) != (t, b, wk + wv)):
        raise ValueError(f"acc must be [T, B, Hkv*(D+Dv)] for dk [B, T, Hkv, D] and dv "
                         f"[B, T, Hkv, Dv], got acc {tuple(acc.shape)}, dk "
                         f"{tuple(dk.shape)}, dv {tuple(dv.shape)}")
    if acc.is_cuda and dk.is_cuda and dv.is_cuda and _kv_layout_ok(acc, dk, dv):
        try:
            from longattn.common.kernels.rows_triton import add_kv_ as fast
        except ImportError:
            fast = None
        if fast is not None:
            return fast(acc, dk, dv, store)
    return add_kv_torch_(acc, dk, dv, store)


__all__ = ["add_kv_", "add_kv_torch_", "add_rows_", "add_rows_torch_", "distinct_layers"]
