"""Fused Triton kernels for the strided calls of dilated attention: the forward's multi-way
LSE merge and the backward's gradient sum, each one launch over the whole output.

Every call ``c`` of a plan whose calls are all strided (:attr:`Call.strided` ``= (s0, nseg,
length, r, o)``) writes a kernel-layout result ``[B*nseg, n, ho, D]`` (rows ``o, o+r, ...`` of
each segment, heads ``o, o+r, ...``). Row ``(b, t, h)`` of the full tensor ``[B, l, H, D]``
belongs to call ``c`` iff ``tr = t - s0`` lies in ``[0, nseg*length)``, ``(tr % length) % r ==
o`` and ``h % r == o``; it is then row ``((b*nseg + tr // length)*n + (tr % length) // r)*ho +
h // r`` of the result (see ``_sview`` in :mod:`longattn.dilated.attention`).

One program handles ``BLOCK_R`` consecutive flat rows ``(b*l + t)*H + h`` and loops over the
calls at run time (one compiled kernel for any number of calls). Per call it reads the member
rows once (masked loads: rows of other calls cost no traffic) and keeps the running result in
float32 registers; the final tensor is written once, in the output dtype. The calls' data
pointers are passed in an int64 table (one small host-to-device copy per launch), together
with the per-call geometry and strides, so calls of any layout share the launch.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# columns of the per-call int64 table
(_PTR, _LPTR, _S0, _NSEG, _LEN, _R, _O, _N, _HO, _ST0, _ST1, _ST2, _LST0, _LST1,
 _LST2) = (tl.constexpr(i) for i in range(15))
_NCOL = tl.constexpr(16)


@triton.jit
def _membership(tab, rows, t, h, bb, MASK_R):
    """Call ``tab``'s (one row of the table) view of the flat rows: ``(member [R], offset of
    the row in the call's result [R] int64, (segment-batch, j, a) [R] int64 for the lse)``."""
    s0 = tl.load(tab + _S0)
    nseg = tl.load(tab + _NSEG)
    length = tl.load(tab + _LEN)
    r = tl.load(tab + _R)
    o = tl.load(tab + _O)
    tr = t - s0
    inside = (tr >= 0) & (tr < nseg * length) & MASK_R
    tr = tl.where(inside, tr, 0)  # keep the divisions below on valid numbers
    seg = tr // length
    pos = tr - seg * length
    member = inside & (pos % r == o) & (h % r == o)
    sb = bb * nseg + seg  # index along the call's batch*segment dim
    j = pos // r
    a = h // r
    off = (sb * tl.load(tab + _ST0) + j * tl.load(tab + _ST1) + a * tl.load(tab + _ST2))
    return member, off, sb, j, a


@triton.jit
def _merge_kernel(TAB, OREF, OUT, LSE, NCALLS, NROWS, L, H, DV,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out/lse of rows ``[pid*BLOCK_R, +BLOCK_R)``: online LSE over the calls holding them."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = rows < NROWS
    h = rows % H
    t = (rows // H) % L
    bb = rows // (H * L)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < DV
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for c in range(NCALLS):
        tab = TAB + c * _NCOL
        member, off, sb, j, a = _membership(tab, rows, t, h, bb, mask_r)
        optr = tl.load(tab + _PTR).to(OREF.dtype)
        lptr = tl.load(tab + _LPTR).to(tl.pointer_type(tl.float32))
        loff = sb * tl.load(tab + _LST0) + a * tl.load(tab + _LST1) + j * tl.load(tab + _LST2)
        lc = tl.load(lptr + loff, mask=member, other=float("-inf"))
        oc = tl.load(optr + off[:, None] + cols[None, :],
                     mask=member[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lc)
        # rows that have seen nothing yet (m_new = -inf) keep acc = s = 0, never NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(lc - m_safe)
        s = s * alpha + beta
        acc = acc * alpha[:, None] + oc * beta[:, None]
        m = m_new
    seen = s > 0
    inv = tl.where(seen, 1.0 / tl.where(seen, s, 1.0), 0.0)
    out = acc * inv[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, s, 1.0)), float("-inf"))
    tl.store(OUT + rows[:, None] * DV + cols[None, :], out.to(OUT.dtype.element_ty),
             mask=mask_r[:, None] & mask_d[None, :])
    tl.store(LSE + rows, lse, mask=mask_r)


@triton.jit
def _sum_kernel(TAB, GREF, OUT, NCALLS, NROWS, L, H, D,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[pid*BLOCK_R, +BLOCK_R)`` of the sum of the calls' gradients (0 where none)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = rows < NROWS
    h = rows % H
    t = (rows // H) % L
    bb = rows // (H * L)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for c in range(NCALLS):
        tab = TAB + c * _NCOL
        member, off, _, _, _ = _membership(tab, rows, t, h, bb, mask_r)
        gptr = tl.load(tab + _PTR).to(GREF.dtype)
        acc += tl.load(gptr + off[:, None] + cols[None, :],
                       mask=member[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_r[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------------------------
# host side


def _unit_last(t):
    """``t`` with unit stride in the last dim (a copy only if it has none): the kernels load
    whole contiguous head-dim rows."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _table(calls, tensors, lses, which, device):
    """The int64 table ``[ncalls, _NCOL]``: pointers, geometry and strides of every call.
    ``tensors[c]`` is call c's ``[B*nseg, n, ho, D]`` result, ``lses[c]`` its ``[B*nseg, ho,
    n]`` lse (or None); ``which`` picks the call's head count (0: query, 1: kv heads)."""
    rows = []
    for call, t, lse in zip(calls, tensors, lses):
        s0, nseg, length, r, o = call.strided
        n, ho = len(range(o, length, r)), call.heads[which]
        if tuple(t.shape[:3]) != (t.shape[0], n, ho) or t.shape[0] % nseg:
            raise ValueError(f"call result {tuple(t.shape)} does not match its call "
                             f"(nseg {nseg}, n {n}, heads {ho})")
        row = [t.data_ptr(), 0 if lse is None else lse.data_ptr(), s0, nseg, length, r, o, n,
               ho, t.stride(0), t.stride(1), t.stride(2)]
        row += [0, 0, 0] if lse is None else list(lse.stride())
        rows.append(row + [0] * (_NCOL.value - len(row)))
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _blocks(d):
    """(BLOCK_R, BLOCK_D, num_warps): about 4096 elements a program."""
    bd = triton.next_power_of_2(d)
    return max(16, 4096 // bd), bd, 4


def merge_strided(parts, calls, b, l, h, dv, out_dtype):
    """Multi-way LSE merge of strided calls. ``parts[c] = (o_c [B*nseg, n, ho, Dv], lse_c
    [B*nseg, ho, n] float32)`` of ``calls[c]``. Returns ``out [B, l, H, Dv]`` in
    ``out_dtype`` and ``lse [B, l, H]`` float32; rows of no call: ``out = 0``, ``lse = -inf``.
    Computes exactly what ``merge_calls`` does, in one launch."""
    outs = [_unit_last(o) for o, _ in parts]
    lses = [lse.float() for _, lse in parts]
    dev = outs[0].device
    tab = _table(calls, outs, lses, 0, dev)
    out = torch.empty(b, l, h, dv, dtype=out_dtype, device=dev)
    lse = torch.empty(b, l, h, dtype=torch.float32, device=dev)
    nrows = b * l * h
    br, bd, nw = _blocks(dv)
    _merge_kernel[(triton.cdiv(nrows, br),)](tab, outs[0], out, lse, len(calls), nrows, l, h,
                                             dv, BLOCK_R=br, BLOCK_D=bd, num_warps=nw)
    return out, lse


def sum_strided(grads, calls, b, l, h, d, out_dtype, which):
    """Sum of the strided calls' gradients: ``grads[c] [B*nseg, n, ho, D]`` of ``calls[c]``
    (``which`` = 0: query rows, heads ``call.heads[0]``; 1: kv rows, ``call.heads[1]``).
    Returns ``[B, l, H, D]`` in ``out_dtype`` (zero on rows no call holds), accumulated in
    float32 and written once."""
    gs = [_unit_last(g) for g in grads]
    dev = gs[0].device
    tab = _table(calls, gs, [None] * len(gs), which, dev)
    out = torch.empty(b, l, h, d, dtype=out_dtype, device=dev)
    nrows = b * l * h
    br, bd, nw = _blocks(d)
    _sum_kernel[(triton.cdiv(nrows, br),)](tab, gs[0], out, len(calls), nrows, l, h, d,
                                           BLOCK_R=br, BLOCK_D=bd, num_warps=nw)
    return out
