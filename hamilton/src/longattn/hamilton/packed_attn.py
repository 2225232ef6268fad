"""The step loop of :func:`~longattn.hamilton.hamilton_attn` for packed documents
(``cu_seqlens``): the messages and kernel calls of a :class:`~longattn.hamilton.packing.
PackedPlan`, forward and backward.

Each rank's K / V live in one row buffer ``[L, Hkv*(D+Dv)]`` (B = 1: a row range is one
contiguous message with K and V together). At step ``s`` every origin sends the rows of its
slot that the step's holder can see (gathered into one message per slot), the holder gathers
each segment's keys from what arrived and makes one varlen call
(:func:`longattn.common.kernels.varlen.attention_forward_varlen`: the flash varlen op on CUDA
for fp16 / bf16, a loop over segments through the dense backends elsewhere), merged into the
accumulators (``out`` in ``acc_dtype``, ``lse`` in ``lse_dtype``). The next step's messages
are posted before this step computes. Backward: the steps in reverse, the KV rows of step
``s - 1`` fetched again while step ``s`` computes (the forward keeps the last step's rows),
and each step's dK / dV rows (``acc_dtype``) sent back to their origin, which adds them in.
"""

from __future__ import annotations

import functools

import torch

from longattn.common.comm import exchange
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import grad_lse_or_none
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
from longattn.common.merge import merge_partials_


def packed_attention(q, k, v, plan, group, softmax_scale, backend, config):
    """``(out [1, L, Hq, Dv], lse [1, Hq, L])`` of this rank (differentiable in q, k, v)."""
    return _PackedAttn.apply(q, k, v, plan, group, softmax_scale, backend, config)


# ---------------------------------------------------------------------------------------------
# buffers and messages


def kv_rows(k0, v0):
    """K ``[L, Hkv, D]`` and V ``[L, Hkv, Dv]`` as one row buffer ``[L, Hkv*(D+Dv)]``."""
    return torch.cat([k0.reshape(k0.shape[0], -1), v0.reshape(v0.shape[0], -1)], dim=1)


def split_rows(buf, hkv, d):
    """K ``[rows, Hkv, D]`` and V ``[rows, Hkv, Dv]`` views of a row buffer."""
    return (buf[:, :hkv * d].unflatten(-1, (hkv, d)),
            buf[:, hkv * d:].unflatten(-1, (hkv, -1)))


def post_kv(plan, s, kv, group):
    """Post the messages of step ``s`` (this rank's visible rows out, the step's rows in);
    returns ``(handle, buffer)``."""
    st = plan.steps[s]
    buf = kv.new_empty(st.rows, kv.shape[1])
    sends = [(kv.index_select(0, plan.send_index(s, i, kv.device)), h)
             for i, (h, _) in enumerate(st.sends)]
    recvs = [(buf[off:off + rows], o) for o, rows, off in st.recvs]
    return _keeping(exchange(sends, recvs, group), sends), buf


def _keeping(handle, sends):
    """The handle, holding the gathered send tensors until it is waited on (they exist only
    for the message)."""
    handle.sends = sends
    return handle


def _post_grads(plan, s, dkv, width, group):
    """Send step ``s``'s dK/dV rows back to their origins, receive those of this rank's rows;
    returns ``(handle, [(received, local row index)])``."""
    st = plan.steps[s]
    sends = [(dkv[off:off + rows], o) for o, rows, off in st.recvs]
    got = [(dkv.new_empty(len(idx), width), plan.send_index(s, i, dkv.device))
           for i, (_, idx) in enumerate(st.sends)]
    recvs = [(t, h) for (t, _), (h, _) in zip(got, st.sends)]
    return _keeping(exchange(sends, recvs, group), sends), got


def _add_rows(dk, dv, rows, idx, hkv, d):
    """Add dK/dV rows (a row buffer) into ``dk`` / ``dv`` at local rows ``idx`` (None: all)."""
    gk, gv = split_rows(rows, hkv, d)
    if idx is None:
        dk += gk
        dv += gv
    else:
        dk.index_add_(0, idx, gk)
        dv.index_add_(0, idx, gv)


# ---------------------------------------------------------------------------------------------
# one step's compute (shared with bench/bench_packed.py)


def _gather(kk, vv, kidx):
    if kidx is None:
        return kk.contiguous(), vv.contiguous()
    return kk.index_select(0, kidx), vv.index_select(0, kidx)


def step_forward(q0, kk, vv, call, tensors, *, softmax_scale, backend):
    """One step's varlen call: ``(out [r1-r0, Hq, Dv], lse [Hq, r1-r0])`` of query rows
    ``[call.r0, call.r1)`` against the keys ``kk`` / ``vv`` (``[rows, Hkv, D]``) gathered by
    ``call``; ``tensors`` = ``plan.call_tensors(s, device)``."""
    cq, ck, ki = tensors
    kg, vg = _gather(kk, vv, ki)
    return attention_forward_varlen(q0[call.r0:call.r1], kg, vg, cq, ck,
                                    softmax_scale=softmax_scale, causal=call.causal,
                                    backend=backend)


def step_backward(dout0, dlse0, q0, out0, lse0, kk, vv, call, tensors, dq, dk, dv, *,
                  softmax_scale, backend):
    """One step's gradients: adds into ``dq`` (rows ``[r0, r1)``) and into the row gradients
    ``dk`` / ``dv`` (``[rows, Hkv, D]``, the layout of ``kk`` / ``vv``)."""
    cq, ck, ki = tensors
    kg, vg = _gather(kk, vv, ki)
    r = slice(call.r0, call.r1)
    dq_s, dk_s, dv_s = attention_backward_varlen(
        dout0[r], q0[r], kg, vg, out0[r], lse0[:, r], cq, ck, softmax_scale=softmax_scale,
        causal=call.causal, dlse=None if dlse0 is None else dlse0[:, r], backend=backend)
    dq[r] += dq_s
    if ki is None:
        dk += dk_s
        dv += dv_s
    else:
        dk.index_add_(0, ki, dk_s.to(dk.dtype))
        dv.index_add_(0, ki, dv_s.to(dv.dtype))


# ---------------------------------------------------------------------------------------------
# forward and backward loops


def _forward(q, k, v, plan, group, softmax_scale, backend, config):
    q0, k0, v0 = q[0], k[0], v[0]
    hkv, d = k.shape[2], k.shape[3]
    merge = functools.partial(merge_partials_, backend=config.merge_backend)
    kv = kv_rows(k0, v0) if plan.n > 1 else None
    h, nxt = post_kv(plan, 1, kv, group) if plan.n > 1 else (None, None)
    o, l = step_forward(q0, k0, v0, plan.steps[0].call, plan.call_tensors(0, q.device),
                        softmax_scale=softmax_scale, backend=backend)  # every row: it sees itself
    acc_out, acc_lse = o.to(acc_dtype(q.dtype))[None], l.to(lse_dtype(q.dtype))[None]
    cur = None
    for s in range(1, plan.n):
        h.wait()
        cur = nxt
        if s + 1 < plan.n:
            h, nxt = post_kv(plan, s + 1, kv, group)
        call = plan.steps[s].call
        if call is not None:
            kk, vv = split_rows(cur, hkv, d)
            o, l = step_forward(q0, kk, vv, call, plan.call_tensors(s, q.device),
                                softmax_scale=softmax_scale, backend=backend)
            merge(acc_out[:, call.r0:call.r1], acc_lse[:, :, call.r0:call.r1], o[None], l[None])
    return acc_out.to(q.dtype), acc_lse, cur


def _backward(dout, dlse, q, k, v, out, lse, kv_last, plan, group, softmax_scale, backend):
    q0, k0, v0, dout0, out0, lse0 = q[0], k[0], v[0], dout[0], out[0], lse[0]
    dlse0 = None if dlse is None else dlse[0]
    hkv, d = k.shape[2], k.shape[3]
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q0.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k0.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v0.shape, dtype=acc, device=q.device)
    kv = kv_rows(k0, v0) if plan.n > 2 else None
    width = hkv * (d + v.shape[3])
    cur, h_g, got = kv_last, None, []
    for s in range(plan.n - 1, 0, -1):
        h_kv = post_kv(plan, s - 1, kv, group) if s > 1 else None
        call = plan.steps[s].call
        dkv = torch.zeros(plan.steps[s].rows, width, dtype=acc, device=q.device)
        if call is not None:
            kk, vv = split_rows(cur, hkv, d)
            gk, gv = split_rows(dkv, hkv, d)
            step_backward(dout0, dlse0, q0, out0, lse0, kk, vv, call,
                          plan.call_tensors(s, q.device), dq, gk, gv,
                          softmax_scale=softmax_scale, backend=backend)
        if h_g is not None:
            h_g.wait()
            for rows, idx in got:
                _add_rows(dk, dv, rows, idx, hkv, d)
        h_g, got = _post_grads(plan, s, dkv, width, group)
        if h_kv is not None:
            h_kv[0].wait()
            cur = h_kv[1]
    step_backward(dout0, dlse0, q0, out0, lse0, k0, v0, plan.steps[0].call,
                  plan.call_tensors(0, q.device), dq, dk, dv, softmax_scale=softmax_scale,
                  backend=backend)
    if h_g is not None:
        h_g.wait()
        for rows, idx in got:
            _add_rows(dk, dv, rows, idx, hkv, d)
    return dq.to(q.dtype)[None], dk.to(k.dtype)[None], dv.to(v.dtype)[None]


class _PackedAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, softmax_scale, backend, config):
        out, lse, kv_last = _forward(q, k, v, plan, group, softmax_scale, backend, config)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse, kv_last)
        ctx.args = (plan, group, softmax_scale, backend)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_last = ctx.saved_tensors
        plan, group, softmax_scale, backend = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(dout.contiguous(), grad_lse_or_none(dlse), q, k, v, out, lse,
                               kv_last, plan, group, softmax_scale, backend)
        return dq, dk, dv, None, None, None, None, None
