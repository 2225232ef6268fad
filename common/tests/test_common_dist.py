"""longattn.common.dist: group resolution (the one rule of ``group=None``) and the agreement
protocol (the same error on every rank, never a hang); merge_stacked's empty and NaN rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from longattn.common import dist as D
from longattn.common.dtypes import acc_dtype
from longattn.common.merge import merge_partials, merge_stacked
from longattn.common.testing import run_world


def test_single_process_resolution():
    g = D.resolve_group(None)
    assert (g.size, g.rank, g.distributed) == (1, 0, False)
    assert D.resolve_group(D.LOCAL) == g
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        D.resolve_group(object())


def test_acc_dtype():
    assert acc_dtype(torch.float64) == torch.float64
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert acc_dtype(dt) == torch.float32


def test_agree_single_process_raises_the_local_error():
    def bad():
        raise ValueError("softmax_scale must be finite")

    with pytest.raises(ValueError, match="softmax_scale must be finite"):
        D.agree("op", D.resolve_group(None), bad)
    res, views = D.agree("op", D.resolve_group(None), lambda: (7, {"n": 3, "len": 5}),
                         vary=("len",))
    assert res == 7 and views == {"len": [5]}


def _resolve(rank, world):
    out = {}
    try:
        D.resolve_group(None)
    except ValueError as e:
        out["none"] = str(e)
    g = D.resolve_group(dist.group.WORLD)
    out["world"] = (g.size, g.rank, str(g.device))
    out["local"] = D.resolve_group(D.LOCAL).size
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    out["mesh"] = D.resolve_group(mesh).size
    if world % 2 == 0:
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
        try:
            D.resolve_group(mesh2)
        except ValueError as e:
            out["mesh2"] = str(e)
        out["mesh2_cp"] = D.resolve_group(mesh2["cp"]).size
    try:
        D.resolve_group("world")
    except TypeError as e:
        out["type"] = str(e)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_resolve_group_in_a_world(world):
    for rank, out in enumerate(run_world(world, _resolve)):
        assert "group=None is ambiguous" in out["none"] and "LOCAL" in out["none"]
        assert out["world"] == (world, rank, "cpu")
        assert out["local"] == 1 and out["mesh"] == world
        assert "group must be a torch.distributed ProcessGroup" in out["type"]
        if world % 2 == 0:
            assert "1-D DeviceMesh" in out["mesh2"]
            assert out["mesh2_cp"] == world // 2


def _agree_case(rank, world, case):
    g = D.resolve_group(dist.group.WORLD)

    def check():
        if case == "bad_on_last" and rank == world - 1:
            raise TypeError("causal must be a bool, got 'no'")
        if case == "defect_on_first" and rank == 0:  # a check's own failure, not a bad argument
            raise ZeroDivisionError("0.0 cannot be raised to a negative power")
        fields = {"q.shape": (2, 8, 4, 16), "dtype": torch.float32, "kv_len": 10 + rank,
                  "softmax_scale": 0.25, "device": "cpu"}
        if case == "scale_differs" and rank == 1:
            fields["softmax_scale"] = 0.5
        if case == "dtype_differs" and rank == 0:
            fields["dtype"] = torch.float64
        if case == "overflow" and rank == 1:
            fields["window_size"] = (2**63, 0)
        elif case == "overflow":
            fields["window_size"] = (4, 0)
        if case == "shape_count" and rank == 0:
            fields["q.shape"] = (2, 8, 4)
        if case == "none_vs_int":
            fields["hierarchy"] = None if rank == world - 1 else 2
        if case == "int_vs_float":
            fields["window"] = 4.0 if rank == 0 else 4
        if case in ("long", "long_differs"):  # 70 values: agreed as one word, not 70
            fields["segment_lengths"] = tuple(range(70 + (case == "long_differs" and rank)))
        return "ok", fields

    try:
        res, views = D.agree("op", g, check, vary=("kv_len",))
    except (TypeError, ValueError, RuntimeError) as e:
        return type(e).__name__, str(e)
    return res, views


@pytest.mark.parametrize("world", [2, 3, 4])
def test_agree_raises_the_same_error_on_every_rank(world):
    ok = run_world(world, _agree_case, "ok")
    assert all(r == ("ok", {"kv_len": [10 + i for i in range(world)]}) for r in ok)

    bad = run_world(world, _agree_case, "bad_on_last")
    assert {b for b in bad} == {bad[0]}  # identical everywhere
    assert bad[0][0] == "TypeError" and "causal must be a bool" in bad[0][1]
    assert f"rank(s) [{world - 1}]" in bad[0][1]

    # any other exception of a check reaches every rank too (it hung the others before)
    de = run_world(world, _agree_case, "defect_on_first", timeout=60)
    assert all(d == de[0] for d in de), de
    assert de[0][0] == "RuntimeError" and "ZeroDivisionError: 0.0 cannot" in de[0][1]
    assert "rank(s) [0]" in de[0][1]

    sc = run_world(world, _agree_case, "scale_differs")
    assert all(s[0] == "ValueError" for s in sc)
    assert "softmax_scale must be the same on every rank" in sc[0][1]
    assert "0.5" in sc[0][1]

    dt = run_world(world, _agree_case, "dtype_differs")
    assert all(d[0] == "ValueError" and "dtype must be the same" in d[1] for d in dt)

    ov = run_world(world, _agree_case, "overflow")
    assert all(o[0] == "ValueError" and "window_size[0]" in o[1] and "out of range" in o[1]
               for o in ov)

    sh = run_world(world, _agree_case, "shape_count")
    assert all(s == sh[0] for s in sh)
    assert sh[0][0] == "ValueError" and "q.shape must be the same on every rank" in sh[0][1]

    long = run_world(world, _agree_case, "long")
    assert all(r == ("ok", {"kv_len": [10 + i for i in range(world)]}) for r in long), long
    for case, field in (("none_vs_int", "hierarchy"), ("int_vs_float", "window"),
                        ("long_differs", "segment_lengths")):
        got = run_world(world, _agree_case, case)
        assert all(g == got[0] for g in got), got  # the same message on every rank
        assert got[0][0] == "ValueError" and f"{field} must be the same" in got[0][1]


def _stack(n, b, s, h, d, seed):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(n, b, s, h, d, generator=g, dtype=torch.float64)
    lses = torch.randn(n, b, s, h, generator=g, dtype=torch.float64) * 3
    return outs, lses


@pytest.mark.parametrize("seed", range(5))
def test_merge_stacked_equals_pairwise(seed):
    outs, lses = _stack(4, 2, 5, 3, 8, seed)
    lses[1, 0, 2] = float("-inf")
    outs[1, 0, 2] = float("nan")  # a dead side's out is ignored
    lses[:, 1, 3, 1] = float("-inf")  # a row nobody sees
    out, lse = merge_stacked(outs, lses)
    ref_o, ref_l = outs[0], lses[0].transpose(1, 2)
    for i in range(1, 4):
        ref_o, ref_l = merge_partials(ref_o, ref_l, outs[i], lses[i].transpose(1, 2))
    assert torch.allclose(out, ref_o, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_l.transpose(1, 2)))
    live = ~torch.isneginf(lse)
    assert torch.allclose(lse[live], ref_l.transpose(1, 2)[live], rtol=1e-12)
    assert torch.all(out[1, 3, 1] == 0) and math.isinf(lse[1, 3, 1])


def test_merge_stacked_keeps_nan():
    outs, lses = _stack(3, 1, 4, 2, 8, 0)
    lses[2, 0, 1, 0] = float("nan")
    outs[2, 0, 1, 0] = float("nan")
    out, lse = merge_stacked(outs, lses)
    assert torch.isnan(lse[0, 1, 0]) and torch.isnan(out[0, 1, 0]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(lse[0, 0]).all()
