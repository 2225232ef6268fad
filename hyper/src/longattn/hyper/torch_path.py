"""Pure-PyTorch HyperAttention (any device, any float dtype, float64 included): the slow twin
of the Triton path (:mod:`longattn.hyper.triton_path`), which computes the same function;
``tests/test_hyper_triton.py`` compares the two under ``TRITON_INTERPRET=1``.

Written with ordinary differentiable torch ops, so autograd gives the exact gradients of the
approximation actually computed -- through the ``n / m`` weights, the log-sum-exp merges and
``lse`` (``d(lse)`` included). Sort orders and sample positions are integer and carry no
gradient. Memory is O(rows * (window + samples)) per core call: meant for CPUs and tests; the
Triton path is the fast one.
"""

from __future__ import annotations

import torch

from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import attention
from longattn.common.merge import finish_rows, merge_partials
from longattn.hyper.lsh import sort_rows


def window_start(i: torch.Tensor, nk: int, block_size: int, smooth: bool) -> torch.Tensor:
    """First sorted key of sorted query ``i``'s window of ``block_size`` keys.

    Block diagonal: ``(i // bs) * bs``. Smooth: a band centred on the row, shifted inwards at
    the ends, ``clip(i - bs // 2, 0, max(nk - bs, 0))``. The window is ``[start, start + bs)``
    cut at ``nk`` (a short tail block has fewer keys; nothing is padded).
    """
    if smooth:
        return (i - block_size // 2).clamp(min=0, max=max(nk - block_size, 0))
    return torch.div(i, block_size, rounding_mode="floor") * block_size


def _gather_rows(x, perm):
    """x [B, S, H, D], perm [B, H, S'] -> [B, H, S', D] (x's rows in perm order)."""
    xt = x.transpose(1, 2)
    return xt.gather(2, perm.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


MERGES = ("lse", "equal")


def core(qc, kc, vc, rq, rk, samples, *, softmax_scale, block_size, smooth,
         double_count=False, merge="lse"):
    """One core call: sorted block-diagonal (or banded) attention plus sampled columns.

    ``double_count`` and ``merge`` are ablations for ``bench/quality_vs_seed.py``, not part of
    the public function (the Triton path and the oracle implement the defaults only):
    ``double_count=True`` keeps samples that fall in the row's window (the seed's fp32 torch
    path and its CUDA path do), which biases the estimate; ``merge="equal"`` averages the
    window's and the samples' normalised outputs with weight 1/2 each instead of one softmax
    over both (a biased shrinkage, see the README's Quality section).

    ``qc [B, nq, Hq, D]``, ``kc [B, nk, Hkv, D]``, ``vc [B, nk, Hkv, Dv]``; ranks ``rq [B, Hq,
    nq]``, ``rk [B, Hkv, nk]``; ``samples [B, Hkv, m]`` sorted key positions or None.
    Returns ``out [B, nq, Hq, Dv]`` in the accumulation dtype and ``lse [B, Hq, nq]`` in
    :func:`longattn.common.dtypes.lse_dtype` (float64 for float32 inputs: the shift and the
    log of the row sum are added in float64, so a large logit keeps its float32 accuracy).
    """
    acc = acc_dtype(qc.dtype)
    b, nq, hq, d = qc.shape
    nk, hkv, dv = kc.shape[1], kc.shape[2], vc.shape[3]
    g = hq // hkv
    dev = qc.device
    pq, pk = sort_rows(rq), sort_rows(rk)
    qs = _gather_rows(qc.to(acc), pq).view(b, hkv, g, nq, d)
    ks, vs = _gather_rows(kc.to(acc), pk), _gather_rows(vc.to(acc), pk)  # [B, Hkv, nk, D]

    # window part: query tiles of block_size rows; each tile's keys start at its first row's
    # window and span at most 2 * block_size - 1 keys (smooth) or block_size (blocks)
    bs = block_size
    nt = -(-nq // bs)
    width = min(2 * bs if smooth else bs, nk)
    i = torch.arange(nt * bs, device=dev)
    start = window_start(i, nk, bs, smooth)  # [nt * bs]
    kidx = start[::bs, None] + torch.arange(width, device=dev)  # [nt, width]
    st = start.view(nt, bs, 1)
    vis = (kidx[:, None, :] >= st) & (kidx[:, None, :] < st + bs) & (kidx[:, None, :] < nk)
    vis &= (i < nq).view(nt, bs, 1)
    kc_ = kidx.clamp(max=nk - 1).reshape(-1)
    kw = ks[:, :, kc_].view(b, hkv, nt, width, d)
    vw = vs[:, :, kc_].view(b, hkv, nt, width, dv)
    qp = torch.nn.functional.pad(qs, (0, 0, 0, nt * bs - nq)).view(b, hkv, g, nt, bs, d)
    sw = torch.einsum("bhgtrd,bhtwd->bhgtrw", qp, kw) * softmax_scale
    sw = torch.where(vis, sw, float("-inf")).reshape(b, hkv, g, nt * bs, width)[..., :nq, :]

    ss = None
    if samples is not None and samples.shape[-1] > 0:
        m = samples.shape[-1]
        sidx = samples.to(device=dev, dtype=torch.int64)
        k_s = ks.gather(2, sidx.unsqueeze(-1).expand(-1, -1, -1, d))  # [B, Hkv, m, D]
        v_s = vs.gather(2, sidx.unsqueeze(-1).expand(-1, -1, -1, dv))
        # the weight nk / m multiplies exp(score) below: added to the score as log(nk / m) it
        # would be rounded at ulp(score), ~1e-3 at logits near 1e4 in float32
        ss = torch.einsum("bhgid,bhmd->bhgim", qs, k_s) * softmax_scale
        st_q = start[:nq].view(1, 1, nq, 1)
        inwin = (sidx[:, :, None, :] >= st_q) & (sidx[:, :, None, :] < st_q + bs)
        if not double_count:
            ss = torch.where(inwin.unsqueeze(2), float("-inf"), ss)

    # one softmax over window keys and (weighted) samples; the max (of the unweighted scores:
    # any shift is exact, and this one cannot overflow) is a constant shift
    mx = sw.amax(-1)
    if ss is not None:
        mx = torch.maximum(mx, ss.amax(-1))
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx).detach().unsqueeze(-1)
    pw = torch.exp(sw - mx)
    den = pw.sum(-1, keepdim=True)
    pwt = torch.nn.functional.pad(pw, (0, 0, 0, nt * bs - nq)).view(b, hkv, g, nt, bs, width)
    o = torch.einsum("bhgtrw,bhtwd->bhgtrd", pwt, vw).reshape(b, hkv, g, nt * bs, dv)[..., :nq, :]
    if ss is not None:
        ps = torch.exp(ss - mx) * (nk / m)
        o_s = torch.einsum("bhgim,bhmd->bhgid", ps, v_s)
        if merge == "equal":
            o, den = _equal_mix(o, den, o_s, ps.sum(-1, keepdim=True))
        else:
            den = den + ps.sum(-1, keepdim=True)
            o = o + o_s
    # rows that see nothing: out 0, lse -inf; a NaN score makes the row NaN
    ld = lse_dtype(qc.dtype)
    o, lse = finish_rows(o, den[..., 0].to(ld), mx[..., 0].to(ld))
    o = o.to(acc)

    # back to the original row order
    inv = torch.argsort(pq, dim=-1)
    o = o.reshape(b, hq, nq, dv).gather(2, inv.unsqueeze(-1).expand(-1, -1, -1, dv))
    lse = lse.reshape(b, hq, nq).gather(2, inv)
    return o.transpose(1, 2), lse


def _equal_mix(o_w, den_w, o_s, den_s):
    """Ablation ``merge="equal"``: out = (window out + sample out) / 2 as unnormalised
    ``(o, den)`` with ``den = 2 * den_w`` (so lse is the window's plus log 2); a side that is
    empty leaves the other alone."""
    ow = o_w / torch.where(den_w > 0, den_w, 1.0)
    os_ = o_s / torch.where(den_s > 0, den_s, 1.0)
    both = (den_w > 0) & (den_s > 0)
    out = torch.where(both, 0.5 * (ow + os_), torch.where(den_w > 0, ow, os_))
    den = torch.where(both, 2 * den_w, den_w + den_s)
    return out * den, den


def hyper_torch(q, k, v, rq, rk, samples, plan, *, softmax_scale, block_size, smooth, causal,
                double_count=False, merge="lse", leaf_backend="auto"):
    """Assemble the plan: exact leaves, core calls, merges. Returns ``(out, lse)``, out in the
    accumulation dtype, lse (and every partial lse merged on the way) in
    :func:`longattn.common.dtypes.lse_dtype`. ``rq``/``rk`` are the ranks of all rows;
    ``samples [n_calls, B, Hkv, m]`` or None. ``double_count`` / ``merge``: the ablations of
    :func:`core` (defaults: the algorithm). ``leaf_backend``: the local-kernel backend of the
    exact leaves (and of the whole call where the plan is exact), ``HyperConfig.leaf_backend``."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if plan.exact:
        out, lse = attention(q, k, v, softmax_scale=softmax_scale, causal=False,
                             return_lse=True, backend=leaf_backend)
        return out.to(acc_dtype(q.dtype)), lse.to(lse_dtype(q.dtype))

    def call(c):
        q0, nq, k0, nk = plan.calls[c]
        s = None if samples is None else samples[c]
        return core(q[:, q0:q0 + nq], k[:, k0:k0 + nk], v[:, k0:k0 + nk], rq[..., q0:q0 + nq],
                    rk[..., k0:k0 + nk], s, softmax_scale=softmax_scale, block_size=block_size,
                    smooth=smooth, double_count=double_count, merge=merge)

    if not causal:
        return call(0)
    ids = {c: i for i, c in enumerate(plan.calls)}
    leaf = {a: n for a, n in plan.leaves}

    def rec(a, n):
        if leaf.get(a) == n:
            o, lse = attention(q[:, a:a + n], k[:, a:a + n], v[:, a:a + n],
                               softmax_scale=softmax_scale, causal=True, return_lse=True,
                               backend=leaf_backend)
            return o.to(acc_dtype(q.dtype)), lse.to(lse_dtype(q.dtype))
        n1 = n - n // 2
        o1, l1 = rec(a, n1)
        o2, l2 = rec(a + n1, n // 2)
        oc, lc = call(ids[(a + n1, n // 2, a, n1)])
        o2, l2 = merge_partials(o2, l2, oc, lc)  # lse stays in lse_dtype
        return torch.cat([o1, o2], 1), torch.cat([l1, l2], 2)

    return rec(0, q.shape[1])
