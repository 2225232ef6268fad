"""longattn.common.testing: persistent gloo worlds (1, 2, 3, 4, 8 ranks), reuse across tests,
hard timeouts for hung ranks, re-raised rank errors, and the error/tolerance helpers.

Timing figures (world start-up, per-call overhead) are printed (``pytest -s``), never asserted.
The only time bounds asserted are the ones the contract promises: a hung or crashed rank fails
the call within its timeout instead of blocking.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import (
    TOLERANCES,
    RankError,
    WorldTimeout,
    assert_close,
    assert_errors,
    oracle_errors,
    random_like,
    random_qkv,
    rel_error,
    run_world,
    world_pids,
)

SIZES = [1, 2, 3, 4, 8]
PIDS: dict[int, list[int]] = {}


# --------------------------------------------------------------------------------------------
# functions run on the ranks (module level: the workers import this module by name)


def _info(rank, world_size, tag, tensor):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "world_size": world_size, "dist_rank": dist.get_rank(),
            "dist_world": dist.get_world_size(), "backend": dist.get_backend(),
            "pid": os.getpid(), "sum": t.item(), "tag": tag, "tensor": tensor * (rank + 1)}


def _trivial(rank, world_size):
    return rank


def _raise_on(rank, world_size, bad):
    if rank in bad:
        raise ValueError(f"boom from rank {rank}")
    return rank


def _raise_while_others_wait(rank, world_size):
    if rank == world_size - 1:
        raise KeyError("rank gave up before the collective")
    dist.barrier()  # blocks: the last rank never joins
    return rank


def _hang(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    return rank


def _hang_in_collective(rank, world_size):
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(3600)
    return rank


def _die(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def _several_cases(rank, world_size, shapes):
    """Many checks inside one call (how tests should use a world)."""
    out = []
    for s in shapes:
        t = torch.full((s,), float(rank))
        dist.all_reduce(t)
        out.append(t.sum().item())
    return out


# --------------------------------------------------------------------------------------------
# worlds and reuse


@pytest.mark.parametrize("n", SIZES)
def test_world_of_each_size(n):
    t0 = time.perf_counter()
    res = run_world(n, _info, "hello", torch.arange(3.0))
    dt = time.perf_counter() - t0
    assert [r["rank"] for r in res] == list(range(n))  # results in rank order
    for r in res:
        assert r["world_size"] == r["dist_world"] == n and r["dist_rank"] == r["rank"]
        assert r["backend"] == "gloo" and r["tag"] == "hello"
        assert r["sum"] == n * (n + 1) / 2  # the ranks really talk to each other
        assert torch.equal(r["tensor"], torch.arange(3.0) * (r["rank"] + 1))
    pids = [r["pid"] for r in res]
    assert len(set(pids)) == n and os.getpid() not in pids
    assert world_pids(n) == pids
    PIDS.setdefault(n, pids)
    print(f"\nworld of {n}: first call {dt:.2f} s (includes start-up if it was not running)")


def test_worlds_are_reused_across_tests_and_calls():
    for n in SIZES:
        if n not in PIDS:  # this test run alone
            PIDS[n] = [r["pid"] for r in run_world(n, _info, "a", torch.zeros(1))]
        for _ in range(3):
            res = run_world(n, _info, "again", torch.ones(1))
            assert [r["pid"] for r in res] == PIDS[n]
        assert world_pids(n) == PIDS[n]


def test_per_call_overhead_is_measured_and_printed():
    lines = []
    for n in (1, 2, 4, 8):
        run_world(n, _trivial)
        reps = 30
        t0 = time.perf_counter()
        for _ in range(reps):
            assert run_world(n, _trivial) == list(range(n))
        ms = (time.perf_counter() - t0) / reps * 1e3
        lines.append(f"world of {n}: {ms:.2f} ms per run_world call")
        assert world_pids(n) == PIDS.get(n, world_pids(n))
    print("\n" + "\n".join(lines))


def test_many_cases_in_one_call():
    shapes = [1, 5, 17, 64]
    res = run_world(4, _several_cases, shapes)
    assert res == [[float(6 * s) for s in shapes]] * 4


# --------------------------------------------------------------------------------------------
# failures: errors re-raised with tracebacks, hangs and crashes bounded by the timeout


def test_raising_rank_reraises_with_its_traceback():
    with pytest.raises(RankError) as ei:
        run_world(2, _raise_on, (1,), timeout=60)
    msg = str(ei.value)
    assert "rank 1" in msg and "Traceback" in msg
    assert "ValueError: boom from rank 1" in msg and "_raise_on" in msg
    # the world is usable again afterwards
    assert run_world(2, _trivial) == [0, 1]


def test_lowest_failing_rank_is_reported():
    with pytest.raises(RankError, match="boom from rank 0"):
        run_world(2, _raise_on, (0, 1), timeout=60)
    assert run_world(2, _trivial) == [0, 1]


def test_rank_error_while_others_block_in_a_collective():
    timeout = 60
    t0 = time.perf_counter()
    with pytest.raises(RankError, match="rank gave up"):
        run_world(2, _raise_while_others_wait, timeout=timeout)
    dt = time.perf_counter() - t0
    print(f"\nerror with blocked peers reported after {dt:.1f} s")
    assert dt < timeout
    assert run_world(2, _trivial) == [0, 1]


@pytest.mark.parametrize("fn", [_hang, _hang_in_collective])
def test_hung_rank_fails_within_its_timeout(fn):
    old = world_pids(2) or [r["pid"] for r in run_world(2, _info, "x", torch.zeros(1))]
    timeout = 3.0
    t0 = time.perf_counter()
    with pytest.raises(WorldTimeout, match="did not finish"):
        run_world(2, fn, timeout=timeout)
    dt = time.perf_counter() - t0
    print(f"\nhung rank detected after {dt:.1f} s (timeout {timeout} s)")
    assert dt < timeout + 15  # the timeout plus killing the processes
    assert world_pids(2) is None  # the hung world is gone ...
    new = [r["pid"] for r in run_world(2, _info, "x", torch.zeros(1))]  # ... and a fresh one works
    assert set(new).isdisjoint(old)


def test_crashed_rank_fails_promptly():
    """A rank that dies (segfault, os._exit, OOM kill) can never answer: the call must fail
    with RankError soon, not sit until the (default 120 s) timeout."""
    timeout = 20.0
    t0 = time.perf_counter()
    with pytest.raises(RankError, match="died"):
        run_world(2, _die, timeout=timeout)
    dt = time.perf_counter() - t0
    print(f"\ncrashed rank detected after {dt:.1f} s (timeout {timeout} s)")
    assert dt < timeout / 2
    assert run_world(2, _trivial) == [0, 1]


def test_ranks_that_die_at_start_up_fail_the_start_promptly(tmp_path):
    """A script without a ``__main__`` guard makes every spawned rank die while importing it;
    the world start must say so at once instead of waiting out its 60 + 10 n s deadline."""
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from longattn.common.testing import run_world, WorldTimeout\n"
        "try:\n"
        "    run_world(2, print)\n"
        "except WorldTimeout as e:\n"
        "    print('WORLD-TIMEOUT', e)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    dt = time.perf_counter() - t0
    print(f"\nstart-up failure reported after {dt:.1f} s")
    assert "WORLD-TIMEOUT" in proc.stdout, proc.stdout + proc.stderr
    assert "did not start" in proc.stdout


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("n", [0, -1, True, 2.0, "2", None])
def test_bad_world_size(n):
    with pytest.raises(ValueError, match="world_size"):
        run_world(n, _trivial)


@pytest.mark.parametrize("fn", [None, "f", 3])
def test_fn_not_callable(fn):
    with pytest.raises(TypeError, match="fn"):
        run_world(1, fn)


def test_fn_not_importable_by_name():
    with pytest.raises((TypeError, ValueError), match="fn"):
        run_world(1, lambda rank, world_size: rank)


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), "10"])
def test_bad_timeout(timeout):
    with pytest.raises((ValueError, TypeError), match="timeout"):
        run_world(1, _trivial, timeout=timeout)


# --------------------------------------------------------------------------------------------
# rel_error / assert_close / TOLERANCES


def test_rel_error_basics():
    e = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert rel_error(e, e) == 0.0
    assert math.isclose(rel_error(e + torch.tensor([0.0, 0.5], dtype=torch.float64), e), 0.1)
    assert math.isclose(rel_error(np.array([1.0, 0.0]), np.zeros(2)), 1.0)  # abs when e == 0
    assert rel_error(torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0  # mixed types
    bf = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert rel_error(bf, bf.double()) == 0.0


def test_rel_error_nan_and_inf_never_pass():
    e = np.array([1.0, 2.0, -np.inf])
    assert rel_error(np.array([1.0, np.nan, -np.inf]), e) == math.inf
    assert rel_error(e, np.array([1.0, np.nan, -np.inf])) == math.inf
    assert rel_error(np.array([1.0, 2.0, 5.0]), e) == math.inf  # inf on one side only
    assert rel_error(np.array([1.0, 2.0, np.inf]), e) == math.inf  # +inf vs -inf
    assert rel_error(np.array([1.0, 2.0, -np.inf]), e) == 0.0  # agreeing -inf ignored
    assert rel_error(np.array([1.1, 2.0, -np.inf]), e) == pytest.approx(0.1 / math.sqrt(5))


def test_rel_error_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        rel_error(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        rel_error(np.zeros((3, 1)), np.zeros(3))  # no silent broadcasting


def test_assert_close_and_tolerances():
    assert set(TOLERANCES) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    assert TOLERANCES[torch.float64] <= 1e-10 and TOLERANCES[torch.bfloat16] <= 2e-2
    e = torch.ones(4, dtype=torch.float64)
    assert assert_close(e, e) == 0.0
    assert_close((e * (1 + 1e-3)).bfloat16(), e)  # bf16 tolerance from the dtype
    with pytest.raises(AssertionError, match="out"):
        assert_close(e * (1 + 1e-8), e, what="out")
    with pytest.raises(AssertionError):
        assert_close(torch.full((4,), float("nan")), e, tol=1e9)
    assert_close(e * 1.5, e, tol=0.6)


# --------------------------------------------------------------------------------------------
# the shared oracle harness: random_qkv / random_like / oracle_errors / assert_errors


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_random_qkv_shapes_dtypes_and_values(dtype):
    q, k, v = random_qkv(2, 5, 7, 4, 2, 8, dtype=dtype, seed=3, dv=6)
    assert q.shape == (2, 5, 4, 8) and k.shape == (2, 7, 2, 8) and v.shape == (2, 7, 2, 6)
    assert q.dtype == k.dtype == v.dtype == dtype and q.device.type == "cpu"
    for t in (q, k, v):
        assert (t != 0).all() and torch.isfinite(t).all() and t.double().std() > 0.5
    assert not torch.equal(k[..., :6], v)
    again = random_qkv(2, 5, 7, 4, 2, 8, dtype=dtype, seed=3, dv=6)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))  # deterministic
    other = random_qkv(2, 5, 7, 4, 2, 8, dtype=dtype, seed=4, dv=6)
    assert not torch.equal(q, other[0])
    # the same values as float64 draws cast down: every dtype sees the same problem
    q64 = random_qkv(2, 5, 7, 4, 2, 8, dtype=torch.float64, seed=3, dv=6)[0]
    assert torch.equal(q, q64.to(dtype))


def test_random_like_and_empty_shapes():
    q, k, v = random_qkv(1, 0, 3, 2, 1, 4, dtype=torch.float32, seed=0)
    assert q.shape == (1, 0, 2, 4) and k.shape == (1, 3, 1, 4)
    t = torch.empty(2, 3, dtype=torch.bfloat16)
    r = random_like(t, seed=1)
    assert r.shape == t.shape and r.dtype == t.dtype and (r != 0).all()
    assert torch.equal(r, random_like(t, seed=1)) and not torch.equal(r, random_like(t, seed=2))


@pytest.mark.parametrize("kw,exc,word", [
    (dict(hq=3, hkv=2), ValueError, "hkv"), (dict(hkv=0), ValueError, "hkv"),
    (dict(b=-1), ValueError, "b must"), (dict(d=2.0), ValueError, "d must"),
    (dict(seed=True), ValueError, "seed"), (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_random_qkv_bad_arguments(kw, exc, word):
    args = dict(b=1, sq=2, sk=2, hq=2, hkv=1, d=4, dtype=torch.float32, seed=0)
    args.update(kw)
    with pytest.raises(exc, match=word):
        random_qkv(**args)


def test_oracle_errors_relative_errors_per_name():
    e = {"out": np.array([3.0, 4.0]), "lse": torch.tensor([1.0, -math.inf], dtype=torch.float64)}
    a = {"out": torch.tensor([3.0, 4.5]), "lse": torch.tensor([1.0, -math.inf])}
    errs = oracle_errors(a, e)
    assert set(errs) == {"out", "lse"}
    assert errs["out"] == pytest.approx(0.1) and errs["lse"] == 0.0  # agreeing -inf ignored


def test_oracle_errors_nan_never_passes():
    e = {"out": np.array([1.0, 2.0])}
    assert oracle_errors({"out": torch.tensor([1.0, math.nan])}, e)["out"] == math.inf
    assert oracle_errors({"out": torch.tensor([1.0, math.inf])}, e)["out"] == math.inf
    assert oracle_errors({"out": torch.tensor([1.0, -math.inf])}, e)["out"] == math.inf
    with pytest.raises(AssertionError, match="out"):
        assert_errors(oracle_errors({"out": torch.tensor([1.0, math.nan])}, e), torch.float64,
                      tol=1e30)


def test_oracle_errors_bad_input():
    with pytest.raises(ValueError, match="only in actual.*dq.*only in expected.*dk"):
        oracle_errors({"out": torch.zeros(1), "dq": torch.zeros(1)},
                      {"out": np.zeros(1), "dk": np.zeros(1)})
    with pytest.raises(ValueError, match="lse: .*shape"):
        oracle_errors({"lse": torch.zeros(2)}, {"lse": np.zeros(3)})
    with pytest.raises(TypeError, match="dict"):
        oracle_errors([torch.zeros(1)], [np.zeros(1)])


def test_assert_errors_uses_the_dtype_tolerance_and_names_every_miss():
    ok = {"out": 1e-3, "lse": 1e-7}
    assert assert_errors(ok, torch.bfloat16) is ok
    with pytest.raises(AssertionError) as ei:
        assert_errors({"out": 1e-3, "dq": 0.5, "dk": 0.1}, torch.float16)
    msg = str(ei.value)
    assert "dq" in msg and "dk" in msg and "out" not in msg.split(":", 1)[1]
    assert_errors({"out": 0.5}, torch.float64, tol=0.6)
    assert_errors({"out": 0.5, "lse": 1e-9}, torch.float64, tol={"out": 0.6, "lse": 1e-8})
    with pytest.raises(AssertionError, match="lse"):
        assert_errors({"out": 0.5, "lse": 1e-7}, torch.float64, tol={"out": 0.6, "lse": 1e-8})
    with pytest.raises(ValueError, match="lse"):
        assert_errors({"out": 0.5, "lse": 1e-9}, torch.float64, tol={"out": 0.6})
    with pytest.raises(AssertionError, match="out"):
        assert_errors({"out": math.nan}, torch.float64, tol=1.0)
    with pytest.raises(TypeError, match="dtype"):
        assert_errors({"out": 0.0}, torch.int32)


def test_device_rel_error_is_rel_error_in_chunks():
    from longattn.common.testing import device_rel_error

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, 3, 4, generator=g), torch.randn(100, 3, 4, generator=g)
    assert device_rel_error(a, b, chunk=7) == pytest.approx(rel_error(a, b), rel=1e-12)
    assert device_rel_error(b, b) == 0.0
    assert device_rel_error(a, torch.zeros_like(a)) == float("inf")
    a[50, 1, 2] = float("nan")
    assert device_rel_error(a, b, chunk=7) == float("inf")
    b[3, 0, 0] = float("inf")
    assert device_rel_error(b.clone(), b) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        device_rel_error(a, b[:5])
