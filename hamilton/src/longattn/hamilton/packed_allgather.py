"""``schedule="allgather"`` for packed documents (``cu_seqlens``): K/V all-gathered, ONE varlen
call per rank forward and one backward, dK/dV returned to their owners.

The layout is the step schedules' (:func:`longattn.hamilton.packing.packed_layout`), so
``shard`` / ``unshard`` are unchanged. Each rank's K / V rows (``[L, Hkv*(D+Dv)]``, K and V in
one row, B = 1) go to every other rank in one exchange (one message per peer) and land in a
buffer of ``n * L`` rows in *origin order* (row ``p * L + i`` is rank ``p``'s local row ``i``).
The rank's :class:`~longattn.hamilton.packing.AllgatherPlan` then gathers, for each of its
query segments (maximal runs of one document, consecutive in the packed sequence), the keys of
its document from the document's start to the segment's end (causal: bottom-right aligned per
segment, the segment being the last of its keys) or the whole document (full) into one packed
key buffer (``kidx``), and one varlen call
(:func:`longattn.common.kernels.varlen.attention_forward_varlen`) computes every row's final
``out`` / ``lse``: nothing is merged. Backward: one varlen backward call on the same buffer
(with the final ``out`` / ``lse``, and ``dlse`` when a gradient flows into the returned lse),
the dK/dV of the packed key buffer index-added per distinct gathered row its keys come from
(``acc_dtype``; a key several segments see is one row), whose rows of rank ``p``
(``plan.send_rows[p]``) go back to ``p`` (one message per peer that has any); each rank adds
what every rank returns into its rows (``plan.recv_rows``, known from the other ranks' plans)
in rank order (in ``acc_dtype``, so float64 stays exact). Rows no query of a rank sees have no
gradient from it and are not sent.

Communication: the whole K/V shard to every peer, ``(n - 1) * L`` rows received per rank,
whatever the documents; in the backward the dK/dV rows (``acc_dtype``) of the keys some query
of the sender sees, at most ``(n - 1) * L`` (``plan.grad_rows_sent`` / ``grad_rows_received``);
the messages are not overlapped with the compute. The packed step loop (:mod:`longattn.hamilton.
packed_attn`) sends only rows some query of the receiver sees and overlaps each step's
messages with the previous step's call, at the price of one varlen call per step.

**Memory** kept for the backward, per rank: q, k, v, out and lse (as every schedule), and
``min(keys, n * L)`` K/V rows of ``Hkv * (D + Dv)`` elements (input dtype): the packed key
buffer of the plan's ``keys`` rows when that is smaller, else the gathered ``n * L`` rows, from
which the backward gathers the packed key buffer again. ``keys`` is below ``n * L`` for
documents shorter than the ranks' shares and may exceed it when several segments of one rank
share a long document's keys. Transient: the gathered ``n * L`` rows and the packed key
buffer in the forward; in the backward the packed key buffer (if not kept), its dK/dV
(``keys`` rows), its sum per distinct row, the received rows and the rank's own ``L`` rows,
all in ``acc_dtype``.
"""

from __future__ import annotations

import torch

from longattn.common.comm import exchange
from longattn.common.dist import Group
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import grad_lse_or_none
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
from longattn.hamilton.collectives import _gather
from longattn.hamilton.packed_attn import _gather as _gather_keys
from longattn.hamilton.packed_attn import kv_rows, split_rows


def packed_allgather_attention(q, k, v, plan, g: Group, softmax_scale, backend):
    """``(out [1, L, Hq, Dv], lse [1, Hq, L])`` of this rank (differentiable in q, k, v);
    ``plan``: this rank's :class:`~longattn.hamilton.packing.AllgatherPlan`."""
    return _PackedAllgather.apply(q, k, v, plan, g, softmax_scale, backend)


def _pieces(n, length):
    """Origin order: rank ``p``'s ``length`` rows at rows ``p * length`` of the buffer."""
    return tuple(((0, length, p * length),) for p in range(n))


def gather_kv(kv, g: Group):
    """Every rank's K/V rows ``[L, W]`` -> ``[n * L, W]`` in origin order (one exchange; the
    rows themselves when ``n == 1``)."""
    if g.size == 1:
        return kv
    return _gather(kv, g, _pieces(g.size, kv.shape[0]))


def keys_of(buf, plan, hkv, d, device):
    """The plan's packed key buffer: contiguous K ``[keys, Hkv, D]``, V ``[keys, Hkv, Dv]``
    gathered from the origin-order rows ``buf``."""
    kk, vv = split_rows(buf, hkv, d)
    return _gather_keys(kk, vv, plan.tensors(device)[2])


def call_forward(q0, kg, vg, plan, *, softmax_scale, backend):
    """The plan's one forward call: ``(out [L, Hq, Dv], lse [Hq, L])``."""
    cq, ck, _ = plan.tensors(q0.device)
    return attention_forward_varlen(q0, kg, vg, cq, ck, softmax_scale=softmax_scale,
                                     causal=plan.causal, backend=backend)


def call_backward(dout0, dlse0, q0, kg, vg, out0, lse0, plan, *, softmax_scale, backend):
    """The plan's one backward call: ``(dq [L, Hq, D], dk, dv)`` (dk / dv of the packed key
    buffer)."""
    cq, ck, _ = plan.tensors(q0.device)
    return attention_backward_varlen(dout0, q0, kg, vg, out0, lse0, cq, ck,
                                     softmax_scale=softmax_scale, causal=plan.causal,
                                     dlse=dlse0, backend=backend)


def scatter_key_grads(dk_g, dv_g, plan, width, hkv, d):
    """The packed key buffer's dK / dV summed per distinct gathered row, in ``acc_dtype``:
    ``[rows, W]``, the rows of ``plan.send_rows`` owner after owner (every gathered row, in
    origin order, when the keys are the gathered buffer itself)."""
    acc = acc_dtype(dk_g.dtype)
    inv, off, _ = plan.grad_tensors(dk_g.device)
    dbuf = torch.zeros(off[-1], width, dtype=acc, device=dk_g.device)
    gk, gv = split_rows(dbuf, hkv, d)
    if inv is None:
        gk += dk_g
        gv += dv_g
    else:
        gk.index_add_(0, inv, dk_g.to(acc))
        gv.index_add_(0, inv, dv_g.to(acc))
    return dbuf


def add_received(own, parts, plan):
    """``own [L, W]`` plus every sender's rows ``parts[q]`` (``[len(plan.recv_rows[q]), W]``)
    at the local rows they belong to, senders in rank order (each row once per sender, so the
    sum is in rank order and deterministic)."""
    recv = plan.grad_tensors(own.device)[2]
    for q, part in enumerate(parts):
        if part.shape[0]:
            own.index_add_(0, recv[q], part)
    return own


def reduce_kv_grads(dbuf, plan, g: Group):
    """This rank's ``[L, W]`` rows: the gradient of every rank's keys that come from them,
    summed in rank order (in ``dbuf``'s dtype). Each rank sends each owner only the rows its
    keys come from (``plan.send_rows``) and receives only those of its own rows the sender's
    keys come from (``plan.recv_rows``); one exchange."""
    n, me = g.size, g.rank
    _, off, _ = plan.grad_tensors(dbuf.device)
    parts = [dbuf[off[q]:off[q + 1]] if q == me else
             dbuf.new_empty(len(plan.recv_rows[q]), dbuf.shape[1]) for q in range(n)]
    if n > 1:
        sends = [(dbuf[off[p]:off[p + 1]], p) for p in range(n)
                 if p != me and off[p + 1] > off[p]]
        recvs = [(parts[q], q) for q in range(n) if q != me and parts[q].shape[0]]
        exchange(sends, recvs, g).wait()
    own = torch.zeros(plan.rows, dbuf.shape[1], dtype=dbuf.dtype, device=dbuf.device)
    return add_received(own, parts, plan)


def _forward(q, k, v, plan, g, softmax_scale, backend):
    q0, k0, v0 = q[0], k[0], v[0]
    hkv, d = k.shape[2], k.shape[3]
    buf = gather_kv(kv_rows(k0, v0), g)
    kg, vg = keys_of(buf, plan, hkv, d, q.device)
    out, lse = call_forward(q0, kg, vg, plan, softmax_scale=softmax_scale, backend=backend)
    return out[None], lse.to(lse_dtype(q.dtype))[None], buf, (kg, vg)


def _backward(dout, dlse, q, out, lse, kg, vg, plan, g, softmax_scale, backend, width):
    hkv, d = kg.shape[1], kg.shape[2]
    dq, dk_g, dv_g = call_backward(dout[0], None if dlse is None else dlse[0], q[0], kg, vg,
                                   out[0], lse[0], plan, softmax_scale=softmax_scale,
                                   backend=backend)
    if g.size == 1 and plan.kidx is None:  # the keys are the local rows, in order
        return dq[None], dk_g[None], dv_g[None]
    own = reduce_kv_grads(scatter_key_grads(dk_g, dv_g, plan, width, hkv, d), plan, g)
    dk, dv = split_rows(own, hkv, d)
    return dq[None], dk[None], dv[None]


class _PackedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, g, softmax_scale, backend):
        out, lse, buf, (kg, vg) = _forward(q, k, v, plan, g, softmax_scale, backend)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:3]):
            # the smaller of the packed key buffer and the gathered rows (module docstring)
            keep_keys = plan.keys <= buf.shape[0]
            ctx.save_for_backward(q, out, lse, *((kg, vg) if keep_keys else (buf,)))
            ctx.keep_keys = keep_keys
        ctx.args = (plan, g, softmax_scale, backend, k.shape[2], k.shape[3], v.shape[3],
                    k.dtype, v.dtype)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        plan, g, softmax_scale, backend, hkv, d, dv_, kdt, vdt = ctx.args
        q, out, lse, *kept = ctx.saved_tensors
        kg, vg = kept if ctx.keep_keys else keys_of(kept[0], plan, hkv, d, q.device)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(dout.contiguous(), grad_lse_or_none(dlse), q, out, lse, kg, vg,
                               plan, g, softmax_scale, backend, hkv * (d + dv_))
        return (dq.to(q.dtype), dk.to(kdt), dv.to(vdt), None, None, None, None)
