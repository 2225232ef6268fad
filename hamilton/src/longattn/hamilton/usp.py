"""``usp_attn``: 2-D context parallelism (USP): Ulysses over ``head_group``, a ring-like
schedule of :func:`longattn.hamilton.hamilton_attn` (ring, zigzag ring, TASP) over
``seq_group``.

Layout (:func:`usp_shard`): the sequence is cut over ``seq_group`` as :func:`shard` cuts it
(zigzag when ``causal``), and each such part contiguously over ``head_group``. The Ulysses
all-to-all over ``head_group`` gives every rank its seq-group part for ``Hq / h`` heads, the
step loop runs over ``seq_group`` and the all-to-all goes back.

The groups must tile a grid: they share only this rank, and every rank of a head group has the
same rank in its seq group (and vice versa). Checks run in two agreements (over ``head_group``,
then over ``seq_group``, carrying the first one's verdict), so any rank's error reaches every
rank of the grid before any data moves. A 2-D ``DeviceMesh`` given as both groups means its
dimension 0 (heads) and 1 (sequence).
"""

from __future__ import annotations

import torch.distributed as tdist

from longattn.common import dist
from longattn.common import layout as _layout
from longattn.hamilton.args import (
    _check_common,
    _units_needed,
    check_heads,
    resolve_kernels,
    resolve_schedule,
)
from longattn.hamilton.plan import make_plan
from longattn.hamilton.sharding import _check_args, _gather, layout_name
from longattn.hamilton.strategy import auto_schedule, call_shape
from longattn.hamilton.ulysses import around_heads, head_shapes


def _mesh_groups(head_group, seq_group):
    """``(head_group, seq_group)`` with a 2-D DeviceMesh given as both split into its dims."""
    if dist._is_mesh(head_group) and (seq_group is head_group or seq_group is None):
        if head_group.ndim != 2:
            raise ValueError(f"head_group: a DeviceMesh given for both groups must be 2-D "
                             f"(head, seq), got a {head_group.ndim}-D mesh of shape "
                             f"{tuple(head_group.shape)}")
        return head_group.get_group(0), head_group.get_group(1)
    return head_group, seq_group


def _members(g):
    if not g.distributed:
        return {tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0}
    return set(tdist.get_process_group_ranks(g.pg))


def _grid_check(hg, sg):
    common = _members(hg) & _members(sg)
    if len(common) != 1:
        raise ValueError(f"head_group and seq_group must share exactly this rank (a grid of "
                         f"head x seq ranks), they share {len(common)}: {sorted(common)}")


def agree_grid(op, hg, sg, check):
    """``check() -> (result, fields)`` agreed over the whole grid: once over ``hg`` (with this
    rank's seq-group rank, which must be the same there), then over ``sg`` carrying the first
    verdict (with the head-group rank). Any rank's error raises on every rank of the grid."""
    err, result, fields = None, None, {}

    def first():
        _grid_check(hg, sg)
        res, f = check()
        return (res, f), dict(f, **{"seq_group rank": sg.rank, "seq_group size": sg.size})

    try:
        (result, fields), _ = dist.agree(op, hg, first)
    except (TypeError, ValueError) as e:
        err = e

    def second():
        if err is not None:
            raise type(err)(str(err))
        return result, dict(fields, **{"head_group rank": hg.rank,
                                       "head_group size": hg.size})

    result, _ = dist.agree(op, sg, second)
    return result


def usp_attn(q, k, v, *, head_group, seq_group, causal=False, softmax_scale=None,
             schedule="auto", return_lse=False, backend="auto", config=None):
    """2-D context-parallel attention: Ulysses over ``head_group``, ``schedule`` (``"auto"``,
    ``"tasp"``, ``"ring"``, ``"two_level"`` or a ``Schedule``) over ``seq_group``.

    ``q [B, L, Hq, D]``, ``k [B, L, Hkv, D]``, ``v [B, L, Hkv, Dv]``: this rank's part as
    :func:`usp_shard` lays it out; ``Hq`` divisible by the head-group size. Returns ``out [B, L,
    Hq, Dv]`` (and ``lse [B, Hq, L]`` in ``lse_dtype`` with ``return_lse``); differentiable.
    Bad arguments raise on every rank of the grid before any data moves.

    ``config``: a :class:`~longattn.hamilton.HamiltonConfig`; with ``config.target``,
    ``schedule="auto"`` takes the seq-group schedule the strategy model predicts fastest
    (:func:`longattn.hamilton.explain` with ``head_group``), else TASP when the length divides
    into its sub-chunks, else ring.
    """
    hg_arg, sg_arg = _mesh_groups(head_group, seq_group)
    hg = dist.resolve_group(hg_arg, name="head_group")
    sg = dist.resolve_group(sg_arg, name="seq_group")

    def check():
        cfg, scale, grad = _check_common(q, k, v, causal, softmax_scale, return_lse, backend,
                                         config)
        check_heads(q, k, hg.size, "head_group")
        lq, lk = q.shape[1], k.shape[1]
        if lq != lk:
            raise ValueError(f"usp_attn needs the same local length for q ({lq}) and k/v ({lk})")
        lh = hg.size * lk  # the local length over seq_group after the all-to-all
        chosen = schedule
        if isinstance(schedule, str) and schedule == "auto" and cfg.target is not None:
            chosen = auto_schedule(cfg.target, call_shape(q, k, v, causal, grad),
                                   hg.size * sg.size, head_group=hg.size, usp=True)
        sched = resolve_schedule(chosen, sg.size, lh, causal)
        # one step loop per local call (ulysses.head_segments); every rank resolves the
        # kernels of every rank's calls, keyed by (query heads, KV heads)
        kernels = {heads: resolve_kernels(qh, kh, vh, n=sg.size, causal=causal,
                                          units=_units_needed(sched, causal), backend=backend,
                                          grad=grad, return_lse=return_lse,
                                          contiguous_kv=cfg.contiguous_kv)
                   for heads, (qh, kh, vh) in head_shapes(q, k, v, hg.size).items()}
        fields = {"q.shape": tuple(q.shape), "k.shape": tuple(k.shape),
                  "v.shape": tuple(v.shape), "dtype": q.dtype, "q.device.type": q.device.type,
                  "causal": causal, "softmax_scale": scale, "schedule": sched.key_int,
                  "requires_grad": grad, "return_lse": return_lse, "backend": backend,
                  "kernel backends": tuple(b for x in kernels.values() for b in x.names()),
                  "config.merge_backend": cfg.merge_backend,
                  "config.contiguous_kv": cfg.contiguous_kv, "config.target": cfg.target}
        return (scale, sched, kernels, cfg), fields

    scale, sched, kernels, cfg = agree_grid("usp_attn", hg, sg, check)
    from longattn.hamilton.attn import _HamiltonAttn

    plan = make_plan(sched, sg.rank, causal)

    def attend(qh, kh, vh):
        kern = kernels[qh.shape[2], kh.shape[2]]
        return _HamiltonAttn.apply(qh, kh, vh, plan, sg.pg, scale, kern, cfg)

    out, lse = around_heads(q, k, v, hg, attend, return_lse)
    return (out, lse) if return_lse else out


def usp_shard(x, *, head_group, seq_group, causal=False, dim=1):
    """This rank's part of the full ``x`` in the layout of :func:`usp_attn`: ``shard`` over
    ``seq_group`` (zigzag when causal), then contiguous over ``head_group``. The length must be
    divisible by ``2 * s * h`` (causal) or ``s * h``. Agreed over the grid; no data moves."""
    hg_arg, sg_arg = _mesh_groups(head_group, seq_group)
    hg = dist.resolve_group(hg_arg, name="head_group")
    sg = dist.resolve_group(sg_arg, name="seq_group")

    def check():
        fields = _check_args(x, causal, dim)
        part = _layout.take_shard(x, sg.rank, sg.size, layout=layout_name(causal), dim=dim)
        part = _layout.take_shard(part, hg.rank, hg.size, layout="contiguous", dim=dim)
        return part.contiguous(), fields

    return agree_grid("usp_shard", hg, sg, check)


def usp_unshard(x, *, head_group, seq_group, causal=False, dim=1):
    """The full tensor from every rank's :func:`usp_shard` part: all-gathers over
    ``head_group``, then over ``seq_group``. Not differentiable."""
    hg_arg, sg_arg = _mesh_groups(head_group, seq_group)
    hg = dist.resolve_group(hg_arg, name="head_group")
    sg = dist.resolve_group(sg_arg, name="seq_group")
    agree_grid("usp_unshard", hg, sg, lambda: (None, _check_args(x, causal, dim)))
    part = x if not hg.distributed else _layout.join_shards(_gather(x, hg), dim=dim)
    if not sg.distributed:
        return part
    return _layout.join_shards(_gather(part, sg), layout=layout_name(causal), dim=dim)


__all__ = ["usp_attn", "usp_shard", "usp_unshard"]
