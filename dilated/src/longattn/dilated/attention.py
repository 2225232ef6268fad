"""Exact LongNet dilated attention (arXiv 2307.02486, section 2; distributed: section 3.1).

    dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False,
                      softmax_scale=None, group=None, return_lse=False, backend="auto",
                      config=None)

Every branch ``(w, r)`` runs on every head (head ``h`` uses offset ``h mod r``); each
sparsified segment is a dense attention problem, and equal-shaped problems are gathered into
one batched call of the lse-returning local kernel (:mod:`longattn.common.kernels`). The
branches are mixed by their softmax denominators in one multi-way LSE merge, which is
attention over the multiset union of the keys the branches select. So the backward runs each
call's kernel backward with the *final* out / lse (the ring-attention rule): exact, including
the gradient through the mixing weights.

Distributed (``group`` with more than one rank): each rank passes its contiguous chunk of the
sequence. Segments inside the chunk run locally; a segment that spans ranks reads the
*sparsified* K/V rows it needs from the other ranks of that segment (causal: earlier ranks
only), in one batched exchange per call; the backward returns their gradients the same way
(the reduce-scatter of section 3.1). See ``plan.py`` for the index bookkeeping.
"""

from __future__ import annotations

import torch

from longattn.common import comm
from longattn.common import dist as ldist
from longattn.common.checks import check_bool, check_qkv, check_scale
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import attention_backward, attention_forward, pick_backend
from longattn.common.merge import finish_rows
from longattn.dilated.config import check_config
from longattn.dilated.plan import make_plan


def check_schedule(segment_lengths, dilation_rates):
    """Validate a (segments, rates) schedule; returns two tuples of ints."""
    for name, vals in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(vals, (str, bytes)) or not hasattr(vals, "__len__"):
            raise TypeError(f"{name} must be a sequence of positive ints, got {vals!r}")
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must hold positive ints, got {list(vals)!r}")
    if len(segment_lengths) == 0 or len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths {list(segment_lengths)} and dilation_rates "
            f"{list(dilation_rates)} must be non-empty and of equal length"
        )
    return tuple(int(x) for x in segment_lengths), tuple(int(x) for x in dilation_rates)


def check_call(q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend, config,
           causal_name="causal"):
    """This rank's checks of a :func:`dilated_attention` call: ``((segments, rates, scale,
    config), fields every rank must share)`` (see :func:`longattn.common.dist.agree`).
    ``causal_name``: the caller's name of ``causal`` (the module's is ``is_causal``)."""
    seg, rates = check_schedule(segment_lengths, dilation_rates)
    check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"dilated attention runs over one sequence: q length {q.shape[1]} != k/v length "
            f"{k.shape[1]}"
        )
    if q.shape[1] == 0 or q.shape[0] == 0:
        raise ValueError(f"q must have a non-empty batch and sequence, got {tuple(q.shape)}")
    check_bool(causal_name, causal)
    scale = check_scale(softmax_scale, q.shape[-1], "softmax_scale")
    config = check_config(config)
    # the local kernel for these inputs: an explicit backend that cannot serve them raises here
    name = pick_backend(q, k, v, causal=causal, backend=backend)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    fields = {"q.shape": tuple(q.shape), "k.shape": tuple(k.shape), "v.shape": tuple(v.shape),
              "dtype": q.dtype, "device type": q.device.type, causal_name: causal,
              "softmax_scale": scale, "segment_lengths": seg, "dilation_rates": rates,
              "backend": name, "needs grad": needs_grad}
    return (seg, rates, scale, config), fields


# --------------------------------------------------------------------------------------------
# plan tensors on a device


def _device_plan(plan, device):
    """Torch index tensors of the plan on ``device`` (cached on the plan object)."""
    cache = plan.__dict__.setdefault("_dev", {})
    key = str(device)
    if key not in cache:
        calls = []
        for c in plan.calls:
            if c.strided is not None:
                calls.append((c, None, None))
            else:
                qr = torch.as_tensor(c.qrows.reshape(-1), device=device)
                kr = torch.as_tensor(c.krows.reshape(-1), device=device)
                calls.append((c, qr, kr))
        sends = {d: torch.as_tensor(r, device=device) for d, r in plan.send_rows.items()}
        cache[key] = (calls, sends)
    return cache[key]


# --------------------------------------------------------------------------------------------
# the pieces of one call


def _sview(t, call):
    """Strided call: the view ``[B, nseg, n, heads, *rest]`` of its rows in ``t [B, L, H,
    *rest]`` (dims after the batch contiguous; any batch stride). No copy."""
    s0, nseg, length, r, o = call.strided
    nheads = t.shape[2]
    rest = tuple(t.shape[3:])
    inner = 1
    for x in rest:
        inner *= x
    rest_strides = tuple(t.stride()[3:])
    size = (t.shape[0], nseg, len(range(o, length, r)), len(range(o, nheads, r))) + rest
    stride = (t.stride(0), length * nheads * inner, r * nheads * inner, r * inner) + rest_strides
    return t.as_strided(size, stride, t.storage_offset() + ((s0 + o) * nheads + o) * inner)


def _kernel_in(t, call):
    """Strided call: its rows of ``t [B, L, H, D]`` as a kernel operand ``[B*nseg, n, h, D]``
    (a view when the batch merges with the segments, else a copy)."""
    v = _sview(t, call)
    return v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])


def _operands(call, qr, kr, q, k, v, kpool, vpool):
    """(q, k, v) of one call in BSHD for the kernel."""
    if call.strided is not None:
        return _kernel_in(q, call), _kernel_in(k, call), _kernel_in(v, call)
    b = q.shape[0]
    nseg, nq, nk, c, p = call.shape
    return (q.view(b, -1, q.shape[-1])[:, qr].view(b * nseg, nq, c, q.shape[-1]),
            kpool[:, kr].view(b * nseg, nk, p, kpool.shape[-1]),
            vpool[:, kr].view(b * nseg, nk, p, vpool.shape[-1]))


def _rows(call, b, t):
    """Kernel-layout per-row tensor ``[B*nseg, C, n]`` -> the call's rows: ``[B, nseg, n, C]``
    (strided) or ``[B, N]`` in the order of the flat query rows (gathered)."""
    nseg, nq, _, c, _ = call.shape
    t = t.view(b, nseg, c, nq).transpose(2, 3)
    return t if call.strided is not None else t.reshape(b, nseg * nq * c)


def _kernel_rows(call, b, t):
    """Inverse of :func:`_rows`: the call's rows of ``t`` -> ``[B*nseg, C, n]`` contiguous."""
    nseg, nq, _, c, _ = call.shape
    return t.reshape(b, nseg, nq, c).transpose(2, 3).reshape(b * nseg, c, nq)


def _take(call, qr, t3):
    """The call's rows of a per-row tensor ``[B, l, H]``: a strided view or a gather."""
    if call.strided is not None:
        return _sview(t3, call)
    return t3.reshape(t3.shape[0], -1)[:, qr]


def merge_calls(results, calls, b, l, h, dv, acc, first_covers=False, stats=None, device=None):
    """One multi-way LSE merge of every call's ``(out, lse)`` (the paper's Eq. 10 over all
    branches at once): the math of :func:`longattn.common.merge.merge_stacked`, accumulated
    call by call into the rows each call writes (no stack of full-size partials): the row max
    ``m``, ``den = sum_c exp(lse_c - m)``, ``num = sum_c exp(lse_c - m) out_c``, then
    :func:`~longattn.common.merge.finish_rows` (rows no call wrote: ``out = 0``, ``lse = -inf``;
    a NaN stays NaN). ``out`` accumulates in ``acc``; the statistics (``m``, ``den``, the calls'
    ``lse``) in ``stats`` (None: ``acc``; callers pass
    :func:`~longattn.common.dtypes.lse_dtype` of the inputs: float64 for float32 inputs, so
    merging at large logits keeps float32 accuracy). Returns ``out [B, l, H, Dv]`` (``acc``, or
    ``stats`` where that is wider) and ``lse [B, l, H]`` in ``stats``.

    The eager twin of the fused Triton merge :func:`longattn.dilated.fused.merge_strided`.
    ``first_covers``: ``calls[0]`` writes every row (see
    :class:`~longattn.dilated.plan.Plan`), so ``num`` needs no zero fill. ``device``: where
    the result lives (default: the first call's; a rank of a distributed call may keep no row
    and have no call)."""
    dev = device if device is not None else results[0][0].device
    stats = acc if stats is None else stats
    m = torch.full((b, l, h), float("-inf"), dtype=stats, device=dev)
    lses = []
    for (call, qr, _), (_, lse) in zip(calls, results):
        lc = _rows(call, b, lse.to(stats))
        lses.append(lc)
        if call.strided is not None:
            mv = _sview(m, call)
            torch.maximum(mv, lc, out=mv)
        else:
            m.view(b, -1).scatter_reduce_(1, qr.expand(b, -1), lc, reduce="amax")
    m0 = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # rows of no call: weights 0
    den = torch.zeros_like(m)
    num = (torch.empty if first_covers else torch.zeros)(b, l, h, dv, dtype=acc, device=dev)
    for i, ((call, qr, _), (o, _), lc) in enumerate(zip(calls, results, lses)):
        w = torch.exp(lc - _take(call, qr, m0))
        wa = w.to(acc)  # the out accumulator's weights (no copy unless stats is wider)
        if call.strided is not None:
            _sview(den, call).add_(w)
            nv = _sview(num, call)
            if i == 0 and first_covers:
                torch.mul(o.unflatten(0, nv.shape[:2]), wa.unsqueeze(-1), out=nv)
            else:
                nv.addcmul_(o.unflatten(0, nv.shape[:2]), wa.unsqueeze(-1))  # no float32 copy
        else:
            den.view(b, -1).index_add_(1, qr, w)
            num.view(b, -1, dv).index_add_(1, qr, o.reshape(b, -1, dv).to(acc) * wa.unsqueeze(-1))
    return finish_rows(num, den, m)


# --------------------------------------------------------------------------------------------
# sparsified K/V exchange


def _exchange_kv(kf, vf, plan, sends, group):
    """Send the sparsified K/V rows others need; return the received rows ``[B, M - l*Hkv,
    D + Dv]`` (K and V side by side, in ``plan.recv`` order), or None if nothing moves."""
    if not plan.recv and not sends:
        return None
    b, d = kf.shape[0], kf.shape[-1]
    out = [(torch.cat([kf[:, rows], vf[:, rows]], -1).contiguous(), dst)
           for dst, rows in sends.items()]
    bufs = [(kf.new_empty(b, cnt, d + vf.shape[-1]), src) for src, cnt in plan.recv]
    comm.exchange(out, bufs, group).wait()
    return torch.cat([t for t, _ in bufs], 1) if bufs else None


def _pools(kf, vf, recv):
    """Key / value pools: local rows, then the received ones."""
    if recv is None:
        return kf, vf
    d = kf.shape[-1]
    return torch.cat([kf, recv[..., :d]], 1), torch.cat([vf, recv[..., d:]], 1)


def _return_grads(dkpool, dvpool, n_local, plan, sends, group, dtype):
    """Backward of :func:`_exchange_kv`: send the gradients of received rows back to their
    owners, add the ones that come back for the rows this rank sent. Returns the gradients of
    the local rows ``[B, l*Hkv, D]`` / ``[B, l*Hkv, Dv]``."""
    if not plan.recv and not sends:
        return dkpool, dvpool  # the pool is exactly the local rows
    dkf, dvf = dkpool[:, :n_local], dvpool[:, :n_local]
    d = dkf.shape[-1]
    out, off = [], n_local
    for src, cnt in plan.recv:
        out.append((torch.cat([dkpool[:, off:off + cnt], dvpool[:, off:off + cnt]], -1)
                    .to(dtype).contiguous(), src))
        off += cnt
    b = dkf.shape[0]
    bufs = [(torch.empty(b, rows.numel(), d + dvf.shape[-1], dtype=dtype, device=dkf.device),
             dst) for dst, rows in sends.items()]
    comm.exchange(out, bufs, group).wait()
    for (t, _), rows in zip(bufs, sends.values()):
        dkf.index_add_(1, rows, t[..., :d].to(dkf.dtype))
        dvf.index_add_(1, rows, t[..., d:].to(dvf.dtype))
    return dkf, dvf


# --------------------------------------------------------------------------------------------
# fused path


def _fused_module():
    """:mod:`longattn.dilated.fused`, or None when triton is not importable."""
    try:
        from longattn.dilated import fused
    except ImportError:
        return None
    return fused


def _use_fused(q, plan, config):
    """Whether this call merges / sums with the fused kernels (``config.fused``, see
    :class:`~longattn.dilated.config.FusedConfig`): only when every call is strided and nothing
    is exchanged (then the full tensors are the calls' strided results and the kernels compute
    their layout from ``Call.strided``)."""
    if config.fused == "off" or plan.recv or plan.send_rows or not plan.calls:
        return False
    if any(c.strided is None for c in plan.calls):
        return False
    # fp16 / bf16 only: the kernels' statistics are float32, which at large logits would cost
    # float32 inputs their accuracy (their lse is float64, lse_dtype): those merge eagerly
    ok = q.dtype in (torch.float16, torch.bfloat16) and (config.fused == "on" or q.is_cuda)
    return ok and _fused_module() is not None


def _fused_backward(ctx, q, k, v, out, lse, dout, dlse):
    """Backward of the fused path: every call's kernel backward reads strided views (no
    copies); one :func:`~longattn.dilated.fused.sum_strided` launch per gradient writes it
    in the input dtype (no float32 full-size accumulators)."""
    plan, scale, _, backend, config = ctx.args
    b, l, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    calls = [c for c, _, _ in _device_plan(plan, q.device)[0]]
    grads = ([], [], [])
    for call in calls:
        qg, kg, vg = _kernel_in(q, call), _kernel_in(k, call), _kernel_in(v, call)
        lg = _kernel_rows(call, b, _take(call, None, lse))
        dlg = None if dlse is None else _kernel_rows(call, b, _take(call, None, dlse))
        res = attention_backward(_kernel_in(dout, call), qg, kg, vg, _kernel_in(out, call), lg,
                                 softmax_scale=scale, causal=call.causal, dlse=dlg,
                                 backend=backend)
        for acc, g in zip(grads, res):
            acc.append(g)
    fused = _fused_module()
    return (fused.sum_strided(grads[0], calls, b, l, hq, d, q.dtype, 0, config=config),
            fused.sum_strided(grads[1], calls, b, l, hkv, d, k.dtype, 1, config=config),
            fused.sum_strided(grads[2], calls, b, l, hkv, dv, v.dtype, 1, config=config))


# --------------------------------------------------------------------------------------------
# autograd


class _DilatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, group, backend, config):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, l, hq, _ = q.shape
        dv = v.shape[-1]
        acc = acc_dtype(q.dtype)
        calls, sends = _device_plan(plan, q.device)
        kf, vf = k.view(b, -1, k.shape[-1]), v.view(b, -1, dv)
        recv = _exchange_kv(kf, vf, plan, sends, group)
        kpool, vpool = _pools(kf, vf, recv)
        results = []
        for call, qr, kr in calls:
            qg, kg, vg = _operands(call, qr, kr, q, k, v, kpool, vpool)
            results.append(attention_forward(qg, kg, vg, softmax_scale=scale,
                                             causal=call.causal, backend=backend))
        ctx.fused = _use_fused(q, plan, config)
        if ctx.fused:  # one launch, written in q.dtype
            out, lse = _fused_module().merge_strided(results, [c for c, _, _ in calls], b, l,
                                                     hq, dv, q.dtype, config=config)
        else:
            out, lse = merge_calls(results, calls, b, l, hq, dv, acc, plan.first_covers,
                                   stats=lse_dtype(q.dtype), device=q.device)
            out = out.to(q.dtype)
        del results
        # an unused lse (the usual case) comes back as None, not a zero tensor to fill and test
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, recv)
        ctx.args = (plan, scale, group, backend, config)
        return out, lse.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, recv = ctx.saved_tensors
        plan, scale, group, backend, _ = ctx.args
        b, l, hq, d = q.shape
        hkv, dv = k.shape[2], v.shape[-1]
        acc = acc_dtype(q.dtype)
        calls, sends = _device_plan(plan, q.device)
        kf, vf = k.view(b, -1, d), v.view(b, -1, dv)
        kpool, vpool = _pools(kf, vf, recv)  # the received rows were kept from the forward
        dout = torch.zeros_like(out) if dout is None else dout.contiguous().to(q.dtype)
        if dlse is not None and not torch.any(dlse):  # a sync, only when lse had a gradient
            dlse = None
        dlse = (None if dlse is None  # [B, l, H], in the lse's dtype
                else dlse.transpose(1, 2).to(lse_dtype(q.dtype)).contiguous())
        if ctx.fused:
            return _fused_backward(ctx, q, k, v, out, lse, dout, dlse) + (None,) * 5
        # calls[0] writes every local row when plan.first_covers: no zero fill needed there
        alloc = torch.empty if plan.first_covers else torch.zeros
        dq = alloc(b, l, hq, d, dtype=acc, device=q.device)
        dkpool = alloc(b, kpool.shape[1], d, dtype=acc, device=q.device)
        dvpool = alloc(b, kpool.shape[1], dv, dtype=acc, device=q.device)
        if plan.first_covers:
            dkpool[:, l * hkv:].zero_()  # received rows
            dvpool[:, l * hkv:].zero_()
        dk4 = dkpool[:, :l * hkv].view(b, l, hkv, d)
        dv4 = dvpool[:, :l * hkv].view(b, l, hkv, dv)
        for i, (call, qr, kr) in enumerate(calls):
            qg, kg, vg = _operands(call, qr, kr, q, k, v, kpool, vpool)
            nseg, nq, _, c, _ = call.shape
            if call.strided is not None:
                og, dog = _kernel_in(out, call), _kernel_in(dout, call)
            else:
                og = out.view(b, -1, dv)[:, qr].view(b * nseg, nq, c, dv)
                dog = dout.view(b, -1, dv)[:, qr].view(b * nseg, nq, c, dv)
            lg = _kernel_rows(call, b, _take(call, qr, lse))
            dlg = None if dlse is None else _kernel_rows(call, b, _take(call, qr, dlse))
            dqg, dkg, dvg = attention_backward(dog, qg, kg, vg, og, lg, softmax_scale=scale,
                                               causal=call.causal, dlse=dlg, backend=backend)
            if call.strided is not None:  # accumulate in place, no float32 copies
                for tgt, g in ((dq, dqg), (dk4, dkg), (dv4, dvg)):
                    tv = _sview(tgt, call)
                    g = g.unflatten(0, tv.shape[:2])  # any kernel output strides
                    tv.copy_(g) if i == 0 and plan.first_covers else tv.add_(g)
            else:
                dq.view(b, -1, d).index_add_(1, qr, dqg.reshape(b, -1, d).to(acc))
                dkpool.index_add_(1, kr, dkg.reshape(b, -1, d).to(acc))
                dvpool.index_add_(1, kr, dvg.reshape(b, -1, dv).to(acc))
        dkf, dvf = _return_grads(dkpool, dvpool, l * hkv, plan, sends, group, q.dtype)
        return (dq.to(q.dtype), dkf.view(b, l, hkv, d).to(k.dtype),
                dvf.view(b, l, hkv, dv).to(v.dtype), None, None, None, None, None)


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False,
                      softmax_scale=None, group=None, return_lse=False, backend="auto",
                      config=None):
    """LongNet dilated attention, forward and exact backward.

    q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]`` (``Hq % Hkv == 0``), any
    ``S``. ``segment_lengths`` / ``dilation_rates``: the branches ``(w_i, r_i)``. Branch ``i``
    cuts the sequence into segments ``[j*w_i, min((j+1)*w_i, S))``; query head ``h`` keeps
    the rows at offset ``h mod r_i`` (stride ``r_i``) of each segment and attends densely
    inside that sparsified segment (``causal``: causally, in sequence order). Branches are
    mixed by their softmax denominators. Rows no branch keeps give ``out = 0``.

    ``softmax_scale``: default ``D ** -0.5``. ``backend``: the local kernel of
    :mod:`longattn.common.kernels` (``"auto"`` or a name). ``config``: a
    :class:`~longattn.dilated.config.FusedConfig` (how the calls are merged and their gradients
    summed; None: the defaults).

    ``group`` (see :mod:`longattn.common.dist`): a ``ProcessGroup`` or a 1-D ``DeviceMesh`` of
    ``n`` ranks shards the sequence: ``q/k/v`` are this rank's contiguous chunk (``S/n`` tokens,
    the same on every rank) of the global sequence, and the result is this rank's chunk of the
    output. :data:`longattn.common.dist.LOCAL` runs on this process alone; ``None`` does too
    without ``torch.distributed`` or in a world of one rank, and raises in a world of more.
    Every check runs on every rank before any K/V moves, and a bad or mismatched argument on
    any rank raises on all of them (:func:`longattn.common.dist.agree`).

    Returns ``out [B, S, Hq, Dv]`` (and ``lse [B, Hq, S]`` if ``return_lse``, in
    :func:`~longattn.common.dtypes.lse_dtype`: float32 for fp16 / bf16 inputs, float64 for
    float32 / float64 inputs).
    """
    return _dilated(q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, group,
                    return_lse, backend, config)


def _dilated(q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, group, return_lse,
             backend, config, op="dilated_attention", causal_name="causal"):
    """:func:`dilated_attention`; ``op`` and ``causal_name`` name the caller and its ``causal``
    in the errors (the module's ``is_causal``)."""
    g = ldist.resolve_group(group)

    def check():
        check_bool("return_lse", return_lse)
        return check_call(q, k, v, segment_lengths, dilation_rates, causal, softmax_scale,
                          backend, config, causal_name)

    (seg, rates, scale, config), _ = ldist.agree(op, g, check)
    b, l, hq, _ = q.shape
    plan = make_plan(l * g.size, l, g.rank, g.size, hq, k.shape[2], seg, rates, causal)
    out, lse = _DilatedAttention.apply(q, k, v, plan, scale, g.pg if g.distributed else None,
                                       backend, config)
    return (out, lse) if return_lse else out


class DilatedAttention(torch.nn.Module):
    """Module form of :func:`dilated_attention` (the argument names of
    dilated-attention-pytorch).

    ``forward(q, k, v, is_causal=False)`` with BSHD tensors; ``is_causal`` is the seed's name of
    ``causal``. ``attention_dropout`` must be 0: dropout of attention probabilities has no exact
    equivalent on the lse kernels used here (LongNet trains with dropout 0). ``group``: as in
    :func:`dilated_attention` (``None`` raises in a multi-rank world: a module under DDP passes
    ``group=longattn.common.dist.LOCAL``). ``config``: a
    :class:`~longattn.dilated.config.FusedConfig`.
    """

    def __init__(self, segment_lengths, dilation_rates, softmax_scale=None,
                 attention_dropout=0.0, group=None, *, config=None):
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_schedule(segment_lengths,
                                                                   dilation_rates)
        if softmax_scale is not None:
            check_scale(softmax_scale, 1, "softmax_scale")
        if attention_dropout != 0.0:
            raise ValueError(
                f"attention_dropout must be 0.0 (exact kernels have no attention dropout), "
                f"got {attention_dropout!r}"
            )
        self.softmax_scale = softmax_scale
        self.attention_dropout = 0.0
        self.group = group
        self.config = check_config(config)

    def forward(self, q, k, v, is_causal=False):
        return _dilated(q, k, v, self.segment_lengths, self.dilation_rates, is_causal,
                        self.softmax_scale, self.group, False, "auto", self.config,
                        op="DilatedAttention", causal_name="is_causal")

    def extra_repr(self):
        return (f"segment_lengths={list(self.segment_lengths)}, "
                f"dilation_rates={list(self.dilation_rates)}")
