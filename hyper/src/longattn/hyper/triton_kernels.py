"""Triton kernels of one recursion level: all core calls of the level in one launch each.

Their slow twin is :func:`longattn.hyper.torch_path.core` (one core call in differentiable
torch ops, autograd for the backward): the kernels compute the same windows, samples, weights
and merges; ``tests/test_hyper_triton.py`` compares the two paths under ``TRITON_INTERPRET=1``.

Every kernel reads q/k/v *through the sort permutations* (nothing is materialised in sorted
order) and works on many core calls ("problems") at once; a problem ``p`` has queries
``[q0, q0 + nq)`` and keys ``[k0, k0 + nk)``, and ``PQ[b, h, q0 + i]`` is the row of its
``i``-th sorted query (``PK`` likewise for keys). Sorted query ``i`` sees the sorted keys
``[start(i), min(start(i) + BS, nk))`` (see ``window_start`` in :mod:`torch_path`) plus the
``M`` sampled sorted key positions ``SAMP[p, b, hkv]`` that lie outside that window, each with
weight ``nk / M`` (``PLW[p] = log2(nk / M)``). Scores are kept in base 2 (``scale * log2(e)``).

* :func:`_fwd`: one program per (tile of ``BLOCK_M`` sorted queries, batch * q head). One
  online softmax over the window keys and then the samples; it starts from the running
  ``(O, L)`` of earlier parts (``HAS_INIT``) and writes the merged result back in place (the
  rows of one level's problems are disjoint). ``O`` may be in the input dtype (fp16 / bf16):
  it is loaded into and merged in fp32 registers and rounded once on the store; ``L`` is
  always fp32.
* :func:`_bwd_dq`: same grid; ``dq += scale * sum_j dS_ij k_j`` with ``P`` recomputed from the
  *final* lse and ``dS = P * (dP - delta)``, ``delta = rowsum(dO * O) - dlse`` (the d(lse)
  term).
* :func:`_bwd_dkdv`: one program per (tile of ``BLOCK_N`` sorted keys, batch * kv head); loops
  over the query heads of the GQA group and the (contiguous) range of sorted queries whose
  window holds a key of the tile -- the exact transpose of the forward's window rule, for the
  block diagonal and for the smooth band alike.
* :func:`_bwd_samples`: one program per (chunk of sorted queries of a problem, tile of samples,
  batch * kv head); writes per-sample partial dk/dv, which the caller sums over chunks and
  scatters (duplicates add up) into dk/dv.

Register economy (gathered loads have no TMA and no affine addresses): row offsets are int32
unless ``IDX64`` (a row offset past 2^31 elements); batch and head offsets go into the scalar
base pointers; head-dim masks exist only when the head dim is not a power of two
(``EVEN_D``), so loads stay 16-byte vectors. ``bench/compile_sm90.py`` compiles every config
for sm_90 with ptxas and reports registers and spills; the configs below cover 4 and 8 warps,
autotuned per (shape bucket, dtype).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


def _configs(pairs):
    if INTERPRET:
        return [triton.Config({"BLOCK_INNER": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_INNER": b}, num_warps=w, num_stages=s) for b, w, s in pairs]


# (inner tile, warps, stages): FlashAttention-2-like choices for head_dim <= 128 on Hopper;
# the second row: more pipelining depths for head_dim 64. 128-wide inner tiles run on 8 warps
# only (bench/compile_sm90.py reports every config's registers and spills for sm_90)
_FWD = _configs([(64, 4, 3), (128, 8, 3), (64, 8, 2), (64, 8, 3), (32, 4, 3),
                 (64, 4, 2), (64, 4, 4), (128, 8, 2), (32, 4, 2)])
_DKDV = _configs([(32, 4, 3), (64, 4, 2), (64, 8, 3), (32, 8, 2), (32, 4, 4), (32, 4, 2),
                  (16, 4, 3)])
_KEY = ["BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "SMOOTH", "TUNE_ROWS"]


def _prune(configs, named_args, **kwargs):
    """fp32 inputs (fp32-accurate dots, for checks rather than speed): one small config."""
    if kwargs.get("PREC") in ("ieee", "tf32x3"):
        return [min(configs, key=lambda c: (c.kwargs["BLOCK_INNER"], c.num_warps))]
    return configs


_PRUNE = {"early_config_prune": _prune}


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``PREC == "ieee"`` (fp32 inputs, and every input under
    ``TRITON_INTERPRET=1``) widens the operands to fp32 first: a no-op for fp32, exact for
    fp16 / bf16 -- as the GPU's fp32-accumulating dots use them -- and it keeps the
    interpreter off its bf16 dots, which multiply the raw 16-bit patterns."""
    if PREC == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _start(i, nk, BS, SMOOTH: tl.constexpr):
    """First sorted key of sorted query i's window (elementwise or scalar)."""
    if SMOOTH:
        return tl.minimum(tl.maximum(i - BS // 2, 0), tl.maximum(nk - BS, 0))
    else:
        return (i // BS) * BS


@triton.jit
def _problem(TP, TI, PQ0, PNQ, PK0, PNK, pid):
    p = tl.load(TP + pid)
    return p, tl.load(TI + pid), tl.load(PQ0 + p), tl.load(PNQ + p), tl.load(PK0 + p), \
        tl.load(PNK + p)


@triton.jit
def _ptrs(base, rows, stride, offs, IDX64: tl.constexpr):
    """base + rows[:, None] * stride + offs[None, :] (rows gathered through a permutation)."""
    if IDX64:
        rows = rows.to(tl.int64)
    return base + rows[:, None] * stride + offs[None, :]


@triton.jit
def _mask(ok, offs, n, EVEN: tl.constexpr):
    if EVEN:
        return ok[:, None]
    else:
        return ok[:, None] & (offs[None, :] < n)


@triton.jit
def _online(m_i, l_i, acc, s, v, PREC: tl.constexpr):
    """One online-softmax step over base-2 scores s (-inf = not seen)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    pr = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + _dot(pr.to(v.dtype), v, PREC)
    return m_new, l_i, acc


@triton.jit
def _load_kv(k_head, v_head, kr, ok, sks, svs, offs_d, offs_dv, D, DV, EVEN_D: tl.constexpr,
             EVEN_DV: tl.constexpr, IDX64: tl.constexpr):
    """K and V rows ``kr`` (gathered through the sort permutation) of one (batch, kv head)."""
    k = tl.load(_ptrs(k_head, kr, sks, offs_d, IDX64), mask=_mask(ok, offs_d, D, EVEN_D),
                other=0.0)
    v = tl.load(_ptrs(v_head, kr, svs, offs_dv, IDX64), mask=_mask(ok, offs_dv, DV, EVEN_DV),
                other=0.0)
    return k, v


@triton.jit
def _load_q_do(Q, DO, b, h, rows, ok, sqb, sqs, sqh, sdb, sds, sdh, offs_d, offs_dv, D, DV,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IDX64: tl.constexpr):
    """Q and dO rows ``rows`` of (batch ``b``, query head ``h``)."""
    q = tl.load(_ptrs(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, rows, sqs, offs_d, IDX64),
                mask=_mask(ok, offs_d, D, EVEN_D), other=0.0)
    do = tl.load(_ptrs(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, rows, sds, offs_dv,
                       IDX64), mask=_mask(ok, offs_dv, DV, EVEN_DV), other=0.0)
    return q, do


@triton.jit
def _row_stats(L, DELTA, lrow, ok):
    """The backward's per-row lse in base 2 (+inf for rows that saw nothing: p = 0) and
    delta."""
    lse = tl.load(L + lrow, mask=ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return lse2, tl.load(DELTA + lrow, mask=ok, other=0.0)


@triton.jit
def _visible(offs_j, j_ok, st, lo, BS, IN_WIN: tl.constexpr, UNIFORM: tl.constexpr):
    """Which of the sorted keys ``offs_j`` each query row sees: inside its window (``IN_WIN``,
    the block-diagonal part) or outside it (a sampled column inside the window is dropped).
    ``st``: each row's window start; ``UNIFORM``: all rows share the window ``[lo, lo + BS)``
    (the result is then one row, broadcast)."""
    if UNIFORM:
        if IN_WIN:
            vis = j_ok[None, :]
        else:
            vis = (j_ok & ((offs_j < lo) | (offs_j >= lo + BS)))[None, :]
    else:
        inside = (offs_j[None, :] >= st[:, None]) & (offs_j[None, :] < st[:, None] + BS)
        if IN_WIN:
            vis = j_ok[None, :] & inside
        else:
            vis = j_ok[None, :] & ~inside
    return vis


@triton.jit
def _query_tile(PQ, PK, TP, TI, PQ0, PNQ, PK0, PNK, HQ, HKV, SQ, SK, BS, BLOCK_M: tl.constexpr,
                SMOOTH: tl.constexpr):
    """The tile of ``BLOCK_M`` sorted queries of this program (forward and dq grids): batch,
    query / kv head, problem, the rows (through the permutation), each row's window start
    ``st``, the tile's key range ``[lo, hi)`` and the problem's sorted-key base pointer."""
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // (HQ // HKV)
    p, i0, q0, nq, k0, nk = _problem(TP, TI, PQ0, PNQ, PK0, PNK, tl.program_id(0))
    offs_i = i0 + tl.arange(0, BLOCK_M)
    row_ok = offs_i < nq
    rows = tl.load(PQ + (b * HQ + h).to(tl.int64) * SQ + q0 + offs_i, mask=row_ok, other=0)
    st = _start(offs_i, nk, BS, SMOOTH)
    lo = _start(i0, nk, BS, SMOOTH)
    hi = tl.minimum(_start(tl.minimum(i0 + BLOCK_M, nq) - 1, nk, BS, SMOOTH) + BS, nk)
    kbase = PK + (b * HKV + hk).to(tl.int64) * SK + k0
    return b, h, hk, p, row_ok, rows, st, lo, hi, kbase


@triton.autotune(configs=_FWD, key=_KEY, restore_value=["O", "L"], prune_configs_by=_PRUNE)
@triton.jit
def _fwd(Q, K, V, O, L, PQ, PK, SAMP, TP, TI, PQ0, PNQ, PK0, PNK, PLW,
         sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
         B, HQ, HKV, SQ, SK, M, D, DV, BS, qk_scale, TUNE_ROWS,
         HAS_INIT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
         EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IDX64: tl.constexpr,
         UNIFORM: tl.constexpr, BLOCK_INNER: tl.constexpr, PREC: tl.constexpr):
    b, h, hk, p, row_ok, rows, st, lo, hi, kbase = _query_tile(
        PQ, PK, TP, TI, PQ0, PNQ, PK0, PNK, HQ, HKV, SQ, SK, BS, BLOCK_M, SMOOTH)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_head = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(_ptrs(q_head, rows, sqs, offs_d, IDX64), mask=_mask(row_ok, offs_d, D, EVEN_D),
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    k_head = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_head = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    # window keys
    for j0 in range(lo, hi, BLOCK_INNER):
        offs_j = j0 + tl.arange(0, BLOCK_INNER)
        j_ok = offs_j < hi
        kr = tl.load(kbase + offs_j, mask=j_ok, other=0)
        k, v = _load_kv(k_head, v_head, kr, j_ok, sks, svs, offs_d, offs_dv, D, DV, EVEN_D,
                        EVEN_DV, IDX64)
        s = _dot(q, tl.trans(k), PREC) * qk_scale
        vis = _visible(offs_j, j_ok, st, lo, BS, True, UNIFORM)
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where(vis, s, float("-inf")), v, PREC)
    # sampled columns, weight nk / M, the ones inside the row's window dropped
    logw = tl.load(PLW + p)
    sbase = SAMP + ((p * B + b) * HKV + hk).to(tl.int64) * M
    for s0 in range(0, M, BLOCK_INNER):
        offs_s = s0 + tl.arange(0, BLOCK_INNER)
        s_ok = offs_s < M
        sp = tl.load(sbase + offs_s, mask=s_ok, other=0)
        kr = tl.load(kbase + sp, mask=s_ok, other=0)
        k, v = _load_kv(k_head, v_head, kr, s_ok, sks, svs, offs_d, offs_dv, D, DV, EVEN_D,
                        EVEN_DV, IDX64)
        s = _dot(q, tl.trans(k), PREC) * qk_scale + logw
        vis = _visible(sp, s_ok, st, lo, BS, False, UNIFORM)
        m_i, l_i, acc = _online(m_i, l_i, acc, tl.where(vis, s, float("-inf")), v, PREC)

    o_ptr = _ptrs(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh, rows, sos, offs_dv, IDX64)
    o_mask = _mask(row_ok, offs_dv, DV, EVEN_DV)
    l_ptr = L + (b * HQ + h).to(tl.int64) * SQ + rows
    if HAS_INIT:  # merge with the running (O, L) of the earlier parts
        m_p = tl.load(l_ptr, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        m_new = tl.maximum(m_i, m_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_i - m_safe)
        c = tl.exp2(m_p - m_safe)
        o_prev = tl.load(o_ptr, mask=o_mask, other=0.0).to(tl.float32)
        acc = acc * a[:, None] + o_prev * c[:, None]
        l_i = l_i * a + c
        m_i = m_new
    alive = l_i != 0  # l = 0: the row saw nothing (out 0, lse -inf); a NaN l stays NaN
    l_safe = tl.where(alive, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(alive, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(l_ptr, lse, mask=row_ok)


@triton.jit
def _dq_part(q, do, lse2, delta, dq, st, lo, k_head, v_head, kr, offs_j, j_ok,
             in_win: tl.constexpr, bias, sks, svs, offs_d, offs_dv, D, DV, BS, qk_scale,
             EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IDX64: tl.constexpr,
             UNIFORM: tl.constexpr, PREC: tl.constexpr):
    k, v = _load_kv(k_head, v_head, kr, j_ok, sks, svs, offs_d, offs_dv, D, DV, EVEN_D, EVEN_DV,
                    IDX64)
    s = _dot(q, tl.trans(k), PREC) * qk_scale + bias
    vis = _visible(offs_j, j_ok, st, lo, BS, in_win, UNIFORM)
    pr = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PREC)
    ds = pr * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PREC)


@triton.autotune(configs=_FWD, key=_KEY, restore_value=["DQ"], prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dq(Q, K, V, DO, L, DELTA, DQ, PQ, PK, SAMP, TP, TI, PQ0, PNQ, PK0, PNK, PLW,
            sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sgb, sgs, sgh,
            B, HQ, HKV, SQ, SK, M, D, DV, BS, qk_scale, TUNE_ROWS,
            SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr,
            EVEN_DV: tl.constexpr, IDX64: tl.constexpr, UNIFORM: tl.constexpr,
            BLOCK_INNER: tl.constexpr, PREC: tl.constexpr):
    b, h, hk, p, row_ok, rows, st, lo, hi, kbase = _query_tile(
        PQ, PK, TP, TI, PQ0, PNQ, PK0, PNK, HQ, HKV, SQ, SK, BS, BLOCK_M, SMOOTH)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, do = _load_q_do(Q, DO, b, h, rows, row_ok, sqb, sqs, sqh, sdb, sds, sdh, offs_d, offs_dv,
                       D, DV, EVEN_D, EVEN_DV, IDX64)
    lse2, delta = _row_stats(L, DELTA, (b * HQ + h).to(tl.int64) * SQ + rows, row_ok)
    k_head = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_head = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(lo, hi, BLOCK_INNER):
        offs_j = j0 + tl.arange(0, BLOCK_INNER)
        j_ok = offs_j < hi
        kr = tl.load(kbase + offs_j, mask=j_ok, other=0)
        dq = _dq_part(q, do, lse2, delta, dq, st, lo, k_head, v_head, kr, offs_j, j_ok, True,
                      0.0, sks, svs, offs_d, offs_dv, D, DV, BS, qk_scale, EVEN_D, EVEN_DV,
                      IDX64, UNIFORM, PREC)
    logw = tl.load(PLW + p)
    sbase = SAMP + ((p * B + b) * HKV + hk).to(tl.int64) * M
    for s0 in range(0, M, BLOCK_INNER):
        offs_s = s0 + tl.arange(0, BLOCK_INNER)
        s_ok = offs_s < M
        sp = tl.load(sbase + offs_s, mask=s_ok, other=0)
        kr = tl.load(kbase + sp, mask=s_ok, other=0)
        dq = _dq_part(q, do, lse2, delta, dq, st, lo, k_head, v_head, kr, sp, s_ok, False,
                      logw, sks, svs, offs_d, offs_dv, D, DV, BS, qk_scale, EVEN_D, EVEN_DV,
                      IDX64, UNIFORM, PREC)
    # qk_scale = scale * log2(e) was used for the scores; dq needs the plain scale
    dq = dq * (qk_scale * 0.6931471805599453)
    g_ptr = _ptrs(DQ + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh, rows, sgs, offs_d, IDX64)
    g_mask = _mask(row_ok, offs_d, D, EVEN_D)
    dq = tl.load(g_ptr, mask=g_mask, other=0.0).to(tl.float32) + dq  # DQ: fp32 or input dtype
    tl.store(g_ptr, dq.to(DQ.dtype.element_ty), mask=g_mask)


@triton.jit
def _kv_part(Q, DO, L, DELTA, PQ, k, v, dk, dv, b, h, q0, nq, i_start, i_hi, offs_j, j_ok,
             in_win: tl.constexpr, bias, nk, sqb, sqs, sqh, sdb, sds, sdh, HQ, SQ, D, DV, BS,
             qk_scale, SMOOTH: tl.constexpr, BLOCK_INNER: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
             IDX64: tl.constexpr, UNIFORM: tl.constexpr, PREC: tl.constexpr):
    """Add one tile of sorted queries [i_start, i_start + BLOCK_INNER) to dk/dv of the keys at
    sorted positions offs_j (window keys, or samples when not in_win). UNIFORM: the tile's
    rows share one block (and, for window keys, it is the keys' block)."""
    offs_i = i_start + tl.arange(0, BLOCK_INNER)
    i_ok = (offs_i < i_hi) & (offs_i < nq)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = tl.load(PQ + (b * HQ + h).to(tl.int64) * SQ + q0 + offs_i, mask=i_ok, other=0)
    q, do = _load_q_do(Q, DO, b, h, rows, i_ok, sqb, sqs, sqh, sdb, sds, sdh, offs_d, offs_dv,
                       D, DV, EVEN_D, EVEN_DV, IDX64)
    lse2, delta = _row_stats(L, DELTA, (b * HQ + h).to(tl.int64) * SQ + rows, i_ok)
    vis = i_ok[:, None] & _visible(offs_j, j_ok, _start(offs_i, nk, BS, SMOOTH),
                                   (i_start // BS) * BS, BS, in_win, UNIFORM)
    s = _dot(q, tl.trans(k), PREC) * qk_scale + bias  # [I, J]
    pr = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
    dv = dv + _dot(tl.trans(pr).to(do.dtype), do, PREC)
    dp = _dot(do, tl.trans(v), PREC)
    ds = pr * (dp - delta[:, None])
    dk = dk + _dot(tl.trans(ds).to(q.dtype), q, PREC)
    return dk, dv


@triton.autotune(configs=_DKDV, key=_KEY, restore_value=["DKA", "DVA"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dkdv(Q, K, V, DO, L, DELTA, DKA, DVA, PQ, PK, TP, TI, PQ0, PNQ, PK0, PNK,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
              sgb, sgs, sgh, shb, shs, shh,
              B, HQ, HKV, SQ, SK, D, DV, BS, qk_scale, TUNE_ROWS,
              SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr,
              EVEN_DV: tl.constexpr, IDX64: tl.constexpr, UNIFORM: tl.constexpr,
              BLOCK_INNER: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    g = HQ // HKV
    p, j0, q0, nq, k0, nk = _problem(TP, TI, PQ0, PNQ, PK0, PNK, pid)
    offs_j = j0 + tl.arange(0, BLOCK_N)
    j_ok = offs_j < nk
    kr = tl.load(PK + (b * HKV + hk).to(tl.int64) * SK + k0 + offs_j, mask=j_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v = _load_kv(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh,
                    V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh, kr, j_ok, sks, svs, offs_d,
                    offs_dv, D, DV, EVEN_D, EVEN_DV, IDX64)
    # the sorted queries whose window holds a key of [j0, j1): a contiguous range
    j1 = tl.minimum(j0 + BLOCK_N, nk)
    if SMOOTH:
        i_lo = tl.where(j0 - BS < 0, 0, j0 - BS + BS // 2 + 1)
        i_hi = tl.where(j1 - 1 >= tl.maximum(nk - BS, 0), nq, tl.minimum(j1 + BS // 2, nq))
    else:
        i_lo = (j0 // BS) * BS
        i_hi = tl.minimum(((j1 - 1) // BS + 1) * BS, nq)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for gi in range(0, g):
        h = hk * g + gi
        for i_start in range(i_lo, i_hi, BLOCK_INNER):
            dk, dv = _kv_part(Q, DO, L, DELTA, PQ, k, v, dk, dv, b, h, q0, nq, i_start, i_hi,
                              offs_j, j_ok, True, 0.0, nk, sqb, sqs, sqh, sdb, sds, sdh, HQ, SQ,
                              D, DV, BS, qk_scale, SMOOTH, BLOCK_INNER, BLOCK_D, BLOCK_DV,
                              EVEN_D, EVEN_DV, IDX64, UNIFORM, PREC)
    dk = dk * (qk_scale * 0.6931471805599453)
    gk = _ptrs(DKA + b.to(tl.int64) * sgb + hk.to(tl.int64) * sgh, kr, sgs, offs_d, IDX64)
    mk = _mask(j_ok, offs_d, D, EVEN_D)
    dk = tl.load(gk, mask=mk, other=0.0).to(tl.float32) + dk  # fp32 or the input dtype
    tl.store(gk, dk.to(DKA.dtype.element_ty), mask=mk)
    gv = _ptrs(DVA + b.to(tl.int64) * shb + hk.to(tl.int64) * shh, kr, shs, offs_dv, IDX64)
    mv = _mask(j_ok, offs_dv, DV, EVEN_DV)
    dv = tl.load(gv, mask=mv, other=0.0).to(tl.float32) + dv
    tl.store(gv, dv.to(DVA.dtype.element_ty), mask=mv)


@triton.autotune(configs=_DKDV, key=[*_KEY, "CHUNK"], prune_configs_by=_PRUNE)
@triton.jit
def _bwd_samples(Q, K, V, DO, L, DELTA, DKS, DVS, PQ, PK, SAMP, TP, TI, PQ0, PNQ, PK0,
                 PNK, PLW,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
                 B, HQ, HKV, SQ, SK, M, D, DV, BS, qk_scale, TUNE_ROWS, CHUNK,
                 SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr,
                 EVEN_DV: tl.constexpr, IDX64: tl.constexpr, UNIFORM: tl.constexpr,
                 BLOCK_INNER: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    st_id = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    g = HQ // HKV
    p, c0, q0, nq, k0, nk = _problem(TP, TI, PQ0, PNQ, PK0, PNK, pid)
    offs_s = st_id * BLOCK_N + tl.arange(0, BLOCK_N)
    s_ok = offs_s < M
    sp = tl.load(SAMP + ((p * B + b) * HKV + hk).to(tl.int64) * M + offs_s, mask=s_ok, other=0)
    kr = tl.load(PK + (b * HKV + hk).to(tl.int64) * SK + k0 + sp, mask=s_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v = _load_kv(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh,
                    V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh, kr, s_ok, sks, svs, offs_d,
                    offs_dv, D, DV, EVEN_D, EVEN_DV, IDX64)
    logw = tl.load(PLW + p)
    c1 = tl.minimum(c0 + CHUNK, nq)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for gi in range(0, g):
        h = hk * g + gi
        for i_start in range(c0, c1, BLOCK_INNER):
            dk, dv = _kv_part(Q, DO, L, DELTA, PQ, k, v, dk, dv, b, h, q0, nq, i_start, c1,
                              sp, s_ok, False, logw, nk, sqb, sqs, sqh, sdb, sds, sdh, HQ, SQ,
                              D, DV, BS, qk_scale, SMOOTH, BLOCK_INNER, BLOCK_D, BLOCK_DV,
                              EVEN_D, EVEN_DV, IDX64, UNIFORM, PREC)
    dk = dk * (qk_scale * 0.6931471805599453)
    base = ((pid * B + b) * HKV + hk).to(tl.int64) * M + offs_s
    tl.store(DKS + base[:, None] * BLOCK_D + offs_d[None, :], dk, mask=s_ok[:, None])
    tl.store(DVS + base[:, None] * BLOCK_DV + offs_dv[None, :], dv, mask=s_ok[:, None])


@triton.jit
def _delta(O, DO, DLSE, DELTA, sob, sos, soh, sdb, sds, sdh, HQ, SQ, DV,
           HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
           EVEN_DV: tl.constexpr, IDX64: tl.constexpr):
    """``delta[b, h, i] = sum_d dO * O - dlse`` in fp32, reading O and dO in their own dtype."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < SQ
    offs = tl.arange(0, BLOCK_DV)
    m = _mask(ok, offs, DV, EVEN_DV)
    o = tl.load(_ptrs(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh, rows, sos, offs, IDX64),
                mask=m, other=0.0)
    do = tl.load(_ptrs(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, rows, sds, offs, IDX64),
                 mask=m, other=0.0)
    d = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    base = (b * HQ + h).to(tl.int64) * SQ + rows
    if HAS_DLSE:
        d = d - tl.load(DLSE + base, mask=ok, other=0.0)
    tl.store(DELTA + base, d, mask=ok)
