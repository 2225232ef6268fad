"""Row scatter-add (Triton), kept apart so that importing ``longattn.common.kernels`` does not
import triton unless a GPU scatter runs.

Slow twins: :func:`longattn.common.kernels.rows.add_rows_torch_` (``index_copy_`` /
``index_add_`` on the converted rows) and :func:`longattn.common.kernels.rows.add_kv_torch_`
(two strided adds); a CPU test runs each pair under ``TRITON_INTERPRET=1`` and compares
them."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add_rows_kernel(dst, rows, src, src_rows, M, C, dst_stride, src_stride,
                     HAS_SRC_ROWS: tl.constexpr, STORE: tl.constexpr,
                     BM: tl.constexpr, BC: tl.constexpr):
    """dst[rows[i], c] (+)= src[src_rows[i] or i, c] in dst's dtype, rows distinct: no two
    programs touch one element, so plain loads and stores (no atomics) are race-free."""
    i = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    c = (tl.program_id(1) * BC + tl.arange(0, BC)).to(tl.int64)
    ok = (i < M)[:, None] & (c < C)[None, :]
    r = tl.load(rows + i, mask=i < M, other=0).to(tl.int64)
    s = tl.load(src_rows + i, mask=i < M, other=0).to(tl.int64) if HAS_SRC_ROWS else i
    val = tl.load(src + s[:, None] * src_stride + c[None, :], mask=ok, other=0.0)
    val = val.to(dst.dtype.element_ty)
    at = dst + r[:, None] * dst_stride + c[None, :]
    if not STORE:
        val += tl.load(at, mask=ok, other=0.0)
    tl.store(at, val, mask=ok)


def add_rows_(dst, rows, src, src_rows=None, store=False):
    """See :func:`longattn.common.kernels.rows.add_rows_`."""
    m, c = rows.shape[0], dst.shape[1]
    if m == 0 or c == 0:
        return dst
    bc = min(1024, triton.next_power_of_2(c))
    bm = max(1, 4096 // bc)
    grid = (triton.cdiv(m, bm), triton.cdiv(c, bc))
    _add_rows_kernel[grid](dst, rows, src, rows if src_rows is None else src_rows, m, c,
                           dst.stride(0), src.stride(0), HAS_SRC_ROWS=src_rows is not None,
                           STORE=bool(store), BM=bm, BC=bc)
    return dst


@triton.jit
def _add_kv_kernel(acc, dk, dv, M, B, WK, WV, acc_st, acc_sb, k_sb, k_st, v_sb, v_st,
                   STORE: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """acc[t, b, :WK] (+)= dk[b, t] and acc[t, b, WK:] (+)= dv[b, t] (rows of WK / WV
    contiguous elements), in acc's dtype; program (i, j): BM rows ``i = t * B + b`` and the
    j-th BC columns of the K part, or of the V part past its blocks."""
    i = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    j = tl.program_id(1)
    nk = tl.cdiv(WK, BC)
    t = i // B
    b = i % B
    if j < nk:
        c = (j * BC + tl.arange(0, BC)).to(tl.int64)
        ok = (i < M)[:, None] & (c < WK)[None, :]
        src = dk + (b * k_sb + t * k_st)[:, None] + c[None, :]
        at = acc + (t * acc_st + b * acc_sb)[:, None] + c[None, :]
    else:
        c = ((j - nk) * BC + tl.arange(0, BC)).to(tl.int64)
        ok = (i < M)[:, None] & (c < WV)[None, :]
        src = dv + (b * v_sb + t * v_st)[:, None] + c[None, :]
        at = acc + (t * acc_st + b * acc_sb + WK)[:, None] + c[None, :]
    val = tl.load(src, mask=ok, other=0.0).to(acc.dtype.element_ty)
    if not STORE:
        val += tl.load(at, mask=ok, other=0.0)
    tl.store(at, val, mask=ok)


def add_kv_(acc, dk, dv, store=False):
    """See :func:`longattn.common.kernels.rows.add_kv_` (the caller checked the layouts)."""
    b, t = dk.shape[0], dk.shape[1]
    wk, wv = dk.shape[2] * dk.shape[3], dv.shape[2] * dv.shape[3]
    m = t * b
    if m == 0 or wk + wv == 0:
        return acc
    bc = min(1024, triton.next_power_of_2(max(wk, wv)))
    bm = max(1, 4096 // bc)
    grid = (triton.cdiv(m, bm), triton.cdiv(wk, bc) + triton.cdiv(wv, bc))
    _add_kv_kernel[grid](acc, dk, dv, m, b, wk, wv, acc.stride(0), acc.stride(1),
                         dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                         STORE=bool(store), BM=bm, BC=bc)
    return acc
