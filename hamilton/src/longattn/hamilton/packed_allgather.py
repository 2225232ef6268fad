"""``schedule="allgather"`` for packed documents (``cu_seqlens``): the K/V rows each rank's
keys come from gathered, ONE varlen call per rank forward and one backward, their dK/dV
returned to their owners.

The layout is the step schedules' (:func:`longattn.hamilton.packing.packed_layout`), so
``shard`` / ``unshard`` are unchanged. The rank's :class:`~longattn.hamilton.packing.
AllgatherPlan` gathers, for each of its query segments (maximal runs of one document,
consecutive in the packed sequence), the keys of its document from the document's start to
the segment's end (causal: bottom-right aligned per segment, the segment being the last of its
keys) or the whole document (full) into one packed key buffer (``kidx``, rows of the
origin-order sequence: row ``p * L + i`` is rank ``p``'s local row ``i``), and one varlen call
(:func:`longattn.common.kernels.varlen.attention_forward_varlen`) computes every row's final
``out`` / ``lse``: nothing is merged.

**Forward exchange** (:func:`gather_seen`): each rank's K / V rows (``[L, Hkv*(D+Dv)]``, K and
V in one row, B = 1) that rank ``q``'s keys come from (``plan.rows_to[q]``) go to ``q`` in one
exchange (one message per peer that has any); the rank's buffer holds the rows its keys come
from, owner after owner (``plan.rows_from``), and the packed key buffer is gathered from it.
Every plan is a pure function of ``cu_seqlens``, so every rank knows what every other needs
without a message; a key no query of a rank sees never reaches it.

**Backward** (:func:`backward_calls`): not causal, one varlen backward call on the same packed
key buffer; causal, two calls with the final ``out`` / ``lse`` (and ``dlse`` when a gradient
flows into the returned lse): each segment against its own rows (the local K/V: square, a
top-left band) and, unmasked, against its document's keys before it (``plan.cu_past``), the
same (query, key) pairs as the forward's call, whose bottom-right band cuDNN's backward runs
about half as fast. The keys' dK/dV are summed per row of the rank's buffer (``acc_dtype``,
:func:`~longattn.common.kernels.rows.add_rows_`; a key several segments see is one row), whose
rows of owner ``p`` go back to ``p``; each rank adds what every rank returns into its rows
(``plan.rows_to``) in rank order, onto its own rows' gradients from the first causal call (in
``acc_dtype``, so float64 stays exact).

Communication: forward ``plan.rows_received`` K/V rows arrive (at most ``(n - 1) * L``, the
dense all-gather, when every rank sees every key; far fewer for documents shorter than a
rank's share) and ``plan.rows_sent`` leave; backward as many dK/dV rows (``acc_dtype``) the
other way. The messages are not overlapped with the compute. The packed step loop
(:mod:`longattn.hamilton.packed_attn`) sends only rows some query of the receiver sees as well
and overlaps each step's messages with the previous step's call, at the price of one varlen
call per step.

**Memory** kept for the backward, per rank: q, out and lse, k and v when causal (as every
schedule), and the smaller of the packed key buffer (``keys`` rows) and the rank's buffer (its
distinct rows, ``plan.rows_received`` plus its own), ``Hkv * (D + Dv)`` elements a row (input
dtype); the backward gathers the packed key buffer again from the latter. ``keys`` exceeds the
distinct rows when several segments of one rank share a long document's keys. Transient: the
rank's buffer and the packed key buffer in the forward; in the backward the packed key buffer
(if not kept), its dK/dV (``keys`` rows), their sum per distinct row, the received rows and the
rank's own ``L`` rows, in ``acc_dtype``.
"""

from __future__ import annotations

import torch

from longattn.common.comm import exchange
from longattn.common.dist import Group
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import grad_lse_or_none
from longattn.common.kernels.rows import add_rows_
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
from longattn.hamilton.packed_attn import _gather as _gather_keys
from longattn.hamilton.packed_attn import kv_rows, split_rows


def packed_allgather_attention(q, k, v, plan, g: Group, softmax_scale, backend):
    """``(out [1, L, Hq, Dv], lse [1, Hq, L])`` of this rank (differentiable in q, k, v);
    ``plan``: this rank's :class:`~longattn.hamilton.packing.AllgatherPlan`."""
    return _PackedAllgather.apply(q, k, v, plan, g, softmax_scale, backend)


def gather_seen(kv, plan, g: Group):
    """The rank's buffer ``[rows, W]``: the K/V rows its keys come from, owner after owner
    (``plan.rows_from``), from every rank's rows ``kv [L, W]``; each rank sends each peer the
    rows that peer's keys come from (``plan.rows_to``). One exchange (none when ``n == 1``)."""
    n, me = g.size, g.rank
    _, off, to = plan.route_tensors(kv.device)
    if off[-1] == kv.shape[0] and n == 1:  # every local row, in order
        return kv

    def rows(i):  # the rows ``to[i]`` of kv: kv itself when it is every row
        return kv if len(to[i]) == kv.shape[0] else kv.index_select(0, to[i])

    out = kv.new_empty(off[-1], kv.shape[1])
    out[off[me]:off[me + 1]] = rows(me)
    if n > 1:
        sends = [(rows(q), q) for q in range(n) if q != me and len(to[q])]
        recvs = [(out[off[p]:off[p + 1]], p) for p in range(n)
                 if p != me and off[p + 1] > off[p]]
        exchange(sends, recvs, g).wait()
    return out


def keys_of(buf, plan, hkv, d, device):
    """The plan's packed key buffer: contiguous K ``[keys, Hkv, D]``, V ``[keys, Hkv, Dv]``
    gathered from the rank's buffer ``buf`` (:func:`gather_seen`)."""
    kk, vv = split_rows(buf, hkv, d)
    return _gather_keys(kk, vv, plan.route_tensors(device)[0])


def call_forward(q0, kg, vg, plan, *, softmax_scale, backend):
    """The plan's one forward call: ``(out [L, Hq, Dv], lse [Hq, L])``."""
    cq, ck = plan.tensors(q0.device)
    return attention_forward_varlen(q0, kg, vg, cq, ck, softmax_scale=softmax_scale,
                                     causal=plan.causal, backend=backend)


def call_backward(dout0, dlse0, q0, kg, vg, out0, lse0, plan, *, softmax_scale, backend):
    """The plan's one backward call (not causal): ``(dq [L, Hq, D], dk, dv)`` (dk / dv of the
    packed key buffer)."""
    cq, ck = plan.tensors(q0.device)
    return attention_backward_varlen(dout0, q0, kg, vg, out0, lse0, cq, ck,
                                     softmax_scale=softmax_scale, causal=plan.causal,
                                     dlse=dlse0, backend=backend)


def past_of(kept, plan, hkv, d, device):
    """The keys of the causal backward's unmasked call (``plan.cu_past``), K and V, from what
    the forward kept: the packed key buffer ``(kg, vg)`` or the rank's buffer ``(buf,)``."""
    _, pos, rows = plan.past_tensors(device)
    if len(kept) == 2:
        return kept[0].index_select(0, pos), kept[1].index_select(0, pos)
    kk, vv = split_rows(kept[0], hkv, d)
    return kk.index_select(0, rows), vv.index_select(0, rows)


def backward_calls(dout0, dlse0, q0, k0, v0, kept, out0, lse0, plan, *, softmax_scale,
                   backend):
    """The rank's backward kernel calls: ``(dq [L, Hq, D], diag, keyed)``.

    Not causal: the forward's one call again; ``diag`` is None and ``keyed = (dk, dv, False)``
    (dK / dV of the packed key buffer, summed per buffer row by :func:`key_grads`). Causal:
    two calls with the final ``out`` / ``lse`` (as a ring merges partial results), each
    segment against its own rows (the local ``k0`` / ``v0``; square, so cuDNN runs a top-left
    band, whose backward is about twice as fast as the bottom-right one of the forward's call
    with these shapes) and, without a mask, against the keys before them (``plan.cu_past``);
    ``diag = (dk0, dv0)`` of the local rows, ``keyed = (dk, dv, True)`` of the past keys (None
    when there are none); dq is their sum.
    ``kept``: ``(kg, vg)`` or ``(buf,)`` (:func:`keys_of`, :func:`gather_seen`)."""
    hkv, d, dev = k0.shape[1], k0.shape[2], q0.device
    kw = {"softmax_scale": softmax_scale, "backend": backend}
    if not plan.causal:
        kg, vg = kept if len(kept) == 2 else keys_of(kept[0], plan, hkv, d, dev)
        dq, dk, dv = call_backward(dout0, dlse0, q0, kg, vg, out0, lse0, plan, **kw)
        return dq, None, (dk, dv, False)
    cq, _ = plan.tensors(dev)
    dq, dk0, dv0 = attention_backward_varlen(dout0, q0, k0, v0, out0, lse0, cq, cq, causal=True,
                                             dlse=dlse0, **kw)
    if plan.past_keys == 0:
        return dq, (dk0, dv0), None
    kp, vp = past_of(kept, plan, hkv, d, dev)
    dqp, dkp, dvp = attention_backward_varlen(dout0, q0, kp, vp, out0, lse0, cq,
                                              plan.past_tensors(dev)[0], causal=False,
                                              dlse=dlse0, **kw)
    dq = dq.add_(dqp)  # in dq's dtype: one rounding of the sum, as in acc_dtype then a cast
    return dq, (dk0, dv0), (dkp, dvp, True)


def scatter_key_grads(dk_g, dv_g, plan, width, hkv, d, past=False, own=None):
    """Key gradients summed per row of the rank's buffer (:func:`gather_seen`), in
    ``acc_dtype``: ``[rows, W]``, the rows of ``plan.rows_from`` owner after owner; the keys
    are the packed key buffer's, or with ``past`` the causal backward's unmasked call's, whose
    keys of the rank's own rows are added to ``own [L, W]`` instead (that slice of the result
    is left unwritten: :func:`own_part`). One pass per layer of distinct rows
    (``plan.scatter_layers``; a key several segments see adds in a second layer), the first
    storing, without atomics (:func:`longattn.common.kernels.rows.add_rows_`)."""
    acc = acc_dtype(dk_g.dtype)
    layers, bare, own_layers = plan.scatter_layers(past, dk_g.device)
    dbuf = torch.empty(plan.route_tensors(dk_g.device)[1][-1], width, dtype=acc,
                       device=dk_g.device)
    if bare.numel():
        dbuf.index_fill_(0, bare, 0)
    k2, v2 = dk_g.reshape(dk_g.shape[0], -1), dv_g.reshape(dv_g.shape[0], -1)
    for dst, lays, first in ((dbuf, layers, True), (own, own_layers or (), False)):
        for lv, (pos, rows) in enumerate(lays):
            add_rows_(dst[:, :hkv * d], rows, k2, pos, store=first and lv == 0)
            add_rows_(dst[:, hkv * d:], rows, v2, pos, store=first and lv == 0)
    return dbuf


def key_grads(diag, keyed, plan, width):
    """``(own, dbuf)`` of :func:`backward_calls`' results, in ``acc_dtype``: the local rows'
    ``[L, W]`` from ``diag`` and the past keys of the rank's own rows (None when not causal),
    and the rank's buffer's ``[rows, W]`` (:func:`scatter_key_grads`)."""
    own = None
    if diag is not None:
        dk0, dv0 = diag
        own = torch.empty(dk0.shape[0], width, dtype=acc_dtype(dk0.dtype), device=dk0.device)
        ok, ov = split_rows(own, dk0.shape[1], dk0.shape[2])
        ok.copy_(dk0)
        ov.copy_(dv0)
    if keyed is None:  # causal without past keys: every key was one of the rank's own rows
        ref = diag[0]
        dbuf = torch.empty(plan.route_tensors(ref.device)[1][-1], width,
                           dtype=acc_dtype(ref.dtype), device=ref.device)
        return own, dbuf
    dk, dv, past = keyed
    return own, scatter_key_grads(dk, dv, plan, width, dk.shape[1], dk.shape[2], past, own)


def own_part(dbuf, plan):
    """The rows of the rank's buffer ``dbuf`` that are its own and still to be added to its
    local rows: none for a causal plan (:func:`key_grads` added them), else its own slice."""
    off = plan.route_tensors(dbuf.device)[1]
    return dbuf[:0] if plan.causal else dbuf[off[plan.rank]:off[plan.rank + 1]]


def add_received(own, parts, plan):
    """``own [L, W]`` plus every sender's rows ``parts[q]`` (``[len(plan.rows_to[q]), W]``)
    at the local rows they belong to, senders in rank order (each row once per sender, so the
    sum is in rank order and deterministic; no atomics, :func:`add_rows_`)."""
    to = plan.route_tensors(own.device)[2]
    for q, part in enumerate(parts):
        if part.shape[0]:
            add_rows_(own, to[q], part)
    return own


def reduce_kv_grads(dbuf, plan, g: Group, own=None):
    """This rank's ``[L, W]`` rows: the gradient of every rank's keys that come from them,
    summed in rank order (in ``dbuf``'s dtype) onto ``own`` (default zeros; causal: the local
    rows' gradients from :func:`key_grads`, the rank's own rows of ``dbuf`` included,
    :func:`own_part`). Each rank returns each owner the rows of its buffer that owner sent
    (``plan.rows_from``) and receives those of its own rows the sender's keys come from
    (``plan.rows_to``); one exchange."""
    n, me = g.size, g.rank
    _, off, _ = plan.route_tensors(dbuf.device)
    parts = [own_part(dbuf, plan) if q == me else
             dbuf.new_empty(len(plan.rows_to[q]), dbuf.shape[1]) for q in range(n)]
    if n > 1:
        sends = [(dbuf[off[p]:off[p + 1]], p) for p in range(n)
                 if p != me and off[p + 1] > off[p]]
        recvs = [(parts[q], q) for q in range(n) if q != me and parts[q].shape[0]]
        exchange(sends, recvs, g).wait()
    if own is None:
        own = torch.zeros(plan.rows, dbuf.shape[1], dtype=dbuf.dtype, device=dbuf.device)
    return add_received(own, parts, plan)


def _forward(q, k, v, plan, g, softmax_scale, backend):
    q0, k0, v0 = q[0], k[0], v[0]
    hkv, d = k.shape[2], k.shape[3]
    buf = gather_seen(kv_rows(k0, v0), plan, g)
    kg, vg = keys_of(buf, plan, hkv, d, q.device)
    out, lse = call_forward(q0, kg, vg, plan, softmax_scale=softmax_scale, backend=backend)
    return out[None], lse.to(lse_dtype(q.dtype))[None], buf, (kg, vg)


def _backward(dout, dlse, q, k, v, out, lse, kept, plan, g, softmax_scale, backend, width):
    hkv, d = k.shape[2], k.shape[3]
    dq, diag, keyed = backward_calls(dout[0], None if dlse is None else dlse[0], q[0], k[0],
                                     v[0], kept, out[0], lse[0], plan,
                                     softmax_scale=softmax_scale, backend=backend)
    if g.size == 1 and not plan.causal and plan.kidx is None:
        return dq[None], keyed[0][None], keyed[1][None]  # the keys are the local rows, in order
    own, dbuf = key_grads(diag, keyed, plan, width)
    dk, dv = split_rows(reduce_kv_grads(dbuf, plan, g, own), hkv, d)
    return dq[None], dk[None], dv[None]


class _PackedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, g, softmax_scale, backend):
        out, lse, buf, (kg, vg) = _forward(q, k, v, plan, g, softmax_scale, backend)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:3]):
            # the smaller of the packed key buffer and the gathered rows (module docstring)
            kept = (kg, vg) if plan.keys <= buf.shape[0] else (buf,)
            # the local K/V only for the causal backward's square call (full attention does
            # not read them: empty stand-ins of their shapes, so nothing is kept alive)
            kv = (k, v) if plan.causal else (k.new_empty(1, 0, *k.shape[2:]),
                                             v.new_empty(1, 0, *v.shape[2:]))
            ctx.save_for_backward(q, *kv, out, lse, *kept)
        ctx.args = (plan, g, softmax_scale, backend, k.shape[2], k.shape[3], v.shape[3],
                    k.dtype, v.dtype)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        plan, g, softmax_scale, backend, hkv, d, dv_, kdt, vdt = ctx.args
        q, k, v, out, lse, *kept = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(dout.contiguous(), grad_lse_or_none(dlse), q, k, v, out, lse,
                               kept, plan, g, softmax_scale, backend, hkv * (d + dv_))
        return (dq.to(q.dtype), dk.to(kdt), dv.to(vdt), None, None, None, None)
