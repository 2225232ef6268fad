"""longattn.common.topology: the four targets as data, and the alpha-beta model against
hand-computed step times."""

from __future__ import annotations

import dataclasses
import math

import pytest

from longattn.common import topology as T

GB = 1e9


def test_the_four_targets():
    assert set(T.TARGETS) == {"H100-1", "H100-2", "H100-4", "MI300X-1"}
    sizes = {name: (t.nodes, t.gpus_per_node, t.world_size) for name, t in T.TARGETS.items()}
    assert sizes == {"H100-1": (1, 8, 8), "H100-2": (2, 8, 16), "H100-4": (4, 8, 32),
                     "MI300X-1": (1, 8, 8)}
    for name, t in T.TARGETS.items():
        assert t.name == name and T.get_target(name) is t
        assert t.fabric in ("nvswitch", "full_mesh")
        for f in ("gpu_bw", "peer_bw", "nic_bw", "intra_latency", "inter_latency",
                  "attn_flops_fwd", "attn_flops_fwd_bwd"):
            v = getattr(t, f)
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (name, f)
        assert t.peer_bw <= t.gpu_bw  # one peer never gets more than the GPU's egress
        assert t.nic_bw < t.peer_bw  # the network is the slow link
        assert t.intra_latency <= t.inter_latency
        assert t.attn_flops_fwd_bwd <= t.attn_flops_fwd
        assert 1e-7 < t.intra_latency < 1e-3 and 1e12 < t.attn_flops_fwd < 1e16
        assert t.device
    h = T.TARGETS["H100-1"]
    assert h.fabric == "nvswitch" and h.gpu_bw == 450 * GB and h.nic_bw == 50 * GB
    m = T.TARGETS["MI300X-1"]
    assert m.fabric == "full_mesh" and m.peer_bw == 64 * GB and m.gpu_bw == 7 * 64 * GB


def test_targets_are_immutable_data():
    with pytest.raises(dataclasses.FrozenInstanceError):
        T.TARGETS["H100-1"].nodes = 3
    t = T.TARGETS["H100-2"]
    assert [t.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]


def test_get_target_unknown():
    with pytest.raises(ValueError, match="target"):
        T.get_target("B200-1")


# --------------------------------------------------------------------------------------------
# step_time: hand-computed cases


def test_empty_and_self_messages_cost_nothing():
    t = T.TARGETS["H100-1"]
    assert T.step_time(t, []) == 0.0
    assert T.step_time(t, [(3, 3, 10**9), (1, 2, 0)]) == 0.0


@pytest.mark.parametrize("name", ["H100-1", "MI300X-1"])
def test_one_intra_node_message(name):
    t = T.TARGETS[name]
    nb = 256 * 2**20
    want = t.intra_latency + nb / t.peer_bw
    assert T.step_time(t, [(0, 1, nb)]) == pytest.approx(want, rel=1e-12)


def test_one_inter_node_message_uses_the_nic():
    t = T.TARGETS["H100-2"]
    nb = 64 * 2**20
    assert T.step_time(t, [(0, 8, nb)]) == pytest.approx(t.inter_latency + nb / t.nic_bw)


def test_fan_out_on_nvswitch_is_limited_by_the_gpu_egress():
    t = T.TARGETS["H100-1"]
    nb = 2**28
    msgs = [(0, p, nb) for p in range(1, 8)]
    want = t.intra_latency + max(7 * nb / t.gpu_bw, nb / t.peer_bw)
    assert T.step_time(t, msgs) == pytest.approx(want)
    assert 7 * nb / t.gpu_bw > nb / t.peer_bw  # the egress term is the binding one here


def test_fan_out_on_a_full_mesh_runs_links_in_parallel():
    t = T.TARGETS["MI300X-1"]
    nb = 2**28
    one = T.step_time(t, [(0, 1, nb)])
    seven = T.step_time(t, [(0, p, nb) for p in range(1, 8)])
    assert seven == pytest.approx(one)  # 7 links, one per peer
    assert seven == pytest.approx(t.intra_latency + nb / (64 * GB))


def test_ring_step_times():
    nb = 2**27
    for name in ("H100-1", "MI300X-1"):
        t = T.TARGETS[name]
        ring = [(r, (r + 1) % 8, nb) for r in range(8)]
        assert T.step_time(t, ring) == pytest.approx(t.intra_latency + nb / t.peer_bw)
    t = T.TARGETS["H100-2"]
    ring = [(r, (r + 1) % 16, nb) for r in range(16)]  # ranks 7 -> 8 and 15 -> 0 cross nodes
    assert T.step_time(t, ring) == pytest.approx(t.inter_latency + nb / t.nic_bw)


def test_all_to_all_on_h100_1():
    t = T.TARGETS["H100-1"]
    nb = 2**24
    a2a = [(s, d, nb) for s in range(8) for d in range(8) if s != d]
    want = t.intra_latency + max(7 * nb / t.gpu_bw, nb / t.peer_bw)
    assert T.step_time(t, a2a) == pytest.approx(want)


def test_ingress_counts_too():
    t = T.TARGETS["H100-1"]
    nb = 2**28
    fan_in = [(p, 0, nb) for p in range(1, 8)]
    assert T.step_time(t, fan_in) == pytest.approx(t.intra_latency + 7 * nb / t.gpu_bw)


def test_monotone_in_bytes_and_latency_bound_for_tiny_messages():
    for t in T.TARGETS.values():
        prev = 0.0
        for nb in (1, 2**10, 2**20, 2**30):
            cur = T.step_time(t, [(0, 1, nb)])
            assert cur > prev
            prev = cur
        assert T.step_time(t, [(0, 1, 8)]) == pytest.approx(t.intra_latency, rel=1e-3)


def test_message_outside_the_target_raises():
    t = T.TARGETS["H100-1"]
    with pytest.raises(ValueError, match="outside"):
        T.step_time(t, [(0, 8, 10)])
    with pytest.raises(ValueError, match="outside"):
        T.step_time(t, [(-1, 0, 10)])


def test_negative_bytes_raise():
    with pytest.raises(ValueError, match="bytes|nbytes"):
        T.step_time(T.TARGETS["H100-1"], [(0, 1, -5)])


# --------------------------------------------------------------------------------------------
# schedules, overlap, all-reduce, flops


def test_schedule_time_is_the_sum_of_steps():
    t = T.TARGETS["H100-2"]
    steps = [[(0, 1, 2**20)], [(0, 8, 2**20)], []]
    assert T.schedule_time(t, steps) == pytest.approx(sum(T.step_time(t, s) for s in steps))
    assert T.schedule_time(t, []) == 0.0


def test_overlapped_time():
    assert T.overlapped_time([1.0, 2.0, 3.0], [1.5, 1.0]) == pytest.approx(1.5 + 2.0 + 3.0)
    assert T.overlapped_time([1.0, 1.0], [5.0, 5.0]) == pytest.approx(10.0)
    assert T.overlapped_time([], []) == 0.0


def test_allreduce_time():
    t = T.TARGETS["H100-1"]
    nb = 4096.0
    assert T.allreduce_time(t, nb) == pytest.approx(2 * 3 * (t.intra_latency + nb / t.peer_bw))
    assert T.allreduce_time(t, nb, algorithm="ring") == pytest.approx(
        2 * 7 * (t.intra_latency + nb / 8 / t.peer_bw))
    t4 = T.TARGETS["H100-4"]
    assert T.allreduce_time(t4, nb) == pytest.approx(2 * 5 * (t4.inter_latency + nb / t4.nic_bw))
    one = dataclasses.replace(t, name="one", gpus_per_node=1)
    assert T.allreduce_time(one, nb) == 0.0
    with pytest.raises(ValueError, match="algorithm"):
        T.allreduce_time(t, nb, algorithm="butterfly")
    # small messages: latency bound, the tree wins; huge ones: bandwidth bound, the ring wins
    assert T.allreduce_time(t, 64) < T.allreduce_time(t, 64, algorithm="ring")
    assert T.allreduce_time(t, 2**32) > T.allreduce_time(t, 2**32, algorithm="ring")


def test_attention_flops():
    assert T.attention_flops(1, 1024, 1024, 8, 64) == 4.0 * 1024 * 1024 * 8 * 64
    assert T.attention_flops(2, 10, 20, 3, 4, causal=True) == 4.0 * 2 * 10 * 20 * 3 * 4 / 2
    assert T.attention_flops(1, 8, 8, 1, 8, backward=True) == 4.0 * 8 * 8 * 8 * 3.5


def test_model_sanity_ring_attention_on_h100_1():
    """At S = 128k over 8 H100s, one ring step's KV transfer hides behind its attention block:
    the regime the ring / TASP papers are in."""
    t = T.TARGETS["H100-1"]
    s, h, d, n = 131072, 32, 128, 8
    local = s // n
    kv_bytes = 2 * local * 8 * d * 2  # K and V, 8 KV heads, bf16
    comm = T.step_time(t, [(r, (r + 1) % n, kv_bytes) for r in range(n)])
    compute = T.attention_flops(1, local, local, h, d) / t.attn_flops_fwd
    assert comm < compute
    # across 4 nodes the inter-node hops are 7x slower per byte than NVSwitch peers
    t4 = T.TARGETS["H100-4"]
    ring4 = [(r, (r + 1) % 32, kv_bytes) for r in range(32)]
    assert T.step_time(t4, ring4) > 5 * T.step_time(t, [(0, 1, kv_bytes)]) - t4.inter_latency
