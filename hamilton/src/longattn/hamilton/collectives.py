"""Differentiable exchanges of the dense strategies (``allgather``, ``ulysses``, ``usp_attn``).

Every message goes through :func:`longattn.common.comm.exchange` (one batch of point-to-point
messages per call: counted exactly by ``comm.counting()``, staged for CUDA tensors over gloo).
Ranks are group ranks of a resolved :class:`longattn.common.dist.Group`.

* :func:`gather_rows` -- every rank gets every rank's rows (an all-gather as one message per
  piece and peer); its gradient is the reduce-scatter: each rank sends every peer the gradient
  of that peer's rows and sums what it receives (in ``acc_dtype``, peers in rank order).
* :func:`to_heads` / :func:`to_seq` -- the Ulysses all-to-alls: from "this rank's tokens, all
  heads" to "every rank's tokens, this rank's heads" and back. Head ranges may overlap (a KV
  head several ranks need travels to each of them); the way back then sums the copies.
"""

from __future__ import annotations

import torch

from longattn.common.comm import exchange
from longattn.common.dtypes import acc_dtype

# ---------------------------------------------------------------------------------------------
# all-gather of token rows (forward) / reduce-scatter of their gradient (backward)


def _gather(x, g, pieces):
    """``x [L, ...]`` (token rows outermost) -> ``[n * L, ...]``: rank ``p``'s local rows
    ``a:b`` land at global rows ``pieces[p][i]`` for every ``(a, b, start)`` piece."""
    n, me = g.size, g.rank
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    for a, b, start in pieces[me]:
        out[start:start + b - a].copy_(x[a:b])
    sends = [(x[a:b], p) for p in range(n) if p != me for a, b, _ in pieces[me]]
    recvs = [(out[start:start + b - a], p) for p in range(n) if p != me
             for a, b, start in pieces[p]]
    exchange(sends, recvs, g).wait()
    return out


def _reduce_scatter(grad, g, pieces, length):
    """The gradient of :func:`_gather`: this rank's ``[length, ...]`` rows summed over every
    rank's copy of them, in ``acc_dtype``; sent in ``grad``'s dtype."""
    n, me = g.size, g.rank
    grad = grad.contiguous()
    recv = grad.new_empty((n, length) + tuple(grad.shape[1:]))
    sends = [(grad[start:start + b - a], p) for p in range(n) if p != me
             for a, b, start in pieces[p]]
    recvs = [(recv[p, a:b], p) for p in range(n) if p != me for a, b, _ in pieces[me]]
    for a, b, start in pieces[me]:
        recv[me, a:b].copy_(grad[start:start + b - a])
    exchange(sends, recvs, g).wait()
    return recv.to(acc_dtype(grad.dtype)).sum(0).to(grad.dtype)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, pieces):
        ctx.g, ctx.pieces, ctx.length = g, pieces, x.shape[0]
        return _gather(x.contiguous(), g, pieces)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.g, ctx.pieces, ctx.length), None, None


def gather_rows(x, g, pieces):
    """All-gather of ``x [L, ...]`` (rows outermost) over ``g``: rows ``a:b`` of rank ``p`` go
    to global rows ``start:start + b - a`` for each ``(a, b, start)`` in ``pieces[p]`` (a tuple
    per rank; the pieces of all ranks tile ``n * L`` rows). Differentiable (reduce-scatter)."""
    return _GatherRows.apply(x, g, pieces)


# ---------------------------------------------------------------------------------------------
# Ulysses all-to-alls: sequence-sharded <-> head-sharded


def _to_heads(g, specs, xs):
    """Each ``x`` (``[..., L (seq_dim), ..., H (head_dim), ...]``, this rank's tokens): rank
    ``p`` gets heads ``ranges[p]`` of it; returns, per tensor, every rank's tokens (rank order
    along ``seq_dim``) of this rank's heads. One exchange for all tensors."""
    n, me = g.size, g.rank
    sends, recvs, outs = [], [], []
    for x, (ranges, seq_dim, head_dim, _) in zip(xs, specs):
        lo, hi = ranges[me]
        shape = list(x.shape)
        shape[head_dim] = hi - lo
        parts = [x.new_empty(shape) for _ in range(n)]
        for p in range(n):
            a, b = ranges[p]
            piece = x.narrow(head_dim, a, b - a)
            if p == me:
                parts[p].copy_(piece)
            else:
                sends.append((piece.contiguous(), p))
                recvs.append((parts[p], p))
        outs.append((parts, seq_dim))
    exchange(sends, recvs, g).wait()
    return [torch.cat(parts, seq_dim) for parts, seq_dim in outs]


def _to_seq(g, specs, ys):
    """The inverse of :func:`_to_heads`: each ``y`` holds every rank's tokens of this rank's
    heads; returns this rank's tokens of all ``H`` heads, summing copies of a head that several
    ranks held (overlapping ranges) in ``acc_dtype``."""
    n, me = g.size, g.rank
    sends, recvs, outs = [], [], []
    for y, (ranges, seq_dim, head_dim, heads) in zip(ys, specs):
        length = y.shape[seq_dim] // n
        pieces = {}
        for p in range(n):
            a, b = ranges[p]
            mine = y.narrow(seq_dim, p * length, length)
            if p == me:
                pieces[p] = mine
                continue
            sends.append((mine.contiguous(), p))
            shape = list(mine.shape)
            shape[head_dim] = b - a
            pieces[p] = y.new_empty(shape)
            recvs.append((pieces[p], p))
        outs.append((pieces, ranges, head_dim, heads, y))
    exchange(sends, recvs, g).wait()
    return [_assemble(*o) for o in outs]


def _assemble(pieces, ranges, head_dim, heads, like):
    shape = list(pieces[0].shape)
    shape[head_dim] = heads
    disjoint = all(ranges[p][1] <= ranges[p + 1][0] for p in range(len(ranges) - 1))
    dtype = like.dtype if disjoint else acc_dtype(like.dtype)
    out = like.new_zeros(shape, dtype=dtype)
    for p, piece in pieces.items():  # rank order: a deterministic sum
        a, b = ranges[p]
        out.narrow(head_dim, a, b - a).add_(piece)
    return out.to(like.dtype)


class _ToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, specs, *xs):
        ctx.g, ctx.specs = g, specs
        return tuple(_to_heads(g, specs, [x.contiguous() for x in xs]))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + tuple(_to_seq(ctx.g, ctx.specs, list(grads)))


class _ToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, specs, *ys):
        ctx.g, ctx.specs = g, specs
        return tuple(_to_seq(g, specs, [y.contiguous() for y in ys]))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + tuple(_to_heads(ctx.g, ctx.specs, list(grads)))


def to_heads(g, specs, *xs):
    """Differentiable :func:`_to_heads`; ``specs``: per tensor ``(ranges, seq_dim, head_dim,
    heads)`` with ``ranges[p] = (lo, hi)`` the heads rank ``p`` gets."""
    return _ToHeads.apply(g, specs, *xs)


def to_seq(g, specs, *ys):
    """Differentiable :func:`_to_seq` (specs as in :func:`to_heads`; ranges disjoint)."""
    return _ToSeq.apply(g, specs, *ys)
