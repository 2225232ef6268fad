"""Bad input raises a clear error on every rank, before any K/V moves, and never hangs; the
world keeps working afterwards. Also: the seed's argument names, local mode, sub-groups."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

from longattn.common.comm import counting
from longattn.common.testing import rel_error, run_world
from longattn.ring_swa import (
    ring_sliding_window_attn,
    ring_sliding_window_attn_varlen,
    ring_streaming_llm_attn,
    ring_streaming_llm_attn_varlen,
    ring_swa_attn,
)
from longattn.ring_swa.cases import errors, run_case


def _dense(rank, s=4, h=2):
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(1, s, h, 8, generator=g) for _ in range(3)]


def _packed(t, h=2):
    return [torch.randn(t, h, 8) for _ in range(3)]


def _bad_calls(rank, world):
    """(name, thunk) pairs; each thunk makes one call that must raise on every rank."""
    cu = torch.tensor([0, 5, 4 * world], dtype=torch.int32)
    grp = dist.group.WORLD
    return [
        ("window<0", lambda: ring_sliding_window_attn(*_dense(rank), -1, grp)),
        ("window<0 on rank 0 only",
         lambda: ring_sliding_window_attn(*_dense(rank), -1 if rank == 0 else 3, grp)),
        ("window not int", lambda: ring_sliding_window_attn(*_dense(rank), 2.5, grp)),
        ("cu not monotone", lambda: ring_sliding_window_attn_varlen(
            *_packed(4), 3, torch.tensor([0, 6, 2, 4 * world], dtype=torch.int32), grp)),
        ("cu wrong total", lambda: ring_sliding_window_attn_varlen(
            *_packed(4), 3, torch.tensor([0, 5, 4 * world + 1], dtype=torch.int32), grp)),
        ("cu float", lambda: ring_sliding_window_attn_varlen(
            *_packed(4), 3, torch.tensor([0.0, 4.0 * world]), grp)),
        ("cu differs on rank 1", lambda: ring_sliding_window_attn_varlen(
            *_packed(4), 3, torch.tensor([0, 6 if rank == 1 else 5, 4 * world],
                                         dtype=torch.int32), grp)),
        ("seq length differs on the last rank",
         lambda: ring_sliding_window_attn(*_dense(rank, s=5 if rank == world - 1 else 4), 3, grp)),
        ("heads differ on rank 1", lambda: ring_sliding_window_attn_varlen(
            *_packed(4, h=4 if rank == 1 else 2), 3, cu, grp)),
        ("dtype differs on rank 0", lambda: ring_sliding_window_attn(
            *[t.double() if rank == 0 else t for t in _dense(rank)], 3, grp)),
        ("q/k token counts differ", lambda: ring_sliding_window_attn(
            _dense(rank)[0], *[t[:, :3] for t in _dense(rank)[1:]], 3, grp)),
        ("gqa heads", lambda: ring_sliding_window_attn(
            torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), 3, grp)),
        ("no sinks", lambda: ring_streaming_llm_attn(*_dense(rank), 3, grp, num_sink_tokens=0)),
        ("cp_size wrong", lambda: ring_sliding_window_attn(*_dense(rank), 3, grp,
                                                           cp_size=world + 1)),
        ("cp_local_rank wrong on rank 0", lambda: ring_sliding_window_attn(
            *_dense(rank), 3, grp, cp_local_rank=(rank + 1) % world if rank == 0 else rank)),
        ("cp_next_global_rank wrong", lambda: ring_sliding_window_attn(
            *_dense(rank), 3, grp, cp_next_global_rank=rank)),
        ("scale nan", lambda: ring_sliding_window_attn(*_dense(rank), 3, grp,
                                                       softmax_scale=float("nan"))),
    ]


def bad_input_worker(rank, world):
    report = []
    for name, call in _bad_calls(rank, world):
        with counting() as c:
            try:
                call()
                outcome = ("no error", "")
            except (ValueError, TypeError) as e:
                outcome = (type(e).__name__, str(e))
        report.append((name, outcome, c.bytes_sent + c.bytes_received))
        # the world still works: a good call right after the bad one
        q, k, v = _dense(rank)
        ring_sliding_window_attn(q, k, v, 5, dist.group.WORLD)
    return report


def test_bad_input_raises_on_every_rank_without_traffic():
    world = 3
    reports = run_world(world, bad_input_worker, timeout=120)
    names = [n for n, _ in _bad_calls(0, world)]
    for i, name in enumerate(names):
        for rank in range(world):
            got_name, (kind, msg), moved = reports[rank][i]
            assert got_name == name
            assert kind in ("ValueError", "TypeError"), f"{name}: rank {rank} did not raise"
            assert moved == 0, f"{name}: rank {rank} moved {moved} bytes before raising"
            assert msg, name


def test_error_messages_name_the_argument():
    q, k, v = _dense(0)
    with pytest.raises(ValueError, match="window_size"):
        ring_sliding_window_attn(q, k, v, -3)
    with pytest.raises(TypeError, match="window_size"):
        ring_sliding_window_attn(q, k, v, True)
    with pytest.raises(ValueError, match="num_sink_tokens"):
        ring_streaming_llm_attn(q, k, v, 2, num_sink_tokens=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        ring_sliding_window_attn_varlen(q[0], k[0], v[0], 2,
                                        torch.tensor([0, 3, 1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        ring_sliding_window_attn_varlen(q[0], k[0], v[0], 2,
                                        torch.tensor([0, 3, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cp_size"):
        ring_sliding_window_attn(q, k, v, 2, cp_size=2)


def test_seed_signatures():
    """Drop-in: exactly the seed's parameters, names, order and defaults."""
    common = ["cp_group", "cp_size", "cp_local_rank", "cp_prev_global_rank",
              "cp_next_global_rank", "softmax_scale"]
    want = {
        ring_sliding_window_attn: ["q", "k", "v", "window_size", *common],
        ring_sliding_window_attn_varlen: ["q", "k", "v", "window_size", "cu_seqlens", *common],
        ring_streaming_llm_attn: ["q", "k", "v", "window_size", *common, "num_sink_tokens"],
        ring_streaming_llm_attn_varlen: ["q", "k", "v", "window_size", "cu_seqlens", *common,
                                         "num_sink_tokens"],
    }
    for fn, names in want.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params] == names, fn.__name__
        assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params), fn.__name__
        defaults = {p.name: p.default for p in params if p.default is not p.empty}
        assert defaults == {**dict.fromkeys(common), **({"num_sink_tokens": 1} if
                                                         "num_sink_tokens" in names else {})}
    params = inspect.signature(ring_swa_attn).parameters
    assert list(params) == ["q", "k", "v", "window_size", "group", "causal", "softmax_scale",
                            "cu_seqlens", "num_sink_tokens", "return_lse", "backend"]
    assert all(params[n].kind == inspect.Parameter.KEYWORD_ONLY for n in list(params)[3:])


def test_local_mode_matches_oracle_and_gradcheck():
    """cp_group=None without torch.distributed runs on this process alone."""
    case = dict(kind="varlen", n=1, lengths=[5, 1, 9, 2, 7], counts=[24], hq=4, hkv=1, d=8,
                window=3, ns=2, dtype="float64", seed=11)
    from longattn.ring_swa.cases import cu_seqlens, global_inputs, oracle

    q, k, v, dout = global_inputs(case)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_streaming_llm_attn_varlen(q, k, v, 3, cu_seqlens(case), num_sink_tokens=2)
    out.backward(dout)
    for got, ref in zip((out, q.grad, k.grad, v.grad), oracle(case)):
        assert rel_error(got, ref) <= 1e-10
    small = [torch.randn(1, 7, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda a, b, c: ring_streaming_llm_attn(a, b, c, 2,
                                                                             num_sink_tokens=2),
                                    small)


def subgroup_worker(rank, world, case):
    """Ranks 1..3 form the cp_group (group ranks 0..2); rank 0 sits out."""
    grp = dist.new_group([1, 2, 3])
    if rank == 0:
        return None
    return run_case(dist.get_rank(grp), 3, case, group=grp)


def test_subgroup_group_ranks():
    case = dict(kind="varlen", n=3, lengths=[4, 1, 9, 3, 2], counts=[6, 7, 6], hq=2, hkv=2,
                d=8, window=7, ns=1, dtype="float64", seed=5)
    res = run_world(4, subgroup_worker, case)[1:]
    for key, e in errors(res, case).items():
        assert e <= 1e-10, key
