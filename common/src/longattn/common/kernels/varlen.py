"""Local attention on packed variable-length batches (THD), with optional attention sinks.

    attention_forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale=None,
                             causal=False, window_size=(-1, -1), num_sink_tokens=0,
                             backend="auto", config=None) -> (out, lse)
    attention_backward_varlen(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              softmax_scale=None, causal=False, window_size=(-1, -1),
                              num_sink_tokens=0, dlse=None, backend="auto", config=None)
        -> (dq, dk, dv)
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale=None,
                     causal=False, window_size=(-1, -1), num_sink_tokens=0,
                     return_lse=False, backend="auto", config=None)     # autograd

Tensors are packed: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` (GQA as in the dense kernels);
``cu_seqlens_q`` / ``cu_seqlens_k`` are int32 ``[num_seqs + 1]`` (flash-attn's convention, same
number of sequences). ``out`` is ``[Tq, Hq, Dv]`` in q's dtype, ``lse`` is ``[Hq, Tq]`` in
:func:`~longattn.common.dtypes.lse_dtype` (float32 for fp16 / bf16, float64 for float32 and
float64 inputs). Sequence i's queries attend only to sequence i's keys; inside a
sequence ``causal`` / ``window_size`` follow the dense kernels (bottom-right aligned when its q
and k lengths differ).

Sinks: the first ``num_sink_tokens`` keys *of each sequence* are visible to every query of that
sequence on top of the window (if ``causal``, only to queries at or after them: key j is seen by
query i iff ``j <= i + Sk - Sq``). ``num_sink_tokens`` is one int for all sequences or one int
per sequence. This is ``longattn.reference.document_mask(..., num_sink_tokens=)``.

How: the window part runs on the keys *without* the sinks (dropping a sequence's first keys
keeps the bottom-right alignment of the rest), the sink part is a small dense computation over
at most ``max(num_sink_tokens)`` keys per query, and the two are merged with
:func:`longattn.common.merge.merge_partials`. The window part is one call of the flash aten op
(``aten::_flash_attention_forward`` with ``cum_seq_q/k`` and window sizes) on CUDA for fp16 /
bf16 (``backend="auto"`` or ``"aten"``), otherwise a loop over sequences through the dense
backends (``backend`` picks which, ``config`` is passed on to them as in the dense entry
points). ``backend="cudnn"`` runs the window part as one ragged cuDNN graph
(:func:`longattn.common.kernels.cudnn_backend.varlen_forward`, graphs reused across document
layouts of one size bucket) where that serves the call (CUDA fp16 / bf16, equal head dims up
to 128, no ``dlse``, every query row sees a key); otherwise it keeps the loop over sequences
through the dense cuDNN graphs, and where cuDNN has no engine for the ragged graph the call
runs as with ``"auto"`` (warned once). ``backend="fa4"`` runs the window part as one packed
FlashAttention-4 call (:func:`longattn.common.kernels.fa4_backend.varlen_forward`, ``dlse``
included) where that serves it (CUDA fp16 / bf16 on sm90 or newer, head dims FA4 has); otherwise
the loop over sequences asks the dense ``fa4`` backend, which raises with its reason.
"""

from __future__ import annotations

import torch

from longattn.common.checks import check_bool, check_cu_seqlens, check_qkv, check_scale
from longattn.common.dtypes import acc_dtype, lse_dtype, split_lse
from longattn.common.kernels import (
    attention_backward,
    attention_forward,
    check_backward_tensors,
    fix_empty_rows,
    grad_lse_or_none,
    host_to_device,
    may_have_empty_rows,
    normalize_window,
    seq_lengths,
)
from longattn.common.merge import finish_rows, merge_partials

_HALF = (torch.float16, torch.bfloat16)
# Elements of one score block of the sink part (rows x sinks x heads x head_dim): a fixed
# memory bound of 2**24 (64 MiB in fp32), not a tuned setting.
_SINK_BLOCK_ELEMS = 1 << 24


def _check_sinks(num_sink_tokens, num_seqs):
    """One non-negative int, or one per sequence. Returns a list of ``num_seqs`` ints."""
    if isinstance(num_sink_tokens, torch.Tensor):
        num_sink_tokens = num_sink_tokens.tolist()
    if isinstance(num_sink_tokens, (list, tuple)):
        if len(num_sink_tokens) != num_seqs:
            raise ValueError(f"num_sink_tokens must have one entry per sequence ({num_seqs}), "
                             f"got {len(num_sink_tokens)}")
        vals = list(num_sink_tokens)
    else:
        vals = [num_sink_tokens] * num_seqs
    for n in vals:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_sink_tokens must be ints >= 0, got {num_sink_tokens!r}")
    return [int(n) for n in vals]


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window, num_sink_tokens):
    check_qkv(q, k, v, varlen=True)
    cu_q = check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    cu_k = check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q ({len(cu_q) - 1} sequences) and cu_seqlens_k "
                         f"({len(cu_k) - 1} sequences) must describe the same sequences")
    scale = check_scale(scale, q.shape[-1])
    win = normalize_window(causal, window)
    ns = _check_sinks(num_sink_tokens, len(cu_q) - 1)
    return cu_q, cu_k, scale, win, ns


# --------------------------------------------------------------------------------------------
# window part: flash varlen op on CUDA, a loop over sequences elsewhere


def _use_flash(q, v, backend, needs_dlse):
    d = q.shape[-1]
    return (backend in ("auto", "aten") and q.is_cuda and q.dtype in _HALF and not needs_dlse
            and d % 8 == 0 and d <= 256 and v.shape[-1] == d
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def _cudnn_varlen(q, k, v, cu_q, cu_k, win, backend, needs_dlse):
    """The cudnn backend module when its ragged graphs serve this window part, else None."""
    if backend != "cudnn" or q.shape[0] == 0 or k.shape[0] == 0:
        return None
    from longattn.common.kernels import cudnn_backend as cb

    reason = cb.varlen_supports(q, k, v, seq_lengths(cu_q), seq_lengths(cu_k), win, needs_dlse)
    return cb if reason is None else None


def _fa4_varlen(q, k, v, win, backend, needs_dlse):
    """The fa4 backend module when its packed kernels serve this window part, else None."""
    if backend != "fa4" or q.shape[0] == 0 or k.shape[0] == 0:
        return None
    from longattn.common.kernels import fa4_backend as fb

    return fb if fb.varlen_supports(q, k, v, win, needs_dlse) is None else None


def _int32(cu, device):
    """``cu`` (host ints) as an int32 tensor on ``device`` (:func:`host_to_device`: the host
    does not wait for the GPU)."""
    return host_to_device(torch.tensor(cu, dtype=torch.int32), device)


def _flash_lse_to_packed(lse, cu_q):
    """The op returns lse [H, Tq] (unpadded, and takes that back in its backward); older
    builds returned [B, H, max_q]: unpad those."""
    if lse.dim() == 2:
        return lse
    parts = [lse[i, :, : b - a] for i, (a, b) in enumerate(zip(cu_q, cu_q[1:]))]
    return torch.cat(parts, dim=1)


def _window_forward(q, k, v, cu_q, cu_k, scale, win, backend, config):
    tq, hq = q.shape[0], q.shape[1]
    ldt = lse_dtype(q.dtype)
    if tq == 0:
        return q.new_zeros(0, hq, v.shape[-1]), torch.zeros(hq, 0, dtype=ldt, device=q.device)
    cb = _cudnn_varlen(q, k, v, cu_q, cu_k, win, backend, False)
    if cb is not None:
        try:
            return cb.varlen_forward(q, k, v, cu_q, cu_k, softmax_scale=scale, window_size=win)
        except cb.GraphRefused:
            backend = "auto"
    fb = _fa4_varlen(q, k, v, win, backend, False)
    if fb is not None:
        return fb.varlen_forward(q, k, v, cu_q, cu_k, softmax_scale=scale, window_size=win)
    if _use_flash(q, v, backend, False) and k.shape[0] > 0:
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, _int32(cu_q, q.device), _int32(cu_k, q.device), max(seq_lengths(cu_q)),
            max(max(seq_lengths(cu_k)), 1), 0.0, False, False, scale=scale,
            window_size_left=win[0], window_size_right=win[1])
        out, lse = res[0], _flash_lse_to_packed(res[1], cu_q).float()
        if any(may_have_empty_rows(b - a, d - c, win)
               for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]) if b > a):
            o, l = fix_empty_rows(out[None], lse[None])  # flash reports +inf for them
            out, lse = o[0], l[0]
        return out, lse
    out = q.new_zeros(tq, hq, v.shape[-1])
    lse = torch.full((hq, tq), float("-inf"), dtype=ldt, device=q.device)
    for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        if b == a or d == c:
            continue
        o, l = attention_forward(q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale=scale,
                                 window_size=win, backend=backend, config=config)
        out[a:b] = o[0]
        lse[:, a:b] = l[0].to(ldt)
    return out, lse


def _window_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, win, dlse, backend, config):
    cb = _cudnn_varlen(q, k, v, cu_q, cu_k, win, backend, dlse is not None)
    if cb is not None:
        try:
            return cb.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, softmax_scale=scale,
                                      window_size=win)
        except cb.GraphRefused:
            backend = "auto"
    fb = _fa4_varlen(q, k, v, win, backend, dlse is not None)
    if fb is not None:
        return fb.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, softmax_scale=scale,
                                  window_size=win, dlse=dlse)
    if _use_flash(q, v, backend, dlse is not None) and q.shape[0] > 0 and k.shape[0] > 0:
        lse_in = lse.float().masked_fill(torch.isneginf(lse), float("inf"))  # p = 0 there
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(),
            lse_in.contiguous(), _int32(cu_q, q.device),
            _int32(cu_k, q.device), max(seq_lengths(cu_q)), max(seq_lengths(cu_k)), 0.0, False, rng,
            unused, scale=scale, window_size_left=win[0], window_size_right=win[1])
        return dq, dk, dv
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        if b == a or d == c:
            continue
        dl = None if dlse is None else dlse[None, :, a:b]
        g = attention_backward(dout[None, a:b], q[None, a:b], k[None, c:d], v[None, c:d],
                               out[None, a:b], lse[None, :, a:b], softmax_scale=scale,
                               window_size=win, dlse=dl, backend=backend, config=config)
        dq[a:b], dk[c:d], dv[c:d] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# sink part: at most max(ns) keys per query, plain torch on any device


def _sink_layout(cu_q, cu_k, ns_eff, causal, device):
    """Per query token: the key indices of its sequence's sinks and which of them it sees."""
    lq, lk = seq_lengths(cu_q), seq_lengths(cu_k)
    nmax = max(ns_eff)
    seq = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq, dtype=torch.int64))
    j = torch.arange(nmax)
    starts = torch.tensor(cu_k[:-1], dtype=torch.int64)
    nse = torch.tensor(ns_eff, dtype=torch.int64)
    kidx = (starts[:, None] + j[None, :]).clamp(max=max(cu_k[-1] - 1, 0))[seq]  # [Tq, nmax]
    vis = (j[None, :] < nse[:, None])[seq]
    if causal:  # aligned position of each query inside its sequence
        off = torch.tensor([b - a for a, b in zip(lq, lk)], dtype=torch.int64)
        pos = torch.arange(cu_q[-1]) - torch.tensor(cu_q[:-1], dtype=torch.int64)[seq] + off[seq]
        vis &= j[None, :] <= pos[:, None]
    return kidx.to(device), vis.to(device)


def _sink_rows(t, hkv, nmax, d):
    return max(1, min(t, _SINK_BLOCK_ELEMS // max(1, nmax * hkv * d)))


def _sinks_forward(q, k, v, kidx, vis, scale):
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g, nmax, acc, ldt = hq // hkv, kidx.shape[1], acc_dtype(q.dtype), lse_dtype(q.dtype)
    out = torch.zeros(tq, hq, dv, dtype=acc, device=q.device)
    lse = torch.full((tq, hq), float("-inf"), dtype=ldt, device=q.device)
    step = _sink_rows(tq, hkv, nmax, d)
    for t0 in range(0, tq, step):
        t1 = min(tq, t0 + step)
        qb = q[t0:t1].to(acc).reshape(t1 - t0, hkv, g, d)
        kb, vb = k[kidx[t0:t1]].to(acc), v[kidx[t0:t1]].to(acc)  # [r, nmax, Hkv, D]
        s = torch.einsum("thgd,tjhd->thgj", qb, kb) * scale
        s = s.masked_fill(~vis[t0:t1, None, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)  # NaN if a score is NaN
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        o = torch.einsum("thgj,tjhd->thgd", p, vb)
        # empty rows: 0 / -inf; NaN stays; lse = m + log(den) in lse_dtype
        o, blk = finish_rows(o, p.sum(-1), m[..., 0].to(ldt))
        out[t0:t1] = o.reshape(t1 - t0, hq, dv)
        lse[t0:t1] = blk.reshape(t1 - t0, hq)
    return out, lse.t()


def _sinks_backward(dout, q, k, v, lse, delta, kidx, vis, scale):
    """Gradients of the sink part given the final lse and ``delta = rowsum(dout*out) - dlse``
    (``[Hq, Tq]``); dk/dv come back as full-size accumulators (acc dtype)."""
    tq, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g, nmax, acc = hq // hkv, kidx.shape[1], acc_dtype(q.dtype)
    dq = torch.zeros(tq, hq, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dvv = torch.zeros(v.shape, dtype=acc, device=q.device)
    lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    lse_hi, lse_lo = split_lse(lse_safe.t(), acc)  # [Tq, Hq]; lo: float64 lse, fp32 inputs
    delta = delta.t().to(acc)
    step = _sink_rows(tq, hkv, nmax, d)
    for t0 in range(0, tq, step):
        t1 = min(tq, t0 + step)
        r = t1 - t0
        qb = q[t0:t1].to(acc).reshape(r, hkv, g, d)
        kb, vb = k[kidx[t0:t1]].to(acc), v[kidx[t0:t1]].to(acc)
        s = torch.einsum("thgd,tjhd->thgj", qb, kb) * scale
        s = s.masked_fill(~vis[t0:t1, None, None, :], float("-inf"))
        p = s - lse_hi[t0:t1].reshape(r, hkv, g, 1)
        if lse_lo is not None:
            p = p - lse_lo[t0:t1].reshape(r, hkv, g, 1)
        p = torch.exp(p)
        dob = dout[t0:t1].to(acc).reshape(r, hkv, g, dv)
        dp = torch.einsum("thgd,tjhd->thgj", dob, vb)
        ds = p * (dp - delta[t0:t1].reshape(r, hkv, g, 1))
        dq[t0:t1] = (torch.einsum("thgj,tjhd->thgd", ds, kb) * scale).reshape(r, hq, d)
        idx = kidx[t0:t1].reshape(-1)
        dk.index_add_(0, idx, (torch.einsum("thgj,thgd->tjhd", ds, qb) * scale).reshape(-1, hkv, d))
        dvv.index_add_(0, idx, torch.einsum("thgj,thgd->tjhd", p, dob).reshape(-1, hkv, dv))
    return dq, dk, dvv


def _split_sinks(cu_k, ns):
    """(effective sinks per sequence, indices of the non-sink keys, their cu_seqlens)."""
    ns_eff = [min(n, b - a) for n, a, b in zip(ns, cu_k, cu_k[1:])]
    keep, cu_w = [], [0]
    for n, a, b in zip(ns_eff, cu_k, cu_k[1:]):
        keep.append(torch.arange(a + n, b))
        cu_w.append(cu_w[-1] + (b - a - n))
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64)
    return ns_eff, keep, cu_w


# --------------------------------------------------------------------------------------------
# public functions


def attention_forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale=None,
                             causal=False, window_size=(-1, -1), num_sink_tokens=0,
                             backend="auto", config=None):
    """Packed varlen attention forward. Returns ``(out [Tq, Hq, Dv], lse [Hq, Tq])``."""
    cu_q, cu_k, scale, win, ns = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                             causal, window_size, num_sink_tokens)
    ns_eff, keep, cu_w = _split_sinks(cu_k, ns)
    if not any(ns_eff):
        return _window_forward(q, k, v, cu_q, cu_k, scale, win, backend, config)
    keep = keep.to(q.device)
    out_w, lse_w = _window_forward(q, k.index_select(0, keep), v.index_select(0, keep), cu_q,
                                   cu_w, scale, win, backend, config)
    kidx, vis = _sink_layout(cu_q, cu_k, ns_eff, bool(causal), q.device)
    out_s, lse_s = _sinks_forward(q, k, v, kidx, vis, scale)
    out, lse = merge_partials(out_w[None], lse_w[None], out_s[None], lse_s[None])
    return out[0].to(q.dtype), lse[0]


def attention_backward_varlen(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              softmax_scale=None, causal=False, window_size=(-1, -1),
                              num_sink_tokens=0, dlse=None, backend="auto", config=None):
    """Gradients given the *final* ``out`` / ``lse`` (and optionally ``dlse``, ``[Hq, Tq]``)."""
    cu_q, cu_k, scale, win, ns = _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                             causal, window_size, num_sink_tokens)
    check_backward_tensors(q, dout, out, lse, dlse)
    if dout.shape != out.shape or out.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be "
                         f"[Tq, Hq, Dv] matching q {tuple(q.shape)}")
    if tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must be [Hq, Tq] = {(q.shape[1], q.shape[0])}, "
                         f"got {tuple(lse.shape)}")
    ns_eff, keep, cu_w = _split_sinks(cu_k, ns)
    if not any(ns_eff):
        return _window_backward(dout, q, k, v, out, lse, cu_q, cu_k, scale, win, dlse, backend,
                                config)
    keep = keep.to(q.device)
    dq_w, dk_w, dv_w = _window_backward(dout, q, k.index_select(0, keep),
                                        v.index_select(0, keep), out, lse, cu_q, cu_w, scale,
                                        win, dlse, backend, config)
    acc = acc_dtype(q.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).t()  # [Hq, Tq]
    if dlse is not None:
        delta = delta - dlse.to(acc)
    kidx, vis = _sink_layout(cu_q, cu_k, ns_eff, bool(causal), q.device)
    dq, dk, dv = _sinks_backward(dout, q, k, v, lse, delta, kidx, vis, scale)
    dq += dq_w.to(acc)
    dk.index_add_(0, keep, dk_w.to(acc))
    dv.index_add_(0, keep, dv_w.to(acc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _AttentionVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale, causal, window, ns, backend, config):
        out, lse = attention_forward_varlen(q, k, v, cu_q, cu_k, softmax_scale=scale,
                                            causal=causal, window_size=window,
                                            num_sink_tokens=ns, backend=backend, config=config)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (scale, causal, window, ns, backend, config)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        scale, causal, window, ns, backend, config = ctx.args
        dq, dk, dv = attention_backward_varlen(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, softmax_scale=scale,
            causal=causal, window_size=window, num_sink_tokens=ns, dlse=grad_lse_or_none(dlse),
            backend=backend, config=config)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, softmax_scale=None,
                     causal=False, window_size=(-1, -1), num_sink_tokens=0, return_lse=False,
                     backend="auto", config=None):
    """Differentiable packed varlen attention (``cu_seqlens_k`` defaults to ``cu_seqlens_q``)."""
    check_bool("return_lse", return_lse)
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    out, lse = _AttentionVarlen.apply(q, k, v, cu_seqlens_q, cu_k, softmax_scale, causal,
                                      window_size, num_sink_tokens, backend, config)
    return (out, lse) if return_lse else out


__all__ = ["attention_backward_varlen", "attention_forward_varlen", "attention_varlen"]
