"""``hamilton_attn``: context-parallel attention that executes any :class:`Schedule`.

One step loop serves Ring Attention (``schedule="ring"``; zigzag ring when causal), TASP
(``"tasp"``: every step one all-to-all over ``n - 1`` arc-disjoint rings) and the two-level
schedule. Forward, per step: post the next transition (batched point-to-point, straight into
the other half of a double buffer), run this step's kernel calls on the current buffer, merge
into the accumulators (``out`` in ``acc_dtype``, ``lse`` in ``lse_dtype``: float64 for
float32 inputs, so merging partials near large logits keeps float32 accuracy), wait, swap.
Backward (an autograd Function): the KV sub-chunks and their dK/dV accumulators
(``acc_dtype``) travel the *reversed* schedule, so every sub-chunk ends where it started; each
step's gradient uses the final merged ``out`` / ``lse`` (exact). The dK/dV message of a step
goes out while the next step computes.

Buffers and kernel calls: see :mod:`longattn.hamilton.plan`. Streams: messages are posted from
the current stream (``longattn.common.comm``); NCCL's stream waits for the work queued before
the post (so a buffer is not overwritten while an earlier kernel reads it) and ``wait()`` makes
later kernels wait for the transfer.

Side stream (``HamiltonConfig.overlap_merges``, :class:`SideStream`): the memory-bound work of a
step (the forward's merge; the backward's dq and dK/dV accumulation) is queued on a second CUDA
stream, so that it runs while the next step's kernels compute. The discipline is
``longattn.common.comm``'s: the side stream waits for the current stream (``wait_stream``, i.e.
an event) before each piece of work, so it sees the step's partials; the partials it reads are
``record_stream``'d on it, so the caching allocator does not hand their memory to a later kernel
before it has read them; the dK/dV buffer that travels is posted with ``exchange(...,
stream=side)`` (NCCL waits for the side stream's work, ``Handle.wait()`` joins the streams
again); and the current stream waits for the side stream (``join``) before anything reads an
accumulator (the return, the last dq and dK/dV sums). Merges into the same accumulator stay in
their order on the one side stream. Everything the side stream writes is allocated before, on
the current stream. Without CUDA (or with the option off) the same code runs the work inline.
"""

from __future__ import annotations

import functools

import torch

from longattn.common.comm import exchange
from longattn.common.dist import resolve_group
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import attention_backward, attention_forward, grad_lse_or_none
from longattn.common.kernels.rows import add_kv_
from longattn.common.merge import merge_partials_, merge_slots
from longattn.hamilton.allgather import allgather_attention
from longattn.hamilton.args import DENSE_NAMES, check_call, check_dense_call
from longattn.hamilton.config import DEFAULT, HamiltonConfig
from longattn.hamilton.packed_allgather import packed_allgather_attention
from longattn.hamilton.packed_attn import packed_attention
from longattn.hamilton.packing import make_allgather_plan, make_packed_plan
from longattn.hamilton.plan import kv_views, make_plan, new_buffer
from longattn.hamilton.strategy import auto_schedule, call_shape
from longattn.hamilton.ulysses import ulysses_attention


def hamilton_attn(q, k, v, *, group=None, causal=False, softmax_scale=None, schedule="auto",
                  return_lse=False, backend="auto", config=None, cu_seqlens=None):
    """Context-parallel attention over the ranks of ``group`` (TASP / ring / two-level).

    Arguments are this rank's shards (see :func:`longattn.hamilton.shard`): ``q [B, L, Hq, D]``,
    ``k [B, Lk, Hkv, D]``, ``v [B, Lk, Hkv, Dv]`` with ``Hq % Hkv == 0`` (GQA: only ``Hkv``
    heads travel). ``causal=True`` expects the zigzag layout (rank ``r`` holds blocks ``r`` and
    ``2n-1-r`` of ``2n``) and ``L == Lk``; non-causal works in any layout (contiguous by
    convention) and allows ``L != Lk``. ``softmax_scale``: the factor on ``q . k`` (default
    ``D ** -0.5``). ``schedule``: ``"auto"`` (with ``config.target``: the strategy
    :func:`longattn.hamilton.explain` predicts fastest on that target, among TASP, ring,
    two-level, ``"allgather"`` and ``"ulysses"``; without: TASP if the local length divides
    into its sub-chunks, else ring), ``"tasp"``, ``"ring"``, ``"two_level"``, or a
    :class:`~longattn.hamilton.schedules.Schedule`. The KV length per rank must be divisible by
    the schedule's sub-chunks (``num_slots``; twice that when causal). ``backend`` picks the
    local kernel (``longattn.common.kernels``); a named backend that cannot serve the call
    raises before any communication.

    ``config``: a :class:`~longattn.hamilton.HamiltonConfig` (None: its defaults): the merge
    backend and whether the step kernels get contiguous K/V copies instead of strided views.

    ``group``: a ``ProcessGroup``, a 1-D ``DeviceMesh``, ``longattn.common.dist.LOCAL`` or
    None. None means this process alone without torch.distributed or in a world of one rank,
    and is an error in a world of more ranks (pass ``torch.distributed.group.WORLD``).

    Returns this rank's ``out [B, L, Hq, Dv]`` (dtype of q) and, with ``return_lse``, ``lse
    [B, Hq, L]`` in ``longattn.common.dtypes.lse_dtype(q.dtype)`` (float64 for float32 and
    float64 inputs, float32 for fp16 / bf16). Differentiable in q, k, v (also through lse).
    Bad arguments raise ``ValueError`` / ``TypeError`` on every rank before any communication.

    ``cu_seqlens``: packed documents. The GLOBAL int32 cumulative document lengths ``[num_docs
    + 1]`` of one packed sequence (the same on every rank, batch 1), whose total is the group
    size times the local length; q, k, v are this rank's part as ``shard(x, causal=causal,
    cu_seqlens=cu_seqlens)`` lays it out (:mod:`longattn.hamilton.packing`). Attention stays
    inside each document (causal inside it with ``causal``). With a step schedule (``"auto"``
    is TASP here) a KV block no query of a rank sees is neither sent to it nor computed, one
    varlen call per step; with ``schedule="allgather"`` every rank's K/V is all-gathered and
    each rank makes ONE varlen call over all its query segments
    (:mod:`longattn.hamilton.packed_allgather`). ``"ulysses"`` does not take ``cu_seqlens``.
    """
    g = resolve_group(group)
    if isinstance(schedule, str) and schedule == "auto" and cu_seqlens is None:
        schedule = _auto(q, k, v, g.size, causal, config)
    if isinstance(schedule, str) and schedule in DENSE_NAMES:
        return _dense(q, k, v, g, causal, softmax_scale, schedule, return_lse, backend, config,
                      cu_seqlens)
    scale, sched, kernels, config = check_call(q, k, v, group=g, causal=causal,
                                               softmax_scale=softmax_scale, schedule=schedule,
                                               return_lse=return_lse, backend=backend,
                                               config=config, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:  # kernels: the checked cu_seqlens tuple
        plan = make_packed_plan(kernels, g.size, g.rank, causal, sched)
        out, lse = packed_attention(q, k, v, plan, g.pg, scale, backend, config)
        return (out, lse) if return_lse else out
    plan = make_plan(sched, g.rank, causal)
    out, lse = _HamiltonAttn.apply(q, k, v, plan, g.pg, scale, kernels, config)
    return (out, lse) if return_lse else out


def _auto(q, k, v, n, causal, config):
    """``schedule="auto"`` with ``config.target``: the strategy the model predicts fastest
    (:mod:`longattn.hamilton.strategy`), from values every rank agrees on afterwards (shapes,
    dtype, ``causal``, whether a backward runs, the target; the chosen schedule itself is agreed
    by the call's checks). Without a target, or on arguments the checks will refuse: ``"auto"``
    (TASP when the local length divides into its sub-chunks, else ring)."""
    if not isinstance(config, HamiltonConfig) or config.target is None:
        return "auto"
    ok = (all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v))
          and isinstance(causal, bool) and min(q.shape[2], k.shape[2]) > 0
          and q.shape[2] % k.shape[2] == 0 and min(q.shape[1], k.shape[1]) > 0)
    if not ok:
        return "auto"
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return auto_schedule(config.target, call_shape(q, k, v, causal, grad), n)


def _dense(q, k, v, g, causal, softmax_scale, schedule, return_lse, backend, config,
           cu_seqlens):
    """``schedule="allgather"`` / ``"ulysses"`` (:mod:`longattn.hamilton.allgather`,
    :mod:`longattn.hamilton.ulysses`; packed documents: :mod:`longattn.hamilton.
    packed_allgather`)."""
    scale, cu = check_dense_call(q, k, v, group=g, causal=causal, softmax_scale=softmax_scale,
                                 schedule=schedule, return_lse=return_lse, backend=backend,
                                 config=config, cu_seqlens=cu_seqlens)
    if cu is not None:  # schedule="allgather" (the checks refuse cu_seqlens for the others)
        plan = make_allgather_plan(cu, g.size, g.rank, causal)
        out, lse = packed_allgather_attention(q, k, v, plan, g, scale, backend)
    elif schedule == "allgather":
        out, lse = allgather_attention(q, k, v, g, causal=causal, softmax_scale=scale,
                                       backend=backend)
    else:
        out, lse = ulysses_attention(q, k, v, g, causal=causal, softmax_scale=scale,
                                     backend=backend, return_lse=return_lse)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# buffers


def _token_index(plan, length, device):
    """Local token of every buffer row at step 0 (None when it is the identity)."""
    if list(plan.own_units) == list(range(plan.units)):
        return None
    h = length // plan.units
    idx = torch.tensor(plan.own_units, device=device)[:, None] * h + torch.arange(h, device=device)
    return idx.reshape(-1)


def _pack(buf, k, v, idx):
    kk, vv = kv_views(buf, 0, buf.shape[0], k.shape[2], k.shape[3])
    if idx is not None:
        k, v = k.index_select(1, idx), v.index_select(1, idx)
    kk.copy_(k)
    vv.copy_(v)


def _post(transfer, send_buf, recv_buf, unit, group, *, reverse=False, stream=None):
    """Post one transition (or, with ``reverse``, send back what was received and vice versa);
    ``stream``: comm's ``stream=`` (None: the current stream)."""
    sends, recvs = (transfer.recvs, transfer.sends) if reverse else (transfer.sends,
                                                                    transfer.recvs)
    return exchange([(send_buf[a * unit:b * unit], p) for p, a, b in sends],
                    [(recv_buf[a * unit:b * unit], p) for p, a, b in recvs], group,
                    stream=stream)


# ---------------------------------------------------------------------------------------------
# the side stream of HamiltonConfig.overlap_merges


class SideStream:
    """The stream a step loop queues its accumulation on (``HamiltonConfig.overlap_merges``).

    ``SideStream(device, enabled)`` holds a CUDA stream when ``enabled`` and ``device`` is a
    CUDA device; otherwise ``stream`` is None and every method runs its work inline, on the
    current stream, in the order it is called (the default path, and every CPU run: the same
    code as the side-stream path). The ordering rules (module docstring) are
    ``longattn.common.comm``'s: ``wait_stream`` both ways, ``record_stream`` for what the side
    stream reads, comm's ``stream=`` for a message of what it wrote.
    """

    def __init__(self, device, enabled: bool = True):
        device = torch.device(device)
        self.stream = (torch.cuda.Stream(device=device)
                       if enabled and device.type == "cuda" else None)

    def run(self, fn, keep=()):
        """Queue ``fn()`` on the side stream after the work queued so far on the current
        stream. ``keep``: the tensors ``fn`` reads that were made on the current stream (a
        step's partials); their memory is not handed out again before ``fn``'s work has run.
        Whatever ``fn`` writes must exist already (allocated on the current stream)."""
        if self.stream is None:
            fn()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            fn()
        for t in keep:
            t.record_stream(self.stream)

    def post(self, post):
        """Post a message that sends what the side stream wrote: ``post(stream=...)`` passes
        the side stream on to comm's ``stream=`` (NCCL then waits for the side stream's queued
        work, and the handle's ``wait()`` makes the current stream wait for the side
        stream)."""
        return post(stream=self.stream)

    def join(self):
        """The current stream waits for everything queued on the side stream so far."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


def _run(side, fn, keep=()):
    if side is None:
        fn()
    else:
        side.run(fn, keep)


# ---------------------------------------------------------------------------------------------
# one step's compute (shared by the loops below and by bench/bench_hamilton.py)


def _kv(buf, call, unit, hkv, d, contiguous):
    """K / V of a call's key units: strided views of ``buf``, or contiguous copies of them
    (``HamiltonConfig.contiguous_kv``)."""
    kk, vv = kv_views(buf, call.start * unit, call.stop * unit, hkv, d)
    if contiguous:
        kk, vv = kk.contiguous(), vv.contiguous()
    return kk, vv


def _pick(backend, kind):
    """The backend name of a ``kind`` of call: ``backend`` is one name for every kind or a
    mapping ``{kind: name}`` (:class:`longattn.hamilton.args.Kernels`)."""
    return backend if isinstance(backend, str) else backend[kind]


def _rows(call, half):
    return slice(None) if call.rows == "all" else slice(half, None)


class _SlotOrder:
    """The slot of each kernel call a deferred loop keeps, in step order: ``first`` leading
    slots (the diagonal block's), then the ``"all"`` calls of ``calls`` (a plan's
    ``calls[1:]``), then the ``"back"`` calls, so front query rows merge or sum the slots
    ``[0, n_front)`` and back rows every one. ``take(rows)``: ``(slot, query rows)`` of the
    next call of ``rows``."""

    def __init__(self, calls, length, first=0):
        kinds = [call.rows for step in calls for call in step]
        self.half = length // 2
        self.n_front = first + kinds.count("all")
        self.n = first + len(kinds)
        self.i_all, self.i_back = first, self.n_front

    def take(self, rows):
        if rows == "all":
            self.i_all += 1
            return self.i_all - 1, slice(None)
        self.i_back += 1
        return self.i_back - 1, slice(self.half, None)


class DeferredOut:
    """``HamiltonConfig.defer_merge``: every kernel call's ``(out, lse)`` of a rank's forward
    kept in a slot, merged once by :meth:`finish`.

    Slot 0 holds the diagonal block (step 0, every query row); the ``"all"`` calls of
    ``calls`` (a plan's ``calls[1:]``) come next, the ``"back"`` calls last, so the front query
    rows ``[0, L/2)`` merge slots ``[0, 1 + n_all)`` and the back rows every slot
    (:func:`longattn.common.merge.merge_slots`; a back slot's front rows are never written
    nor read). The kernels write their outputs into the slots (``attention_forward(out=)``):
    no float32 accumulator is read and written per call. Memory: ``1 + len(calls)`` tensors
    ``[B, L, Hq, Dv]`` in q's dtype and their ``lse`` in ``lse_dtype(q.dtype)``."""

    def __init__(self, calls, q, dv):
        b, length, hq, _ = q.shape
        self.order = _SlotOrder(calls, length, first=1)
        n = self.order.n
        self.outs = q.new_empty((n, b, length, hq, dv))
        self.lses = torch.empty((n, b, hq, length), dtype=lse_dtype(q.dtype), device=q.device)

    def slot(self, rows):
        """``(out, lse)`` views of the next slot for a call of ``rows`` (``"diag"``, ``"all"``
        or ``"back"``, in step order), restricted to the rows it computes."""
        i, sl = (0, slice(None)) if rows == "diag" else self.order.take(rows)
        return self.outs[i][:, sl], self.lses[i][:, :, sl]

    def run(self, rows, q, k, v, *, softmax_scale, causal, backend):
        """One kernel call of ``rows`` written into its slot."""
        out, lse = self.slot(rows)
        _, l = attention_forward(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                 backend=backend, out=out)
        lse.copy_(l)

    def finish(self, dtype):
        """``(out in dtype, lse)``: every slot merged."""
        return merge_slots(self.outs, self.lses, n_front=self.order.n_front,
                           split=self.order.half, out_dtype=dtype)


def forward_step(q, buf, calls, unit, acc_out, acc_lse, *, hkv, d, softmax_scale, backend,
                 config=DEFAULT, merge=None, side=None, parts=None):
    """Run one step's kernel calls on buffer ``buf`` and merge into ``acc_out`` / ``acc_lse``.

    ``backend``: a backend name, or ``{"all": name, "back": name}``. ``config``: a
    :class:`HamiltonConfig`. ``merge``: a function with the signature of
    :func:`longattn.common.merge.merge_partials_` used instead of it (benchmarks time e.g. a
    ``torch.compile``'d merge this way); None: ``merge_partials_`` with
    ``config.merge_backend``. ``side``: a :class:`SideStream` the merges are queued on (None:
    inline); the caller joins it before reading the accumulators. ``parts``: a
    :class:`DeferredOut` the calls write into instead (``acc_out`` / ``acc_lse`` unused)."""
    if parts is not None:
        half = q.shape[1] // 2
        for call in calls:
            kk, vv = _kv(buf, call, unit, hkv, d, config.contiguous_kv)
            parts.run(call.rows, q[:, _rows(call, half)], kk, vv,
                      softmax_scale=softmax_scale, causal=False,
                      backend=_pick(backend, call.rows))
        return
    if merge is None:
        merge = functools.partial(merge_partials_, backend=config.merge_backend)
    half = q.shape[1] // 2
    for call in calls:
        kk, vv = _kv(buf, call, unit, hkv, d, config.contiguous_kv)
        if call.rows == "all":
            qs, ao, al = q, acc_out, acc_lse
        else:
            qs, ao, al = q[:, half:], acc_out[:, half:], acc_lse[:, :, half:]
        o, l = attention_forward(qs, kk, vv, softmax_scale=softmax_scale, causal=False,
                                 backend=_pick(backend, call.rows))
        _run(side, functools.partial(merge, ao, al, o, l), (o, l))


def step_grads(dout, dlse, q, out, lse, buf, calls, unit, *, hkv, d, softmax_scale, backend,
               config=DEFAULT, dq_parts=None):
    """One step's gradient kernels: ``[(call, dq_s, dk_s, dv_s)]``, in the kernels' dtypes
    (``dq_s`` covers the call's query rows, ``dk_s`` / ``dv_s`` its key units).
    ``backend``: a backend name, or ``{"all": name, "back": name}``; ``config``: a
    :class:`HamiltonConfig`. ``dq_parts``: a :class:`DeferredDq` whose slots the kernels write
    ``dq_s`` into."""
    half = q.shape[1] // 2
    grads = []
    for call in calls:
        kk, vv = _kv(buf, call, unit, hkv, d, config.contiguous_kv)
        sl = _rows(call, half)
        dq_s, dk_s, dv_s = attention_backward(
            dout[:, sl], q[:, sl], kk, vv, out[:, sl], lse[:, :, sl],
            softmax_scale=softmax_scale, causal=False,
            dlse=None if dlse is None else dlse[:, :, sl], backend=_pick(backend, call.rows),
            dq_out=None if dq_parts is None else dq_parts.slot(call))
        grads.append((call, dq_s, dk_s, dv_s))
    return grads


def backward_step(dout, dlse, q, out, lse, buf, calls, unit, dq, *, hkv, d, softmax_scale,
                  backend, config=DEFAULT):
    """One step's gradient kernels: adds into ``dq``, returns ``[(call, dk, dv)]`` for
    :func:`add_kv_grads` (added once the incoming dK/dV accumulator has arrived).
    ``backend``: a backend name, or ``{"all": name, "back": name}``; ``config``: a
    :class:`HamiltonConfig`. (The loop itself uses :func:`step_grads` and
    :func:`accumulate_step`.)"""
    grads = step_grads(dout, dlse, q, out, lse, buf, calls, unit, hkv=hkv, d=d,
                       softmax_scale=softmax_scale, backend=backend, config=config)
    add_q_grads(dq, grads)
    return [(call, dk_s, dv_s) for call, _, dk_s, dv_s in grads]


def add_q_grads(dq, grads):
    """``dq[:, rows] += dq_s`` for each ``(call, dq_s, ...)`` of :func:`step_grads`, in order."""
    half = dq.shape[1] // 2
    for call, dq_s, *_ in grads:
        dq[:, _rows(call, half)] += dq_s


def add_kv_grads(acc, grads, unit):
    """Add a step's K/V gradients into the dK/dV accumulator buffer (same layout as KV), one
    :func:`~longattn.common.kernels.rows.add_kv_` per call."""
    for call, dk_s, dv_s in grads:
        add_kv_(acc[call.start * unit:call.stop * unit], dk_s, dv_s)


def init_kv_grads(acc, grads, unit):
    """What ``acc.zero_()`` then :func:`add_kv_grads` gives, in one write of ``acc``: each
    call's K/V gradients copied into its units (the calls of a step cover disjoint units), the
    units no call covers zeroed. The same values (``0 + x == x``; only an exact ``-0.0`` of a
    gradient stays ``-0.0`` where the sum gave ``+0.0``)."""
    spans = sorted((call.start, call.stop) for call, _, _ in grads)
    if any(a < b_prev for (_, b_prev), (a, _) in zip(spans, spans[1:])):
        acc.zero_()  # overlapping calls (no plan makes them): the sum itself
        add_kv_grads(acc, grads, unit)
        return
    for call, dk_s, dv_s in grads:
        add_kv_(acc[call.start * unit:call.stop * unit], dk_s, dv_s, store=True)
    pos = 0
    for a, b in spans + [(acc.shape[0] // unit, None)]:
        if a > pos:
            acc[pos * unit:a * unit].zero_()
        pos = b


class DeferredDq:
    """``HamiltonConfig.defer_dq``: the dq partials of the steps ``1..n-1`` kept in the
    kernels' dtype and summed once, in the accumulation dtype, by :meth:`sum_into`.

    One slot ``[B, L, Hq, D]`` per kernel call of ``calls`` (a plan's ``calls[1:]``),
    allocated up front (on the current stream), the ``"all"`` calls' first: the front query
    rows ``[0, L/2)`` sum the first ``n_all`` slots, the back rows every slot (a ``"back"``
    call's slot has no front rows written). :func:`step_grads` has the kernels write each
    partial into its slot (``attention_backward(dq_out=)``; :meth:`keep` copies only a partial
    that lives elsewhere). Memory: one slot per kernel call, i.e. ``n - 1`` tensors
    ``[B, L, Hq, D]`` in q's dtype with ring, up to twice that with TASP (a step with both
    calls)."""

    def __init__(self, calls, q):
        self.order = _SlotOrder(calls, q.shape[1])
        self.slots = q.new_empty((self.order.n, *q.shape))

    def slot(self, call):
        """The rows of the next slot for ``call`` (in step order), where its kernel writes."""
        i, sl = self.order.take(call.rows)
        return self.slots[i][:, sl]

    def keep(self, call, dq_s):
        """Have one call's partial in its slot: nothing to do where the kernel wrote it into
        the slot :meth:`slot` gave it, else a copy into the next slot."""
        if dq_s.untyped_storage().data_ptr() != self.slots.untyped_storage().data_ptr():
            self.slot(call).copy_(dq_s)

    def sum_into(self, dq):
        """``dq`` (accumulation dtype, every row written) = the sum of the kept partials."""
        h, n_all = self.order.half, self.order.n_front
        torch.sum(self.slots[:n_all, :, :h], 0, dtype=dq.dtype, out=dq[:, :h])
        torch.sum(self.slots[:, :, h:], 0, dtype=dq.dtype, out=dq[:, h:])


def accumulate_step(grads, dq, acc, unit, *, first=False, side=None, dq_parts=None):
    """The accumulation of one step's :func:`step_grads`, queued on ``side`` (None: inline):
    each ``dq_s`` into ``dq`` (:func:`add_q_grads`; with ``dq_parts``, a :class:`DeferredDq`:
    kept there instead) and the K/V gradients into the dK/dV buffer ``acc``
    (:func:`add_kv_grads`; with ``first``, :func:`init_kv_grads`: ``acc`` need not be
    zeroed)."""
    kv = [(call, dk_s, dv_s) for call, _, dk_s, dv_s in grads]

    def work():
        if dq_parts is None:
            add_q_grads(dq, grads)
        else:
            for call, dq_s, _, _ in grads:
                dq_parts.keep(call, dq_s)
        (init_kv_grads if first else add_kv_grads)(acc, kv, unit)

    _run(side, work, [t for g in grads for t in g[1:]])


def add_buffer_grads(dk, dv, acc, idx, *, hkv, d):
    """Add the dK/dV accumulator buffer ``acc`` (buffer order, see :func:`_pack`) into the
    local gradients ``dk [B, Lk, Hkv, D]`` / ``dv`` (token order) in place; ``idx``: the
    buffer's token index (None: the same order). The slow twin of :func:`finish_kv_grads`."""
    gk, gv = kv_views(acc, 0, dk.shape[1], hkv, d)
    if idx is None:
        dk += gk
        dv += gv
    else:
        dk.index_add_(1, idx, gk)
        dv.index_add_(1, idx, gv)


def _unit_runs(own_units):
    """``[(buffer unit, token unit, count)]``: the maximal runs of consecutive buffer units that
    hold consecutive token units (``plan.own_units``)."""
    runs = []
    for i, t in enumerate(own_units):
        if runs and runs[-1][0] + runs[-1][2] == i and runs[-1][1] + runs[-1][2] == t:
            runs[-1][2] += 1
        else:
            runs.append([i, t, 1])
    return runs


def finish_kv_grads(dk0, dv0, acc, own_units, *, hkv, d, dtypes):
    """The local ``(dk, dv)`` in ``dtypes``: the step-0 gradients ``dk0`` / ``dv0`` plus the
    dK/dV buffer ``acc`` (buffer order; ``own_units``: the plan's token unit of each buffer
    unit), one add per run of units written straight in the output dtype. Bitwise what
    ``dk0.to(acc.dtype)``, :func:`add_buffer_grads` and ``.to(dtype)`` give (the same sums,
    rounded once), without the two full-size float32 passes."""
    lk = dk0.shape[1]
    h = lk // len(own_units)
    runs = _unit_runs(own_units)
    outs = []
    for g, x, dt in zip(kv_views(acc, 0, lk, hkv, d), (dk0, dv0), dtypes):
        res = torch.empty(x.shape, dtype=dt, device=x.device)
        for b, t, m in runs:
            rows, src = slice(t * h, (t + m) * h), slice(b * h, (b + m) * h)
            torch.add(x[:, rows], g[:, src], out=res[:, rows])
        outs.append(res)
    return tuple(outs)


def finish_q_grads(dq, dq0, dtype):
    """``dq + dq0`` in ``dtype`` (bitwise ``(dq += dq0).to(dtype)``, one pass)."""
    if dq.dtype == dtype:
        return dq.add_(dq0)
    return torch.add(dq, dq0, out=torch.empty(dq.shape, dtype=dtype, device=dq.device))


# ---------------------------------------------------------------------------------------------
# forward and backward loops


def _forward(q, k, v, plan, group, softmax_scale, kernels, config, side=None):
    """``side``: the :class:`SideStream` of the merges (None: ``config.overlap_merges``'s)."""
    backend = kernels.fwd
    n, lk = plan.n, k.shape[1]
    b, hkv, d, dv = k.shape[0], k.shape[2], k.shape[3], v.shape[3]
    if n == 1:
        out, lse = attention_forward(q, k, v, softmax_scale=softmax_scale, causal=plan.causal,
                                     backend=backend["diag"])
        return out, lse.to(lse_dtype(q.dtype)), None
    if side is None:
        side = SideStream(q.device, config.overlap_merges)
    unit = lk // plan.units
    cur = new_buffer(lk, b, hkv, d, dv, k.dtype, k.device)
    nxt = torch.empty_like(cur)
    _pack(cur, k, v, _token_index(plan, lk, k.device))
    parts = DeferredOut(plan.calls[1:], q, dv) if config.defer_merge else None
    acc_out = acc_lse = None
    for s in range(n):
        h = _post(plan.transfers[s], cur, nxt, unit, group) if s < n - 1 else None
        if s == 0 and parts is not None:
            parts.run("diag", q, k, v, softmax_scale=softmax_scale, causal=plan.causal,
                      backend=backend["diag"])
        elif s == 0:  # the diagonal block on the local q, k, v (causal when causal)
            out, lse = attention_forward(q, k, v, softmax_scale=softmax_scale,
                                         causal=plan.causal, backend=backend["diag"])
            acc_out, acc_lse = out.to(acc_dtype(q.dtype)), lse.to(lse_dtype(q.dtype))
        else:
            forward_step(q, cur, plan.calls[s], unit, acc_out, acc_lse, hkv=hkv, d=d,
                         softmax_scale=softmax_scale, backend=backend, config=config,
                         side=side, parts=parts)
        if h is not None:
            h.wait()
            cur, nxt = nxt, cur
    if parts is not None:
        out, lse = parts.finish(q.dtype)
        return out, lse, cur
    side.join()  # the merges have run before the accumulators are read
    return acc_out.to(q.dtype), acc_lse, cur


def _backward(dout, dlse, q, k, v, out, lse, kv_last, plan, group, softmax_scale, kernels,
              config, side=None):
    """``side``: the :class:`SideStream` of the accumulation (None: ``config.overlap_merges``'s).
    """
    backend = kernels.bwd if dlse is None else kernels.bwd_dlse
    n, lk = plan.n, k.shape[1]
    b, hkv, d, dv = k.shape[0], k.shape[2], k.shape[3], v.shape[3]
    acc = acc_dtype(q.dtype)
    if side is None:
        side = SideStream(q.device, config.overlap_merges and n > 1)
    parts = DeferredDq(plan.calls[1:], q) if config.defer_dq and n > 1 else None
    dq = (torch.empty if parts is not None else torch.zeros)(q.shape, dtype=acc,
                                                               device=q.device)
    h_g = None
    if n > 1:
        unit = lk // plan.units
        # dK/dV accumulators: one is added to and sent back, the other receives the next one
        # (the first step writes every row of accs[0]: init_kv_grads)
        accs = [new_buffer(lk, b, hkv, d, dv, acc, k.device) for _ in range(2)]
        cur_acc = 0
        spare = [torch.empty_like(kv_last) for _ in range(2 if n > 2 else 0)]
        cur = kv_last  # saved by forward; never written (backward may run twice)
        for s in range(n - 1, 0, -1):
            h_kv = None
            if s > 1:  # bring back what this rank held at step s - 1 (not needed at step 0)
                nxt = spare[s % 2]
                h_kv = _post(plan.transfers[s - 1], cur, nxt, unit, group, reverse=True)
            grads = step_grads(dout, dlse, q, out, lse, cur, plan.calls[s], unit, hkv=hkv,
                               d=d, softmax_scale=softmax_scale, backend=backend,
                               config=config, dq_parts=parts)
            if h_g is not None:  # the accumulator of this content from the later steps
                h_g.wait()  # (posted on the side stream: this also joins it)
            accumulate_step(grads, dq, accs[cur_acc], unit, first=s == n - 1,
                            side=side, dq_parts=parts)
            h_g = side.post(functools.partial(_post, plan.transfers[s - 1], accs[cur_acc],
                                              accs[1 - cur_acc], unit, group, reverse=True))
            cur_acc = 1 - cur_acc
            if h_kv is not None:
                h_kv.wait()
                cur = nxt
        if parts is not None:  # queued before the step-0 kernel: it overlaps with it
            side.run(functools.partial(parts.sum_into, dq))
    dq0, dk0, dv0 = attention_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale,
                                       causal=plan.causal, dlse=dlse, backend=backend["diag"])
    side.join()  # dq is complete
    dq = finish_q_grads(dq, dq0, q.dtype)
    if h_g is None:
        return dq, dk0, dv0
    h_g.wait()
    dk, dv = finish_kv_grads(dk0, dv0, accs[cur_acc], plan.own_units, hkv=hkv, d=d,
                             dtypes=(k.dtype, v.dtype))
    return dq, dk, dv


class _HamiltonAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, softmax_scale, kernels, config):
        out, lse, kv_last = _forward(q, k, v, plan, group, softmax_scale, kernels, config)
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse, kv_last)
        ctx.args = (plan, group, softmax_scale, kernels, config)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_last = ctx.saved_tensors
        plan, group, softmax_scale, kernels, config = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        # no gradient through lse: the fast kernels (which take no dlse) serve the backward
        dlse = grad_lse_or_none(dlse)
        dq, dk, dv = _backward(dout.contiguous(), dlse, q, k, v, out, lse, kv_last, plan,
                               group, softmax_scale, kernels, config)
        return dq, dk, dv, None, None, None, None, None
