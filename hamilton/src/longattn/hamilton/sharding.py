"""``shard`` / ``unshard``: the sequence layout :func:`hamilton_attn` expects.

Causal attention uses the zigzag layout (``2n`` blocks, rank ``r`` holds blocks ``r`` and
``2n-1-r``: equal causal work on every rank at every step); non-causal attention the
contiguous one. Both come from :mod:`longattn.common.layout`. ``group`` follows the rule of
:func:`longattn.common.dist.resolve_group` (None: this process alone, an error in a world of
more than one rank).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from longattn.common import dist
from longattn.common import layout as _layout
from longattn.common.checks import check_bool, check_tensor
from longattn.common.comm import record


def layout_name(causal: bool) -> str:
    """``"zigzag"`` for causal attention, ``"contiguous"`` otherwise."""
    return "zigzag" if check_bool("causal", causal) else "contiguous"


def shard(x: torch.Tensor, *, group=None, causal: bool = False, dim: int = 1) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (1: the sequence of BSHD).

    The global length must be divisible by ``2n`` (causal) or ``n``. No data moves, but every
    rank of ``group`` must call it: one small agreement (:func:`longattn.common.dist.agree`)
    checks that every rank shards a tensor of the same shape, dtype and device type with the
    same ``causal`` and ``dim``, so a bad or differing argument on one rank raises on every
    rank instead of leaving the ranks with mismatched layouts.
    """
    g = dist.resolve_group(group)

    def check():
        name = layout_name(causal)
        _check_dim(x, dim)
        part = _layout.take_shard(x, g.rank, g.size, layout=name, dim=dim)
        return part, {"x.shape": tuple(x.shape), "x.dtype": x.dtype,
                      "x.device.type": x.device.type, "causal": causal, "dim": dim % x.ndim}

    part, _ = dist.agree("shard", g, check)
    return part


def _check_dim(x, dim):
    check_tensor("x", x, dtypes=None)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int in [-{x.ndim}, {x.ndim}), got {dim!r}")


def unshard(x, *, group=None, causal: bool = False, dim: int = 1) -> torch.Tensor:
    """The full tensor from the local shards: all-gathers ``x`` over ``group`` (every rank
    gets the result), or, given a list of every rank's shard in rank order, reassembles it
    without communication. Not differentiable."""
    if isinstance(x, (list, tuple)):
        return _layout.join_shards(list(x), layout=layout_name(causal), dim=dim)
    g = dist.resolve_group(group)

    def check():
        name = layout_name(causal)
        _check_dim(x, dim)
        return name, {"x.shape": tuple(x.shape), "x.dtype": x.dtype,
                      "x.device.type": x.device.type, "causal": causal, "dim": dim % x.ndim}

    name, _ = dist.agree("unshard", g, check)
    if not g.distributed:
        return x
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(g.size)]
    tdist.all_gather(chunks, x, group=g.pg)
    nbytes = x.numel() * x.element_size()
    for p in range(g.size):
        if p != g.rank:
            record("send", p, nbytes)
            record("recv", p, nbytes)
    return _layout.join_shards(chunks, layout=name, dim=dim)
