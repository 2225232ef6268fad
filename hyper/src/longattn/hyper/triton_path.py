"""HyperAttention on the Triton kernels, with its own exact backward.

The slow twin of this module is the pure-PyTorch path :mod:`longattn.hyper.torch_path`: same
contract, same function (same plan, sort order, windows, sampled columns and weights, merges);
``tests/test_hyper_triton.py`` compares the two, forward and backward with ``d(lse)``, under
``TRITON_INTERPRET=1`` on a CPU. Under the interpreter the kernels widen fp16 / bf16 dot
operands to fp32 (exactly, as the GPU's fp32-accumulating dots use them): the triton
interpreter multiplies bf16 operands as their raw 16-bit patterns.

Forward: exact causal leaves (``longattn.common.kernels`` on ``HyperConfig.leaf_backend``:
``auto`` picks cuDNN on GPUs; their backward on ``leaf_backend_bwd`` where set) fill the
running ``(O, L)``; then each recursion level sorts the rows of its calls (one stable segmented
sort on 8-bit ranks, or of ``segment * 2^r + rank`` for uneven lengths) and one :func:`_fwd`
launch merges all of the level's core calls into them in place. Every part is a softmax
partial over its own disjoint set of (weighted) keys, so the result is the merged approximation
exactly.

Precision: ``L`` (the softmax statistics, natural-log lse) is fp32 in the kernels' registers
and buffers for every input dtype; for fp32 inputs the returned lse is that fp32 ``L`` widened
to float64 (``common.dtypes.lse_dtype``): the torch path's dtype, with values that carry fp32
statistics. Each level's merge weight ``exp(L_old - L_new)`` carries the rounding of ``L``
(``ulp(|lse|)`` absolute) and each sampled column's ``log2(nk / m)`` is added to an fp32
score, errors that grow with the logit scale (the torch path merges in float64 and multiplies
the weight in, so it does not have them). The tests compare the two paths' values at the
tolerances of ``tests/test_hyper_triton.py``.

``O`` is kept in the input dtype for fp16 / bf16 inputs: the leaves' batched output *is* the
initial ``O`` (no copy) and the final output needs no cast; each level loads ``O``, merges in
fp32 registers and rounds once to the input dtype on the store, so a row gets one extra
rounding per level it takes part in (at most ``log2(S / min_seq_len)``, 6 at S = 131072 with
the defaults), on top of the rounding of its leaf output. fp32 inputs keep an fp32 ``O``
(numerics unchanged).

The backward's running dq / dk / dv are kept the same way by default
(``HyperConfig.grad_accum="input"``): the leaves' gradients are the initial ones, and each
level's kernels load, add their part in fp32 registers and round once on the store;
``grad_accum="float32"`` keeps fp32 copies and rounds once at the end.

Backward (autograd.Function): with the *final* ``O``, ``L`` and
``delta = rowsum(dO * O) - dL`` every part's gradient is that of a flash-attention step (the
ring-attention rule), so leaves use ``attention_backward`` and the levels use the Triton
backward kernels. Gradients are those of the approximation actually computed, ``d(lse)``
included.
"""

from __future__ import annotations

import math

import torch
import triton

from longattn.common.dtypes import lse_dtype
from longattn.common.kernels import attention, attention_backward, attention_forward
from longattn.hyper import triton_kernels as tk
from longattn.hyper.config import HyperConfig
from longattn.hyper.plan import Plan, uniform_leaves

_CACHE: dict = {}


def _tiles(plan: Plan, li: int, bm: int, by_keys: bool, device):
    """(problem, first sorted row) per tile of ``bm`` rows (or keys) of level ``li``'s calls,
    and the problem arrays q0, nq, k0, nk (int32 on ``device``)."""
    key = (plan, li, bm, by_keys, str(device))
    if key not in _CACHE:
        calls = [plan.calls[c] for c in plan.levels[li]]
        tp, ti = [], []
        for p, (_, nq, _, nk) in enumerate(calls):
            n = nk if by_keys else nq
            for i0 in range(0, n, bm):
                tp.append(p)
                ti.append(i0)
        cols = list(zip(*calls))
        t = [torch.tensor(x, dtype=torch.int32, device=device) for x in (tp, ti, *cols)]
        _CACHE[key] = t
    return _CACHE[key]


def _labels(plan: Plan, li: int, n: int, keys: bool, device):
    """Per query (or key) position, the index of its piece at level ``li`` (pieces: each
    call's query (key) range, and the rows in between); non-decreasing, so a stable sort by
    ``label * 2^r + rank`` sorts every call's range in place."""
    key = ("labels", plan, li, n, keys, str(device))
    if key not in _CACHE:
        starts = {0}
        for c in plan.levels[li]:
            a, m = plan.calls[c][2:] if keys else plan.calls[c][:2]
            starts |= {a, a + m}
        starts = torch.tensor(sorted(s for s in starts if s < n), dtype=torch.int64)
        lab = torch.searchsorted(starts, torch.arange(n), right=True) - 1
        _CACHE[key] = lab.to(device), len(starts)
    return _CACHE[key]


def _regular(pieces, total):
    """``(n, lo, cnt)`` if piece ``c`` is ``[c * n + lo, c * n + lo + cnt)`` and the pieces'
    periods tile ``[0, total)`` (every level of a power-of-two length), else None."""
    n = total // len(pieces)
    lo, cnt = pieces[0][0], pieces[0][1]
    if n * len(pieces) != total or any(p != (c * n + lo, cnt) for c, p in enumerate(pieces)):
        return None
    return n, lo, cnt


def _small_int(rank, r_bits):
    """Narrowest sortable dtype for ranks < 2^r (radix sort passes scale with key width)."""
    if r_bits <= 8:
        return rank.to(torch.uint8)
    return rank.to(torch.int16) if r_bits <= 15 else rank


def _offsets(n, per, lo, device):
    """``[n // per, 1]`` int32: the first row of each period's piece."""
    key = ("offs", n, per, lo, str(device))
    if key not in _CACHE:
        _CACHE[key] = (torch.arange(0, n, per, dtype=torch.int32) + lo).view(-1, 1).to(device)
    return _CACHE[key]


def _level_perm(rank, plan, li, keys, r_bits):
    """Sort permutation ``[B, H, S]`` int32 of level ``li``: at every call's query (key) range
    ``[a, a + m)``, positions ``a + i`` hold the row of its ``i``-th query (key) in stable rank
    order. Other positions are never read (left uninitialised)."""
    b, h, n = rank.shape
    pieces = [plan.calls[c][2:] if keys else plan.calls[c][:2] for c in plan.levels[li]]
    reg = _regular(pieces, n)
    if reg is not None:  # sort only the rows that take part, with narrow keys
        per, lo, cnt = reg
        x = _small_int(rank, r_bits).view(b, h, n // per, per)[..., lo:lo + cnt]
        idx = torch.sort(x, dim=-1, stable=True).indices  # int64, positions within the piece
        perm = torch.empty(b, h, n, dtype=torch.int32, device=rank.device)
        dst = perm.view(b, h, n // per, per)[..., lo:lo + cnt]
        dst.copy_(idx)  # narrowed in the copy, then offset in place (int32: 2 passes, not 3)
        dst += _offsets(n, per, lo, rank.device)
        return perm
    labels, n_labels = _labels(plan, li, n, keys, rank.device)
    if n_labels < (1 << (31 - r_bits)):  # known on the host: int32 keys, no device sync
        key = (labels.to(torch.int32) * (1 << r_bits)).view(1, 1, -1) + rank.to(torch.int32)
    else:
        key = labels.view(1, 1, -1) * (1 << r_bits) + rank.to(torch.int64)
    return torch.sort(key, dim=-1, stable=True).indices.to(torch.int32)


def _sizes(q, v):
    d, dv = q.shape[-1], v.shape[-1]
    bd = max(16, triton.next_power_of_2(d))
    bdv = max(16, triton.next_power_of_2(dv))
    return d, dv, bd, bdv


def _flags(d, dv, bd, bdv, *tensors):
    """Compile-time flags: head dims without masks, and 64-bit row offsets only if needed."""
    big = max(t.shape[1] * t.stride(1) for t in tensors) >= 2 ** 31 - 1
    return dict(EVEN_D=d == bd, EVEN_DV=dv == bdv, IDX64=big)


def _uniform(block_size, smooth, config: HyperConfig):
    """Block diagonal with blocks that are whole tiles: every tile's rows share one window,
    so the kernels mask per column only (``UNIFORM``)."""
    inner = max(c.kwargs["BLOCK_INNER"] for c in tk._FWD + tk._DKDV)
    tiles = (*_tile_sizes(block_size), _fwd_tile(block_size, config))
    return not smooth and block_size % max(*tiles, inner) == 0


def _log_weights(plan, li, m, device):
    """log2(nk / m) per call of level ``li`` (the weight of a sampled column)."""
    key = ("logw", plan, li, m, str(device))
    if key not in _CACHE:
        nk = [plan.calls[c][3] for c in plan.levels[li]]
        _CACHE[key] = torch.tensor([math.log2(n / m) if m else 0.0 for n in nk],
                                   dtype=torch.float32, device=device)
    return _CACHE[key]


def _fwd_tile(block_size, config: HyperConfig):
    """Query tile of the forward grid: ``config.fwd_tile`` where the block holds it."""
    bm = _tile_sizes(block_size)[0]
    return config.fwd_tile if not tk.INTERPRET and block_size >= config.fwd_tile else bm


def _tile_sizes(block_size):
    """(query tile of the forward / dq grids, key tile of the dk/dv grids). The dk/dv programs
    hold two fp32 accumulators of ``key tile x head_dim``: 64 keys keep them in registers
    (128-key tiles spill on 4 warps and ran slower on 8:
    ``hyper/bench/results/h100/tune_hyper/README.md``)."""
    if tk.INTERPRET:
        return 16, 16
    return (128 if block_size >= 128 else 64), 64


def _prec(q):
    """Dot precision: fp32 inputs get 3xTF32 on GPUs (fp32-accurate on tensor cores; plain
    IEEE fp32 dots compile to slow, spilling FMA loops). Interpreted, every dot is ``"ieee"``:
    the kernels then widen fp16 / bf16 operands to fp32 (:func:`triton_kernels._dot`)."""
    if tk.INTERPRET:
        return "ieee"
    return "tf32x3" if q.dtype == torch.float32 else "tf32"  # tf32: ignored for fp16 / bf16


def _tune_rows(n):
    """Autotuning bucket: small (tests, correctness checks) or large problems. The values are
    multiples of 16 and never 1, so both buckets share one compiled specialisation."""
    return 32 if n >= 32768 else 16


def _levels(q, k, rq, rk, samples, plan, r_bits):
    """Per level: (perm_q, perm_k, samples [P, B, Hkv, M] int32 or None)."""
    out = []
    for li, ids in enumerate(plan.levels):
        pq = _level_perm(rq, plan, li, False, r_bits)
        pk = _level_perm(rk, plan, li, True, r_bits)
        s = None
        if samples is not None:
            s = samples[ids[0]:ids[-1] + 1].to(torch.int32).contiguous()
        out.append((pq, pk, s))
    return out


def _leaf_views(plan, x):
    n = uniform_leaves(plan)
    if n is not None:
        b, s = x.shape[:2]
        return [x.reshape(b * (s // n), n, *x.shape[2:])]
    return [x[:, a:a + m] for a, m in plan.leaves]


def _lse_to_leaves(plan, lse):
    """[B, H, S] -> per leaf view [B', H, n] (matching :func:`_leaf_views`)."""
    n = uniform_leaves(plan)
    if n is not None:
        b, h, s = lse.shape
        return [lse.view(b, h, s // n, n).permute(0, 2, 1, 3).reshape(b * (s // n), h, n)]
    return [lse[:, :, a:a + m].contiguous() for a, m in plan.leaves]


def _lse_from_leaves(plan, parts, lse):
    n = uniform_leaves(plan)
    if n is not None:
        bl, h, _ = parts[0].shape
        b = lse.shape[0]
        lse.copy_(parts[0].view(b, bl // b, h, n).permute(0, 2, 1, 3).reshape(lse.shape))
        return
    for (a, m), x in zip(plan.leaves, parts):
        lse[:, :, a:a + m] = x


def _out_dtype(q):
    """dtype of the running output ``O``: the input dtype (fp16 / bf16: one rounding per level
    a row takes part in, merges in fp32 registers) or fp32 for fp32 inputs."""
    return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32


def _forward(q, k, v, rq, rk, samples, plan, scale, block_size, smooth, causal, r_bits, config):
    b, s, hq, _ = q.shape
    hkv = k.shape[2]
    d, dv, bd, bdv = _sizes(q, v)
    odt = _out_dtype(q)
    if causal:  # the leaves cover every row
        lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
        o, parts = None, []
        for qv, kv, vv in zip(_leaf_views(plan, q), _leaf_views(plan, k), _leaf_views(plan, v)):
            ol, ll = attention_forward(qv, kv, vv, softmax_scale=scale, causal=True,
                                       backend=config.leaf_backend)
            if uniform_leaves(plan) is not None:  # one batched call: its output is O
                o = ol.reshape(b, s, hq, dv).to(odt)
                if o.stride(-1) != 1:
                    o = o.contiguous()
            else:
                if o is None:
                    o = torch.empty(b, s, hq, dv, dtype=odt, device=q.device)
                a, m = plan.leaves[len(parts)]
                o[:, a:a + m].copy_(ol)
            parts.append(ll.float())
        _lse_from_leaves(plan, parts, lse)
    else:  # one core call over every row: the kernel writes all of O and L (no fill)
        assert plan.calls == ((0, s, 0, k.shape[1]),)
        o = torch.empty(b, s, hq, dv, dtype=odt, device=q.device)
        lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    levels = _levels(q, k, rq, rk, samples, plan, r_bits)
    bm = _fwd_tile(block_size, config)
    m = 0 if samples is None else samples.shape[-1]
    for li, (pq, pk, sl) in enumerate(levels):
        tp, ti, pq0, pnq, pk0, pnk = _tiles(plan, li, bm, False, q.device)
        grid = (tp.numel(), b * hq)
        tk._fwd[grid](
            q, k, v, o, lse, pq, pk, sl if sl is not None else pq, tp, ti, pq0, pnq, pk0, pnk,
            _log_weights(plan, li, m, q.device),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            b, hq, hkv, s, k.shape[1], m, d, dv, block_size, scale * tk.LOG2E,
            _tune_rows(tp.numel() * bm),
            HAS_INIT=causal, SMOOTH=smooth, BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd, BLOCK_DV=bdv,
            PREC=_prec(q), UNIFORM=_uniform(block_size, smooth, config),
            **_flags(d, dv, bd, bdv, q, k, v, o))
    return o, lse, levels


def _backward(do, q, k, v, out, lse, dlse, levels, plan, scale, block_size, smooth, causal,
              config):
    b, s, hq, _ = q.shape
    hkv = k.shape[2]
    d, dv, bd, bdv = _sizes(q, v)
    delta = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    rows = 16 if tk.INTERPRET else 64
    flags = _flags(d, dv, bd, bdv, q, k, v, out, do)
    tk._delta[(triton.cdiv(s, rows), b * hq)](
        out, do, dlse if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        hq, s, dv, HAS_DLSE=dlse is not None, BLOCK_M=rows, BLOCK_DV=bdv,
        EVEN_DV=flags["EVEN_DV"], IDX64=flags["IDX64"])
    gdt = _grad_dtype(q, config)
    if causal and uniform_leaves(plan) is not None:  # the leaves cover every row: start there
        dl = None if dlse is None else _lse_to_leaves(plan, dlse)[0]
        a, bb, c = attention_backward(
            _leaf_views(plan, do)[0], _leaf_views(plan, q)[0], _leaf_views(plan, k)[0],
            _leaf_views(plan, v)[0], _leaf_views(plan, out)[0], _lse_to_leaves(plan, lse)[0],
            softmax_scale=scale, causal=True, dlse=dl, backend=config.leaf_backward)
        dq, dk, dvv = (_running(x, t, gdt) for x, t in ((a, q), (bb, k), (c, v)))
    else:
        dq, dk, dvv = (torch.zeros(t.shape, dtype=gdt, device=q.device) for t in (q, k, v))
    if causal and uniform_leaves(plan) is None:
        dls = _lse_to_leaves(plan, dlse) if dlse is not None else [None] * len(plan.leaves)
        for qv, kv, vv, ov, dov, lv, dl, gq, gk, gv in zip(
                _leaf_views(plan, q), _leaf_views(plan, k), _leaf_views(plan, v),
                _leaf_views(plan, out), _leaf_views(plan, do), _lse_to_leaves(plan, lse), dls,
                _leaf_views(plan, dq), _leaf_views(plan, dk), _leaf_views(plan, dvv)):
            a, bb, c = attention_backward(dov, qv, kv, vv, ov, lv, softmax_scale=scale,
                                          causal=True, dlse=dl, backend=config.leaf_backward)
            gq += a
            gk += bb
            gv += c
    bm, bn = _tile_sizes(block_size)
    m = 0 if not levels or levels[0][2] is None else levels[0][2].shape[-1]
    common = dict(SMOOTH=smooth, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv,
                  PREC=_prec(q), UNIFORM=_uniform(block_size, smooth, config),
                  **_flags(d, dv, bd, bdv, q, k, v, out, do, dq, dk, dvv))
    qk_scale = scale * tk.LOG2E
    for li, (pq, pk, sl) in enumerate(levels):
        samp = sl if sl is not None else pq
        plw = _log_weights(plan, li, m, q.device)
        tp, ti, pq0, pnq, pk0, pnk = _tiles(plan, li, bm, False, q.device)
        tk._bwd_dq[(tp.numel(), b * hq)](
            q, k, v, do, lse, delta, dq, pq, pk, samp, tp, ti, pq0, pnq, pk0, pnk, plw,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            b, hq, hkv, s, k.shape[1], m, d, dv, block_size, qk_scale,
            _tune_rows(tp.numel() * bm), **common)
        kp, kj, *_ = _tiles(plan, li, bn, True, q.device)
        tk._bwd_dkdv[(kp.numel(), b * hkv)](
            q, k, v, do, lse, delta, dk, dvv, pq, pk, kp, kj, pq0, pnq, pk0, pnk,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dvv.stride(0), dvv.stride(1),
            dvv.stride(2), b, hq, hkv, s, k.shape[1], d, dv, block_size, qk_scale,
            _tune_rows(kp.numel() * bn), **common)
        if sl is None:
            continue
        chunk = config.samples_chunk // 32 if tk.INTERPRET else config.samples_chunk
        cp, ci, *_ = _tiles(plan, li, chunk, False, q.device)
        nch, npb = cp.numel(), len(plan.levels[li])
        dks = torch.empty(nch, b, hkv, m, bd, dtype=torch.float32, device=q.device)
        dvs = torch.empty(nch, b, hkv, m, bdv, dtype=torch.float32, device=q.device)
        tk._bwd_samples[(nch, triton.cdiv(m, bn), b * hkv)](
            q, k, v, do, lse, delta, dks, dvs, pq, pk, sl, cp, ci, pq0, pnq, pk0, pnk, plw,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            b, hq, hkv, s, k.shape[1], m, d, dv, block_size, qk_scale,
            _tune_rows(nch * chunk), chunk, **common)
        # sum the chunks of each problem, then scatter-add onto the sampled keys' rows
        per = _chunks_per_problem(plan, li, chunk)
        dks = _chunk_sums(dks, cp, npb, per)[..., :d]
        dvs = _chunk_sums(dvs, cp, npb, per)[..., :dv]
        pos = pk0.long().view(-1, 1, 1, 1) + sl.long()  # [P, B, Hkv, M]
        idx = _sampled_rows(pk, pos)
        dk.view(-1, d).index_add_(0, idx, dks.reshape(-1, d).to(gdt))
        dvv.view(-1, dv).index_add_(0, idx, dvs.reshape(-1, dv).to(gdt))
    return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)


def _sampled_rows(pk, pos):
    """Flat row indices into a contiguous ``[B, Sk, Hkv, D]`` gradient viewed as ``[B * Sk *
    Hkv, D]`` of the sampled keys at sorted positions ``pos [P, B, Hkv, M]`` (``pk [B, Hkv,
    Sk]``: the level's key permutation): one ``take`` and one ``index_add_`` per gradient
    (atomics, duplicates add up), where advanced-index ``index_put_`` sorted its indices and
    checked them in a dozen small kernels per level."""
    b, hkv, sk = pk.shape
    bi = torch.arange(b, device=pk.device).view(1, b, 1, 1)
    hi = torch.arange(hkv, device=pk.device).view(1, 1, hkv, 1)
    rows = torch.take(pk, (bi * hkv + hi) * sk + pos).long()
    return ((bi * sk + rows) * hkv + hi).view(-1)


def _grad_dtype(q, config: HyperConfig):
    """dtype of the backward's running dq / dk / dv (``HyperConfig.grad_accum``)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return q.dtype if half and config.grad_accum == "input" else torch.float32


def _running(x, like, dtype):
    """A leaf gradient ``x`` as the running gradient: ``like``'s shape, ``dtype``, contiguous
    (the sampled keys' gradients are added on a flat view; no copy when ``x`` already is
    one)."""
    return x.to(dtype).reshape(like.shape).contiguous()


def _chunk_sums(parts, cp, npb, per):
    """``[npb, ...]``: the sum of the chunk partials ``parts [nch, ...]`` of each of the
    ``npb`` problems (``cp``: the problem of each chunk, problem-major as :func:`_tiles` lays
    them out; ``per``: the chunks of every problem where all have as many, else None). Equal
    counts: a reshape and one ``sum``, without atomics (the profile of the causal backward,
    ``common/bench/results/h100/profile_after/log.txt``, had 2.39 ms of float32
    ``index_add_`` here; after the change the causal fwd+bwd took 57.07 ms on an H100,
    ``hyper/bench/results/h100/chunk_sums/log.txt``); else ``index_add_``."""
    if per and parts.shape[0] == npb * per:
        return parts.view(npb, per, *parts.shape[1:]).sum(1)
    return torch.zeros((npb, *parts.shape[1:]), dtype=parts.dtype,
                       device=parts.device).index_add_(0, cp.long(), parts)


def _chunks_per_problem(plan: Plan, li: int, chunk: int):
    """The number of ``chunk``-row chunks of each problem of level ``li`` when they are all
    equal, else None (from the plan, on the host)."""
    counts = {-(-plan.calls[c][1] // chunk) for c in plan.levels[li]}
    return counts.pop() if len(counts) == 1 else None


class _HyperFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rq, rk, samples, plan, scale, block_size, smooth, causal, r_bits,
                config):
        ctx.set_materialize_grads(False)  # an unused lse gives dlse=None: no zeros, no sync
        o, lse, levels = _forward(q, k, v, rq, rk, samples, plan, scale, block_size, smooth,
                                  causal, r_bits, config)
        out = o.to(q.dtype)  # no copy for fp16 / bf16 (O is kept in the input dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.levels = levels
        ctx.args = (plan, scale, block_size, smooth, causal, config)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, dlse, ctx.levels,
                               *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def hyper_triton(q, k, v, rq, rk, samples, plan, *, softmax_scale, block_size, smooth, causal,
                 r_bits=16, config=None):
    """Same contract as :func:`longattn.hyper.torch_path.hyper_torch` (out in fp32, or in the
    input dtype for fp16 / bf16; lse in ``lse_dtype``: float64 for fp32 inputs, holding the
    kernels' fp32 statistics). ``config``: a :class:`HyperConfig` (None: the defaults)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton path takes fp16 / bf16 / fp32, got {q.dtype}; use "
                         f"backend='torch' for float64")
    ld = lse_dtype(q.dtype)
    config = HyperConfig() if config is None else config
    if plan.exact:
        out, lse = attention(q, k, v, softmax_scale=softmax_scale, causal=False,
                             return_lse=True, backend=config.leaf_backend)
        return out, lse.to(ld)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = _HyperFn.apply(q, k, v, rq, rk, samples, plan, softmax_scale, block_size, smooth,
                              causal, r_bits, config)
    return out, lse.to(ld)  # fp32 statistics, widened to the lse dtype (no copy for fp16/bf16)
