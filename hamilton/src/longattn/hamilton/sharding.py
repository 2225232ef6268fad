"""``shard`` / ``unshard``: the sequence layout :func:`hamilton_attn` expects.

Causal attention uses the zigzag layout (``2n`` blocks, rank ``r`` holds blocks ``r`` and
``2n-1-r``: equal causal work on every rank at every step); non-causal attention the
contiguous one. Both come from :mod:`longattn.common.layout`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longattn.common import layout as _layout
from longattn.common.checks import check_same_across_ranks
from longattn.common.comm import record
from longattn.hamilton.args import world


def layout_name(causal: bool) -> str:
    """``"zigzag"`` for causal attention, ``"contiguous"`` otherwise."""
    return "zigzag" if causal else "contiguous"


def shard(x: torch.Tensor, *, group=None, causal: bool = False, dim: int = 1) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (1: the sequence of BSHD).

    The global length must be divisible by ``2n`` (causal) or ``n``. Purely local.
    """
    n, rank = world(group)
    return _layout.shard(x, rank, n, layout=layout_name(causal), dim=dim)


def unshard(x, *, group=None, causal: bool = False, dim: int = 1) -> torch.Tensor:
    """The full tensor from the local shards: all-gathers ``x`` over ``group`` (every rank
    gets the result), or, given a list of every rank's shard in rank order, reassembles it
    without communication. Not differentiable."""
    if isinstance(x, (list, tuple)):
        return _layout.unshard(list(x), layout=layout_name(causal), dim=dim)
    n, rank = world(group)
    if n == 1:
        return x
    check_same_across_ranks("unshard: shape of x", tuple(x.shape), group)
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(chunks, x, group=group)
    nbytes = x.numel() * x.element_size()
    for p in range(n):
        if p != rank:
            record("send", p, nbytes)
            record("recv", p, nbytes)
    return _layout.unshard(chunks, layout=layout_name(causal), dim=dim)
