"""Fault injection for schedule="allgather" / "ulysses" and usp_attn: one rank of a 2-, 3- or
4-rank world passes one bad argument; every rank raises the same error (class and words),
none hangs, and the world works afterwards. Each (entry, fault, world) is one test id (6
hamilton_attn faults, 3 usp_attn faults: 9 x 3 = 27), each run with the bad rank first and last
(the groups that do not form a grid are given on every rank: a group argument that differs
between ranks cannot be agreed on, as for ``hamilton_attn``'s ``group``).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as tdist

from longattn.common.testing import run_world
from longattn.hamilton import hamilton_attn, usp_attn

# name -> (entry, error class, words of the message)
FAULTS = {
    "ulysses heads not divisible": ("ulysses", ValueError, ["q has", "divisible by the group"]),
    "ulysses causal odd length": ("ulysses", ValueError, ["zigzag layout"]),
    "allgather causal odd length": ("allgather", ValueError, ["zigzag layout"]),
    "allgather cu_seqlens on one rank": ("allgather", ValueError,
                                         ["cu_seqlens must be the same on every rank"]),
    "ring cu_seqlens on one rank": ("ring", ValueError,
                                    ["cu_seqlens must be the same on every rank"]),
    "ulysses cu_seqlens": ("ulysses", ValueError,
                           ["cu_seqlens", "not served by schedule='ulysses'"]),
    "allgather causal differs": ("allgather", ValueError, ["causal must be the same"]),
    "usp heads not divisible": ("usp", ValueError, ["divisible by the head_group size"]),
    "usp groups not a grid": ("usp", ValueError, ["must share exactly this rank"]),
    "usp scale differs": ("usp", ValueError, ["softmax_scale must be the same"]),
}


def _qkv(n, hq, length):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, length, hq, 4, generator=g, dtype=torch.float64),
            torch.randn(1, length, 1, 4, generator=g, dtype=torch.float64),
            torch.randn(1, length, 1, 4, generator=g, dtype=torch.float64))


def _call(rank, n, bad, fault):
    world = tdist.group.WORLD
    hq, length, kw = 2 * n, 4, {}
    if bad:
        if "heads" in fault:
            hq = 2 * n + 1
        if "odd length" in fault:
            length = 3
        if "cu_seqlens" in fault:
            kw["cu_seqlens"] = torch.tensor([0, 4 * n], dtype=torch.int32)
        if "causal differs" in fault:
            kw["causal"] = False
        if "scale differs" in fault:
            kw["softmax_scale"] = 0.25
    q, k, v = _qkv(n, hq, length)
    entry = FAULTS[fault][0] if fault else "ulysses"
    if entry == "usp":
        from longattn.common.dist import LOCAL

        # a group argument cannot differ between ranks (the ranks would then disagree on who
        # takes part in the agreement): a bad grid is given on every rank
        sg = world if fault and "grid" in fault else LOCAL
        return usp_attn(q, k, v, head_group=world, seq_group=sg, causal=True, **kw)
    kw.setdefault("causal", True)
    return hamilton_attn(q, k, v, group=world, schedule=entry, **kw)


def _inject(rank, n, bad_rank):
    out = {}
    for fault in FAULTS:
        try:
            _call(rank, n, rank == bad_rank, fault)
        except Exception as e:  # noqa: BLE001 - the test records whatever was raised
            out[fault] = (type(e).__name__, str(e))
        else:
            out[fault] = (None, "returned")
    return out, tuple(_call(rank, n, False, None).shape)


@functools.cache
def _world(n):
    return {bad: run_world(n, _inject, bad, timeout=120) for bad in sorted({0, n - 1})}


@pytest.mark.faults
@pytest.mark.parametrize("fault", list(FAULTS), ids=[f.replace(" ", "_") for f in FAULTS])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_one_bad_rank_raises_everywhere(n, fault):
    _, cls, words = FAULTS[fault]
    for bad, per_rank in _world(n).items():
        got = [r[0][fault] for r in per_rank]
        assert all(c == cls.__name__ for c, _ in got), (n, bad, got)
        assert len({m for _, m in got}) == 1, (n, bad, got)
        assert all(w in got[0][1] for w in words), (n, bad, got[0][1])
        assert all(r[1] == (1, 4, 2 * n, 4) for r in per_rank)
