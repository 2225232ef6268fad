"""Split-K ("flash-decoding") Triton kernel for the local decode step, with lse.

A decode step has a handful of query rows and a very long key axis. Flash-attention kernels
parallelise over query blocks, so at ``Lq = 1`` they run ``B * H`` programs and leave most of a
GPU idle. Here the key axis is cut into ``splits`` pieces: program ``(s, b * Hkv + h)`` attends
all query rows of KV head ``h`` (the ``Lq * G`` rows of its GQA group, so every key is read
once) to the keys of split ``s`` with an online softmax, and writes an unnormalised partial
``(acc, m, l)``. A short torch epilogue (:func:`merge_splits`) merges the splits exactly, its
statistics in ``common.dtypes.lse_dtype`` (float32 for fp16 / bf16, float64 for float32 inputs:
a float32 ``m + log l`` near 1e4 is only good to ~1e-3, which a later merge across ranks turns
into a relative error of 1e-4 and more in ``out``, ``tree/bench/results/precision_cpu.log``);
its slow twin is
:func:`longattn.common.merge.merge_stacked` on the normalised partials ``(acc / l, m + log l)``
(the tests compare the two).

Reads K and V in their BSHD layout (any strides with a unit last stride): no copies. Window
``(-1, right)`` bottom-right aligned, as :func:`longattn.tree.local.local_attention` needs.
Per-row lengths (``seqlens``, with per-row ``rights``): each program reads its row's valid
length and window, so rows of different lengths share one launch and the splits past a row's
length run no key block.
Runs on CPU under ``TRITON_INTERPRET=1`` (set before triton is imported), which the tests use.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from longattn.common.dtypes import lse_dtype
from longattn.common.kernels import host_to_device
from longattn.common.merge import finish_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

MAX_ROWS = 128  # Lq * (Hq / Hkv) rows per program
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q, k, v):
    """None if :func:`decode` serves these tensors, else a reason."""
    import os

    if triton is None:
        return "triton is not installed"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs CUDA tensors (or TRITON_INTERPRET=1)"
    if q.dtype not in _DTYPES:
        return f"needs fp16/bf16/fp32, got {q.dtype}"
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256) or v.shape[-1] != d:
        return f"head_dim must be a power of two in [16, 256], got {d}"
    rows = q.shape[1] * (q.shape[2] // k.shape[2])
    if rows > MAX_ROWS:
        return f"Lq * Hq / Hkv = {rows} rows exceed {MAX_ROWS} (use a prefill kernel)"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "needs a unit stride on head_dim"
    return None


if triton is not None:

    @triton.jit
    def _split_kernel(
        Q, K, V, ACC, M, L, SEQ, RGT, STA, SKL, SKH, ITEMS,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh,
        S, LQ, HKV, NB, scale, right, split_len,
        G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr,
        PER_ROW: tl.constexpr = False, ITEMIZED: tl.constexpr = False,
        BPAD: tl.constexpr = 1,
    ):
        if ITEMIZED:  # one program per split that has keys: ITEMS[b] = row b's first program
            item = tl.program_id(0)
            offs = tl.arange(0, BPAD)
            pref = tl.load(ITEMS + offs, mask=offs <= NB, other=2147483647)
            bi = tl.sum((pref <= item).to(tl.int32), 0) - 1  # the last row starting <= item
            first = tl.load(ITEMS + bi)
            per_head = (tl.load(ITEMS + bi + 1) - first) // HKV
            sid = (item - first) % per_head
            bh = bi * HKV + (item - first) // per_head
        else:
            sid = tl.program_id(0)
            bh = tl.program_id(1)
        # 64-bit offsets: a 1M-token cache has S * Hkv * D > 2**31 elements
        b = (bh // HKV).to(tl.int64)
        h = (bh % HKV).to(tl.int64)
        rows = tl.arange(0, BLOCK_M)
        t = rows // G  # new-token index of each row
        g = rows % G
        row_ok = rows < ROWS
        dd = tl.arange(0, D)
        q_ptr = Q + b * sqb + t[:, None] * sqt + (h * G + g)[:, None] * sqh + dd[None, :]
        q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
        if PER_ROW:  # this batch row's end, window, start and skipped slots (int32 [B] each)
            s_len = tl.load(SEQ + b)
            r_win = tl.load(RGT + b)
            s_0 = tl.load(STA + b)
            skip_lo = tl.load(SKL + b)
            skip_hi = tl.load(SKH + b)
        else:
            s_len = S
            r_win = right
            s_0 = 0
            skip_lo = 0
            skip_hi = 0
        # row t sees key j iff j <= t + S - LQ + right (right < 0: unbounded), S and right
        # this batch row's with PER_ROW
        lim = t + s_len - LQ + r_win
        lim = tl.where(r_win < 0, s_len, lim)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        if ITEMIZED:  # splits count from the row's first slot
            lo = s_0 + sid * split_len
            hi = tl.minimum(lo + split_len, s_len)
        else:
            lo = sid * split_len
            hi = tl.minimum(lo + split_len, s_len)
            lo = tl.maximum(lo, s_0)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            # skipped slots are masked out of the loads too: they are never read
            col_ok = (cols < hi) & ((cols < skip_lo) | (cols >= skip_hi))
            cols64 = cols.to(tl.int64)
            kb = tl.load(k_base + cols64[:, None] * sks + dd[None, :], mask=col_ok[:, None],
                         other=0.0)  # [BLOCK_N, D]
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(kb.to(tl.float32)),
                           input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kb))
            s = s * scale
            vis = col_ok[None, :] & (cols[None, :] <= lim[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + cols64[:, None] * svs + dd[None, :], mask=col_ok[:, None],
                         other=0.0)  # [BLOCK_N, D]
            if IEEE:  # P rounded to V's dtype first, as on the tensor-core path
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype).to(tl.float32),
                                                    vt.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
        # only the ROWS real rows are stored: the padding rows of BLOCK_M would be written and
        # read back by the merge for nothing
        base = (bh * SPLITS + sid) * ROWS
        tl.store(ACC + (base + rows)[:, None] * D + dd[None, :], acc, mask=row_ok[:, None])
        tl.store(M + base + rows, m_i, mask=row_ok)
        tl.store(L + base + rows, l_i, mask=row_ok)


# The launch configuration by device name (a substring of ``torch.cuda.get_device_name``):
# the best of tree/bench/bench_tree.py's sweep on each, or within 1% of it
# (tree/bench/results/bench_tree.json, H100: bn64/w8/s4 at 1.016x the HBM floor, the best
# 1.012x; tree/bench/results/h200/bench_tree_log.txt, H200: 0.99x, where the fallback
# bn64/w4/s3 ran at 1.16x).
CONFIGS = (
    ("H100", dict(block_n=64, num_warps=8, num_stages=4)),
    ("H200", dict(block_n=64, num_warps=8, num_stages=4)),
)
FALLBACK = dict(block_n=64, num_warps=4, num_stages=3)


@functools.cache
def _config_for(name: str) -> tuple:
    for key, cfg in CONFIGS:
        if key in name:
            return tuple(cfg.items())
    return tuple(FALLBACK.items())


def default_config(device=None) -> dict:
    """``{block_n, num_warps, num_stages}`` for ``device``: its row of :data:`CONFIGS`, else
    :data:`FALLBACK` (also off CUDA, where the launch options do not apply)."""
    if device is None or torch.device(device).type != "cuda":
        return dict(FALLBACK)
    return dict(_config_for(torch.cuda.get_device_name(device)))


def _sms(device) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


# Hopper's shared memory and threads per SM, for a device whose properties do not say
SMEM_PER_SM = 233472
THREADS_PER_SM = 2048


def resident_programs(device, *, block_n: int, num_warps: int, num_stages: int, head_dim: int,
                      itemsize: int) -> int:
    """Programs of the kernel the GPU runs at once: its SMs times the programs one SM holds,
    bounded by shared memory (the pipelined K and V tiles: ``num_stages - 1`` buffers of each,
    and a quarter tile, as the shared memory Triton asked for in
    tree/bench/results/h200/decode_batch/run2_log.txt) and by threads."""
    smem, threads = SMEM_PER_SM, THREADS_PER_SM
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_multiprocessor", smem) or smem
        threads = getattr(props, "max_threads_per_multi_processor", threads) or threads
    tile = block_n * head_dim * itemsize
    need = max(1, (num_stages - 1) * 2 * tile + tile // 4)
    per_sm = max(1, min(smem // need, threads // (32 * num_warps)))
    return _sms(device) * per_sm


def _row_programs(lengths, per):
    """Each row's programs per head when splits are ``per`` long (splits count from the row's
    first slot; ``lengths`` and ``per`` in the same unit)."""
    return [-(-n // per) for n in lengths]


def _wave_split(blocks, heads, slots):
    """The split length (in key blocks) for rows of ``blocks`` key blocks each: of the lengths
    that cut the work into 1 to 16 waves of ``slots`` resident programs, the one whose waves
    times length (the time of the longest program in each wave, added up) is least."""
    total = heads * sum(blocks)
    if total == 0:
        return 1
    best = None
    for waves in range(1, 17):
        per = max(1, -(-total // (waves * slots)))
        cost = -(-heads * sum(_row_programs(blocks, per)) // slots) * per
        if best is None or cost < best[0]:
            best = (cost, per)
    return best[1]


def make_plan(seq: int, programs_per_split: int, *, block_n: int = 64, splits=None,
              device=None, rows=None, slots=None):
    """``(splits, split_len)``: enough programs to fill the GPU (about 4 per SM), each split a
    whole number of ``block_n`` key blocks.

    ``rows`` (rows of different lengths): the slots each batch row reads from its first, and
    the splits count from each row's first slot (the launch runs one program per split that has
    keys, :func:`decode`); ``splits`` is then the most any row has. The split length comes
    from the work, not from ``seq``: a plan cut from ``seq`` alone gives the longest row as
    few programs as the shortest, and they run long after the rest are done. Programs are cut
    so that they fill whole waves of ``slots`` (the programs resident at once,
    :func:`resident_programs`; default 4 per SM): a last wave run by few programs leaves most
    of the GPU idle (:func:`_wave_split`)."""
    blocks = max(1, math.ceil(seq / block_n))
    if splits is None and rows is not None:
        blocks_per_row = [-(-n // block_n) for n in rows]
        heads = max(1, programs_per_split // max(1, len(rows)))
        per = _wave_split(blocks_per_row, heads, slots or 4 * _sms(device))
        return max(1, -(-max(blocks_per_row + [1]) // per)), per * block_n
    if splits is None:
        splits = max(1, math.ceil(4 * _sms(device) / max(1, programs_per_split)))
    splits = max(1, min(int(splits), blocks))
    split_len = math.ceil(blocks / splits) * block_n
    return math.ceil(seq / split_len), split_len


def _row_lengths(seqlens, starts):
    """The slots each row reads from its start (host lists only; a device tensor would cost a
    sync)."""
    if isinstance(seqlens, torch.Tensor):
        return None
    starts = [0] * len(seqlens) if starts is None else starts
    return [max(0, int(n) - int(s0)) for n, s0 in zip(seqlens, starts)]


def decode(q, k, v, *, softmax_scale: float, right: int = -1, block_n=None, num_warps=None,
           num_stages=None, splits=None, seqlens=None, rights=None, starts=None, skips=None):
    """``(out, lse)`` of ``q [B, Lq, Hq, D]`` over ``k, v [B, S, Hkv, D]`` (S >= 1) with the
    window ``(-1, right)``; ``out`` float32 ``[B, Lq, Hq, D]``, ``lse [B, Hq, Lq]`` in
    ``lse_dtype(q.dtype)`` (float32 for fp16 / bf16, float64 for float32).

    ``seqlens`` (``B`` ints or an int tensor, each in ``[0, S]``): row ``b`` holds its first
    ``seqlens[b]`` keys, with the window ``(-1, rights[b])`` (``rights`` the same form; None:
    ``right`` for every row). A row with no visible key gives ``out = 0``, ``lse = -inf``.
    With ``seqlens``, ``starts`` (``B`` ints) makes row ``b`` begin at slot ``starts[b]`` and
    ``skips`` (``B`` pairs ``(lo, hi)``) leaves out its slots ``lo <= j < hi``, as in
    :func:`longattn.tree.local.local_attention`; the window counts in slots either way.
    ``block_n``, ``num_warps``, ``num_stages``: None takes the device's
    :func:`default_config`.
    """
    b, lq, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    rows = lq * g
    block_m = max(16, triton.next_power_of_2(rows))
    cfg = default_config(q.device)
    block_n = cfg["block_n"] if block_n is None else block_n
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    rows_ = None if seqlens is None else _row_lengths(seqlens, starts)
    slots = None if rows_ is None else resident_programs(
        q.device, block_n=block_n, num_warps=num_warps, num_stages=num_stages, head_dim=d,
        itemsize=k.element_size())
    n_splits, split_len = make_plan(s_len, b * hkv, block_n=block_n, splits=splits,
                                    device=q.device, rows=rows_, slots=slots)
    itemized = rows_ is not None and splits is None
    acc = torch.empty(b * hkv, n_splits, rows, d, dtype=torch.float32, device=q.device)
    if itemized:  # the splits past a row's last are not run: they must read as empty
        m = torch.full((b * hkv, n_splits, rows), float("-inf"), device=q.device)
        l_ = torch.zeros_like(m)
        counts = [hkv * n for n in _row_programs(rows_, split_len)]
        items = [0, *itertools.accumulate(counts)]
        grid = (sum(counts),)
    else:
        m = torch.empty(b * hkv, n_splits, rows, dtype=torch.float32, device=q.device)
        l_ = torch.empty_like(m)
        items, grid = [], (n_splits, b * hkv)
    kw = {} if q.device.type != "cuda" else dict(num_warps=num_warps, num_stages=num_stages)
    per_row = seqlens is not None
    if per_row:
        seq_t, rgt_t, sta_t, skl_t, skh_t, items_t = _row_tables(
            b, q.device, seqlens, [right] * b if rights is None else rights,
            [0] * b if starts is None else starts, [(0, 0)] * b if skips is None else skips,
            items)
        items_t = items_t if itemized else m
    elif starts is not None or skips is not None:
        raise ValueError("starts and skips need seqlens")
    else:  # unread placeholders
        seq_t = rgt_t = sta_t = skl_t = skh_t = items_t = m
    if grid[0]:  # an itemized batch with no key to read launches nothing
        _split_kernel[grid](
            q, k, v, acc, m, l_, seq_t, rgt_t, sta_t, skl_t, skh_t, items_t,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            s_len, lq, hkv, b, float(softmax_scale), int(right), split_len,
            G=g, ROWS=rows, BLOCK_M=block_m, BLOCK_N=block_n, D=d, SPLITS=n_splits,
            # float32 inputs need IEEE dots (not TF32); the CPU interpreter's low-precision
            # tl.dot is broken (triton 3.x), so there every dot runs in float32 as well
            IEEE=q.dtype == torch.float32 or q.device.type != "cuda", PER_ROW=per_row,
            ITEMIZED=itemized, BPAD=triton.next_power_of_2(b + 1), **kw,
        )
    if itemized:  # the unrun splits' acc is unset; their m = -inf gives them no weight
        acc = torch.where(torch.isneginf(m).unsqueeze(-1), 0.0, acc)
    # the per-split maxima are float32 scores (exact in float64); the epilogue's statistics
    # (and so the lse) are in lse_dtype: float64 for float32 inputs, float32 (as before) else
    stat = lse_dtype(q.dtype)
    return merge_splits(acc, m.to(stat), l_.to(stat), b, lq, hq)


def _row_tables(b, device, seqlens, rights, starts, skips, items):
    """The kernel's per-row int32 tables (``seqlens``, ``rights``, ``starts``, the skipped
    slots' ``lo`` and ``hi``, each ``[B]``) and the itemized launch's row offsets ``items``, as
    views of one device tensor. Host lists travel in one copy that does not make the host wait
    for the GPU (:func:`longattn.common.kernels.host_to_device`)."""
    parts = [seqlens, rights, starts, skips]
    if any(isinstance(x, torch.Tensor) for x in parts):  # device tensors: no host copy at all
        seq_t, rgt_t, sta_t = (torch.as_tensor(x, dtype=torch.int32, device=device)
                               for x in parts[:3])
        sk = torch.as_tensor(skips, dtype=torch.int32, device=device).reshape(-1, 2)
        tabs = [seq_t, rgt_t, sta_t, sk[:, 0].contiguous(), sk[:, 1].contiguous()]
        shapes = [tuple(t.shape) for t in tabs[:4]]
        if set(shapes) != {(b,)}:
            raise ValueError(f"seqlens, rights, starts and skips must hold {b} entries (one "
                             f"per batch row), got shapes {shapes}")
        return (*tabs, torch.as_tensor(items, dtype=torch.int32, device=device))
    lists = [list(seqlens), list(rights), list(starts), [lo for lo, _ in skips],
             [hi for _, hi in skips]]
    if {len(x) for x in lists} != {b}:
        raise ValueError(f"seqlens, rights, starts and skips must hold {b} entries (one per "
                         f"batch row), got {[len(x) for x in lists[:4]]}")
    flat = host_to_device(
        torch.tensor([int(x) for x in itertools.chain(*lists, items)], dtype=torch.int32), device)
    return (*flat[:5 * b].view(5, b).unbind(0), flat[5 * b:])


def merge_splits(acc, m, l_, b, lq, hq):
    """Exact merge of the per-split partials (``acc [B*Hkv, splits, rows, D]`` unnormalised,
    running max ``m`` and sum ``l`` ``[B*Hkv, splits, rows]``); rows are ``(t, g)`` with ``t``
    the new token. Returns ``out [B, Lq, Hq, D]`` in ``acc``'s dtype and ``lse [B, Hq, Lq]``
    in ``m``'s dtype (the statistics' dtype: pass ``m`` and ``l`` in ``lse_dtype``).

    The fast form of :func:`longattn.common.merge.merge_stacked` (its slow twin) on the
    normalised partials ``(acc / l, m + log l)``: one weighted sum, then
    :func:`~longattn.common.merge.finish_rows` (rows no split saw give 0 / -inf; a NaN stays
    NaN)."""
    mx = m.amax(1)  # [BH, rows]
    w = torch.exp(m - torch.where(torch.isneginf(mx), 0.0, mx).unsqueeze(1))  # [BH, splits, rows]
    # a split that saw no key has m = -inf and l = 0: w = 0 there, its (zero) acc drops out
    den = (l_ * w).sum(1)  # [BH, rows]
    num = (acc * w.to(acc.dtype).unsqueeze(-1)).sum(1)  # [BH, rows, D], in acc's dtype
    out, lse = finish_rows(num, den, mx)  # lse in the statistics' dtype
    d = acc.shape[-1]
    hkv = acc.shape[0] // b
    g = hq // hkv
    out = out.reshape(b, hkv, lq, g, d).permute(0, 2, 1, 3, 4).reshape(b, lq, hq, d)
    lse = lse.reshape(b, hkv, lq, g).permute(0, 1, 3, 2).reshape(b, hq, lq)
    return out, lse
