"""relayout: a shard in one layout becomes the same global tensor's shard in another; its
gradient is the inverse move. Checked exactly against longattn.common.layout on gloo worlds."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from longattn.common import comm, layout
from longattn.common.testing import run_world

LAYOUTS = ("contiguous", "zigzag", "striped")


def _moves(rank, world, seq):
    from longattn.integrations.relayout import relayout

    g = torch.Generator().manual_seed(seq)
    x = torch.randn(2, seq, 3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, seq, 3, 4, generator=g, dtype=torch.float64)
    out = []
    for src, dst in itertools.permutations(LAYOUTS, 2):
        mine = layout.take_shard(x, rank, world, layout=src).requires_grad_()
        with comm.counting() as c:
            moved = relayout(mine, src, dst, group=dist.group.WORLD)
        ok_fwd = torch.equal(moved, layout.take_shard(x, rank, world, layout=dst))
        # d/dx sum(moved * w_dst) = w at the same global tokens, in the src layout
        (moved * layout.take_shard(w, rank, world, layout=dst)).sum().backward()
        ok_bwd = torch.equal(mine.grad, layout.take_shard(w, rank, world, layout=src))
        # exactly the tokens that change rank travel, each once
        stay = set(layout.positions(seq, rank, world, src).tolist()) & set(
            layout.positions(seq, rank, world, dst).tolist())
        moved_tokens = seq // world - len(stay)
        ok_bytes = c.bytes_sent == moved_tokens * 2 * 3 * 4 * 8
        out.append((src, dst, ok_fwd, ok_bwd, ok_bytes))
    return out


@pytest.mark.parametrize("world,seq", [(2, 12), (4, 16)])
def test_relayout_forward_backward_and_bytes(world, seq):
    for rank_res in run_world(world, _moves, seq):
        for src, dst, ok_fwd, ok_bwd, ok_bytes in rank_res:
            assert ok_fwd and ok_bwd and ok_bytes, (world, src, dst, ok_fwd, ok_bwd, ok_bytes)


def test_relayout_bad_layout():
    from longattn.integrations.relayout import relayout

    with pytest.raises(ValueError, match="dst"):
        relayout(torch.zeros(1, 4, 1, 1), "zigzag", "spiral")
