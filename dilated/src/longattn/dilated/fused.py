"""Fused Triton kernels for the strided calls of dilated attention: the forward's multi-way
LSE merge and the backward's gradient sum, each one launch over the whole output.

Every call ``c`` of a plan whose calls are all strided (:attr:`Call.strided` ``= (s0, nseg,
length, r, o)``) writes a kernel-layout result ``[B*nseg, n, ho, D]`` (rows ``o, o+r, ...`` of
each segment, heads ``o, o+r, ...``). Row ``(b, t, h)`` of the full tensor ``[B, l, H, D]``
belongs to call ``c`` iff ``tr = t - s0`` lies in ``[0, nseg*length)``, ``(tr % length) % r ==
o`` and ``h % r == o``; it is then row ``((b*nseg + tr // length)*n + (tr % length) // r)*ho +
h // r`` of the result (see ``_sview`` in :mod:`longattn.dilated.attention`).

One program handles a tile of ``BLOCK_T`` positions of one head ``h`` of one batch row. Calls
sharing ``(branch, s0, nseg, length, r)`` form a *group* (one branch's offsets over one batch of
segments); within a group only the call of offset ``h mod r`` can hold head ``h``, so the
program loops over the groups (5 for LongNet's schedule, not its 25 calls) and reads one call
each: its member rows (every r-th position; masked loads, other rows cost no traffic) into a
running float32 result; the final tensor is written once, in the output dtype. The group loop is
unrolled (the group count is a compile-time constant) and branch-free, so the loads of all
groups can be in flight together. (A first version tiled positions x all heads and tested
every call per tile: the per-call scalar latency made it 5x slower than its memory traffic on
the H100.) The calls' data
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
def _call_of_head(TAB, GT, GW, gi, h):
    """The call of group ``gi`` that holds head ``h`` (offset ``o = h mod r``), or -1."""
    g = GT + gi * GW
    r = tl.load(g).to(tl.int32)
    o = h % r
    c = tl.where(o < tl.load(g + 1).to(tl.int32), tl.load(g + 2 + tl.minimum(o, GW - 3)), -1)
    return c, r, o


@triton.jit
def _call_rows(tab, t, h, bb, r, o):
    """Call ``tab``'s (one row of the table) view of positions ``t [T]`` of batch ``bb`` for
    its head ``h``: ``(member [T], element offset of each row in the result [T] (int64),
    lse offset [T])``."""
    s0 = tl.load(tab + _S0).to(tl.int32)
    nseg = tl.load(tab + _NSEG).to(tl.int32)
    length = tl.load(tab + _LEN).to(tl.int32)
    tr = t - s0
    inside = (tr >= 0) & (tr < nseg * length)
    tr = tl.where(inside, tr, 0)  # keep the divisions below on valid numbers
    seg = tr // length
    pos = tr - seg * length
    member = inside & (pos % r == o)
    sb = (bb * nseg + seg).to(tl.int64)  # index along the call's batch*segment dim
    j = (pos // r).to(tl.int64)
    a = (h // r).to(tl.int64)
    row = tl.load(tab + _OFF) + sb * tl.load(tab + _ST0) + j * tl.load(tab + _ST1) \
        + a * tl.load(tab + _ST2)
    lrow = tl.load(tab + _LOFF) + sb * tl.load(tab + _LST0) + j * tl.load(tab + _LST2) \
        + a * tl.load(tab + _LST1)
    return member, row, lrow


@triton.jit
def _tile(L, H, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's head ``h``, batch row ``bb``, positions ``t [T]`` and head-dim columns,
    with their masks. Head fastest (program id 0 = position tile * H + head): programs that run
    together cover all heads of the same positions, i.e. contiguous memory, instead of one
    2*D-byte row out of every 2*H*D bytes."""
    h = tl.program_id(0) % H
    bb = tl.program_id(1)
    t = (tl.program_id(0) // H) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    return h, bb, t, cols, t < L, cols < D


@triton.jit
def _group_rows(TAB, GT, GW, gi, t, h, bb, mask_t, ALIGN: tl.constexpr):
    """Group ``gi``'s call for head ``h``: ``(member [T], row offsets [T], lse offsets [T])``
    of positions ``t``; no member when the group has no call for this head."""
    c, r, o = _call_of_head(TAB, GT, GW, gi, h)
    member, row, lrow = _call_rows(TAB + tl.maximum(c, 0) * _NCOL, t, h, bb, r, o)
    # c >= 0 as a vector: the interpreter rejects masks combined with a scalar bool
    member = member & mask_t & (t * 0 + c >= 0)
    return member, tl.multiple_of(row, ALIGN), lrow


@triton.jit
def _merge_kernel(TAB, GT, GW, OREF, LREF, OUT, LSE, NGROUPS: tl.constexpr, L, H, DV,
                  ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out/lse of one tile (:func:`_tile`): online LSE over the calls holding its rows (one
    per group)."""
    h, bb, t, cols, mask_t, mask_d = _tile(L, H, DV, BLOCK_T, BLOCK_D)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for gi in tl.static_range(NGROUPS):  # unrolled, branch-free: all groups' loads in flight
        member, row, lrow = _group_rows(TAB, GT, GW, gi, t, h, bb, mask_t, ALIGN)
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
def _sum_kernel(TAB, GT, GW, GREF, OUT, NGROUPS: tl.constexpr, L, H, D, ALIGN: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile (:func:`_tile`) of the sum of the calls' gradients (0 where no call holds the
    row)."""
    h, bb, t, cols, mask_t, mask_d = _tile(L, H, D, BLOCK_T, BLOCK_D)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for gi in tl.static_range(NGROUPS):  # unrolled, branch-free: all groups' loads in flight
        member, row, _ = _group_rows(TAB, GT, GW, gi, t, h, bb, mask_t, ALIGN)
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


def _groups(calls, device):
    """The int64 group table ``[ngroups, 2 + max offsets]``: calls that share ``(branch, s0,
    nseg, length, r)`` (one branch's offsets over one batch of segments) form a group, row ``[r,
    count, call index of offset 0, 1, ..., count - 1]``; a head ``h`` reads the group's call
    of offset ``h mod r`` (if ``< count``) -- so each program visits one call per group
    instead of testing every call."""
    groups = {}
    for i, call in enumerate(calls):
        s0, nseg, length, r, o = call.strided
        # the branch too: two branches' partial tails can share (s0, nseg, length, r)
        groups.setdefault((call.branch, s0, nseg, length, r), {})[o] = i
    width = 2 + max(max(g) + 1 for g in groups.values())
    rows = []
    for (_, _, _, _, r), g in groups.items():
        cnt = max(g) + 1
        if sorted(g) != list(range(cnt)):
            raise ValueError(f"a group of calls lacks some offsets below {cnt}: {sorted(g)}")
        rows.append([r, cnt] + [g[o] for o in range(cnt)] + [-1] * (width - 2 - cnt))
    return torch.tensor(rows, dtype=torch.int64, device=device), width


# Tile size (elements of [BLOCK_T, BLOCK_D] a program: positions x head dim of one head) and
# warps. The kernels are memory-bound; a program visits one call per group.
ELEMS = 2048  # the tile of the recorded H100 run (dilated README)
NUM_WARPS = 4


def _launch(kernel, args, calls, b, l, h, d, align, device):
    """Launch ``kernel`` over (tiles of ``BLOCK_T`` positions x heads, head fastest) and batch
    rows."""
    gt, gw = _groups(calls, device)
    bd = triton.next_power_of_2(d)
    bt = max(1, ELEMS // bd)
    tab, *rest = args
    kernel[(triton.cdiv(l, bt) * h, b)](tab, gt, gw, *rest, gt.shape[0], l, h, d, ALIGN=align,
                                       BLOCK_T=bt, BLOCK_D=bd, num_warps=NUM_WARPS)


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
    _launch(_merge_kernel, (tab, outs[0], lses[0], out, lse), calls, b, l, h, dv, align, dev)
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
    _launch(_sum_kernel, (tab, gs[0], out), calls, b, l, h, d, align, dev)
    return out
