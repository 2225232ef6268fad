"""Fused Triton kernels for the strided calls of dilated attention: the forward's multi-way
LSE merge and the backward's gradient sum, each one launch over the whole output.

Every call ``c`` of a plan whose calls are all strided (:attr:`Call.strided` ``= (s0, nseg,
length, r, o)``) writes a kernel-layout result ``[B*nseg, n, ho, D]`` (rows ``o, o+r, ...`` of
each segment, heads ``o, o+r, ...``). Row ``(b, t, h)`` of the full tensor ``[B, l, H, D]``
belongs to call ``c`` iff ``tr = t - s0`` lies in ``[0, nseg*length)``, ``(tr % length) % r ==
o`` and ``h % r == o``; it is then row ``((b*nseg + tr // length)*n + (tr % length) // r)*ho +
h // r`` of the result (see ``_sview`` in :mod:`longattn.dilated.attention`).

A tile is ``BLOCK_T`` positions of one head ``h`` of one batch row. Calls sharing ``(branch,
s0, nseg, length, r)`` form a *group* (one branch's offsets over one batch of segments); within
a group only the call of offset ``h mod r`` can hold head ``h``, so a tile loops over the
groups (5 for LongNet's schedule, not its 25 calls) and reads one call each: its member rows
(every r-th position; masked loads, other rows cost no traffic) into a running float32
result; the final tensor is written once, in the output dtype. The group loop is unrolled
(the group count is a compile-time constant) and branch-free, so the loads of all groups can
be in flight together. (A first version tiled positions x all heads and tested every call per
tile: the per-call scalar latency made it 5x slower than its memory traffic on the H100.)

The host resolves, for every (head, group), the call that holds the head into one row of an
int64 table (one small host-to-device copy per launch): its geometry, and its data as element
offsets from the first call's tensor (a kernel argument, so its 16-byte alignment is known to
the compiler and the head-dim loads are vectors) with the head's column added, and its row
strides -- so the kernel's table loads do not depend on each other, and calls of any layout
share the launch. With :data:`PROGRAMS_PER_SM` set, a few programs per SM stride over the tiles
of their (head, batch row) instead of one program per tile.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# columns of the per-(head, group) int64 table: the geometry of the group's call that holds the
# head, its data as element offsets from the first call's tensor / lse (the head's column
# included), and the row strides
_R, _O, _S0, _NSEG, _LEN, _ROW0, _SSB, _SJ, _LROW0, _LSB, _LSJ = (tl.constexpr(i) for i in
                                                                  range(11))
_NCOL = tl.constexpr(12)


@triton.jit
def _group_rows(HT, h, gi, NGROUPS: tl.constexpr, t, bb, mask_t, ALIGN: tl.constexpr):
    """Group ``gi``'s call for head ``h`` (one row of the host-built table, so the loads below
    are independent of each other): ``(member [T], element offset of each row in the result
    [T] (int64), lse offset [T])`` of positions ``t`` of batch row ``bb``. A head the group has
    no call for has ``nseg = 0``: no member."""
    p = HT + (h * NGROUPS + gi) * _NCOL
    r = tl.load(p + _R).to(tl.int32)
    o = tl.load(p + _O).to(tl.int32)
    nseg = tl.load(p + _NSEG).to(tl.int32)
    length = tl.load(p + _LEN).to(tl.int32)
    tr = t - tl.load(p + _S0).to(tl.int32)
    inside = (tr >= 0) & (tr < nseg * length) & mask_t
    tr = tl.where(inside, tr, 0)  # keep the divisions below on valid numbers
    seg = tr // length
    pos = tr - seg * length
    member = inside & (pos % r == o)
    sb = (bb * nseg + seg).to(tl.int64)  # index along the call's batch*segment dim
    j = (pos // r).to(tl.int64)
    row = tl.load(p + _ROW0) + sb * tl.load(p + _SSB) + j * tl.load(p + _SJ)
    lrow = tl.load(p + _LROW0) + sb * tl.load(p + _LSB) + j * tl.load(p + _LSJ)
    return member, tl.multiple_of(row, ALIGN), lrow


@triton.jit
def _program(H):
    """This program's head, batch row and its share of the position tiles: ``range(first,
    NTILES, step)``. Head fastest (program id 0 = split * H + head): programs that run
    together cover all heads of the same positions, i.e. contiguous memory, instead of one
    2*D-byte row out of every 2*H*D bytes."""
    h = tl.program_id(0) % H
    return h, tl.program_id(1), tl.program_id(0) // H, tl.num_programs(0) // H


@triton.jit
def _merge_kernel(HT, OREF, LREF, OUT, LSE, NGROUPS: tl.constexpr, L, H, DV, NTILES,
                  ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out/lse of this program's tiles (:func:`_program`): online LSE over the calls holding
    their rows (one per group)."""
    h, bb, first, step = _program(H)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < DV
    for ti in range(first, NTILES, step):
        t = ti * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = t < L
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_T], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for gi in tl.static_range(NGROUPS):  # unrolled, branch-free: all loads in flight
            member, row, lrow = _group_rows(HT, h, gi, NGROUPS, t, bb, mask_t, ALIGN)
            lc = tl.load(LREF + lrow, mask=member, other=float("-inf"))
            oc = tl.load(OREF + (row[:, None] + cols[None, :]),
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
        lse = tl.where(seen, m + tl.log(tl.where(seen, s, 1.0)), float("-inf"))
        rows = (bb.to(tl.int64) * L + t) * H + h  # [T] flat (b, t, h)
        tl.store(LSE + rows, lse, mask=mask_t)
        tl.store(OUT + rows[:, None] * DV + cols[None, :], (acc * inv[:, None]).to(
            OUT.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _sum_kernel(HT, GREF, OUT, NGROUPS: tl.constexpr, L, H, D, NTILES, ALIGN: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tiles (:func:`_program`) of the sum of the calls' gradients (0 where no
    call holds the row)."""
    h, bb, first, step = _program(H)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    for ti in range(first, NTILES, step):
        t = ti * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = t < L
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for gi in tl.static_range(NGROUPS):  # unrolled, branch-free: all loads in flight
            member, row, _ = _group_rows(HT, h, gi, NGROUPS, t, bb, mask_t, ALIGN)
            acc += tl.load(GREF + (row[:, None] + cols[None, :]),
                           mask=member[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        rows = (bb.to(tl.int64) * L + t) * H + h
        tl.store(OUT + rows[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=mask_t[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------------------------
# host side


def _unit_last(t):
    """``t`` with unit stride in the last dim (a copy only if it has none): the kernels load
    whole contiguous head-dim rows."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _groups(calls):
    """Calls that share ``(branch, s0, nseg, length, r)`` (one branch's offsets over one batch
    of segments) form a group: ``[{offset: call index}]``. A head ``h`` reads the group's
    call of offset ``h mod r`` (if there is one), so each tile visits one call per group
    instead of testing every call."""
    groups = {}
    for i, call in enumerate(calls):
        s0, nseg, length, r, o = call.strided
        # the branch too: two branches' partial tails can share (s0, nseg, length, r)
        groups.setdefault((call.branch, s0, nseg, length, r), {})[o] = i
    return list(groups.values())


def _table(calls, tensors, lses, which, nheads, device):
    """The int64 table ``[nheads, ngroups, _NCOL]``: for each head and group, the geometry of
    the group's call that holds the head (``nseg = 0`` if none) and its data as element
    offsets from ``tensors[0]`` / ``lses[0]`` (so that the kernel addresses them from a
    pointer argument whose alignment the compiler knows), the head's column included. Also
    ``ALIGN``: the element multiple every call's offset and row strides share (16-byte
    vectors, else 1). ``tensors[c]`` is call c's ``[B*nseg, n, ho, D]`` result, ``lses[c]``
    its ``[B*nseg, ho, n]`` float32 lse (or None); ``which`` picks the call's head count (0:
    query, 1: kv)."""
    ref, lref = tensors[0], lses[0]
    size = ref.element_size()
    geo, offsets = [], []
    for call, t, lse in zip(calls, tensors, lses):
        s0, nseg, length, r, o = call.strided
        n, ho = len(range(o, length, r)), call.heads[which]
        if tuple(t.shape[1:3]) != (n, ho) or t.shape[0] % nseg or t.dtype != ref.dtype:
            raise ValueError(f"call result {tuple(t.shape)} {t.dtype} does not match its call "
                             f"(nseg {nseg}, n {n}, heads {ho}, {ref.dtype})")
        off = (t.data_ptr() - ref.data_ptr()) // size  # exact: pointers align to elements
        lst = (0, 0, 0) if lse is None else lse.stride()
        loff = 0 if lse is None else (lse.data_ptr() - lref.data_ptr()) // 4
        # per head a = h // r: row0 + a * head stride; rows: batch*segment, position j
        geo.append((r, o, s0, nseg, length, off, t.stride(2), t.stride(0), t.stride(1), loff,
                    lst[1], lst[0], lst[2]))
        offsets += [off, t.stride(0), t.stride(1), t.stride(2)]
    groups = _groups(calls)
    rows = []
    for h in range(nheads):
        for g in groups:
            r = geo[next(iter(g.values()))][0]
            c = g.get(h % r)
            if c is None:  # no call of this group holds head h
                rows.append([1, 0, 0, 0, 1] + [0] * (_NCOL.value - 5))
                continue
            r, o, s0, nseg, length, off, sh, ssb, sj, loff, lsh, lsb, lsj = geo[c]
            a = h // r
            rows.append([r, o, s0, nseg, length, off + a * sh, ssb, sj, loff + a * lsh, lsb,
                         lsj, 0])
    vec = max(1, 16 // size)
    align = vec if all(x % vec == 0 for x in offsets) else 1
    tab = torch.tensor(rows, dtype=torch.int64).view(nheads, len(groups), _NCOL.value)
    return tab.to(device), align


# Tile size (elements of [BLOCK_T, BLOCK_D] a tile: positions x head dim of one head), warps,
# and programs: PROGRAMS_PER_SM resident programs per SM stride over the tiles (persistent;
# None: one program per tile). The kernels are memory-bound; a tile visits one call per group.
ELEMS = 2048  # the tile of the recorded H100 run (dilated README)
NUM_WARPS = 4
PROGRAMS_PER_SM = None


def _splits(ntiles, b, h, device):
    """Programs per (head, batch row): each strides over ``ntiles / splits`` position tiles."""
    if PROGRAMS_PER_SM is None:
        return ntiles
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 1)
    return max(1, min(ntiles, triton.cdiv(sms * PROGRAMS_PER_SM, b * h)))


def _launch(kernel, tab, align, args, b, l, h, d, device):
    """Launch ``kernel`` over (splits x heads, head fastest) and batch rows."""
    bd = triton.next_power_of_2(d)
    bt = max(1, ELEMS // bd)
    ntiles = triton.cdiv(l, bt)
    kernel[(_splits(ntiles, b, h, device) * h, b)](
        tab, *args, tab.shape[1], l, h, d, ntiles, ALIGN=align, BLOCK_T=bt, BLOCK_D=bd,
        num_warps=NUM_WARPS)


def merge_strided(parts, calls, b, l, h, dv, out_dtype):
    """Multi-way LSE merge of strided calls. ``parts[c] = (o_c [B*nseg, n, ho, Dv], lse_c
    [B*nseg, ho, n] float32)`` of ``calls[c]``. Returns ``out [B, l, H, Dv]`` in
    ``out_dtype`` and ``lse [B, l, H]`` float32; rows of no call: ``out = 0``, ``lse = -inf``.
    Computes exactly what ``merge_calls`` does, in one launch."""
    outs = [_unit_last(o) for o, _ in parts]
    lses = [lse.float() for _, lse in parts]
    dev = outs[0].device
    tab, align = _table(calls, outs, lses, 0, h, dev)
    out = torch.empty(b, l, h, dv, dtype=out_dtype, device=dev)
    lse = torch.empty(b, l, h, dtype=torch.float32, device=dev)
    _launch(_merge_kernel, tab, align, (outs[0], lses[0], out, lse), b, l, h, dv, dev)
    return out, lse


def sum_strided(grads, calls, b, l, h, d, out_dtype, which):
    """Sum of the strided calls' gradients: ``grads[c] [B*nseg, n, ho, D]`` of ``calls[c]``
    (``which`` = 0: query rows, heads ``call.heads[0]``; 1: kv rows, ``call.heads[1]``).
    Returns ``[B, l, H, D]`` in ``out_dtype`` (zero on rows no call holds), accumulated in
    float32 and written once."""
    gs = [_unit_last(g) for g in grads]
    dev = gs[0].device
    tab, align = _table(calls, gs, [None] * len(gs), which, h, dev)
    out = torch.empty(b, l, h, d, dtype=out_dtype, device=dev)
    _launch(_sum_kernel, tab, align, (gs[0], out), b, l, h, d, dev)
    return out
