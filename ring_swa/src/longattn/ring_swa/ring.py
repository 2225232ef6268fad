"""Ring sliding-window attention on a contiguous layout: argument agreement, forward, backward.

Each rank computes its diagonal block (window plus local sinks) while the keys it needs from
earlier ranks arrive -- exactly those of :mod:`longattn.ring_swa.plan`, straight from the rank
that holds them, in one batch of point-to-point messages. With equal chunks of M tokens and no
sinks that is ``C = min(ceil(w / M), n - 1)`` earlier ranks, the farthest one sending only the
``w - (C - 1) M`` tokens the window reaches. Then the first local sequence's queries attend to

* the halo (window keys of earlier ranks): only its first ``min(len, w)`` queries can see it,
  with the window ``(w - Lq, -1)`` in bottom-right coordinates, and
* the remote sinks (that sequence's first tokens held by earlier ranks): seen by all of them,

and the partials are merged into the diagonal block's rows with ``merge_partials_``.

Backward runs the same calls with the final ``out`` / ``lse`` (exact ring rule): the dK/dV of
the received keys go straight back to their owners, which add them to their own gradients.
Received keys are kept for the backward instead of being fetched again: that costs the memory
of ``<= w + ns`` tokens of K/V per rank and halves the backward's traffic.

Before anything moves, :func:`check_call` runs every argument check inside
:func:`longattn.common.dist.agree`: one all-gather of a small int64 row per rank, after which
every rank raises the same error if any rank's arguments were bad or the ranks disagree.

Numerics: ``out`` partials are merged and gradients summed in
:func:`longattn.common.dtypes.acc_dtype` (float32, float64 for float64 inputs); every ``lse``
(the local step's, the merge accumulators, the returned one, the one the backward reads) is in
:func:`longattn.common.dtypes.lse_dtype` (float64 for float32 and float64 inputs, float32 for
fp16 / bf16), so merging the halo / sink partials of float32 inputs with logits near 1e4 stays
at float32 accuracy. dK/dV partials travel in the dtype of k / v. A NaN in
any key a query sees makes that query's row NaN (the merges keep NaN).
"""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass

import torch

from longattn.common.checks import (
    check_bool,
    check_cu_seqlens,
    check_qkv,
    check_scale,
    check_window,
)
from longattn.common.comm import exchange
from longattn.common.dist import Group, agree, resolve_group
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import attention_backward, attention_forward, pick_backend
from longattn.common.merge import merge_partials_
from longattn.ring_swa import local
from longattn.ring_swa.plan import RankPlan, make_plan


@dataclass(frozen=True)
class SeedArgs:
    """What the seed-compatible functions add to a call: their explicit rank arguments (checked
    against the group when given), an integer ``window_size`` and the least sink count."""

    cp_size: object = None
    cp_local_rank: object = None
    cp_prev_global_rank: object = None
    cp_next_global_rank: object = None
    min_sinks: int = 0


@dataclass(frozen=True)
class Setup:
    """Everything a call needs after its arguments were agreed on every rank."""

    group: Group
    plan: RankPlan
    window: int  # the plan's window w: keys [i - w, i]; the total token count when unbounded
    kernel_left: int  # the left window size given to the kernels (-1: unbounded)
    num_sink_tokens: int
    softmax_scale: float
    varlen: bool
    backend: str


# --------------------------------------------------------------------------------------------
# argument checks, inside the agreement (every rank raises the same error, nobody hangs)


def _int_arg(name, value, minimum):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _last(cu):
    if isinstance(cu, torch.Tensor) and cu.ndim == 1 and cu.numel() >= 1:
        return int(cu[-1])
    return -1


def _digest(values) -> int:
    return zlib.crc32(struct.pack(f"<{len(values)}q", *values))


def _check_seed_ranks(seed: SeedArgs, g: Group):
    """The seed's explicit rank arguments must describe the group (chunk i on group rank i)."""
    for name, val, want, what in (
            ("cp_size", seed.cp_size, g.size, f"the cp_group has {g.size} rank(s)"),
            ("cp_local_rank", seed.cp_local_rank, g.rank,
             f"this process is rank {g.rank} of the cp_group")):
        if val is not None and _int_arg(name, val, 0) != want:
            raise ValueError(f"{name}={val!r} but {what}")
    for name, val, peer in (("cp_prev_global_rank", seed.cp_prev_global_rank,
                             (g.rank - 1) % g.size),
                            ("cp_next_global_rank", seed.cp_next_global_rank,
                             (g.rank + 1) % g.size)):
        if val is None:
            continue
        want = g.global_rank(peer)
        if _int_arg(name, val, 0) != want:
            raise ValueError(f"{name}={val!r} but group rank {peer} is global rank {want} "
                             "(chunk i must live on group rank i)")


def _window(window_size, causal, seed):
    """(left, 0): the causal window; ``left = -1`` is unbounded (plain causal attention)."""
    if seed is not None:  # the seed's integer window w = flash-attn's (w, 0), causal
        return _int_arg("window_size", window_size, 0), 0
    if window_size is None:  # check_window would read None as unbounded: say it explicitly
        raise TypeError("window_size must be a (left, right) pair of ints (-1 = unbounded), "
                        "got None")
    left, right = check_window(window_size, "window_size")
    if not causal and right != 0:
        raise ValueError(
            f"window_size={window_size!r} with causal=False: ring_swa computes causal windows "
            "only (each query sees keys at or before it): pass causal=True, or window_size="
            "(left, 0)")
    return left, 0  # causal caps right at 0 (flash-attn's rule)


def _resolve_backend(q4, k4, v4, left, backend):
    """Raise here (inside the agreement) if ``backend`` cannot serve this rank's own causal
    window block (e.g. a CUDA kernel for CPU tensors, a dtype or head_dim it does not take).
    The steps whose shapes depend on the plan are checked by :func:`_check_steps`."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str (a backend name or 'auto'), got {backend!r}")
    if q4.shape[1] == 0:
        return  # this rank computes nothing
    pick_backend(q4, k4, v4, causal=True, window_size=(left, 0), backend=backend)


def _halo_window(window, kernel_left, lq):
    """The halo step's window in bottom-right coordinates (its keys end where q starts)."""
    return (-1, -1) if kernel_left == -1 else (window - lq, -1)


def _steps(plan: RankPlan, varlen, window, kernel_left):
    """``(step, Sq, Sk, causal, window_size)`` of every kernel call ``plan``'s rank makes (the
    backward makes the same calls). Varlen sink parts run in the varlen kernel's own code."""
    own = (kernel_left, 0)
    steps = []
    if varlen:
        for (a, b), ns in zip(zip(plan.local_cu, plan.local_cu[1:]), plan.local_sinks):
            if b - a > ns:
                steps.append(("own block", b - a, b - a - ns, True, own))
    elif plan.length:
        s, ns = plan.length, min(plan.local_sinks[0], plan.length)
        if ns:
            steps.append(("own sinks", s, ns, False, (-1, s - ns)))
        if ns < s:
            steps.append(("own block", s, s - ns, True, own))
    if plan.num_halo:
        lq = min(plan.first_len, window)
        steps.append(("halo", lq, plan.num_halo, False, _halo_window(window, kernel_left, lq)))
    if plan.num_remote_sinks:
        steps.append(("remote sinks", plan.first_len, plan.num_remote_sinks, False, (-1, -1)))
    return steps


def _like(x, b, s):
    """A ``[b, s, H, D]`` view of one row of storage: what ``supports`` reads (shape, dtype,
    device, a unit last stride) without allocating the step's tensor."""
    h, d = x.shape[-2], x.shape[-1]
    return x.new_empty(max(d, 1)).as_strided((b, s, h, d), (0, 0, 0, 1))


def _check_steps(op, plans, q, k, v, *, varlen, window, kernel_left, backend):
    """An explicit ``backend`` must serve every step of every rank. Decided from values every
    rank agreed on (shapes, dtype, device type, the plans), so every rank raises the same error
    before any K/V moves; ``"auto"`` always has a backend for every step."""
    if backend == "auto":
        return
    b = 1 if varlen else q.shape[0]
    for p in plans:
        for step, sq, sk, causal, win in _steps(p, varlen, window, kernel_left):
            try:
                pick_backend(_like(q, b, sq), _like(k, b, sk), _like(v, b, sk), causal=causal,
                             window_size=win, backend=backend)
            except ValueError as e:
                raise ValueError(f"{op}: {e} (the {step} step of rank {p.rank}: {sq} queries, "
                                 f"{sk} keys, window_size={win}, causal={causal})") from None


def check_call(q, k, v, *, op, varlen, window_size, group, causal, softmax_scale, cu_seqlens,
               num_sink_tokens, return_lse, backend, seed: SeedArgs | None = None) -> Setup:
    """Check the arguments on every rank (:func:`longattn.common.dist.agree`: one all-gather
    of ints) and build this rank's plan. A bad argument on any rank raises the same error on
    every rank before any K/V moves."""
    g = resolve_group(group, name="group" if seed is None else "cp_group")

    def check():
        if seed is not None:
            _check_seed_ranks(seed, g)
        check_qkv(q, k, v, varlen=varlen)
        t = 0 if varlen else 1
        if q.shape[t] != k.shape[t]:
            raise ValueError(f"q and k must hold the same tokens (self-attention): q has "
                             f"{q.shape[t]}, k has {k.shape[t]}")
        check_bool("causal", causal)
        check_bool("return_lse", return_lse)
        left, right = _window(window_size, causal, seed)
        ns = _int_arg("num_sink_tokens", num_sink_tokens,
                      seed.min_sinks if seed is not None else 0)
        scale = check_scale(softmax_scale, q.shape[-1])
        cu = check_cu_seqlens(cu_seqlens, _last(cu_seqlens)) if varlen else None
        q4, k4, v4 = (x.unsqueeze(0) for x in (q, k, v)) if varlen else (q, k, v)
        _resolve_backend(q4, k4, v4, left, backend)
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        fields = {
            # varlen ranks may hold different token counts ("tokens" varies)
            "q.shape": tuple(q.shape[1:] if varlen else q.shape),
            "k.shape": tuple(k.shape[1:] if varlen else k.shape),
            "v.shape": tuple(v.shape[1:] if varlen else v.shape),
            "tokens": q4.shape[1],
            "dtype": q.dtype,
            "q.device.type": q.device.type,
            "window_size": (left, right),
            "causal": causal,
            "num_sink_tokens": ns,
            "softmax_scale": scale,
            "cu_seqlens": (len(cu), _digest(cu)) if varlen else None,
            "return_lse": return_lse,
            "backend": backend,
            "needs grad": needs_grad,
        }
        return (left, ns, scale, cu), fields

    (left, ns, scale, cu), views = agree(op, g, check, vary=("tokens",) if varlen else ())
    if varlen:
        counts = views["tokens"]
    else:
        counts = [q.shape[1]] * g.size
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    total = offsets[-1]
    if varlen:
        if cu[-1] != total:  # every rank holds the same cu_seqlens and counts: raised everywhere
            raise ValueError(f"{op}: cu_seqlens must end at the total token count over the "
                             f"group (sum of q.shape[0] = {total}, per rank {counts}), got "
                             f"{cu[-1]}")
    else:
        cu = [0, total]
    unbounded = left == -1 or left >= total  # as wide as the sequence: plain causal attention
    w, kernel_left = (total, -1) if unbounded else (left, left)
    plans = make_plan(offsets, cu, w, ns)
    _check_steps(op, plans, q, k, v, varlen=varlen, window=w, kernel_left=kernel_left,
                 backend=backend)
    return Setup(g, plans[g.rank], w, kernel_left, ns, scale, varlen, backend)


# --------------------------------------------------------------------------------------------
# forward / backward


def _slices(x, plan, intervals):
    return [x[:, lo - plan.start: hi - plan.start] for lo, hi in intervals]


def _pack(a, b):
    return torch.cat([a.reshape(-1), b.reshape(-1)])


def _post(st, sends, recvs):
    if not sends and not recvs:
        return None
    return exchange(sends, recvs, st.group.pg)


def _recv_buffers(plan_side, b, hkv, d, dv, like):
    """One flat buffer per peer for ``{peer: intervals}`` (keys then values)."""
    out = []
    for peer, iv in plan_side.items():
        n = sum(hi - lo for lo, hi in iv)
        out.append((torch.empty(b * n * hkv * (d + dv), dtype=like.dtype, device=like.device),
                    peer))
    return out


def _unpack(buf, b, n, hkv, d, dv):
    nk = b * n * hkv * d
    return buf[:nk].view(b, n, hkv, d), buf[nk:].view(b, n, hkv, dv)


def _local_forward(q, k, v, st):
    plan, win = st.plan, (st.kernel_left, 0)
    if st.varlen:
        return local.varlen_forward(q, k, v, plan.local_cu, plan.local_sinks,
                                    softmax_scale=st.softmax_scale, window_size=win,
                                    backend=st.backend)
    return local.dense_forward(q, k, v, softmax_scale=st.softmax_scale, window_size=win,
                               num_sink_tokens=plan.local_sinks[0], backend=st.backend)


def _local_backward(dout, q, k, v, out, lse, st):
    plan, win = st.plan, (st.kernel_left, 0)
    if st.varlen:
        return local.varlen_backward(dout, q, k, v, out, lse, plan.local_cu, plan.local_sinks,
                                     softmax_scale=st.softmax_scale, window_size=win,
                                     backend=st.backend)
    return local.dense_backward(dout, q, k, v, out, lse, softmax_scale=st.softmax_scale,
                                window_size=win, num_sink_tokens=plan.local_sinks[0],
                                backend=st.backend)


def _forward(q, k, v, st: Setup):
    plan = st.plan
    b = q.shape[0]
    hkv, d, dv = k.shape[2], k.shape[3], v.shape[3]
    sends = [(_pack(torch.cat(_slices(k, plan, iv), 1), torch.cat(_slices(v, plan, iv), 1)), dst)
             for dst, iv in plan.send.items()]
    recvs = _recv_buffers(plan.recv, b, hkv, d, dv, k)
    handle = _post(st, sends, recvs)
    out, lse = _local_forward(q, k, v, st)
    if handle is not None:
        handle.wait()
    if not recvs:
        return out, lse, None, None
    parts = [_unpack(buf, b, sum(hi - lo for lo, hi in plan.recv[src]), hkv, d, dv)
             for buf, src in recvs]
    rk = torch.cat([p[0] for p in parts], 1) if len(parts) > 1 else parts[0][0]
    rv = torch.cat([p[1] for p in parts], 1) if len(parts) > 1 else parts[0][1]
    n0, nrs, nh = plan.first_len, plan.num_remote_sinks, plan.num_halo
    acc_o = out[:, :n0].to(acc_dtype(q.dtype))
    acc_l = lse[:, :, :n0].clone()  # lse_dtype (the local step's)
    if nh:
        lq = min(n0, st.window)
        o_h, l_h = attention_forward(q[:, :lq].contiguous(), rk[:, nrs:].contiguous(),
                                     rv[:, nrs:].contiguous(), softmax_scale=st.softmax_scale,
                                     window_size=_halo_window(st.window, st.kernel_left, lq),
                                     backend=st.backend)
        merge_partials_(acc_o[:, :lq], acc_l[:, :, :lq], o_h, l_h)
    if nrs:
        o_s, l_s = attention_forward(q[:, :n0].contiguous(), rk[:, :nrs].contiguous(),
                                     rv[:, :nrs].contiguous(), softmax_scale=st.softmax_scale,
                                     backend=st.backend)
        merge_partials_(acc_o, acc_l, o_s, l_s)
    out[:, :n0] = acc_o.to(out.dtype)
    lse[:, :, :n0] = acc_l
    return out, lse, rk, rv


def _backward(dout, q, k, v, out, lse, rk, rv, st: Setup):
    plan = st.plan
    b, _, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    acc = acc_dtype(q.dtype)
    n0, nrs, nh = plan.first_len, plan.num_remote_sinks, plan.num_halo
    sends, dq_r = [], None
    if rk is not None:  # remote parts first: their dK/dV travel during the local backward
        dq_r = torch.zeros(b, n0, hq, d, dtype=acc, device=q.device)
        drk, drv = torch.empty_like(rk), torch.empty_like(rv)
        if nh:
            lq = min(n0, st.window)
            g = attention_backward(dout[:, :lq].contiguous(), q[:, :lq].contiguous(),
                                   rk[:, nrs:].contiguous(), rv[:, nrs:].contiguous(),
                                   out[:, :lq].contiguous(), lse[:, :, :lq].contiguous(),
                                   softmax_scale=st.softmax_scale,
                                   window_size=_halo_window(st.window, st.kernel_left, lq),
                                   backend=st.backend)
            dq_r[:, :lq] += g[0].to(acc)
            drk[:, nrs:], drv[:, nrs:] = g[1], g[2]
        if nrs:
            g = attention_backward(dout[:, :n0].contiguous(), q[:, :n0].contiguous(),
                                   rk[:, :nrs].contiguous(), rv[:, :nrs].contiguous(),
                                   out[:, :n0].contiguous(), lse[:, :, :n0].contiguous(),
                                   softmax_scale=st.softmax_scale, backend=st.backend)
            dq_r += g[0].to(acc)
            drk[:, :nrs], drv[:, :nrs] = g[1], g[2]
        off = 0
        for src, iv in plan.recv.items():
            n = sum(hi - lo for lo, hi in iv)
            sends.append((_pack(drk[:, off:off + n], drv[:, off:off + n]), src))
            off += n
    recvs = _recv_buffers(plan.send, b, hkv, d, dv, k)
    handle = _post(st, sends, recvs)
    dq, dk, dvv = _local_backward(dout, q, k, v, out, lse, st)
    if handle is not None:
        handle.wait()
    if dq_r is not None:
        dq = dq.to(acc)
        dq[:, :n0] += dq_r
    if recvs:
        dk, dvv = dk.to(acc), dvv.to(acc)
        for buf, dst in recvs:
            iv = plan.send[dst]
            gk, gv = _unpack(buf, b, sum(hi - lo for lo, hi in iv), hkv, d, dv)
            off = 0
            for (lo, hi), sk, sv in zip(iv, _slices(dk, plan, iv), _slices(dvv, plan, iv)):
                sk += gk[:, off:off + hi - lo]
                sv += gv[:, off:off + hi - lo]
                off += hi - lo
    return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)


class RingSWAFunction(torch.autograd.Function):
    """Autograd wrapper: inputs BSHD (dense) or THD (varlen) local shards; returns ``out``
    (like q) and ``lse`` (``[B, Hq, S]`` / ``[Hq, T]`` in lse_dtype, not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, st: Setup):
        q4, k4, v4 = (t.unsqueeze(0) if st.varlen else t for t in (q, k, v))
        if q4.shape[1] == 0:
            out = q4.new_zeros(*q4.shape[:3], v4.shape[3])
            rk = rv = None
            lse = torch.zeros(q4.shape[0], q4.shape[2], 0, dtype=lse_dtype(q.dtype),
                              device=q.device)
        else:
            out, lse, rk, rv = _forward(q4, k4, v4, st)
        ctx.save_for_backward(q4, k4, v4, out, lse, rk, rv)
        ctx.st = st
        if st.varlen:
            out, lse = out[0], lse[0]
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, rk, rv = ctx.saved_tensors
        st = ctx.st
        if q.shape[1] == 0:
            return tuple(torch.zeros_like(t[0] if st.varlen else t) for t in (q, k, v)) + (None,)
        d4 = dout.unsqueeze(0) if st.varlen else dout
        dq, dk, dv = _backward(d4, q, k, v, out, lse, rk, rv, st)
        if st.varlen:
            dq, dk, dv = dq[0], dk[0], dv[0]
        return dq, dk, dv, None


def ring_swa(q, k, v, *, op, varlen, window_size, group, causal, softmax_scale, cu_seqlens,
             num_sink_tokens, return_lse, backend, seed: SeedArgs | None = None):
    """The one core behind every public function: agree on the arguments, then run."""
    st = check_call(q, k, v, op=op, varlen=varlen, window_size=window_size, group=group,
               causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
               num_sink_tokens=num_sink_tokens, return_lse=return_lse, backend=backend,
               seed=seed)
    out, lse = RingSWAFunction.apply(q, k, v, st)
    return (out, lse) if return_lse else out
