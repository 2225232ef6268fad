"""Single-GPU benchmark: the packed-document step sequence of each of ``n`` simulated ranks
against one varlen call over all the documents divided by ``n``.

    PYTHONPATH=common/src:reference/src:hamilton/src python hamilton/bench/bench_packed.py
    ... --smoke            # tiny configuration on the CPU (checks that the script works)
    ... --plan-only        # the default configuration's plans, counts and tile bounds (CPU)

Default: 8 ranks x 32,768 tokens (262,144 in all) of documents of 1,024 to 32,768 tokens
(drawn with a fixed seed), H = 32, D = 128, bf16, causal, schedule TASP.

What runs: exactly the compute ``hamilton_attn(..., cu_seqlens=)`` does on each rank, minus the
messages, on the buffers its plan receives (:func:`longattn.hamilton.make_packed_plan`): per
step one varlen call (:func:`longattn.hamilton.packed_attn.step_forward` /
``step_backward``: the keys gathered from the received rows), on each backend of
``--backends`` (default ``auto,cudnn``: the flash varlen op and the ragged cuDNN graphs).
Two variants: ``calls`` (the key gathers, the varlen calls and the gradient adds of each step)
and ``+merge`` (also the send-side gathers, the merges and the dK/dV rows that come back).
Every rank is timed. ``--schedule allgather``: each rank's compute with K/V all-gathered
(:func:`longattn.hamilton.packing.make_allgather_plan`, :mod:`longattn.hamilton.
packed_allgather`): the key gather and ONE varlen call forward, the backward's calls
(causal: each segment against its own rows, then unmasked against its document's keys
before it, gathered from what the real forward keeps); ``+merge`` adds the dK/dV index-add per
distinct key row that precedes the return to
the owners and the sum of what every rank returns (the rows the plans say) that follows it.
Several strategies (``--schedule tasp,allgather``) are checked and timed in one run, all
contenders alternated, their names tagged with the strategy.

The layout line is followed by each strategy's per-rank counts (the step schedule's, TASP's
with ``--schedule allgather``, and all-gather's): kernel calls, (segment, step) pairs with
keys, 128 x 128 (query, key) tiles and query rows in the calls (the plans' ``kernel_calls``,
``segment_steps``, ``tiles()`` and ``query_rows``), also in the JSON (``packed plan counts``),
so a GPU run can fit a rank's time to them; then each strategy's *tile bound*: the baseline's
tiles (one call over all the documents, the one-rank plan) / n over the worst rank's tiles, the
efficiency the rank would reach if every tile took the same time and segments cost nothing.

Baselines in the same run, alternated with the contenders, each one call over all the
documents divided by ``n``: the flash varlen op, and cuDNN's ragged graphs
(``common.kernels.varlen`` with ``backend="cudnn"``; not torch 2.11's own cuDNN varlen op,
whose backward computes wrong gradients, pytorch PR #186142). A baseline that fails, or whose
output or gradients disagree with the flash op's, is reported and left out. Efficiency =
(baseline ms / n) / the rank's ms.

Correctness first: a small packed problem, every rank simulated on the data it would receive
(forward and backward), against the float64 oracle with the document mask.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
import traceback

import torch

from longattn.common import bench
from longattn.common.merge import merge_partials_
from longattn.hamilton import HamiltonConfig, make_packed_plan, packed_layout
from longattn.hamilton.args import resolve_schedule
from longattn.hamilton.packed_allgather import (
    add_received,
    backward_calls,
    call_forward,
    key_grads,
    keys_of,
    own_part,
)
from longattn.hamilton.packed_attn import (
    _add_rows,
    kv_rows,
    split_rows,
    step_backward,
    step_forward,
)
from longattn.hamilton.packing import TILE, make_allgather_plan

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# correctness: every rank's steps on the rows it would receive, against the oracle


def _buffer(plans, kvs, x, s):
    """The KV rows rank ``x`` receives at step ``s`` (each origin's sends to ``x``, slot order)."""
    rows, used = [], {}
    for o, _, _ in plans[x].steps[s].recvs:
        mine = [idx for h, idx in plans[o].steps[s].sends if h == x]
        i = used.get(o, 0)
        used[o] = i + 1
        rows.append(kvs[o][torch.from_numpy(mine[i]).to(kvs[o].device)])
    return torch.cat(rows) if rows else kvs[x][:0]


def _origin_rows(plans, x, s):
    """``[(origin, local rows)]`` of what rank ``x`` receives at step ``s``, in buffer order."""
    out, used = [], {}
    for o, _, _ in plans[x].steps[s].recvs:
        mine = [idx for h, idx in plans[o].steps[s].sends if h == x]
        out.append((o, mine[used.get(o, 0)]))
        used[o] = used.get(o, 0) + 1
    return out


def simulate(plans, q, k, v, dout, scale, backend="auto"):
    """Every rank's out, lse, dq, dk, dv (local layouts) from the step functions alone."""
    n, hkv, d = len(plans), k.shape[2], k.shape[3]
    pos = [torch.from_numpy(plans[0].layout.positions(r)).to(q.device) for r in range(n)]
    loc = [[t[:, p] for t in (q, k, v, dout)] for p in pos]
    kvs = [kv_rows(lk[0], lv[0]) for _, lk, lv, _ in loc]
    res, dks, dvs = [], [], []
    for x in range(n):
        q0, k0, v0, do0 = (t[0] for t in loc[x])
        o, l = step_forward(q0, k0, v0, plans[x].steps[0].call,
                            plans[x].call_tensors(0, q.device), softmax_scale=scale,
                            backend=backend)
        acc_o, acc_l = o.float()[None], l.float()[None]
        for s in range(1, n):
            call = plans[x].steps[s].call
            if call is not None:
                kk, vv = split_rows(_buffer(plans, kvs, x, s), hkv, d)
                o, l = step_forward(q0, kk, vv, call, plans[x].call_tensors(s, q.device),
                                    softmax_scale=scale, backend=backend)
                merge_partials_(acc_o[:, call.r0:call.r1], acc_l[:, :, call.r0:call.r1],
                                o[None], l[None])
        res.append((acc_o.to(q.dtype)[0], acc_l[0]))
        dks.append(torch.zeros(k0.shape, device=q.device))
        dvs.append(torch.zeros(v0.shape, device=q.device))
    dqs = []
    for x in range(n):
        q0, k0, v0, do0 = (t[0] for t in loc[x])
        out0, lse0 = res[x]
        dq = torch.zeros(q0.shape, device=q.device)
        step_backward(do0, None, q0, out0, lse0, k0, v0, plans[x].steps[0].call,
                      plans[x].call_tensors(0, q.device), dq, dks[x], dvs[x],
                      softmax_scale=scale, backend=backend)
        for s in range(1, n):
            call = plans[x].steps[s].call
            if call is None:
                continue
            buf = _buffer(plans, kvs, x, s)
            dkv = torch.zeros(buf.shape, device=q.device)
            kk, vv = split_rows(buf, hkv, d)
            gk, gv = split_rows(dkv, hkv, d)
            step_backward(do0, None, q0, out0, lse0, kk, vv, call,
                          plans[x].call_tensors(s, q.device), dq, gk, gv,
                          softmax_scale=scale, backend=backend)
            off = 0
            for o, idx in _origin_rows(plans, x, s):
                _add_rows(dks[o], dvs[o], dkv[off:off + len(idx)],
                          torch.from_numpy(idx).to(q.device), hkv, d)
                off += len(idx)
        dqs.append(dq)
    return pos, res, dqs, dks, dvs


def simulate_allgather(plans, q, k, v, dout, scale, backend="auto"):
    """Every rank's out, lse, dq, dk, dv (local layouts) from the all-gather plans' calls: each
    rank's gathered rows (those its keys come from, out of every rank's rows in origin order),
    its one forward and one backward call, the dK/dV of every rank's gathered rows returned to
    their owners and summed there."""
    n, hkv, d = len(plans), k.shape[2], k.shape[3]
    pos = [torch.from_numpy(plans[0].layout.positions(r)).to(q.device) for r in range(n)]
    loc = [[t[0, p] for t in (q, k, v, dout)] for p in pos]
    buf = torch.cat([kv_rows(lk, lv) for _, lk, lv, _ in loc])
    res, dqs, dbufs = [], [], []
    per = buf.shape[0] // n
    for x, plan in enumerate(plans):
        q0, k0, v0, do0 = loc[x]
        seen = torch.cat([torch.from_numpy(r + p * per) for p, r in enumerate(plan.rows_from)])
        mine = buf.index_select(0, seen.to(q.device))
        kg, vg = keys_of(mine, plan, hkv, d, q.device)
        o, l = call_forward(q0, kg, vg, plan, softmax_scale=scale, backend=backend)
        res.append((o, l))
        dq, diag, keyed = backward_calls(do0, None, q0, k0, v0, (mine,), o, l, plan,
                                         softmax_scale=scale, backend=backend)
        dqs.append(dq)
        dbufs.append(key_grads(diag, keyed, plan, buf.shape[1]))
    offs = [p.route_tensors(q.device)[1] for p in plans]
    own = []
    for r, plan in enumerate(plans):  # what each owner receives from every rank, summed
        parts = [own_part(dbufs[x][1], plan) if x == r else
                 dbufs[x][1][offs[x][r]:offs[x][r + 1]] for x in range(n)]
        acc = dbufs[r][0]
        if acc is None:
            acc = torch.zeros(per, buf.shape[1], dtype=dbufs[r][1].dtype, device=q.device)
        own.append(split_rows(add_received(acc, parts, plan), hkv, d))
    return pos, res, dqs, [dk for dk, _ in own], [dv for _, dv in own]


def check(device, dtype, n, lens, heads, dim, causal, sched_name, backend="auto"):
    """Relative errors (global) of the simulated n-rank run against the float64 oracle."""
    from longattn.common.testing import rel_error
    from longattn.reference import attention, attention_backward, document_mask

    cu, total = bench.cu_seqlens(lens), sum(lens)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, total, heads, dim, generator=g).to(dtype) for _ in range(4))
    scale = dim ** -0.5
    args = [t.to(device) for t in (q, k, v, dout)]
    if sched_name == "allgather":
        plans = [make_allgather_plan(cu, n, r, causal) for r in range(n)]
        pos, res, dqs, dks, dvs = simulate_allgather(plans, *args, scale, backend)
    else:
        sched = resolve_schedule(sched_name, n, total // n, causal, packed=True)
        plans = [make_packed_plan(cu, n, r, causal, sched) for r in range(n)]
        pos, res, dqs, dks, dvs = simulate(plans, *args, scale, backend)
    mask = document_mask(cu.numpy(), causal=causal)
    args = [t.double().numpy() for t in (q, k, v)]
    ref_out, ref_lse = attention(*args, mask=mask)
    ref_g = attention_backward(dout.double().numpy(), *args, mask=mask)

    def glob(parts, axis=0):
        shape = list(parts[0].shape)
        shape[axis] = total
        full = torch.empty(shape, dtype=torch.float64)
        for p, t in zip(pos, parts):
            full.index_copy_(axis, p.cpu(), t.double().cpu())
        return full

    return {"out": rel_error(glob([o for o, _ in res]), ref_out[0]),
            "lse": rel_error(glob([lse for _, lse in res], 1), ref_lse[0]),
            "dq": rel_error(glob(dqs), ref_g[0][0]), "dk": rel_error(glob(dks), ref_g[1][0]),
            "dv": rel_error(glob(dvs), ref_g[2][0])}


# ---------------------------------------------------------------------------------------------
# timing


class Pool:
    """The tensors every rank's closures share: one buffer per (name, row shape, dtype), of
    random values (``rand``) or zeros (``zeros``), each request a view of its first ``rows``
    rows (the buffer grows when a request is larger); ``keep`` copies a tensor into one.

    Every rank's closures (``n`` ranks x strategies x backends) are alive together, as the
    timings alternate them; with a tensor of their own each, 32 heads did not fit an H100's
    80 GB. The closures run one at a time, their tensors are far larger than the GPU's caches
    and their values are random either way, so sharing changes no time: one rank's tensors
    per name instead of one per closure."""

    def __init__(self, device, seed=0):
        self.device, self.bufs = device, {}
        self.g = torch.Generator(device=device).manual_seed(seed)

    def _view(self, kind, name, rows, tail, dtype):
        key = (kind, name, tuple(tail), dtype)
        b = self.bufs.get(key)
        if b is None or b.shape[0] < rows:
            shape = (max(rows, 0 if b is None else b.shape[0] * 3 // 2),) + tuple(tail)
            b = (torch.zeros(shape, device=self.device, dtype=dtype) if kind == "zeros" else
                 torch.randn(shape, generator=self.g, device=self.device).to(dtype))
            self.bufs[key] = b
        return b[:rows]

    def rand(self, name, rows, *tail, dtype):
        return self._view("rand", name, rows, tail, dtype)

    def zeros(self, name, rows, *tail, dtype):
        return self._view("zeros", name, rows, tail, dtype)

    def keep(self, name, t):
        return self._view("keep", name, t.shape[0], t.shape[1:], t.dtype).copy_(t)


def rank_sequences(device, dtype, plan, heads, dim, config, backend="auto", pool=None):
    """``{mode: (fwd, fwd_bwd)}`` closures of one rank's compute, ``mode`` ``calls`` (gathers,
    varlen calls and the gradient adds of ``step_backward``) or ``+merge`` (also the send-side
    gathers, the merges and the dK/dV rows that come back); both share the tensors, taken from
    ``pool`` (a :class:`Pool`; default: one of their own)."""
    n, per, width = plan.n, plan.layout.total // plan.n, 2 * heads * dim
    pool = Pool(device, plan.rank) if pool is None else pool
    q0, k0, v0, do0 = (pool.rand(x, per, heads, dim, dtype=dtype) for x in ("q", "k", "v", "do"))
    kv = pool.keep("kv", kv_rows(k0, v0))
    # the rows each step receives, and the dK/dV rows that come back: read only, one buffer
    bufs = {s: pool.rand("buf", plan.steps[s].rows, width, dtype=dtype) for s in range(1, n)}
    tens = {s: plan.call_tensors(s, device) for s in range(n) if plan.steps[s].call}
    sends = {(s, i): plan.send_index(s, i, device) for s in range(1, n)
             for i in range(len(plan.steps[s].sends))}
    back = {key: pool.rand("back", len(idx), width, dtype=torch.float32)
            for key, idx in sends.items()}
    scale = dim ** -0.5
    merge = functools.partial(merge_partials_, backend=config.merge_backend)

    def fwd(full):
        if full:
            for idx in sends.values():
                kv.index_select(0, idx)
        o, l = step_forward(q0, k0, v0, plan.steps[0].call, tens[0], softmax_scale=scale,
                            backend=backend)
        acc_o, acc_l = o.float()[None], l.float()[None]
        for s in range(1, n):
            call = plan.steps[s].call
            if call is not None:
                kk, vv = split_rows(bufs[s], heads, dim)
                o, l = step_forward(q0, kk, vv, call, tens[s], softmax_scale=scale,
                                    backend=backend)
                if full:
                    merge(acc_o[:, call.r0:call.r1], acc_l[:, :, call.r0:call.r1], o[None],
                          l[None])
        return acc_o[0].to(dtype), acc_l[0]

    out0, lse0 = (pool.keep(x, t) for x, t in zip(("out", "lse"), fwd(True)))
    dq, dk, dv = (pool.zeros(x, per, heads, dim, dtype=torch.float32)
                  for x in ("dq", "dk", "dv"))

    def bwd(full):
        for s in range(n - 1, 0, -1):
            call = plan.steps[s].call
            if call is None:
                continue
            dkv = torch.zeros(bufs[s].shape, device=device)
            kk, vv = split_rows(bufs[s], heads, dim)
            gk, gv = split_rows(dkv, heads, dim)
            step_backward(do0, None, q0, out0, lse0, kk, vv, call, tens[s], dq, gk, gv,
                          softmax_scale=scale, backend=backend)
            if full:
                for i in range(len(plan.steps[s].sends)):
                    _add_rows(dk, dv, back[(s, i)], sends[(s, i)], heads, dim)
        step_backward(do0, None, q0, out0, lse0, k0, v0, plan.steps[0].call, tens[0], dq, dk,
                      dv, softmax_scale=scale, backend=backend)

    def both(full):
        fwd(full)
        bwd(full)

    return {mode: (functools.partial(fwd, full), functools.partial(both, full))
            for mode, full in (("calls", False), ("+merge", True))}


def allgather_sequences(device, dtype, plan, heads, dim, backend="auto", pool=None):
    """``{mode: (fwd, fwd_bwd)}`` closures of one rank's compute with K/V all-gathered:
    ``calls`` (the key gather and the forward call; the backward's calls,
    :func:`~longattn.hamilton.packed_allgather.backward_calls`: causal, each segment against
    its own rows and, unmasked, against the keys before them, gathered again from what the
    real forward keeps) or ``+merge`` (also the dK/dV index-add per distinct key row and the
    sum of what every rank returns to this one onto its own rows' gradients: its own rows of
    that buffer and, for the others, random rows of the sizes the plans give); both share the
    tensors, taken from ``pool`` (a :class:`Pool`; default: one of their own), the rank's
    gathered rows (those its keys come from) among them."""
    n, per, width = plan.n, plan.rows, 2 * heads * dim
    pool = Pool(device, plan.rank) if pool is None else pool
    off = plan.route_tensors(device)[1]
    buf = pool.rand("gathered", off[-1], width, dtype=dtype)  # the rows the rank's keys use
    q0, k0, v0, do0 = (pool.rand(x, per, heads, dim, dtype=dtype) for x in ("q", "k", "v", "do"))
    scale = dim ** -0.5
    plan.tensors(device)
    if plan.causal:
        plan.past_tensors(device)
    # what the exchange brings from each rank (read only: one buffer)
    recv = [pool.rand("recv", len(r), width, dtype=torch.float32) for r in plan.rows_to]

    def fwd():
        kg, vg = keys_of(buf, plan, heads, dim, device)
        return call_forward(q0, kg, vg, plan, softmax_scale=scale, backend=backend), (kg, vg)

    (out0, lse0), kept = fwd()
    out0, lse0 = pool.keep("out", out0), pool.keep("lse", lse0)
    # what the real forward keeps for the backward: the smaller of the two
    kept = (pool.keep("kept_k", kept[0]), pool.keep("kept_v", kept[1])) \
        if plan.keys <= off[-1] else (buf,)

    def bwd(full):
        _, diag, keyed = backward_calls(do0, None, q0, k0, v0, kept, out0, lse0, plan,
                                        softmax_scale=scale, backend=backend)
        if full:  # this rank's rows of the buffer, and the other ranks' rows it receives
            own, dbuf = key_grads(diag, keyed, plan, width)
            if own is None:
                own = torch.zeros(per, width, dtype=dbuf.dtype, device=device)
            add_received(own, [own_part(dbuf, plan) if q == plan.rank else recv[q]
                               for q in range(n)], plan)

    def both(full):
        fwd()
        bwd(full)

    return {mode: (fwd, functools.partial(both, full))
            for mode, full in (("calls", False), ("+merge", True))}


def plan_counts(plan):
    """The counts of a plan that predict its time (module docstring)."""
    return {"kernel_calls": plan.kernel_calls, "segment_steps": plan.segment_steps,
            f"tiles{TILE}": plan.tiles(), "query_rows": plan.query_rows}


def _varlen_inputs(device, dtype, total, heads, dim, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(total, heads, dim, generator=g, device=device).to(dtype)
            for _ in range(4)]


def flash_varlen(q, k, v, cu, m, causal):
    """One call of the flash varlen op (``aten._flash_attention_forward``) over every doc."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, m, m, 0.0, causal, False)[0]


def cudnn_varlen(q, k, v, cu, m, causal):
    """One call of cuDNN's ragged (THD) graphs over every doc, through
    ``common.kernels.varlen`` (``backend="cudnn"``). Not torch's own
    ``aten._cudnn_attention_forward`` with ``cum_seq``: its backward sizes cuDNN's dQ
    accumulator by the head dim instead of the longest sequence (pytorch PR #186142) and
    returns wrong gradients, so its time is not that of the work."""
    from longattn.common.kernels.varlen import attention_varlen

    return attention_varlen(q, k, v, cu, causal=causal, backend="cudnn")


def _cpu_varlen(q, k, v, cu, m, causal):
    from longattn.common.kernels.varlen import attention_varlen

    return attention_varlen(q, k, v, cu.cpu(), causal=causal)


def baselines(device, dtype, lens, heads, dim, causal):
    """{(name, direction): fn} over every document at once (on the CPU: the varlen loop); a
    baseline that fails, or whose output or gradients disagree with the first one's, is
    reported and left out."""
    cu, m = bench.cu_seqlens(lens, device), max(lens)
    q, k, v, do = _varlen_inputs(device, dtype, sum(lens), heads, dim)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    ops = ({"flash varlen": flash_varlen, "cudnn varlen": cudnn_varlen}
           if device.type == "cuda" else {"varlen(torch)": _cpu_varlen})
    out, ref = {}, None
    for name, op in ops.items():
        def fwd(op=op):
            return op(q, k, v, cu, m, causal)

        def fwd_bwd(op=op):
            for t in (qg, kg, vg):
                t.grad = None
            op(qg, kg, vg, cu, m, causal).backward(do)

        try:
            got = [fwd()]
            fwd_bwd()
            got += [t.grad.clone() for t in (qg, kg, vg)]
            ref = got if ref is None else ref
            for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
                if not torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2):
                    raise RuntimeError(f"{name}: {what} disagrees with {next(iter(ops))}")
            out[(name, "fwd")] = fwd
            out[(name, "fwd+bwd")] = fwd_bwd
        except Exception:  # noqa: BLE001 - a failed baseline is reported, the others still run
            print(f"baseline {name} failed:\n" + traceback.format_exc(), file=sys.stderr)
    return out


STRATEGIES = ("ring", "tasp", "allgather")


def _parse(argv):
    p = bench.simulated_ranks_parser(__doc__, tokens=32768)
    p.add_argument("--min-doc", type=int, default=1024)
    p.add_argument("--max-doc", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    p.add_argument("--full", action="store_true", help="full attention inside the documents")
    p.add_argument("--schedule", default="tasp",
                   help="ring, tasp or allgather, or several comma-separated (e.g. "
                        "tasp,allgather): each is checked and timed, all alternated in one run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--merge-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--plan-only", action="store_true",
                   help="only the layout, the plans' counts and tile bounds (no GPU needed): "
                        "printed and written as the JSON")
    p.add_argument("--backends", default="auto,cudnn",
                   help="the steps' varlen backends, comma-separated (auto: the flash op on "
                        "CUDA; cudnn: the ragged cuDNN graphs); each is timed")
    a = p.parse_args(argv)
    a.backends = [b for b in a.backends.split(",") if b]
    a.schedules = list(dict.fromkeys(x for x in a.schedule.split(",") if x))
    bad = [x for x in a.schedules if x not in STRATEGIES]
    if bad or not a.schedules:
        p.error(f"--schedule: each of {STRATEGIES}, comma-separated; got {a.schedule!r}")
    if a.smoke:
        a.ranks, a.tokens, a.min_doc, a.max_doc = 4, 48, 1, 40
        a.heads, a.dim, a.rounds, a.backends = 2, 16, 1, ["auto"]
    elif not torch.cuda.is_available() and not a.plan_only:
        p.error("no CUDA device; use --smoke or --plan-only on the CPU")
    return a


def _time_all(contenders, device, rounds):
    """Median ms per (name, direction), the contenders alternated round by round."""
    times = {}
    for direction in ("fwd", "fwd+bwd"):
        fns = {name: fn for (name, d), fn in contenders.items() if d == direction}
        per = {name: [] for name in fns}
        order = [(r, name) for r in range(rounds) for name in fns]
        for _, name in bench.progress(order, desc=f"timing {direction}"):
            per[name].append(bench.time_fn(fns[name], device=device))
        times.update({(name, direction): statistics.median(ts) for name, ts in per.items()})
    return times


def _rows(times, base_names, n, effs):
    """Table rows; ``effs[(direction, mode)]`` collects the ranks' rows."""
    rows = []
    for (name, direction), ms in sorted(times.items(), key=lambda x: (x[0][1], x[0][0])):
        row = {"contender": name, "dir": direction, "ms": ms}
        for b in base_names:
            dense = times.get((b, direction))
            row[f"eff vs {b}/n"] = (None if dense is None or name in base_names
                                    else dense / n / ms)
        rows.append(row)
        if name not in base_names:
            effs.setdefault((direction, name.split(" ", 1)[1]), []).append(row)
    return rows


def main(argv=None):
    a = _parse(argv)
    device = torch.device("cpu" if a.smoke or a.plan_only else "cuda")
    dtype, n, causal = torch.bfloat16, a.ranks, not a.full
    out_dir = bench.out_dir(os.path.join(HERE, "results"), a.out)
    lens = bench.draw_documents(n * a.tokens, a.min_doc, a.max_doc, a.seed)
    cu = bench.cu_seqlens(lens)
    lay = packed_layout(cu, n, causal)
    steps = [x for x in a.schedules if x != "allgather"] or ["tasp"]
    scheds = {x: resolve_schedule(x, n, a.tokens, causal, packed=True) for x in steps}
    step_plans = {x: [make_packed_plan(cu, n, r, causal, sc) for r in range(n)]
                  for x, sc in scheds.items()}
    ag_plans = [make_allgather_plan(cu, n, r, causal) for r in range(n)]
    plans = {x: ag_plans if x == "allgather" else step_plans[x] for x in a.schedules}
    names = {x: "allgather" if x == "allgather" else scheds[x].name for x in a.schedules}
    config = HamiltonConfig(merge_backend=a.merge_backend)
    print(f"device: {bench.device_name(device)}; torch {torch.__version__}; {n} ranks x "
          f"{a.tokens} tokens, {len(lens)} documents of {min(lens)}..{max(lens)} tokens, "
          f"H={a.heads}, D={a.dim}, bf16, {'causal' if causal else 'full'}, schedule "
          + ", ".join(names.values()))
    print(f"layout: {lay.chunks_per_rank} chunks of {lay.chunk} tokens per rank, work "
          f"imbalance {lay.imbalance:.3f}; per rank ({scheds[steps[0]].name}): " + ", ".join(
              f"r{p.rank} {p.kernel_calls} calls/{p.blocks_skipped} skipped"
              for p in step_plans[steps[0]]))
    counts = {}
    for label, ps in [(scheds[x].name, step_plans[x]) for x in steps] + [("allgather",
                                                                          ag_plans)]:
        counts[label] = [plan_counts(p) for p in ps]
        print(f"  {label} per rank (calls/(segment, step) pairs with keys/{TILE}x{TILE} tiles/"
              "query rows): " + ", ".join(f"r{p.rank} " + "/".join(str(x) for x in c.values())
                                          for p, c in zip(ps, counts[label])))
    # the bound the tiles alone set: the baseline's tiles (one call over all documents: the
    # one-rank plan) / n over the rank's; time per tile equal, per-segment costs left out
    base_tiles = make_allgather_plan(cu, 1, 0, causal).tiles()
    bounds = {label: min(base_tiles / n / c[f"tiles{TILE}"] for c in cs)
              for label, cs in counts.items()}
    print(f"  tile bound (baseline's {base_tiles} tiles / {n} over the rank's), worst rank: "
          + ", ".join(f"{label} {b:.3f}" for label, b in bounds.items()))
    results, t0 = [bench.result("hamilton", "packed plan counts", median_ms=None,
                                device=device, dtype=dtype, counts=counts,
                                baseline_tiles=base_tiles, tile_bounds=bounds,
                                documents=lens, causal=causal)], time.time()
    if a.plan_only:
        path = bench.write_results(results, os.path.join(out_dir, "bench_packed.json"))
        print(f"wrote {path}")
        return results
    small = bench.draw_documents(n * (48 if a.smoke else 256), 1 if a.smoke else 16,
                           40 if a.smoke else 512, a.seed)
    several = len(a.schedules) > 1

    def stag(x):  # a strategy's tag in names, when several run
        return f" {names[x]}" if several else ""

    for x in a.schedules:
        for backend in a.backends:
            errs = check(device, dtype, n, small, 2 if a.smoke else 4, a.dim, causal, x,
                         backend)
            ok = max(errs.values()) <= 2e-2
            print(f"correctness ({n} ranks simulated, {names[x]}, calls on {backend}, bf16 vs "
                  "float64 oracle): " + ", ".join(f"{key} {val:.2e}" for key, val in errs.items())
                  + ("  OK" if ok else "  FAILED"))
            results.append(bench.result("hamilton", f"packed correctness [{backend}]{stag(x)}",
                                        median_ms=None, device=device, dtype=dtype,
                                        errors=errs, ok=ok, schedule=names[x]))
    contenders = baselines(device, dtype, lens, a.heads, a.dim, causal)
    base_names = sorted({name for name, _ in contenders})
    pool, strategy_of = Pool(device), {}
    for x in a.schedules:
        for plan in bench.progress(plans[x], desc=f"rank sequences {names[x]}"):
            for backend in a.backends:
                tag = stag(x) + ("" if len(a.backends) == 1 else f" [{backend}]")
                seqs = (allgather_sequences(device, dtype, plan, a.heads, a.dim, backend, pool)
                        if x == "allgather" else
                        rank_sequences(device, dtype, plan, a.heads, a.dim, config, backend,
                                       pool))
                for mode, (f, fb) in seqs.items():
                    fb()  # warm-up outside the timings
                    label = f"rank{plan.rank} {mode}{tag}"
                    contenders[(label, "fwd")] = f
                    contenders[(label, "fwd+bwd")] = fb
                    strategy_of[label] = names[x]
    times = _time_all(contenders, device, a.rounds)
    effs = {}
    rows = _rows(times, base_names, n, effs)
    print(bench.format_table(rows))
    shape = {"ranks": n, "tokens_per_rank": a.tokens, "heads": a.heads, "head_dim": a.dim,
             "documents": lens, "causal": causal}
    for row in rows:
        results.append(bench.result("hamilton", f"packed {row['dir']} {row['contender']}",
                                    median_ms=row["ms"], device=device, dtype=dtype, shape=shape,
                                    schedule=strategy_of.get(row["contender"]),
                                    chunks_per_rank=lay.chunks_per_rank,
                                    imbalance=lay.imbalance,
                                    **{k: v for k, v in row.items() if k.startswith("eff")}))
    for (direction, mode), rs in sorted(effs.items()):
        for b in base_names:
            e = [r[f"eff vs {b}/n"] for r in rs if r[f"eff vs {b}/n"] is not None]
            if e:
                print(f"efficiency {direction:8s} {mode:17s} vs {b} / {n}: worst rank "
                      f"{min(e):.3f}, best {max(e):.3f}")
    path = bench.write_results(results, os.path.join(out_dir, "bench_packed.json"))
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
