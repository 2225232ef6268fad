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
a group only the call of offset ``h mod r`` can hold head ``h``, so a tile visits one call per
group (5 for LongNet's schedule, not its 25 calls) and reads its member rows (every r-th
position; masked loads, other rows cost no traffic). The merge first reads the groups' lse and
forms each row's weights, then sums the weighted rows in float32 and writes the result once,
in the output dtype. The group loops are unrolled (the group count is a compile-time constant)
and branch-free, so the loads of all groups can be in flight together. A thread owns whole
rows and reads the head dim in chunks of ``CHUNK`` columns, so a row's index arithmetic is
done once, not by every thread that shares the row.

The host resolves, for every (head, group), the call that holds the head into one row of an
int64 table (one small host-to-device copy per launch): its geometry, and its data as element
offsets from the first call's tensor (a kernel argument, so its 16-byte alignment is known to
the compiler and the head-dim loads are vectors) with the head's column added, and its row
strides -- so the kernel's table loads do not depend on each other, and calls of any layout
share the launch. Each program walks its tiles in a loop (``range(first, NTILES, step)``): one
tile by default; with ``FusedConfig.programs_per_sm`` set, a few programs per SM stride over the
tiles of their (head, batch row). The loop stays even for one tile: the same kernels compiled
without it ran the three sums in 9.1 ms against 5.8 ms on the H100 (``tune_fused.py``, logs
``bench/results/tune_fused_without_loop_log.txt`` and ``tune_fused_log.txt``).

The slow twin of :func:`merge_strided` is the eager
:func:`longattn.dilated.attention.merge_calls` (the same multi-way merge as
:func:`longattn.common.merge.merge_stacked`, accumulated call by call; the tests compare all
three); that of :func:`sum_strided` is the eager accumulation in the backward of
:mod:`longattn.dilated.attention`. The launch is a :class:`~longattn.dilated.config.FusedConfig`
passed by the caller.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from longattn.dilated.config import DEFAULT

# a fact of this process (triton reads it when first imported), not a knob
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# columns of the per-(head, group) int64 table: the geometry of the group's call that holds the
# head, its data as element offsets from the first call's tensor / lse (the head's column
# included), and the row strides
_R, _O, _S0, _NSEG, _LEN, _ROW0, _SSB, _SJ, _LROW0, _LSB, _LSJ = (tl.constexpr(i) for i in
                                                                  range(11))
_NCOL = tl.constexpr(12)


@triton.jit
def _params(HT, h, NGROUPS: tl.constexpr):
    """Head ``h``'s rows of the table, one tuple per group, loaded once per program (the tile
    loop keeps them in registers): ``(r, o, s0, nseg, length, row0, ssb, sj, lrow0, lsb, lsj,
    1/r)``. A head a group has no call for has ``nseg = 0``: no member."""
    prms = ()
    for gi in tl.static_range(NGROUPS):
        p = HT + (h * NGROUPS + gi) * _NCOL
        r = tl.load(p + _R).to(tl.int32)
        prms = prms + ((r, tl.load(p + _O).to(tl.int32), tl.load(p + _S0).to(tl.int32),
                        tl.load(p + _NSEG).to(tl.int32), tl.load(p + _LEN).to(tl.int32),
                        tl.load(p + _ROW0), tl.load(p + _SSB), tl.load(p + _SJ),
                        tl.load(p + _LROW0), tl.load(p + _LSB), tl.load(p + _LSJ),
                        1.0 / r.to(tl.float32)),)
    return prms


@triton.jit
def _group_rows(prm, t0, bb, mask_t, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr,
                FAST: tl.constexpr):
    """One group's call (``prm``, from :func:`_params`) over the tile of positions ``t0 + [0,
    BLOCK_T)`` of batch row ``bb``: ``(member [T], element offset of each row in the result
    [T] (int64), lse offset [T])``.

    ``FAST`` (checked by the host: every segment at least ``BLOCK_T`` and below 2**21
    positions, every stride below 2**31): a tile meets at most one segment boundary, so one
    scalar division per tile finds the segments; the offset in the segment is divided by
    ``r`` in float32, exact below 2**22 (the quotient of ``x + 1/2`` lies at least ``1/(2r)``
    from an integer), and the strides multiply as int32 into int64. The kernels are bound by
    instructions, not memory, without it: integer divisions on every row of every group.
    """
    r, o, s0, nseg, length, row0, ssb, sj, lrow0, lsb, lsj, rcp = prm
    i = tl.arange(0, BLOCK_T)
    tr0 = t0 - s0
    if FAST:
        seg0 = tl.maximum(tr0, 0) // length
        d = (tr0 - seg0 * length) + i  # offset in segment seg0; < 0 before s0
        cross = d >= length
        seg = seg0 + cross.to(tl.int32)
        x = d - tl.where(cross, length, 0) - o
        j = tl.floor((x.to(tl.float32) + 0.5) * rcp).to(tl.int32)
        member = (d >= 0) & (seg < nseg) & mask_t & (x == j * r)
        sb = (bb * nseg + seg).to(tl.int64)
        jj = j.to(tl.int64)
        row = row0 + sb * ssb.to(tl.int32).to(tl.int64) + jj * sj.to(tl.int32).to(tl.int64)
        lrow = lrow0 + sb * lsb.to(tl.int32).to(tl.int64) + jj * lsj.to(tl.int32).to(tl.int64)
    else:
        tr = tr0 + i
        inside = (tr >= 0) & (tr < nseg * length) & mask_t
        tr = tl.where(inside, tr, 0)  # keep the divisions below on valid numbers
        seg = tr // length
        pos = tr - seg * length
        member = inside & (pos % r == o)
        sb = (bb * nseg + seg).to(tl.int64)  # index along the call's batch*segment dim
        jj = (pos // r).to(tl.int64)
        row = row0 + sb * ssb + jj * sj
        lrow = lrow0 + sb * lsb + jj * lsj
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
def _tile(prms, ti, bb, h, L, H, NGROUPS: tl.constexpr, ALIGN: tl.constexpr,
          BLOCK_T: tl.constexpr, FAST: tl.constexpr):
    """Tile ``ti`` of head ``h``, batch row ``bb``: its positions ``t [T]``, their mask, the
    rows of every group (a tuple of :func:`_group_rows`) and the flat output rows ``(b, t, h)``
    (int64)."""
    t0 = ti * BLOCK_T
    t = t0 + tl.arange(0, BLOCK_T)
    mask_t = t < L
    rows = ()
    for gi in tl.static_range(NGROUPS):
        rows = rows + (_group_rows(prms[gi], t0, bb, mask_t, ALIGN, BLOCK_T, FAST),)
    return t, mask_t, rows, (bb.to(tl.int64) * L + t) * H + h


@triton.jit
def _chunk_sum(REF, rows, ws, c, D, NGROUPS: tl.constexpr, BLOCK_T: tl.constexpr,
               CHUNK: tl.constexpr):
    """Columns ``c*CHUNK + [0, CHUNK)`` of the sum over groups of their rows in ``REF`` (times
    the row weights ``ws[gi]``, unless ``ws`` is None), float32 ``[T, CHUNK]``; with the columns
    and their mask."""
    cc = c * CHUNK + tl.arange(0, CHUNK)
    mask_d = cc < D
    acc = tl.zeros([BLOCK_T, CHUNK], tl.float32)
    for gi in tl.static_range(NGROUPS):  # unrolled, branch-free: all loads in flight
        member, row, _ = rows[gi]
        x = tl.load(REF + (row[:, None] + cc[None, :]), mask=member[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        if ws is not None:
            x = x * ws[gi][:, None]
        acc += x
    return acc, cc, mask_d


@triton.jit
def _merge_kernel(HT, OREF, LREF, OUT, LSE, NGROUPS: tl.constexpr, L, H, DV, NTILES,
                  ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                  CHUNK: tl.constexpr, FAST: tl.constexpr):
    """out/lse of this program's tiles (:func:`_program`): the LSE merge of the calls holding
    their rows (one per group). The head dim goes in chunks of ``CHUNK`` columns, so a thread
    owns whole rows: their index arithmetic is done once, not once per thread of a row."""
    h, bb, first, step = _program(H)
    prms = _params(HT, h, NGROUPS)
    for ti in range(first, NTILES, step):
        t, mask_t, rows, out_rows = _tile(prms, ti, bb, h, L, H, NGROUPS, ALIGN, BLOCK_T, FAST)
        lcs = ()
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        for gi in tl.static_range(NGROUPS):
            member, _, lrow = rows[gi]
            lc = tl.load(LREF + lrow, mask=member, other=float("-inf"))
            lcs = lcs + (lc,)
            m = tl.maximum(m, lc)
        m = tl.where(m == float("-inf"), 0.0, m)  # rows of no call: every weight exp(-inf) = 0
        ws = ()
        s = tl.zeros([BLOCK_T], tl.float32)
        for gi in tl.static_range(NGROUPS):
            w = tl.exp(lcs[gi] - m)
            ws = ws + (w,)
            s += w
        seen = s > 0
        inv = tl.where(seen, 1.0 / tl.where(seen, s, 1.0), 0.0)
        tl.store(LSE + out_rows, tl.where(seen, m + tl.log(tl.where(seen, s, 1.0)),
                                          float("-inf")), mask=mask_t)
        for c in tl.static_range(BLOCK_D // CHUNK):
            acc, cc, mask_d = _chunk_sum(OREF, rows, ws, c, DV, NGROUPS, BLOCK_T, CHUNK)
            tl.store(OUT + out_rows[:, None] * DV + cc[None, :],
                     (acc * inv[:, None]).to(OUT.dtype.element_ty),
                     mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _sum_kernel(HT, GREF, OUT, NGROUPS: tl.constexpr, L, H, D, NTILES, ALIGN: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                FAST: tl.constexpr):
    """This program's tiles (:func:`_program`) of the sum of the calls' gradients (0 where no
    call holds the row); the head dim in chunks as in :func:`_merge_kernel`."""
    h, bb, first, step = _program(H)
    prms = _params(HT, h, NGROUPS)
    for ti in range(first, NTILES, step):
        t, mask_t, rows, out_rows = _tile(prms, ti, bb, h, L, H, NGROUPS, ALIGN, BLOCK_T, FAST)
        for c in tl.static_range(BLOCK_D // CHUNK):
            acc, cc, mask_d = _chunk_sum(GREF, rows, None, c, D, NGROUPS, BLOCK_T, CHUNK)
            tl.store(OUT + out_rows[:, None] * D + cc[None, :], acc.to(OUT.dtype.element_ty),
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


def _table(calls, tensors, lses, which, nheads, device, config=DEFAULT):
    """The int64 table ``[nheads, ngroups, _NCOL]``: for each head and group, the geometry of
    the group's call that holds the head (``nseg = 0`` if none) and its data as element
    offsets from ``tensors[0]`` / ``lses[0]`` (so that the kernel addresses them from a
    pointer argument whose alignment the compiler knows), the head's column included. Also
    ``ALIGN``: the element multiple every call's offset and row strides share (16-byte
    vectors, else 1). ``tensors[c]`` is call c's ``[B*nseg, n, ho, D]`` result, ``lses[c]``
    its ``[B*nseg, ho, n]`` float32 lse (or None); ``which`` picks the call's head count (0:
    query, 1: kv); ``config``: its ``rows`` and ``fast_index`` decide ``FAST``."""
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
            if c is None:  # no call of this group holds head h: nseg = 0
                rows.append([1, 0, 0, 0, _NO_LENGTH] + [0] * (_NCOL.value - 5))
                continue
            r, o, s0, nseg, length, off, sh, ssb, sj, loff, lsh, lsb, lsj = geo[c]
            a = h // r
            rows.append([r, o, s0, nseg, length, off + a * sh, ssb, sj, loff + a * lsh, lsb,
                         lsj, 0])
    vec = max(1, 16 // size)
    align = vec if all(x % vec == 0 for x in offsets) else 1
    tab = torch.tensor(rows, dtype=torch.int64).view(nheads, len(groups), _NCOL.value)
    lengths = [g[4] for g in geo]
    strides = [x for g in geo for x in g[6:9] + g[10:]]
    fast = (config.fast_index and min(lengths) >= config.rows and max(lengths) < 2**21
            and max(abs(x) for x in strides) < 2**31)
    return _to_device(tab, device), align, fast


def _to_device(tab, device):
    """``tab`` on ``device`` without a stream sync: a copy from pageable memory would wait
    for the GPU to drain, idling it while the host queues the next launches."""
    if torch.device(device).type != "cuda":
        return tab.to(device)
    return tab.pin_memory().to(device, non_blocking=True)


_NO_LENGTH = 1 << 20  # segment length of a (head, group) without a call: no tile crosses it


def _splits(ntiles, b, h, device, config):
    """Programs per (head, batch row): each strides over ``ntiles / splits`` position tiles."""
    if config.programs_per_sm is None:
        return ntiles
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 1)
    return max(1, min(ntiles, triton.cdiv(sms * config.programs_per_sm, b * h)))


def _launch(kernel, table, args, b, l, h, d, device, config):
    """Launch ``kernel`` over (splits x heads, head fastest) and batch rows."""
    tab, align, fast = table
    bt, bd = config.rows, triton.next_power_of_2(d)
    ntiles = triton.cdiv(l, bt)
    kernel[(_splits(ntiles, b, h, device, config) * h, b)](
        tab, *args, tab.shape[1], l, h, d, ntiles, ALIGN=align, BLOCK_T=bt, BLOCK_D=bd,
        CHUNK=min(config.chunk, bd), FAST=fast, num_warps=config.num_warps)


def merge_strided(parts, calls, b, l, h, dv, out_dtype, config=DEFAULT):
    """Multi-way LSE merge of strided calls, one launch (``config``: a
    :class:`~longattn.dilated.config.FusedConfig`). ``parts[c] = (o_c [B*nseg, n, ho, Dv], lse_c
    [B*nseg, ho, n] float32)`` of ``calls[c]``. Returns ``out [B, l, H, Dv]`` in
    ``out_dtype`` and ``lse [B, l, H]`` float32; rows of no call: ``out = 0``, ``lse = -inf``.

    The fast kernel of the merge; its slow twin, the same numbers from eager torch, is
    :func:`longattn.dilated.attention.merge_calls` (= :func:`longattn.common.merge.merge_stacked`
    of the calls' results placed in full-size tensors)."""
    outs = [_unit_last(o) for o, _ in parts]
    lses = [lse.float() for _, lse in parts]
    dev = outs[0].device
    table = _table(calls, outs, lses, 0, h, dev, config)
    out = torch.empty(b, l, h, dv, dtype=out_dtype, device=dev)
    lse = torch.empty(b, l, h, dtype=torch.float32, device=dev)
    _launch(_merge_kernel, table, (outs[0], lses[0], out, lse), b, l, h, dv, dev, config)
    return out, lse


def sum_strided(grads, calls, b, l, h, d, out_dtype, which, config=DEFAULT):
    """Sum of the strided calls' gradients: ``grads[c] [B*nseg, n, ho, D]`` of ``calls[c]``
    (``which`` = 0: query rows, heads ``call.heads[0]``; 1: kv rows, ``call.heads[1]``).
    Returns ``[B, l, H, D]`` in ``out_dtype`` (zero on rows no call holds), accumulated in
    float32 and written once (``config``: the launch, a
    :class:`~longattn.dilated.config.FusedConfig`)."""
    gs = [_unit_last(g) for g in grads]
    dev = gs[0].device
    table = _table(calls, gs, [None] * len(gs), which, h, dev, config)
    out = torch.empty(b, l, h, d, dtype=out_dtype, device=dev)
    _launch(_sum_kernel, table, (gs[0], out), b, l, h, d, dev, config)
    return out
