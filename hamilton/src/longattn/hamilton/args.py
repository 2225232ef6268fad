"""Argument checks of :func:`hamilton_attn`, agreed across the ranks before any communication.

Everything is checked inside one ``check()`` run by :func:`longattn.common.dist.agree`: the
local checks (a bad argument raises there, on every rank), and the values every rank must share
(q/k/v shapes, dtype, device type, ``causal``, ``softmax_scale``, the schedule, whether a
backward will run, ``return_lse``, the ``backend`` argument and the backends the local kernels
will use). One small all-gather; a bad call never leaves a rank waiting in the KV exchange.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

from longattn.common import dist
from longattn.common.checks import check_bool, check_qkv, check_scale
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import pick_backend
from longattn.hamilton.config import DEFAULT, HamiltonConfig
from longattn.hamilton.packing import check_packed_cu_seqlens, cu_field
from longattn.hamilton.plan import kv_views, new_buffer
from longattn.hamilton.schedules import (
    Schedule,
    multi_ring_schedule,
    ring_schedule,
    two_level_schedule,
)

SCHEDULE_NAMES = ("auto", "tasp", "multi_ring", "ring", "two_level")
DENSE_NAMES = ("allgather", "ulysses")
"""The strategies that are no schedule of the step loop (``longattn.hamilton.allgather``,
``longattn.hamilton.ulysses``)."""
KINDS = ("diag", "all", "back")
"""The kinds of local kernel call: ``diag`` (step 0 on the local q, k, v; causal when causal),
``all`` (all query rows against key units of the KV buffer) and ``back`` (the zigzag back half
of the query rows against key units; causal only)."""


def _units_needed(sched: Schedule, causal: bool) -> int:
    return 2 * sched.num_slots if causal else sched.num_slots


def _divisible(length, sched, causal):
    return sched.n == 1 or length % _units_needed(sched, causal) == 0


def resolve_schedule(schedule, n: int, length: int, causal: bool, *,
                     packed: bool = False) -> Schedule:
    """The :class:`Schedule` a ``schedule`` argument means on ``n`` ranks.

    ``"tasp"`` / ``"multi_ring"``: :func:`multi_ring_schedule`; ``"ring"``: Ring Attention
    (zigzag ring when causal); ``"two_level"``: :func:`two_level_schedule` with
    ``LOCAL_WORLD_SIZE`` GPUs per node; ``"auto"``: TASP when the local length divides into
    its sub-chunks, else ring. Raises ``ValueError`` if the schedule cannot serve the call.
    ``packed``: packed documents (``cu_seqlens``), where slots may differ in length by one
    token, so any length serves and ``"auto"`` is TASP.
    """
    if isinstance(schedule, Schedule):
        if schedule.n != n:
            raise ValueError(f"schedule {schedule.name!r} is for {schedule.n} ranks, but the "
                             f"group has {n}")
        sched = schedule
    elif not isinstance(schedule, str) or schedule not in SCHEDULE_NAMES:
        raise ValueError(f"schedule must be a Schedule or one of "
                         f"{SCHEDULE_NAMES + DENSE_NAMES}, got {schedule!r}")
    elif schedule == "ring":
        sched = ring_schedule(n)
    elif schedule in ("tasp", "multi_ring"):
        sched = multi_ring_schedule(n)
    elif schedule == "two_level":
        g = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        if g < 2 or g % 2 or n % g:
            raise ValueError(f"schedule='two_level' needs LOCAL_WORLD_SIZE (GPUs per node) even "
                             f"and dividing the world size {n}, got {g or 'unset'}; pass "
                             "two_level_schedule(nodes, gpus_per_node) instead")
        sched = two_level_schedule(n // g, g)
    else:  # auto
        sched = multi_ring_schedule(n)
        if not packed and not _divisible(length, sched, causal):
            sched = ring_schedule(n)
    if not packed and not _divisible(length, sched, causal):
        u = _units_needed(sched, causal)
        how = (f"2 x {sched.num_slots} sub-chunks (zigzag halves)" if causal
               else f"{sched.num_slots} sub-chunks")
        raise ValueError(
            f"k/v local sequence length {length} must be divisible by {u} ({how} of schedule "
            f"{sched.name!r} over {n} ranks); pad the global sequence to a multiple of {u * n}"
        )
    return sched


@dataclass(frozen=True)
class Kernels:
    """The local-kernel backend of each kind of call (see :data:`KINDS`), resolved once per
    :func:`hamilton_attn` call: ``fwd``, ``bwd`` (None when no backward will run) and
    ``bwd_dlse`` (the backward when a gradient flows into the returned ``lse``; None without
    ``return_lse``). Each maps a kind to a backend name, or None where the call never occurs."""

    fwd: dict
    bwd: dict | None
    bwd_dlse: dict | None

    def names(self) -> tuple:
        """Every resolved name in a fixed order (None where absent): the agreed value."""
        return tuple((m or {}).get(kind) for m in (self.fwd, self.bwd, self.bwd_dlse)
                     for kind in KINDS)


def resolve_kernels(q, k, v, *, n, causal, units, backend, grad, return_lse,
                    contiguous_kv) -> Kernels:
    """Resolve ``backend`` for every kind of kernel call with
    :func:`longattn.common.kernels.pick_backend`, on requests shaped like the real calls: the
    ``all`` / ``back`` calls get K/V views with the KV buffer's strides (contiguous copies with
    ``contiguous_kv``). A backend that cannot serve one raises ``ValueError`` here, saying why.

    The step requests use K/V views of one buffer unit of rows: a backend's ``supports`` sees
    the real dtype, device, head counts, head dims and strides (key lengths enter no backend's
    rules except for empty inputs, and a unit has at least one row)."""
    kinds = {"diag": (q, k, v, causal)}
    if n > 1:
        b, lk, hkv, d = k.shape
        unit = lk // units
        buf = new_buffer(unit, b, hkv, d, v.shape[-1], k.dtype, k.device)
        kk, vv = kv_views(buf, 0, unit, hkv, d)
        if contiguous_kv:
            kk, vv = kk.contiguous(), vv.contiguous()
        kinds["all"] = (q, kk, vv, False)
        if causal:
            kinds["back"] = (q[:, q.shape[1] // 2:], kk, vv, False)

    def pick(needs_dlse):
        return {kind: _pick_one(kind, *args, needs_dlse, backend)
                for kind, args in kinds.items()}

    fwd = pick(False)
    bwd = pick(False) if grad else None
    bwd_dlse = None
    if grad and return_lse:
        # backend="auto" picks, per call, a backend that takes the gradient of lse; a named
        # backend stays itself (a kernel that takes no dlse then refuses it in the backward,
        # saying why: longattn.common.kernels)
        bwd_dlse = pick(True) if backend == "auto" else dict.fromkeys(kinds, backend)
    return Kernels(fwd, bwd, bwd_dlse)


def _pick_one(kind, q, k, v, causal, needs_dlse, backend):
    try:
        return pick_backend(q, k, v, causal=causal, needs_dlse=needs_dlse, backend=backend)
    except ValueError as e:
        if kind == "diag" or k.is_contiguous():
            raise
        # the refusal stands; say what would serve it, if contiguous copies would
        try:
            pick_backend(q, k.contiguous(), v.contiguous(), causal=causal,
                         needs_dlse=needs_dlse, backend=backend)
        except ValueError:
            raise e from None
        raise ValueError(f"{e} (the step kernels get K/V as strided views of the KV buffer; "
                         "config=HamiltonConfig(contiguous_kv=True) passes contiguous copies)"
                         ) from e


def _check_triton_merge(q, v):
    """``merge_backend="triton"`` must be able to serve this call's merges (raises here, on
    every rank, rather than in the step loop)."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("config.merge_backend='triton' needs triton, which is not installed")
    from longattn.common import merge_triton

    b, _, hq, _ = q.shape
    out = torch.empty(b, 1, hq, v.shape[-1], dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.empty(b, hq, 1, dtype=lse_dtype(q.dtype), device=q.device)
    refusal = merge_triton.refusal(out, lse, out.to(q.dtype), lse)
    if refusal is not None:
        raise ValueError(f"config.merge_backend='triton' cannot serve this call: {refusal}")


def _packed_kernels(q, k, v, causal, backend, grad, return_lse, *, steps=True):
    """The dense backend names the varlen calls resolve to (the CPU loop runs them; on CUDA
    fp16 / bf16 with ``"auto"`` / ``"aten"`` the flash varlen op serves instead), for the
    diagonal call (causal when causal) and, with ``steps`` (the step schedules; not
    ``"allgather"``, whose one call is the diagonal kind), the others, forward and backward: a
    backend that cannot serve raises here, on every rank."""
    kk, vv = k[:, :1], v[:, :1]  # the calls get contiguous gathered keys
    names = []
    for needs_dlse in (False,) + ((grad and return_lse,) if grad else ()):
        for c in dict.fromkeys((causal, False) if steps else (causal,)):
            names.append(pick_backend(q[:, :1], kk, vv, causal=c, needs_dlse=needs_dlse,
                                      backend=backend))
    return tuple(names)


def _check_packed(q, k, n, cu_seqlens):
    """The packed-document rules: batch 1, the same local length for q and k/v, and a valid
    ``cu_seqlens`` ending at ``n`` times it. Returns the checked tuple."""
    lq, lk = q.shape[1], k.shape[1]
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (one packed sequence), got q of batch "
                         f"{q.shape[0]}")
    if lq != lk:
        raise ValueError(f"cu_seqlens needs the same local length for q ({lq}) and k/v ({lk}) "
                         "(one packed sequence)")
    return check_packed_cu_seqlens(cu_seqlens, n * lq,
                                   f" (= {n} ranks x {lq} local tokens)")


def check_call(q, k, v, *, group: dist.Group, causal, softmax_scale, schedule, return_lse,
               backend, config, cu_seqlens=None):
    """Validate a :func:`hamilton_attn` call on every rank of ``group`` (a resolved
    :class:`longattn.common.dist.Group`); return ``(softmax_scale, sched, kernels, config)``
    (``config`` the :class:`HamiltonConfig`, defaults for None).

    Raises on every rank (``ValueError`` / ``TypeError`` naming the argument) when any rank's
    arguments are bad or the ranks disagree on what they must share.

    With ``cu_seqlens`` (packed documents) ``kernels`` is the checked ``cu_seqlens`` tuple and
    the backend names are those of :func:`_packed_kernels`.
    """
    n = group.size

    def check():
        cfg, scale, grad = _check_common(q, k, v, causal, softmax_scale, return_lse, backend,
                                         config)
        if cfg.merge_backend == "triton" and n > 1:
            _check_triton_merge(q, v)
        lq, lk = q.shape[1], k.shape[1]
        if cu_seqlens is not None:
            cu = _check_packed(q, k, n, cu_seqlens)
            sched = resolve_schedule(schedule, n, lk, causal, packed=True)
            # cu_seqlens is the first value agreed (None without), so a rank that passes it
            # while another does not is told so by name
            fields = {"cu_seqlens": cu_field(cu), **_fields(
                q, k, v, causal, scale, sched, grad, return_lse, backend, cfg,
                _packed_kernels(q, k, v, causal, backend, grad, return_lse))}
            return (scale, sched, cu, cfg), fields
        if causal and lq != lk and n > 1:
            raise ValueError(f"causal needs the same local length for q ({lq}) and k/v ({lk}) "
                             "(zigzag layout of one sequence)")
        sched = resolve_schedule(schedule, n, lk, causal)
        kernels = resolve_kernels(q, k, v, n=n, causal=causal,
                                  units=_units_needed(sched, causal), backend=backend,
                                  grad=grad, return_lse=return_lse,
                                  contiguous_kv=cfg.contiguous_kv)
        return (scale, sched, kernels, cfg), {"cu_seqlens": None, **_fields(
            q, k, v, causal, scale, sched, grad, return_lse, backend, cfg, kernels.names())}

    result, _ = dist.agree("hamilton_attn", group, check)
    return result


def _check_common(q, k, v, causal, softmax_scale, return_lse, backend, config):
    """The checks of every call; returns ``(config record, softmax_scale, whether a backward
    will run)``."""
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    cfg = DEFAULT if config is None else config
    if not isinstance(cfg, HamiltonConfig):
        raise TypeError(f"config must be a longattn.hamilton.HamiltonConfig or None, got "
                        f"{type(config).__name__}")
    check_qkv(q, k, v)
    if (isinstance(softmax_scale, int) and not isinstance(softmax_scale, bool)
            and abs(softmax_scale) > sys.float_info.max):  # float() would overflow
        raise ValueError(f"softmax_scale must be finite, got an int of "
                         f"{softmax_scale.bit_length()} bits")
    scale = check_scale(softmax_scale, q.shape[-1])
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or a name in "
                        f"longattn.common.kernels.BACKENDS), got {backend!r}")
    lq, lk = q.shape[1], k.shape[1]
    if lk < 1 or lq < 1:
        raise ValueError(f"q and k/v need at least one token per rank, got {lq} and {lk}")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return cfg, scale, grad


def _fields(q, k, v, causal, scale, sched, grad, return_lse, backend, cfg, names):
    """The values every rank of a call must share."""
    return {"q.shape": tuple(q.shape), "k.shape": tuple(k.shape), "v.shape": tuple(v.shape),
            "dtype": q.dtype, "q.device.type": q.device.type, "causal": causal,
            "softmax_scale": scale, "schedule": sched.key_int, "requires_grad": grad,
            "return_lse": return_lse, "backend": backend, "kernel backends": names,
            "config.merge_backend": cfg.merge_backend, "config.contiguous_kv": cfg.contiguous_kv,
            "config.target": cfg.target}


# ---------------------------------------------------------------------------------------------
# the dense strategies: schedule="allgather" / "ulysses"


def check_heads(q, k, n, what):
    """Ulysses over ``n`` ranks needs the query heads divisible by ``n`` (KV heads need not
    be: a KV head several ranks need travels to each)."""
    if q.shape[2] % n:
        raise ValueError(f"q has {q.shape[2]} heads, which must be divisible by the {what} size "
                         f"{n} (Ulysses gives every rank Hq / {n} query heads)")


def dense_backends(reqs, backend, grad, return_lse):
    """The backend names the local calls ``reqs`` (``(q, k, v, causal)``) resolve to, forward
    and backward (a backend that cannot serve raises here, saying why)."""
    names = []
    for needs_dlse in (False,) + ((grad and return_lse and backend == "auto",) if grad else ()):
        for q, k, v, c in reqs:
            names.append(pick_backend(q, k, v, causal=c, needs_dlse=needs_dlse, backend=backend))
    return tuple(names)


def check_dense_call(q, k, v, *, group: dist.Group, causal, softmax_scale, schedule,
                     return_lse, backend, config, cu_seqlens=None):
    """Validate a ``schedule="allgather"`` / ``"ulysses"`` call of :func:`hamilton_attn` on every
    rank of ``group``; returns ``(softmax_scale, cu)``, ``cu`` the checked ``cu_seqlens`` tuple
    (None without). Causal attention needs the zigzag layout's two halves (an even local length,
    the same for q and k/v); Ulysses needs ``Hq % n == 0``. Packed documents (``cu_seqlens``,
    ``"allgather"`` only) follow the packed rules of :func:`check_call`. ``cu_seqlens`` is the
    first value agreed (None without), so a rank that passes it while another does not gets an
    error naming it."""
    from longattn.hamilton import allgather, ulysses

    n = group.size

    def check():
        cfg, scale, grad = _check_common(q, k, v, causal, softmax_scale, return_lse, backend,
                                         config)
        cu = None
        if cu_seqlens is not None:
            if schedule != "allgather":
                raise ValueError(f"cu_seqlens (packed documents) is not served by schedule="
                                 f"{schedule!r}; use 'tasp', 'ring' or 'allgather'")
            cu = _check_packed(q, k, n, cu_seqlens)
            names = _packed_kernels(q, k, v, causal, backend, grad, return_lse, steps=False)
        else:
            lq, lk = q.shape[1], k.shape[1]
            if causal and n > 1 and (lq != lk or lk % 2):
                raise ValueError(f"causal schedule={schedule!r} needs the zigzag layout: the "
                                 f"same even local length for q and k/v, got {lq} and {lk}; "
                                 f"pad the global sequence to a multiple of {2 * n}")
            if schedule == "ulysses":
                check_heads(q, k, n, "group")
                reqs = ulysses.requests(q, k, v, n, group.rank, causal)
            else:
                reqs = allgather.requests(q, k, v, n, group.rank, causal)
            names = dense_backends(reqs, backend, grad, return_lse)
        fields = {"cu_seqlens": None if cu is None else cu_field(cu),
                  "q.shape": tuple(q.shape), "k.shape": tuple(k.shape),
                  "v.shape": tuple(v.shape), "dtype": q.dtype, "q.device.type": q.device.type,
                  "causal": causal, "softmax_scale": scale, "schedule": schedule,
                  "requires_grad": grad, "return_lse": return_lse, "backend": backend,
                  "kernel backends": names, "config.merge_backend": cfg.merge_backend,
                  "config.contiguous_kv": cfg.contiguous_kv, "config.target": cfg.target}
        return (scale, cu), fields

    result, _ = dist.agree("hamilton_attn", group, check)
    return result
