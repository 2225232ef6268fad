"""Fault injection: one argument is bad (or merely different) on a single rank of a 2-, 3- or
4-rank world. Every rank must raise the same clear error, naming the argument, before any K/V
moves, and the world must keep working afterwards. 38 checks (each with the bad value on one
rank) in each of 4 worlds: 2 ranks (bad rank 1), 3 ranks (bad rank 0, then 1), 4 ranks (bad
rank 3); one more test for an explicit backend that cannot serve one rank's step."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from longattn.common.comm import counting
from longattn.common.dist import LOCAL
from longattn.common.testing import run_world
from longattn.ring_swa import (
    ring_sliding_window_attn,
    ring_sliding_window_attn_varlen,
    ring_streaming_llm_attn,
    ring_swa_attn,
)

pytestmark = pytest.mark.faults

S = 4  # tokens per rank


def _dense(rank):
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(1, S, h, 8, generator=g) for h in (2, 2, 2)]


def _faults(rank, world, bad_rank):
    """(name, words the message must contain, thunk); the thunk's call differs on bad_rank."""
    bad = rank == bad_rank
    grp = dist.group.WORLD
    q, k, v = _dense(rank)
    cu = torch.tensor([0, 3, S * world], dtype=torch.int32)

    def canon(**over):
        kw = dict(window_size=(3, 0), group=grp)
        kw.update(over if bad else {})
        return lambda: ring_swa_attn(q, k, v, **kw)

    def canon_varlen(**over):
        kw = dict(window_size=(3, 0), group=grp, cu_seqlens=cu)
        kw.update(over if bad else {})
        return lambda: ring_swa_attn(q[0], k[0], v[0], **kw)

    def seed(fn=ring_sliding_window_attn, *args, **over):
        kw = over if bad else {}
        return lambda: fn(q, k, v, *args, cp_group=grp, **kw)

    def tensors(q2=None, k2=None, v2=None):
        qq, kk, vv = (x2 if bad and x2 is not None else x
                      for x, x2 in ((q, q2), (k, k2), (v, v2)))
        return lambda: ring_swa_attn(qq, kk, vv, window_size=(3, 0), group=grp)

    return [
        ("window_size < -1", ["window_size"], canon(window_size=(-2, 0))),
        ("window_size not a pair", ["window_size"], canon(window_size=3)),
        ("window_size differs", ["window_size", "same on every rank"], canon(window_size=(4, 0))),
        ("window_size not causal", ["window_size"], canon(window_size=(3, 1), causal=False)),
        ("window_size overflows int64", ["window_size", "64-bit"],
         canon(window_size=(2**64, 0))),
        ("window_size = 2**63", ["window_size", "64-bit"], canon(window_size=(2**63, 0))),
        ("seed: window_size = 2**63", ["window_size", "64-bit"],
         seed(ring_sliding_window_attn, 2**63) if bad else seed(ring_sliding_window_attn, 3)),
        ("causal not a bool", ["causal"], canon(causal="yes")),
        ("causal differs", ["causal", "same on every rank"], canon(causal=False)),
        ("softmax_scale nan", ["softmax_scale"], canon(softmax_scale=float("nan"))),
        ("softmax_scale differs", ["softmax_scale", "same on every rank"],
         canon(softmax_scale=0.25)),
        ("num_sink_tokens < 0", ["num_sink_tokens"], canon(num_sink_tokens=-1)),
        ("num_sink_tokens differs", ["num_sink_tokens", "same on every rank"],
         canon(num_sink_tokens=2)),
        ("num_sink_tokens overflows int64", ["num_sink_tokens", "64-bit"],
         canon(num_sink_tokens=2**70)),
        ("num_sink_tokens = 2**63", ["num_sink_tokens", "64-bit"],
         canon(num_sink_tokens=2**63)),
        ("varlen num_sink_tokens = 2**63", ["num_sink_tokens", "64-bit"],
         canon_varlen(num_sink_tokens=2**63)),
        ("return_lse not a bool", ["return_lse"], canon(return_lse=1)),
        ("return_lse differs", ["return_lse", "same on every rank"], canon(return_lse=True)),
        ("backend unknown", ["backend"], canon(backend="no-such-kernel")),
        ("backend cannot serve (CUDA kernel, CPU tensors)", ["backend 'aten'"],
         canon(backend="aten")),
        ("backend differs", ["backend", "same on every rank"], canon(backend="torch")),
        ("backend not a str", ["backend"], canon(backend=3)),
        ("cu_seqlens differs", ["cu_seqlens", "same on every rank"],
         canon_varlen(cu_seqlens=torch.tensor([0, 2, S * world], dtype=torch.int32))),
        ("cu_seqlens float", ["cu_seqlens"],
         canon_varlen(cu_seqlens=torch.tensor([0.0, S * world]))),
        ("cu_seqlens not monotone", ["cu_seqlens"],
         canon_varlen(cu_seqlens=torch.tensor([0, 3, 2, S * world], dtype=torch.int32))),
        ("dtype differs", ["dtype", "same on every rank"],
         tensors(q.double(), k.double(), v.double())),
        ("device type differs", ["q.device.type", "same on every rank"],
         tensors(*(x.to("meta") for x in (q, k, v)))),
        ("tokens differ (dense)", ["q.shape", "same on every rank"],
         tensors(*(torch.cat([x, x[:, :1]], 1) for x in (q, k, v)))),
        ("heads differ", ["q.shape", "same on every rank"], tensors(torch.cat([q, q], 2))),
        ("q and k tokens differ", ["q and k"], tensors(k2=k[:, :2], v2=v[:, :2])),
        ("needs grad differs", ["needs grad", "same on every rank"],
         tensors(q.clone().requires_grad_())),
        ("seed: window_size not an int", ["window_size"], seed(ring_sliding_window_attn, 2.5)
         if bad else seed(ring_sliding_window_attn, 3)),
        ("seed: cp_size wrong", ["cp_size"], seed(ring_sliding_window_attn, 3,
                                                  cp_size=world + 1)),
        ("seed: cp_local_rank wrong", ["cp_local_rank"],
         seed(ring_sliding_window_attn, 3, cp_local_rank=(rank + 1) % world)),
        ("seed: cp_prev_global_rank wrong", ["cp_prev_global_rank"],
         seed(ring_sliding_window_attn, 3, cp_prev_global_rank=rank)),
        ("seed: cp_next_global_rank wrong", ["cp_next_global_rank"],
         seed(ring_sliding_window_attn, 3, cp_next_global_rank=rank)),
        ("seed: no sinks", ["num_sink_tokens"],
         seed(ring_streaming_llm_attn, 3, num_sink_tokens=0)),
        ("seed varlen: cu_seqlens differs", ["cu_seqlens", "same on every rank"],
         lambda: ring_sliding_window_attn_varlen(
             q[0], k[0], v[0], 3, torch.tensor([0, 1 if bad else 3, S * world],
                                               dtype=torch.int32), grp)),
    ]


def fault_worker(rank, world, bad_rank):
    report = []
    for name, words, call in _faults(rank, world, bad_rank):
        with counting() as c:
            try:
                call()
                outcome = ("no error", "")
            except (ValueError, TypeError) as e:
                outcome = (type(e).__name__, str(e))
        report.append((name, words, outcome, c.bytes_sent + c.bytes_received))
        q, k, v = _dense(rank)  # the world still works: a good call right after the bad one
        ring_swa_attn(q, k, v, window_size=(5, 0), group=dist.group.WORLD)
    return report


def _same(msg):
    """The message without the part that names this rank's own value."""
    return re.sub(r"this rank \(rank \d+\) has .*?(?= \[|$)", "", msg)


@pytest.mark.parametrize("world, bad_rank", [(2, 1), (3, 0), (3, 1), (4, 3)])
def test_fault_on_one_rank_raises_everywhere(world, bad_rank):
    reports = run_world(world, fault_worker, bad_rank, timeout=180)
    for i, (name, words, _, _) in enumerate(reports[0]):
        outcomes = [rep[i][2] for rep in reports]
        for rank, (kind, msg) in enumerate(outcomes):
            assert kind in ("ValueError", "TypeError"), f"{name}: rank {rank} did not raise"
            for w in words:
                assert w in msg, f"{name}: rank {rank}: {w!r} not in {msg!r}"
            assert reports[rank][i][3] == 0, f"{name}: rank {rank} moved bytes before raising"
        assert len({kind for kind, _ in outcomes}) == 1, (name, outcomes)
        assert len({_same(msg) for _, msg in outcomes}) == 1, (name, outcomes)


def causal_only_worker(rank, world):
    """A backend that serves only causal blocks: every rank must refuse the call before any
    K/V moves, naming the step of the rank that needs a non-causal block."""
    from longattn.common.kernels import BACKENDS, Backend, register_backend

    if "causal-only" not in BACKENDS:  # this world process's first call
        t = BACKENDS["torch"]
        register_backend("causal-only", Backend(
            t.forward, t.backward, lambda req: None if req.causal else "only causal blocks",
            t.config_type))
    q, k, v = _dense(rank)
    report = []
    for kw in (dict(window_size=(3, 0)), dict(window_size=(3, 0), num_sink_tokens=2)):
        with counting() as c:
            try:
                ring_swa_attn(q, k, v, group=dist.group.WORLD, backend="causal-only", **kw)
                report.append((None, c.bytes_sent + c.bytes_received))
            except ValueError as e:
                report.append((str(e), c.bytes_sent + c.bytes_received))
    # on one process a window without sinks is one causal block: it runs
    alone = ring_swa_attn(q, k, v, window_size=(3, 0), group=LOCAL, backend="causal-only")
    return report, alone


def test_explicit_backend_checked_for_every_step_of_every_rank():
    reports = run_world(2, causal_only_worker, timeout=120)
    for rank, (report, alone) in enumerate(reports):
        (halo, moved_h), (sinks, moved_s) = report
        assert moved_h == moved_s == 0, rank
        assert halo is not None and "the halo step of rank 1" in halo, halo
        assert sinks is not None and "the own sinks step of rank 0" in sinks, sinks
        assert "backend 'causal-only' cannot serve" in halo and "only causal blocks" in halo
        q, k, v = _dense(rank)
        assert torch.allclose(alone, ring_swa_attn(q, k, v, window_size=(3, 0), group=LOCAL))
    assert reports[0][0] == reports[1][0]  # the same messages on both ranks
