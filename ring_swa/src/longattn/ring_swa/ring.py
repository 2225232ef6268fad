"""Ring sliding-window attention on a contiguous layout: forward and backward.

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

Numerics: partials are merged and gradients summed in float32 (float64 for float64 inputs);
dK/dV partials travel in the dtype of k / v.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longattn.common.checks import check_cu_seqlens, check_qkv, check_scale
from longattn.common.comm import exchange
from longattn.common.kernels import attention_backward, attention_forward
from longattn.common.merge import merge_partials_
from longattn.ring_swa import local
from longattn.ring_swa.plan import RankPlan, make_plans

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_META_FIELDS = ("tokens", "batch", "q heads", "kv heads", "head_dim", "v head_dim", "dtype",
                "window_size", "num_sink_tokens", "softmax_scale", "len(cu_seqlens)",
                "cu_seqlens", "device type")


@dataclass(frozen=True)
class Setup:
    """Everything a call needs after its arguments were checked on every rank."""

    group: object  # process group, or None for a single process
    world: int
    rank: int
    plan: RankPlan
    window: int
    num_sink_tokens: int
    scale: float
    varlen: bool
    backend: str


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# argument checks (every rank raises, nobody hangs)


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


def _check_group(group, cp_size, cp_local_rank, prev, nxt):
    """(world, rank) of ``group``; the seed's explicit rank arguments must agree with it."""
    if group is None:
        for name, val in (("cp_size", cp_size), ("cp_local_rank", cp_local_rank)):
            if val not in (None, 1 if name == "cp_size" else 0):
                raise ValueError(f"{name}={val!r} needs a cp_group (cp_group=None runs locally)")
        return 1, 0
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cp_group was given but torch.distributed is not initialized")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if cp_size is not None and cp_size != world:
        raise ValueError(f"cp_size={cp_size!r} but the cp_group has {world} ranks")
    if cp_local_rank is not None and cp_local_rank != rank:
        raise ValueError(f"cp_local_rank={cp_local_rank!r} but this rank is {rank} in cp_group")
    for name, val, peer in (("cp_prev_global_rank", prev, (rank - 1) % world),
                            ("cp_next_global_rank", nxt, (rank + 1) % world)):
        want = dist.get_global_rank(group, peer) if group is not dist.group.WORLD else peer
        if val is not None and val != want:
            raise ValueError(f"{name}={val!r} but group rank {peer} is global rank {want} "
                             "(chunk i must live on group rank i)")
    return world, rank


def _local_checks(q, k, v, window_size, cu_seqlens, softmax_scale, num_sink_tokens, varlen,
                  streaming):
    """Checks that need no other rank. Returns (window, ns, scale, cu list or None)."""
    check_qkv(q, k, v, varlen=varlen)
    t = 0 if varlen else 1
    if q.shape[t] != k.shape[t]:
        raise ValueError(f"q and k must hold the same tokens (self-attention): q has "
                         f"{q.shape[t]}, k has {k.shape[t]}")
    w = _int_arg("window_size", window_size, 0)
    ns = _int_arg("num_sink_tokens", num_sink_tokens, 1) if streaming else 0
    scale = check_scale(softmax_scale, q.shape[-1])
    cu = check_cu_seqlens(cu_seqlens, _last(cu_seqlens)) if varlen else None
    return w, ns, scale, cu


def _meta(q, k, v, w, ns, scale, cu, varlen):
    b = 1 if varlen else q.shape[0]
    tokens = q.shape[0] if varlen else q.shape[1]
    cu_t = tuple(cu) if cu is not None else ()
    return [tokens, b, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1],
            _DTYPE_CODES[q.dtype], w, ns, struct.unpack("<q", struct.pack("<d", scale))[0],
            len(cu_t), hash(cu_t) & ((1 << 62) - 1), 1 if q.is_cuda else 0]


def _gather_meta(row, group, world):
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    mine = torch.tensor(row, dtype=torch.int64, device=dev)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    return [r.tolist() for r in rows]


def setup(q, k, v, window_size, cu_seqlens, cp_group, cp_size, cp_local_rank,
          cp_prev_global_rank, cp_next_global_rank, softmax_scale, num_sink_tokens, *,
          varlen, streaming, backend) -> Setup:
    """Check the arguments on every rank (one all-gather of ints) and build this rank's plan.

    A bad argument on any rank raises on every rank before any K/V moves.
    """
    err, row = None, None
    try:
        world, rank = _check_group(cp_group, cp_size, cp_local_rank, cp_prev_global_rank,
                                   cp_next_global_rank)
    except (TypeError, ValueError) as e:
        if cp_group is None or not dist.is_initialized():
            raise
        err, world, rank = e, dist.get_world_size(cp_group), dist.get_rank(cp_group)
    if err is None:
        try:
            w, ns, scale, cu = _local_checks(q, k, v, window_size, cu_seqlens, softmax_scale,
                                             num_sink_tokens, varlen, streaming)
            row = _meta(q, k, v, w, ns, scale, cu, varlen)
        except (TypeError, ValueError) as e:
            err = e
    if world == 1:
        if err is not None:
            raise err
        rows = [row]
    else:
        rows = _gather_meta([1] + [0] * len(_META_FIELDS) if err else [0] + row, cp_group,
                            world)
        bad = [r for r, x in enumerate(rows) if x[0]]
        if err is not None:
            raise err
        if bad:
            raise ValueError(f"invalid arguments on rank(s) {bad} of the cp_group (see the "
                             "error there); nothing was exchanged")
        rows = [x[1:] for x in rows]
        for i, name in enumerate(_META_FIELDS):
            if i == 0 and varlen:
                continue  # varlen ranks may hold different token counts
            vals = [x[i] for x in rows]
            if any(x != vals[0] for x in vals):
                what = "q/k/v shapes" if i < 6 else name
                raise ValueError(f"{what} must be the same on every rank of the cp_group; "
                                 f"{name} per rank: {vals}")
    counts = [x[0] for x in rows]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    if varlen:
        if cu[-1] != offsets[-1]:
            raise ValueError(f"cu_seqlens must end at the total token count over the cp_group "
                             f"(sum of q.shape[0] = {offsets[-1]}, per rank {counts}), got "
                             f"{cu[-1]}")
    else:
        cu = [0, offsets[-1]]
    plan = make_plans(offsets, cu, w, ns)[rank]
    return Setup(cp_group, world, rank, plan, w, ns, scale, varlen, backend)


# --------------------------------------------------------------------------------------------
# forward / backward


def _slices(x, plan, intervals):
    return [x[:, lo - plan.start: hi - plan.start] for lo, hi in intervals]


def _pack(a, b):
    return torch.cat([a.reshape(-1), b.reshape(-1)])


def _post(st, sends, recvs):
    if not sends and not recvs:
        return None
    return exchange(sends, recvs, st.group)


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


def _forward(q, k, v, st: Setup):
    plan = st.plan
    b, t, hq, _ = q.shape
    hkv, d, dv = k.shape[2], k.shape[3], v.shape[3]
    sends = [(_pack(torch.cat(_slices(k, plan, iv), 1), torch.cat(_slices(v, plan, iv), 1)), dst)
             for dst, iv in plan.send.items()]
    recvs = _recv_buffers(plan.recv, b, hkv, d, dv, k)
    handle = _post(st, sends, recvs)
    if st.varlen:
        out, lse = local.varlen_forward(q, k, v, plan.local_cu, plan.local_sinks,
                                        scale=st.scale, window_size=st.window,
                                        backend=st.backend)
    else:
        out, lse = local.dense_forward(q, k, v, scale=st.scale, window_size=st.window,
                                       num_sink_tokens=plan.local_sinks[0], backend=st.backend)
    if handle is not None:
        handle.wait()
    if not recvs:
        return out, lse, None, None
    parts = [_unpack(buf, b, sum(hi - lo for lo, hi in plan.recv[src]), hkv, d, dv)
             for buf, src in recvs]
    rk = torch.cat([p[0] for p in parts], 1) if len(parts) > 1 else parts[0][0]
    rv = torch.cat([p[1] for p in parts], 1) if len(parts) > 1 else parts[0][1]
    n0, nrs, nh, w = plan.first_len, plan.num_remote_sinks, plan.num_halo, st.window
    acc_o = out[:, :n0].to(_acc(q.dtype))
    acc_l = lse[:, :, :n0].clone()
    if nh:
        lq = min(n0, w)
        o_h, l_h = attention_forward(q[:, :lq].contiguous(), rk[:, nrs:].contiguous(),
                                     rv[:, nrs:].contiguous(), scale=st.scale,
                                     window=(w - lq, -1), backend=st.backend)
        merge_partials_(acc_o[:, :lq], acc_l[:, :, :lq], o_h, l_h)
    if nrs:
        o_s, l_s = attention_forward(q[:, :n0].contiguous(), rk[:, :nrs].contiguous(),
                                     rv[:, :nrs].contiguous(), scale=st.scale,
                                     backend=st.backend)
        merge_partials_(acc_o, acc_l, o_s, l_s)
    out[:, :n0] = acc_o.to(out.dtype)
    lse[:, :, :n0] = acc_l
    return out, lse, rk, rv


def _backward(dout, q, k, v, out, lse, rk, rv, st: Setup):
    plan = st.plan
    b, t, hq, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    acc = _acc(q.dtype)
    n0, nrs, nh, w = plan.first_len, plan.num_remote_sinks, plan.num_halo, st.window
    sends, dq_r = [], None
    if rk is not None:  # remote parts first: their dK/dV travel during the local backward
        dq_r = torch.zeros(b, n0, hq, d, dtype=acc, device=q.device)
        drk, drv = torch.empty_like(rk), torch.empty_like(rv)
        if nh:
            lq = min(n0, w)
            g = attention_backward(dout[:, :lq].contiguous(), q[:, :lq].contiguous(),
                                   rk[:, nrs:].contiguous(), rv[:, nrs:].contiguous(),
                                   out[:, :lq].contiguous(), lse[:, :, :lq].contiguous(),
                                   scale=st.scale, window=(w - lq, -1), backend=st.backend)
            dq_r[:, :lq] += g[0].to(acc)
            drk[:, nrs:], drv[:, nrs:] = g[1], g[2]
        if nrs:
            g = attention_backward(dout[:, :n0].contiguous(), q[:, :n0].contiguous(),
                                   rk[:, :nrs].contiguous(), rv[:, :nrs].contiguous(),
                                   out[:, :n0].contiguous(), lse[:, :, :n0].contiguous(),
                                   scale=st.scale, backend=st.backend)
            dq_r += g[0].to(acc)
            drk[:, :nrs], drv[:, :nrs] = g[1], g[2]
        off = 0
        for src, iv in plan.recv.items():
            n = sum(hi - lo for lo, hi in iv)
            sends.append((_pack(drk[:, off:off + n], drv[:, off:off + n]), src))
            off += n
    recvs = _recv_buffers(plan.send, b, hkv, d, dv, k)
    handle = _post(st, sends, recvs)
    if st.varlen:
        dq, dk, dvv = local.varlen_backward(dout, q, k, v, out, lse, plan.local_cu,
                                            plan.local_sinks, scale=st.scale,
                                            window_size=st.window, backend=st.backend)
    else:
        dq, dk, dvv = local.dense_backward(dout, q, k, v, out, lse, scale=st.scale,
                                           window_size=st.window,
                                           num_sink_tokens=plan.local_sinks[0],
                                           backend=st.backend)
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
    """Autograd wrapper: inputs BSHD (dense) or THD (varlen) local shards, output like q."""

    @staticmethod
    def forward(ctx, q, k, v, st: Setup):
        q4, k4, v4 = (t.unsqueeze(0) if st.varlen else t for t in (q, k, v))
        if q4.shape[1] == 0:
            out = q4.new_zeros(*q4.shape[:3], v4.shape[3])
            rk = rv = None
            lse = torch.zeros(q4.shape[0], q4.shape[2], 0, dtype=_acc(q.dtype), device=q.device)
        else:
            out, lse, rk, rv = _forward(q4, k4, v4, st)
        ctx.save_for_backward(q4, k4, v4, out, lse, rk, rv)
        ctx.st = st
        return out[0] if st.varlen else out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, rk, rv = ctx.saved_tensors
        st = ctx.st
        if q.shape[1] == 0:
            return tuple(torch.zeros_like(t[0] if st.varlen else t) for t in (q, k, v)) + (None,)
        d4 = dout.unsqueeze(0) if st.varlen else dout
        dq, dk, dv = _backward(d4, q, k, v, out, lse, rk, rv, st)
        if st.varlen:
            dq, dk, dv = dq[0], dk[0], dv[0]
        return dq, dk, dv, None


def ring_attention(q, k, v, window_size, cu_seqlens, cp_group, cp_size, cp_local_rank,
                   cp_prev_global_rank, cp_next_global_rank, softmax_scale, num_sink_tokens, *,
                   varlen, streaming, backend="auto"):
    st = setup(q, k, v, window_size, cu_seqlens, cp_group, cp_size, cp_local_rank,
               cp_prev_global_rank, cp_next_global_rank, softmax_scale, num_sink_tokens,
               varlen=varlen, streaming=streaming, backend=backend)
    return RingSWAFunction.apply(q, k, v, st)
