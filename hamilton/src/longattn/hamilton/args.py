"""Argument checks for :func:`hamilton_attn`, agreed across ranks before any communication.

Every rank runs its local checks and records the error instead of raising; then all ranks
all-gather one small int64 row each (error flag, shapes, dtype, causal, scale, schedule digest,
whether a backward will run). If any rank failed, or the rows differ, every rank raises, so a
bad call never leaves the others waiting in a collective.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from longattn.common.checks import check_qkv, check_scale
from longattn.common.kernels import BACKENDS
from longattn.hamilton.schedules import (
    Schedule,
    multi_ring_schedule,
    ring_schedule,
    two_level_schedule,
)

SCHEDULE_NAMES = ("auto", "tasp", "multi_ring", "ring", "two_level")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FIELDS = (["error"] + [f"q.shape[{i}]" for i in range(4)] + [f"k.shape[{i}]" for i in range(4)]
           + [f"v.shape[{i}]" for i in range(4)]
           + ["dtype", "causal", "scale", "schedule", "requires_grad"])


def world(group=None):
    """``(world_size, rank)`` of ``group``; ``(1, 0)`` without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 1, 0
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if r < 0:
        raise ValueError("this process is not a member of group")
    return n, r


def _units_needed(sched: Schedule, causal: bool) -> int:
    return 2 * sched.num_slots if causal else sched.num_slots


def _divisible(length, sched, causal):
    return sched.n == 1 or length % _units_needed(sched, causal) == 0


def resolve_schedule(schedule, n: int, length: int, causal: bool) -> Schedule:
    """The :class:`Schedule` a ``schedule`` argument means on ``n`` ranks.

    ``"tasp"`` / ``"multi_ring"``: :func:`multi_ring_schedule`; ``"ring"``: Ring Attention
    (zigzag ring when causal); ``"two_level"``: :func:`two_level_schedule` with
    ``LOCAL_WORLD_SIZE`` GPUs per node; ``"auto"``: TASP when the local length divides into
    its sub-chunks, else ring. Raises ``ValueError`` if the schedule cannot serve the call.
    """
    if isinstance(schedule, Schedule):
        if schedule.n != n:
            raise ValueError(f"schedule {schedule.name!r} is for {schedule.n} ranks, but the "
                             f"group has {n}")
        sched = schedule
    elif not isinstance(schedule, str) or schedule not in SCHEDULE_NAMES:
        raise ValueError(f"schedule must be a Schedule or one of {SCHEDULE_NAMES}, got "
                         f"{schedule!r}")
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
        if not _divisible(length, sched, causal):
            sched = ring_schedule(n)
    if not _divisible(length, sched, causal):
        u = _units_needed(sched, causal)
        how = (f"2 x {sched.num_slots} sub-chunks (zigzag halves)" if causal
               else f"{sched.num_slots} sub-chunks")
        raise ValueError(
            f"k/v local sequence length {length} must be divisible by {u} ({how} of schedule "
            f"{sched.name!r} over {n} ranks); pad the global sequence to a multiple of {u * n}"
        )
    return sched


def check_call(q, k, v, *, group, causal, scale, schedule, backend):
    """Validate a :func:`hamilton_attn` call on every rank; return ``(n, rank, scale, sched)``.

    Raises on every rank (``ValueError`` / ``TypeError`` naming the argument) when any rank's
    arguments are bad or the ranks disagree on shapes, dtype, ``causal``, ``scale``,
    ``schedule`` or on whether gradients are needed.
    """
    n, rank = world(group)
    err, fields, sched = None, [-1] * (len(_FIELDS) - 1), None
    try:
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        check_qkv(q, k, v)
        scale = check_scale(scale, q.shape[-1])
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got "
                             f"{backend!r}")
        lq, lk = q.shape[1], k.shape[1]
        if lk < 1 or lq < 1:
            raise ValueError(f"q and k/v need at least one token per rank, got {lq} and {lk}")
        if causal and lq != lk and n > 1:
            raise ValueError(f"causal needs the same local length for q ({lq}) and k/v ({lk}) "
                             "(zigzag layout of one sequence)")
        sched = resolve_schedule(schedule, n, lk, causal)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        fields = ([*q.shape, *k.shape, *v.shape]
                  + [_DTYPES.index(q.dtype), int(causal),
                     int(np.float64(scale).view(np.int64)), sched.key_int, int(grad)])
    except (TypeError, ValueError) as e:
        err = e
    if n > 1:
        rows = _gather([int(err is not None)] + fields, group)
    else:
        rows = [[int(err is not None)] + fields]
    if err is not None:
        raise err
    bad = [i for i, row in enumerate(rows) if row[0]]
    if bad:
        raise ValueError(f"hamilton_attn: invalid arguments on rank(s) {bad} (see the error "
                         "there); raising on every rank")
    for j, name in enumerate(_FIELDS):
        vals = [row[j] for row in rows]
        if any(x != vals[0] for x in vals):
            what = ("whether q/k/v require grad" if name == "requires_grad"
                    else f"{name}")
            raise ValueError(f"hamilton_attn: {what} must be the same on every rank, got "
                             f"{vals} (rank order)")
    return n, rank, scale, sched


def _gather(values, group):
    backend = dist.get_backend(group)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    mine = torch.tensor(values, dtype=torch.int64, device=dev)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]
