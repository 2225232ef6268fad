"""Fault injection: one rank of a 2-, 3- or 4-rank world calls hamilton_attn, shard or unshard
with one bad or different argument. Every rank must raise the same clear error (the same class
and message, naming the argument, and the bad rank where the error is that rank's own), none
may hang or return, and the world must work afterwards.

Each (entry point, fault, world size) is one test id (17 hamilton_attn faults, 7 shard, 7
unshard: 31 x 3 = 93), each run with the bad rank first and last; one world run per size
serves all of them. (q on another device type is not possible on a CPU-only machine; the
agreement covers it as ``q.device.type``.)
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as tdist

from longattn.common.testing import run_world
from longattn.hamilton import HamiltonConfig, hamilton_attn, multi_ring_schedule, shard, unshard

B, HQ, HKV, D = 1, 4, 2, 8

# name -> (what the bad rank changes, error class, words the message must hold, whether the
# message names the bad rank: a rank's own error does, a value that differs names the field)
FAULTS = {
    "backend that cannot serve": ({"backend": "aten"}, ValueError,
                                  ["backend 'aten' cannot serve this call"], True),
    "unknown backend": ({"backend": "nope"}, ValueError, ["backend must be one of"], True),
    "backend not a str": ({"backend": 3}, TypeError, ["backend must be a str"], True),
    "dtype differs": ({"dtype": torch.float32}, ValueError,
                      ["dtype must be the same on every rank"], False),
    "integer dtype": ({"dtype": torch.int64}, TypeError, ["dtype must be one of"], True),
    "causal not a bool": ({"causal": 1}, TypeError, ["causal must be a bool"], True),
    "causal differs": ({"causal": False}, ValueError,
                       ["causal must be the same on every rank"], False),
    "softmax_scale differs": ({"softmax_scale": 0.5}, ValueError,
                              ["softmax_scale must be the same on every rank"], False),
    "softmax_scale overflowing int": ({"softmax_scale": 10**400}, ValueError,
                                      ["softmax_scale must be finite"], True),
    "softmax_scale not finite": ({"softmax_scale": float("nan")}, ValueError,
                                 ["softmax_scale must be finite"], True),
    "schedule for another world": ({"schedule": lambda n: multi_ring_schedule(n + 1)},
                                   ValueError, ["ranks, but the group has"], True),
    "unknown schedule": ({"schedule": "hamilton"}, ValueError, ["schedule must be"], True),
    "return_lse not a bool": ({"return_lse": "yes"}, TypeError, ["return_lse must be a bool"],
                              True),
    "config differs": ({"config": HamiltonConfig(contiguous_kv=True)}, ValueError,
                       ["config.contiguous_kv must be the same on every rank"], False),
    "config not a record": ({"config": {"contiguous_kv": True}}, TypeError,
                            ["config must be a longattn.hamilton.HamiltonConfig"], True),
    "length the schedule cannot split": ({"length": 3}, ValueError,
                                         ["k/v local sequence length 3"], True),
    "length differs": ({"length": lambda n: 8 * (n - 1) * 2}, ValueError,
                       ["q.shape must be the same on every rank"], False),
}


def _call(rank, n, bad_rank, change):
    """hamilton_attn with the good arguments, ``change`` applied on ``bad_rank``."""
    kw = {"causal": True, "softmax_scale": None, "schedule": "tasp", "return_lse": False,
          "backend": "auto", "config": None}
    length, dtype = 4 * (n - 1) * 2, torch.float64
    if rank == bad_rank:
        kw.update({key: val(n) if callable(val) else val for key, val in change.items()})
        dtype = kw.pop("dtype", dtype)
        length = kw.pop("length", None) or length
    kw.pop("dtype", None)
    kw.pop("length", None)
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(B, length, HQ, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, length, HKV, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, length, HKV, D, generator=g, dtype=torch.float64).to(dtype)
    return hamilton_attn(q, k, v, group=tdist.group.WORLD, **kw)


# shard / unshard: (what the bad rank changes, error class, words, names the bad rank)
LAYOUT_FAULTS = {
    "causal not a bool": ({"causal": 1}, TypeError, ["causal must be a bool"], True),
    "causal differs": ({"causal": False}, ValueError,
                       ["causal must be the same on every rank"], False),
    "dim out of range": ({"dim": 5}, ValueError, ["dim must be an int"], True),
    "dim differs": ({"dim": 0}, ValueError, ["dim must be the same on every rank"], False),
    "x not a tensor": ({"x": "x"}, TypeError, ["x must be a torch.Tensor"], True),
    "shape differs": ({"longer": True}, ValueError,
                      ["x.shape must be the same on every rank"], False),
    "dtype differs": ({"dtype": torch.float32}, ValueError,
                      ["x.dtype must be the same on every rank"], False),
}
ENTRIES = {"hamilton_attn": FAULTS, "shard": LAYOUT_FAULTS, "unshard": LAYOUT_FAULTS}


def _layout_call(rank, n, bad_rank, change, fn):
    """shard (of a global tensor) or unshard (of a local one) with ``change`` on ``bad_rank``;
    x is ``[L, L, 3]`` (every ``dim`` but the last splits)."""
    kw = {"causal": True, "dim": 1}
    length = (2 * n if fn is unshard else 2 * n * n) * 2
    dtype, x = torch.float64, None
    if rank == bad_rank:
        kw.update(change)
        dtype, x = kw.pop("dtype", dtype), kw.pop("x", None)
        length += 4 * n * kw.pop("longer", False)
    for key in ("dtype", "longer", "x"):
        kw.pop(key, None)
    if x is None:
        x = torch.arange(length * length * 3, dtype=dtype).reshape(length, length, 3)
    return fn(x, group=tdist.group.WORLD, **kw)


def _inject(rank, n, bad_rank):
    results = {}
    for entry, faults in ENTRIES.items():
        for name, (change, _, _, _) in faults.items():
            try:
                if entry == "hamilton_attn":
                    _call(rank, n, bad_rank, change)
                else:
                    _layout_call(rank, n, bad_rank, change, shard if entry == "shard"
                                 else unshard)
            except Exception as e:  # noqa: BLE001 - the test records whatever was raised
                results[(entry, name)] = (type(e).__name__, str(e))
            else:
                results[(entry, name)] = (None, "returned")
    good = _call(rank, n, None, {})  # the world still works
    full = _layout_call(rank, n, None, {}, shard)
    back = _layout_call(rank, n, None, {}, unshard)
    return results, (tuple(good.shape), tuple(full.shape), tuple(back.shape))


@functools.cache
def _world(n):
    """{bad_rank: per-rank results} of every fault on an n-rank world."""
    return {bad_rank: run_world(n, _inject, bad_rank, timeout=120)
            for bad_rank in sorted({0, n - 1})}


CASES = [(entry, name) for entry, faults in ENTRIES.items() for name in faults]


@pytest.mark.faults
@pytest.mark.parametrize("entry,fault", CASES, ids=[f"{e}-{f.replace(' ', '_')}"
                                                    for e, f in CASES])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_one_bad_rank_raises_the_same_error_everywhere(n, entry, fault):
    _, cls, words, names_rank = ENTRIES[entry][fault]
    for bad_rank, per_rank in _world(n).items():
        got = [r[0][(entry, fault)] for r in per_rank]
        assert all(c == cls.__name__ for c, _ in got), (n, bad_rank, got)
        # the same message everywhere (a differing dtype or string can only be shown as each
        # rank's own value: that tail may differ)
        msgs = {m.split("; this rank (rank")[0] for _, m in got}
        assert len(msgs) == 1, (n, bad_rank, msgs)
        msg = msgs.pop()
        assert all(w in msg for w in words), (n, bad_rank, msg)
        if names_rank:
            assert f"rank(s) [{bad_rank}] of {n}" in msg, (n, bad_rank, msg)
        # the world works afterwards
        assert all(r[1] == ((B, 4 * (n - 1) * 2, HQ, D), (4 * n * n, 4 * n, 3),
                            (4 * n, 4 * n * n, 3))
                   for r in per_rank)
