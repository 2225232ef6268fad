"""``longattn.hamilton.explain``: the strategy model's records, its choice, its inputs (the
committed H200 block times, the topology targets) and its errors. No process group."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from longattn.common import topology
from longattn.hamilton import HamiltonConfig, explain, strategy

PKG = Path(__file__).resolve().parents[1]


def test_block_times_are_the_committed_h200_measurement():
    data = json.loads((PKG / "bench/results/h200/step_times.json").read_text())
    assert data["device"] == "NVIDIA H200"
    assert (data["batch"], data["heads"], data["head_dim"]) == (1, 20, 64)
    assert tuple((r["tokens"], r["full_ms"]) for r in data["rows"]) == strategy.H200_BLOCK_MS


def test_h200_target():
    t = topology.get_target("H200-1")
    assert (t.nodes, t.gpus_per_node, t.fabric) == (1, 8, "nvswitch")
    assert t.gpu_bw == 450e9 and t.attn_flops_fwd == 600e12 and t.attn_flops_fwd_bwd == 543e12
    assert set(topology.ALL_TARGETS) == set(topology.TARGETS) | {"H200-1"}
    spec = json.loads((PKG / "targets/H200-1/target.json").read_text())["hardware"]["figures"]
    assert dataclasses.asdict(t) == spec  # the same figures as the H200-1 reproduction target
    with pytest.raises(ValueError, match="target"):
        topology.get_target("H300-1")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_records_and_choice(causal, backward):
    e = explain(seqlen=8 * 14 * 1024, heads=32, kv_heads=8, causal=causal, backward=backward)
    names = [p.schedule for p in e.predictions]
    assert names == ["tasp", "ring", "allgather", "ulysses"]  # one node: no two_level
    assert e.predictions[1].name == ("zigzag_ring" if causal else "ring")
    for p in e.predictions:
        assert p.feasible and p.reason == ""
        assert 0 < p.compute_ms < math.inf and 0 < p.comm_ms < math.inf and p.memory_bytes > 0
        if p.schedule in ("allgather", "ulysses"):  # blocking exchanges: no overlap
            assert p.total_ms == pytest.approx(p.compute_ms + p.comm_ms)
        else:  # overlapped step loop: at least the compute, at most compute + comm
            assert p.compute_ms <= p.total_ms <= p.compute_ms + p.comm_ms
    assert e.best.total_ms == min(p.total_ms for p in e.predictions)
    assert e.best.schedule in str(e) and "total ms" in str(e)


def test_infeasible_strategies_say_why():
    e = explain(seqlen=8 * 1024, heads=12, kv_heads=4, causal=True)  # 12 % 8 != 0
    by = {p.schedule: p for p in e.predictions}
    assert not by["ulysses"].feasible and "12 query heads" in by["ulysses"].reason
    assert not by["tasp"].feasible and "divisible by 14" in by["tasp"].reason
    assert by["ulysses"].total_ms == math.inf and e.best.feasible


def test_allgather_bytes_in_the_model():
    """allgather's forward communication is one exchange of the README's message to every peer."""
    s = dict(seqlen=8 * 4096, heads=8, kv_heads=2, head_dim=128, causal=False)
    e = explain(**s)
    t = topology.get_target("H200-1")
    kv = 4096 * 2 * 256 * 2
    want = topology.step_time(t, [(r, p, kv) for r in range(8) for p in range(8) if r != p])
    ag = next(p for p in e.predictions if p.schedule == "allgather")
    assert ag.comm_ms == pytest.approx(want * 1e3)
    assert ag.memory_bytes == 2 * 8 * kv


def test_communication_grows_with_length_and_compute_dominates_long_sequences():
    short = explain(seqlen=32768, heads=32, kv_heads=8, causal=True)
    long = explain(seqlen=1 << 20, heads=32, kv_heads=8, causal=True)
    for a, b in zip(short.predictions, long.predictions):
        if a.feasible:
            assert b.comm_ms > a.comm_ms and b.compute_ms > a.compute_ms
    assert all(p.comm_ms < 0.05 * p.compute_ms for p in long.predictions if p.feasible)


def test_two_level_on_several_nodes():
    e = explain(seqlen=16 * 8192, heads=8, kv_heads=8, causal=False, world=16, target="H100-2")
    assert [p.schedule for p in e.predictions] == ["tasp", "ring", "two_level", "allgather",
                                                    "ulysses"]
    two = next(p for p in e.predictions if p.schedule == "two_level")
    ring = next(p for p in e.predictions if p.schedule == "ring")
    assert two.comm_ms < ring.comm_ms  # one NIC message per GPU and step instead of a block


def test_usp_rows():
    e = explain(seqlen=8 * 1024, heads=16, kv_heads=2, causal=True, world=8, head_group=2)
    assert [p.name for p in e.predictions] == ["usp:tasp", "usp:ring"]
    assert e.best.schedule in ("tasp", "ring")
    with pytest.raises(ValueError, match="head_group"):
        explain(seqlen=9 * 1024, heads=16, world=9, head_group=2)


def test_choice_is_deterministic_and_ties_go_to_the_step_loop():
    a = explain(seqlen=1 << 20, heads=64, kv_heads=8, causal=True)
    b = explain(seqlen=1 << 20, heads=64, kv_heads=8, causal=True)
    assert a == b
    p = strategy.Prediction
    tie = [p("ulysses", "ulysses", True, 1, 1, 2, 0), p("ring", "ring", True, 1, 1, 2, 0)]
    assert strategy.choose(tie).schedule == "ring"
    with pytest.raises(ValueError, match="no strategy"):
        strategy.choose([p("tasp", "tasp", False, 0, 0, math.inf, 0, "why")])


@pytest.mark.parametrize("kw,match", [
    (dict(seqlen=1001, world=8), "divisible by world"),
    (dict(seqlen=0), "seqlen"),
    (dict(seqlen=1024, kv_heads=3), "kv_heads"),
    (dict(seqlen=1024, world=True), "world"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        explain(**dict(dict(heads=8), **kw))


def test_config_target_is_checked():
    assert HamiltonConfig(target="H200-1").target == "H200-1"
    with pytest.raises(ValueError, match="target"):
        HamiltonConfig(target="H200")
