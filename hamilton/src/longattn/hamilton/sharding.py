"""``shard`` / ``unshard``: the sequence layout :func:`hamilton_attn` expects.

Causal attention uses the zigzag layout (``2n`` blocks, rank ``r`` holds blocks ``r`` and
``2n-1-r``: equal causal work on every rank at every step); non-causal attention the
contiguous one. Both come from :mod:`longattn.common.layout`. Packed documents
(``cu_seqlens``) use the balanced layout of :func:`longattn.hamilton.packing.packed_layout`.
``group`` follows the rule of :func:`longattn.common.dist.resolve_group` (None: this process
alone, an error in a world of more than one rank).
"""

from __future__ import annotations

import torch

from longattn.common import dist
from longattn.common import layout as _layout
from longattn.common.checks import check_bool, check_tensor
from longattn.common.comm import all_gather, record
from longattn.hamilton.packing import (
    check_divisible,
    check_packed_cu_seqlens,
    cu_field,
    packed_layout,
)


def layout_name(causal: bool) -> str:
    """``"zigzag"`` for causal attention, ``"contiguous"`` otherwise."""
    return "zigzag" if check_bool("causal", causal) else "contiguous"


def shard(x: torch.Tensor, *, group=None, causal: bool = False, dim: int = 1,
          cu_seqlens=None) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (1: the sequence of BSHD).

    The global length must be divisible by ``2n`` (causal) or ``n``. No data moves, but every
    rank of ``group`` must call it: one small agreement (:func:`longattn.common.dist.agree`)
    checks that every rank shards a tensor of the same shape, dtype and device type with the
    same ``causal`` and ``dim``, so a bad or differing argument on one rank raises on every
    rank instead of leaving the ranks with mismatched layouts.

    ``cu_seqlens``: packed documents, the int32 cumulative document lengths ``[num_docs + 1]``
    of the sequence along ``dim`` (the same on every rank): the balanced layout of
    :func:`longattn.hamilton.packing.packed_layout`. The length must be divisible by ``n``
    (:func:`longattn.hamilton.pad_packed` pads it).
    """
    g = dist.resolve_group(group)

    def check():
        fields = _check_args(x, causal, dim)
        if cu_seqlens is None:
            part = _layout.take_shard(x, g.rank, g.size, layout=layout_name(causal), dim=dim)
            return part, fields
        cu = check_packed_cu_seqlens(cu_seqlens, x.shape[dim], f" (x.shape[{dim}])")
        fields["cu_seqlens"] = cu_field(cu)
        idx = _packed_positions(cu, g.size, causal)[g.rank]
        return x.index_select(dim, idx.to(x.device)).contiguous(), fields

    part, _ = dist.agree("shard", g, check)
    return part


def _check_dim(x, dim):
    check_tensor("x", x, dtypes=None)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int in [-{x.ndim}, {x.ndim}), got {dim!r}")


def _check_args(x, causal, dim):
    """Local checks of shard / unshard; returns the fields every rank must share."""
    layout_name(causal)
    _check_dim(x, dim)
    return {"x.shape": tuple(x.shape), "x.dtype": x.dtype, "x.device.type": x.device.type,
            "causal": causal, "dim": dim % x.ndim}


def _packed_positions(cu, n, causal):
    """Every rank's global token indices (int64 tensors) in the packed layout."""
    check_divisible(cu[-1], n)
    lay = packed_layout(cu, n, causal)
    return [torch.from_numpy(lay.positions(r)) for r in range(n)]


def _join_packed(chunks, cu_seqlens, causal, dim):
    """The packed sequence from every rank's part (rank order)."""
    n, local = len(chunks), chunks[0].shape[dim]
    cu = check_packed_cu_seqlens(cu_seqlens, n * local, f" (= {n} ranks x {local} tokens)")
    idx = torch.cat(_packed_positions(cu, n, causal)).to(chunks[0].device)
    cat = torch.cat(list(chunks), dim=dim)
    return torch.empty_like(cat).index_copy_(dim, idx, cat)


def unshard(x, *, group=None, causal: bool = False, dim: int = 1,
            cu_seqlens=None) -> torch.Tensor:
    """The full tensor from the local shards: all-gathers ``x`` over ``group`` (every rank
    gets the result), or, given a list of every rank's shard in rank order, reassembles it
    without communication. ``cu_seqlens``: the packed layout, as in :func:`shard`. Not
    differentiable."""
    if isinstance(x, (list, tuple)):
        if cu_seqlens is not None:
            layout_name(causal)
            return _join_packed(list(x), cu_seqlens, causal, dim)
        return _layout.join_shards(list(x), layout=layout_name(causal), dim=dim)
    g = dist.resolve_group(group)

    def check():
        fields = _check_args(x, causal, dim)
        if cu_seqlens is not None:
            local = x.shape[dim]
            cu = check_packed_cu_seqlens(cu_seqlens, g.size * local,
                                         f" (= {g.size} ranks x {local} tokens)")
            fields["cu_seqlens"] = cu_field(cu)
        return None, fields

    dist.agree("unshard", g, check)
    if not g.distributed:
        return x
    chunks = _gather(x, g)
    if cu_seqlens is not None:
        return _join_packed(chunks, cu_seqlens, causal, dim)
    return _layout.join_shards(chunks, layout=layout_name(causal), dim=dim)


def _gather(x, g):
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(g.size)]
    all_gather(chunks, x, group=g)  # staged for CUDA tensors over gloo; not counted there
    nbytes = x.numel() * x.element_size()
    for p in range(g.size):
        if p != g.rank:
            record("send", p, nbytes)
            record("recv", p, nbytes)
    return chunks
