"""Move a sequence-sharded tensor from one layout to another, differentiably.

A model's hidden states live in one layout for every layer, but the methods want different
ones: hamilton's causal schedule wants ``zigzag`` (balanced causal work), ring_swa wants
``contiguous`` (a window only reaches back a few ranks). A model that mixes full and
sliding-window layers keeps one layout and moves q/k/v (and the output back) for the layers
whose method wants the other: one all-to-all step each way, ``S/n`` tokens per rank at most.

``relayout(x, src, dst, group=None, dim=1)``: ``x`` is this rank's shard in layout ``src``;
returns this rank's shard in layout ``dst``. Its backward is the inverse relayout of the
gradient (a permutation's adjoint is its inverse).
"""

from __future__ import annotations

import torch

from longattn.common import comm, layout
from longattn.common.dist import agree, resolve_group


def _plan(seq_len, rank, n, src, dst, device):
    """For every peer p: the indices into my src shard of the tokens p's dst shard needs, in
    p's dst order; and the indices into my dst shard that p's chunk fills, in my dst order
    (the order p sends them in)."""
    mine_src = layout.positions(seq_len, rank, n, src)
    mine_dst = layout.positions(seq_len, rank, n, dst)
    where_src = {int(g): i for i, g in enumerate(mine_src)}
    send, recv = [], []
    for p in range(n):
        their_dst = layout.positions(seq_len, p, n, dst)
        their_src = {int(g) for g in layout.positions(seq_len, p, n, src)}
        send.append(torch.tensor([where_src[int(g)] for g in their_dst if int(g) in where_src],
                                 dtype=torch.long, device=device))
        recv.append(torch.tensor([i for i, g in enumerate(mine_dst) if int(g) in their_src],
                                 dtype=torch.long, device=device))
    return send, recv


_PLANS: dict = {}


def _move(x, src, dst, g, dim):
    n, rank = g.size, g.rank
    if src == dst or n == 1:
        return x
    seq_len = x.shape[dim] * n
    key = (seq_len, rank, n, src, dst, str(x.device))
    if key not in _PLANS:
        _PLANS[key] = _plan(seq_len, rank, n, src, dst, x.device)
    send_idx, recv_idx = _PLANS[key]
    sends = [x.index_select(dim, i).contiguous() for i in send_idx]
    recvs = [x.new_empty(x.shape[:dim] + (i.numel(),) + x.shape[dim + 1:]) for i in recv_idx]
    comm.all_to_all_step(sends, recvs, g.pg).wait()
    out = torch.empty_like(x)
    for p in range(n):
        chunk = sends[p] if p == rank else recvs[p]
        out.index_copy_(dim, recv_idx[p], chunk)
    return out


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, dst, g, dim):
        ctx.args = (src, dst, g, dim)
        return _move(x, src, dst, g, dim)

    @staticmethod
    def backward(ctx, grad):
        src, dst, g, dim = ctx.args
        return _move(grad.contiguous(), dst, src, g, dim), None, None, None, None


def relayout(x: torch.Tensor, src: str, dst: str, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's shard of the same global tensor in layout ``dst`` (``x`` is in ``src``).

    Every rank must call it (it is one all-to-all step). ``x.shape[dim] * world_size`` is the
    global length; it must be divisible as both layouts require (the rules of
    ``longattn.common.layout.take_shard``).
    ``group``: a ``ProcessGroup``, a 1-D ``DeviceMesh``, ``LOCAL`` or None (this process alone;
    an error in a world of several ranks). The arguments are checked on every rank first
    (``longattn.common.dist.agree``).
    """
    g = resolve_group(group)

    def check():
        for name, lay in (("src", src), ("dst", dst)):
            if lay not in layout.LAYOUTS:
                raise ValueError(f"{name} must be one of {layout.LAYOUTS}, got {lay!r}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < x.ndim:
            raise ValueError(f"dim must be an int in [0, {x.ndim}) for x of shape "
                             f"{tuple(x.shape)}, got {dim!r}")
        if src != dst and g.distributed:
            seq = x.shape[dim] * g.size
            for lay in (src, dst):
                layout.positions(seq, g.rank, g.size, lay)  # raises if not divisible
        # x.shape as a string: another ndim reads "x.shape must be the same" (agree expands
        # tuples into one field per element, so a longer tuple would be "different calls")
        return None, {"src": src, "dst": dst, "x.shape": str(tuple(x.shape)), "x.dtype": x.dtype,
                      "device type": x.device.type, "dim": dim}

    agree("relayout", g, check)
    return moved(x, src, dst, g, dim)


def moved(x: torch.Tensor, src: str, dst: str, g, dim: int = 1) -> torch.Tensor:
    """:func:`relayout` without the checks, for callers that already agreed on the arguments
    (``g``: a resolved :class:`longattn.common.dist.Group`)."""
    if src == dst or not g.distributed:
        return x
    return _Relayout.apply(x, src, dst, g, dim)
