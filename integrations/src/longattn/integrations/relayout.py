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


def _plan_from(src_all, dst_all, rank, device):
    """For every peer p: the indices into my src shard of the tokens p's dst shard needs, in
    p's dst order; and the indices into my dst shard that p's chunk fills, in my dst order
    (the order p sends them in). ``src_all`` / ``dst_all``: every rank's global token indices
    (int64 tensors, rank order) in the two layouts."""
    total = sum(len(t) for t in src_all)
    owner = torch.empty(total, dtype=torch.long)
    where = torch.empty(total, dtype=torch.long)
    for p, idx in enumerate(src_all):
        owner[idx] = p
        where[idx] = torch.arange(len(idx))
    send, recv = [], []
    mine_dst_owner = owner[dst_all[rank]]
    for p, their_dst in enumerate(dst_all):
        send.append(where[their_dst][owner[their_dst] == rank].to(device))
        recv.append((mine_dst_owner == p).nonzero()[:, 0].to(device))
    return send, recv


def _positions(seq_len, n, lay):
    return [layout.positions(seq_len, p, n, lay) for p in range(n)]


_PLANS: dict = {}  # a cache of index plans (facts of the layouts), not a setting
_MAX_PLANS = 256  # packed batches bring new layouts: the oldest plans go first


def _plans(key, src_all, dst_all, rank, device):
    """The forward and the inverse plan, cached under ``key``."""
    key = (key, rank, str(device))
    if key not in _PLANS:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        src_all, dst_all = src_all(), dst_all()
        _PLANS[key] = (_plan_from(src_all, dst_all, rank, device),
                       _plan_from(dst_all, src_all, rank, device))
    return _PLANS[key]


def _move(x, plan, g, dim):
    send_idx, recv_idx = plan
    sends = [x.index_select(dim, i).contiguous() for i in send_idx]
    recvs = [x.new_empty(x.shape[:dim] + (i.numel(),) + x.shape[dim + 1:]) for i in recv_idx]
    comm.all_to_all_step(sends, recvs, g.pg).wait()
    shape = list(x.shape)
    shape[dim] = sum(i.numel() for i in recv_idx)
    out = x.new_empty(shape)
    for p in range(g.size):
        chunk = sends[p] if p == g.rank else recvs[p]
        out.index_copy_(dim, recv_idx[p], chunk)
    return out


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, inverse, g, dim):
        ctx.args = (inverse, g, dim)
        return _move(x, plan, g, dim)

    @staticmethod
    def backward(ctx, grad):
        inverse, g, dim = ctx.args
        return _move(grad.contiguous(), inverse, g, dim), None, None, None, None


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
    seq_len = x.shape[dim] * g.size
    plan, inverse = _plans(("dense", seq_len, g.size, src, dst),
                           lambda: _positions(seq_len, g.size, src),
                           lambda: _positions(seq_len, g.size, dst), g.rank, x.device)
    return _Relayout.apply(x, plan, inverse, g, dim)


def moved_between(x: torch.Tensor, key, src_all, dst_all, g, dim: int = 1) -> torch.Tensor:
    """Like :func:`moved` between any two layouts given as every rank's global token indices
    (callables returning the lists, called once per ``key``: a hashable name of the pair)."""
    if not g.distributed:
        return x
    plan, inverse = _plans(key, src_all, dst_all, g.rank, x.device)
    return _Relayout.apply(x, plan, inverse, g, dim)
