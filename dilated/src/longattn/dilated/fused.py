"""Fused Triton kernels for the strided calls of dilated attention: the forward's multi-way
LSE merge and the backward's gradient sum, each one launch over the whole output.

Every call ``c`` of a plan whose calls are all strided (:attr:`Call.strided` ``= (s0, nseg,
length, r, o)``) writes a kernel-layout result ``[B*nseg, n, ho, D]`` (rows ``o, o+r, ...`` of
each segment, heads ``o, o+r, ...``). Row ``(b, t, h)`` of the full tensor ``[B, l, H, D]``
belongs to call ``c`` iff ``tr = t - s0`` lies in ``[0, nseg*length)``, ``(tr % length) % r ==
o`` and ``h % r == o``; it is then row ``((b*nseg + tr // length)*n + (tr % length) // r)*ho +
h // r`` of the result (see ``_sview`` in :mod:`longattn.dilated.attention`).

One program handles a tile of ``BLOCK_T`` positions x all heads of one batch row (membership
is a product of a position test and a head test, so the integer divisions are per position
and per head, not per row) and loops over the calls at run time (one compiled kernel for any
number of calls), skipping calls with no position in the tile. Per call it reads the member
rows once (masked loads: rows of other calls cost no traffic) and keeps the running result in
float32 registers; the final tensor is written once, in the output dtype. The calls' data
are passed in an int64 table (one small host-to-device copy per launch) as element offsets
from the first call's tensor (a kernel argument, so its 16-byte alignment is known to the
compiler and the head-dim loads are vectors), together with the per-call geometry and
strides, so calls of any layout share the launch.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# columns of the per-call int64 table
(_OFF, _LOFF, _S0, _NSEG, _LEN, _R, _O, _N, _HO, _ST0, _ST1, _ST2, _LST0, _LST1,
 _LST2) = (tl.constexpr(i) for i in range(15))
_NCOL = tl.constexpr(16)


@triton.jit
def _call_rows(tab, t, h, bb, H):
    """Call ``tab``'s (one row of the table) view of a tile of positions ``t [T]`` (int32) of
    batch ``bb`` and heads ``h [HP]``: ``(member_t [T], member_h [HP], element offset of the
    row in the call's result: part_t [T] + part_h [HP] (int64), lse offset: lse_t + lse_h)``.
    Position and head math are separate vectors: the divisions cost T + HP per call, not
    T * HP."""
    s0 = tl.load(tab + _S0).to(tl.int32)
    nseg = tl.load(tab + _NSEG).to(tl.int32)
    length = tl.load(tab + _LEN).to(tl.int32)
    r = tl.load(tab + _R).to(tl.int32)
    o = tl.load(tab + _O).to(tl.int32)
    tr = t - s0
    inside = (tr >= 0) & (tr < nseg * length)
    tr = tl.where(inside, tr, 0)  # keep the divisions below on valid numbers
    seg = tr // length
    pos = tr - seg * length
    member_t = inside & (pos % r == o)
    sb = (bb * nseg + seg).to(tl.int64)  # index along the call's batch*segment dim
    j = (pos // r).to(tl.int64)
    member_h = (h < H) & (h % r == o)
    a = (h // r).to(tl.int64)
    part_t = sb * tl.load(tab + _ST0) + j * tl.load(tab + _ST1)
    part_h = a * tl.load(tab + _ST2)
    lse_t = sb * tl.load(tab + _LST0) + j * tl.load(tab + _LST2)
    lse_h = a * tl.load(tab + _LST1)
    return member_t, member_h, part_t, part_h, lse_t, lse_h


@triton.jit
def _row_start(tab, part_t, part_h, ALIGN: tl.constexpr):
    """Element offsets ``[T, HP]`` (from the reference pointer) of the call's rows. ``ALIGN``
    (checked on the host: every call's pointer and strides) lets the head-dim loads be
    16-byte vectors: the call pointers come from a table, so the compiler cannot see it."""
    return tl.multiple_of(tl.load(tab + _OFF) + part_t[:, None] + part_h[None, :],
                          [ALIGN, ALIGN])


@triton.jit
def _merge_kernel(TAB, OREF, LREF, OUT, LSE, NCALLS, L, H, DV, ALIGN: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """out/lse of positions ``[pid0*BLOCK_T, +BLOCK_T)`` of batch ``pid1``, all heads: online
    LSE over the calls holding them."""
    bb = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    mask_t = t < L
    mask_d = cols < DV
    m = tl.full([BLOCK_T, BLOCK_H], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], tl.float32)
    for c in range(NCALLS):
        tab = TAB + c * _NCOL
        member_t, member_h, part_t, part_h, lse_t, lse_h = _call_rows(tab, t, h, bb, H)
        member_t = member_t & mask_t
        if tl.max(member_t.to(tl.int32), 0) > 0:  # skip calls with no row in this tile
            member = member_t[:, None] & member_h[None, :]
            lc = tl.load(LREF + (tl.load(tab + _LOFF) + lse_t[:, None] + lse_h[None, :]),
                         mask=member, other=float("-inf"))
            row = _row_start(tab, part_t, part_h, ALIGN)
            oc = tl.load(OREF + (row[:, :, None] + cols[None, None, :]),
                         mask=member[:, :, None] & mask_d[None, None, :],
                         other=0.0).to(tl.float32)
            m_new = tl.maximum(m, lc)
            # rows that have seen nothing yet (m_new = -inf) keep acc = s = 0, never NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            beta = tl.exp(lc - m_safe)
            s = s * alpha + beta
            acc = acc * alpha[:, :, None] + oc * beta[:, :, None]
            m = m_new
    seen = s > 0
    inv = tl.where(seen, 1.0 / tl.where(seen, s, 1.0), 0.0)
    lse = tl.where(seen, m + tl.log(tl.where(seen, s, 1.0)), float("-inf"))
    rows = (bb.to(tl.int64) * L + t)[:, None] * H + h[None, :]  # [T, HP] flat (b, t, h)
    mask = mask_t[:, None] & (h < H)[None, :]
    tl.store(LSE + rows, lse, mask=mask)
    tl.store(OUT + rows[:, :, None] * DV + cols[None, None, :],
             (acc * inv[:, :, None]).to(OUT.dtype.element_ty),
             mask=mask[:, :, None] & mask_d[None, None, :])


@triton.jit
def _sum_kernel(TAB, GREF, OUT, NCALLS, L, H, D, ALIGN: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Positions ``[pid0*BLOCK_T, +BLOCK_T)`` of batch ``pid1``, all heads, of the sum of the
    calls' gradients (0 where no call holds the row)."""
    bb = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    mask_t = t < L
    mask_d = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_H, BLOCK_D], tl.float32)
    for c in range(NCALLS):
        tab = TAB + c * _NCOL
        member_t, member_h, part_t, part_h, _, _ = _call_rows(tab, t, h, bb, H)
        member_t = member_t & mask_t
        if tl.max(member_t.to(tl.int32), 0) > 0:  # skip calls with no row in this tile
            member = member_t[:, None] & member_h[None, :]
            row = _row_start(tab, part_t, part_h, ALIGN)
            acc += tl.load(GREF + (row[:, :, None] + cols[None, None, :]),
                           mask=member[:, :, None] & mask_d[None, None, :],
                           other=0.0).to(tl.float32)
    rows = (bb.to(tl.int64) * L + t)[:, None] * H + h[None, :]
    mask = mask_t[:, None] & (h < H)[None, :]
    tl.store(OUT + rows[:, :, None] * D + cols[None, None, :], acc.to(OUT.dtype.element_ty),
             mask=mask[:, :, None] & mask_d[None, None, :])


# --------------------------------------------------------------------------------------------
# host side


def _unit_last(t):
    """``t`` with unit stride in the last dim (a copy only if it has none): the kernels load
    whole contiguous head-dim rows."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _table(calls, tensors, lses, which, device):
    """The int64 table ``[ncalls, _NCOL]`` of every call's geometry, strides and data (as
    element offsets from ``tensors[0]`` / ``lses[0]``, so that the kernel addresses them from
    a pointer argument whose alignment the compiler knows), and ``ALIGN``: the element
    multiple every call's offset and row strides share (16-byte vectors, else 1).
    ``tensors[c]`` is call c's ``[B*nseg, n, ho, D]`` result, ``lses[c]`` its ``[B*nseg, ho,
    n]`` float32 lse (or None); ``which`` picks the call's head count (0: query, 1: kv)."""
    ref, lref = tensors[0], lses[0]
    size = ref.element_size()
    rows, offsets = [], []
    for call, t, lse in zip(calls, tensors, lses):
        s0, nseg, length, r, o = call.strided
        n, ho = len(range(o, length, r)), call.heads[which]
        if tuple(t.shape[1:3]) != (n, ho) or t.shape[0] % nseg or t.dtype != ref.dtype:
            raise ValueError(f"call result {tuple(t.shape)} {t.dtype} does not match its call "
                             f"(nseg {nseg}, n {n}, heads {ho}, {ref.dtype})")
        off = (t.data_ptr() - ref.data_ptr()) // size  # exact: pointers align to elements
        loff = 0 if lse is None else (lse.data_ptr() - lref.data_ptr()) // 4
        row = [off, loff, s0, nseg, length, r, o, n, ho, t.stride(0), t.stride(1), t.stride(2)]
        row += [0, 0, 0] if lse is None else list(lse.stride())
        rows.append(row + [0] * (_NCOL.value - len(row)))
        offsets += [off, t.stride(0), t.stride(1), t.stride(2)]
    vec = max(1, 16 // size)
    align = vec if all(x % vec == 0 for x in offsets) else 1
    return torch.tensor(rows, dtype=torch.int64, device=device), align


# Tile size (elements of [BLOCK_T, BLOCK_H, BLOCK_D] a program) and warps: tunable (the GPU
# kernels are memory-bound; these only trade registers against the number of programs).
ELEMS = 4096
NUM_WARPS = 4


def _launch(kernel, args, b, l, h, d, align):
    """Launch ``kernel`` over tiles of ``BLOCK_T`` positions x all heads, per batch row."""
    bh, bd = triton.next_power_of_2(h), triton.next_power_of_2(d)
    bt = max(1, ELEMS // (bh * bd))
    kernel[(triton.cdiv(l, bt), b)](*args, l, h, d, ALIGN=align, BLOCK_T=bt, BLOCK_H=bh,
                                    BLOCK_D=bd, num_warps=NUM_WARPS)


def merge_strided(parts, calls, b, l, h, dv, out_dtype):
    """Multi-way LSE merge of strided calls. ``parts[c] = (o_c [B*nseg, n, ho, Dv], lse_c
    [B*nseg, ho, n] float32)`` of ``calls[c]``. Returns ``out [B, l, H, Dv]`` in
    ``out_dtype`` and ``lse [B, l, H]`` float32; rows of no call: ``out = 0``, ``lse = -inf``.
    Computes exactly what ``merge_calls`` does, in one launch."""
    outs = [_unit_last(o) for o, _ in parts]
    lses = [lse.float() for _, lse in parts]
    dev = outs[0].device
    tab, align = _table(calls, outs, lses, 0, dev)
    out = torch.empty(b, l, h, dv, dtype=out_dtype, device=dev)
    lse = torch.empty(b, l, h, dtype=torch.float32, device=dev)
    _launch(_merge_kernel, (tab, outs[0], lses[0], out, lse, len(calls)), b, l, h, dv, align)
    return out, lse


def sum_strided(grads, calls, b, l, h, d, out_dtype, which):
    """Sum of the strided calls' gradients: ``grads[c] [B*nseg, n, ho, D]`` of ``calls[c]``
    (``which`` = 0: query rows, heads ``call.heads[0]``; 1: kv rows, ``call.heads[1]``).
    Returns ``[B, l, H, D]`` in ``out_dtype`` (zero on rows no call holds), accumulated in
    float32 and written once."""
    gs = [_unit_last(g) for g in grads]
    dev = gs[0].device
    tab, align = _table(calls, gs, [None] * len(gs), which, dev)
    out = torch.empty(b, l, h, d, dtype=out_dtype, device=dev)
    _launch(_sum_kernel, (tab, gs[0], out, len(calls)), b, l, h, d, align)
    return out
