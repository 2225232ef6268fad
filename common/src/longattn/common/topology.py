"""Hardware targets as data, and an alpha-beta model of communication time.

A :class:`Target` describes a cluster: nodes, GPUs per node, the intra-node fabric and its
bandwidths, the per-GPU network bandwidth between nodes, latencies, and the attention compute
rate. The four targets in :data:`TARGETS` are the ones the TASP paper measured on;
:data:`EXTRA_TARGETS` adds H200-1 (one node of 8 H200s, below).

Figures and where they come from (unidirectional, per GPU, GB/s = 1e9 B/s). Datasheet values
are the vendors'; "estimate" marks a value nobody measured here, to be replaced by a
measurement when one is committed.

* H100 SXM, NVSwitch: 18 NVLink-4 links x 25 GB/s = **450 GB/s** egress per GPU (NVIDIA H100
  datasheet, "900 GB/s" bidirectional). One peer can take most of it through the switch: we
  use **370 GB/s** for a single NCCL p2p stream (an estimate). When a GPU sends to 7 peers at
  once each gets 450/7 = 64 GB/s.
* Between H100 nodes: one 400 Gb/s NDR InfiniBand NIC per GPU = **50 GB/s** (the NIC's line
  rate).
* MI300X, full xGMI mesh: 7 links per GPU, **64 GB/s** per direction to each peer, no switch,
  so a single peer never gets more than one link (AMD MI300X platform data: 896 GB/s aggregate
  bidirectional over 7 links).
* Latency (alpha): 10 us per intra-node p2p step and 15 us across nodes (estimates).
* Attention compute: H100 600 TFLOP/s forward / 550 fwd+bwd, rounded down from the cuDNN
  figures measured on an H100 at S = 32768, H = 32, D = 128, bf16 (605-614 forward, 558-561
  forward+backward: ``common/bench/results/bench_kernels.json``); MI300X 400 / 330 (estimates;
  no MI300X was measured).

The model: a communication step is a set of messages (src, dst, bytes) that run concurrently.
Each GPU's time is alpha plus the largest of (its intra-node egress over the GPU's fabric
bandwidth, its largest single-peer intra message over the per-peer bandwidth, its inter-node
egress over its NIC bandwidth), and the same for ingress; the step takes the slowest GPU's time.
Links are assumed full duplex and the switch non-blocking.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Target:
    name: str
    nodes: int
    gpus_per_node: int
    fabric: str  # "nvswitch" (any peer up to peer_bw, total gpu_bw) or "full_mesh" (peer_bw each)
    gpu_bw: float  # intra-node egress per GPU, bytes/s
    peer_bw: float  # intra-node bytes/s to one peer
    nic_bw: float  # inter-node bytes/s per GPU
    intra_latency: float  # s
    inter_latency: float  # s
    attn_flops_fwd: float  # dense attention FLOP/s forward
    attn_flops_fwd_bwd: float  # FLOP/s over forward+backward
    device: str = ""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node


_H100 = dict(fabric="nvswitch", gpu_bw=450 * GB, peer_bw=370 * GB, nic_bw=50 * GB,
             intra_latency=10e-6, inter_latency=15e-6, attn_flops_fwd=600e12,
             attn_flops_fwd_bwd=550e12, device="NVIDIA H100 SXM 80GB")

TARGETS: dict[str, Target] = {
    "H100-1": Target("H100-1", 1, 8, **_H100),
    "H100-2": Target("H100-2", 2, 8, **_H100),
    "H100-4": Target("H100-4", 4, 8, **_H100),
    "MI300X-1": Target("MI300X-1", 1, 8, fabric="full_mesh", gpu_bw=7 * 64 * GB,
                       peer_bw=64 * GB, nic_bw=50 * GB, intra_latency=10e-6,
                       inter_latency=15e-6, attn_flops_fwd=400e12, attn_flops_fwd_bwd=330e12,
                       device="AMD Instinct MI300X"),
}


# NVIDIA H200 SXM, one node of 8 GPUs on NVSwitch (HGX H200): the 8 x H200 machine the H200
# measurements of this repository come from (hamilton/targets/H200-1/target.json lists the same
# figures and their sources).
# * gpu_bw: NVLink 4, 18 links x 25 GB/s = 450 GB/s per direction per GPU (NVIDIA H200
#   datasheet: "NVLink 900 GB/s", bidirectional). peer_bw: 370 GB/s for one NCCL p2p stream, the
#   H100 entry's estimate (the same NVLink 4 / NVSwitch generation; not measured here).
# * alpha: 10 us per intra-node step, the H100 entry's estimate. Why this one: no multi-GPU run
#   of this repository has measured a step's fixed cost (a batched NCCL send/recv plus the
#   kernel launches around it, not the wire latency), and keeping the H100 figure makes the
#   H100-1 and H200-1 models differ only where something was measured (the compute rate).
# * nic_bw / inter_latency: one 400 Gb/s NIC per GPU, as the H100 entry (used only by targets of
#   several nodes).
# * attention FLOP/s: cuDNN SDPA at S = 32768, H = 32, D = 128, bf16, non-causal, on an H200:
#   600 TFLOP/s forward, 543 forward+backward (common/bench/results/h200/bench_kernels.json).
# Not in TARGETS (the four targets of the TASP paper); get_target and ALL_TARGETS serve every
# target.
EXTRA_TARGETS: dict[str, Target] = {
    "H200-1": Target("H200-1", 1, 8, fabric="nvswitch", gpu_bw=450 * GB, peer_bw=370 * GB,
                     nic_bw=50 * GB, intra_latency=10e-6, inter_latency=15e-6,
                     attn_flops_fwd=600e12, attn_flops_fwd_bwd=543e12, device="NVIDIA H200"),
}

ALL_TARGETS: dict[str, Target] = {**TARGETS, **EXTRA_TARGETS}
"""Every named target: the paper's four (:data:`TARGETS`) and :data:`EXTRA_TARGETS`."""


def get_target(name: str) -> Target:
    """The target ``name`` among :data:`ALL_TARGETS` (the paper's four and H200-1)."""
    if name not in ALL_TARGETS:
        raise ValueError(f"target must be one of {sorted(ALL_TARGETS)}, got {name!r}")
    return ALL_TARGETS[name]


def step_time(target: Target, messages) -> float:
    """Seconds for one step whose ``messages`` = iterable of (src, dst, nbytes) run at once."""
    n = target.world_size
    intra_out, intra_in = defaultdict(float), defaultdict(float)
    inter_out, inter_in = defaultdict(float), defaultdict(float)
    peer_max = defaultdict(float)
    crosses = False
    any_msg = False
    for src, dst, nb in messages:
        if not (0 <= src < n and 0 <= dst < n):
            raise ValueError(f"message {src}->{dst} outside a {n}-GPU target")
        if nb < 0:
            raise ValueError(f"nbytes of message {src}->{dst} must be >= 0, got {nb}")
        if src == dst or nb == 0:
            continue
        any_msg = True
        if target.node_of(src) == target.node_of(dst):
            intra_out[src] += nb
            intra_in[dst] += nb
            peer_max[(src, "o")] = max(peer_max[(src, "o")], nb)
            peer_max[(dst, "i")] = max(peer_max[(dst, "i")], nb)
        else:
            crosses = True
            inter_out[src] += nb
            inter_in[dst] += nb
    if not any_msg:
        return 0.0
    worst = 0.0
    for g in range(n):
        t = max(
            intra_out[g] / target.gpu_bw, intra_in[g] / target.gpu_bw,
            peer_max[(g, "o")] / target.peer_bw, peer_max[(g, "i")] / target.peer_bw,
            inter_out[g] / target.nic_bw, inter_in[g] / target.nic_bw,
        )
        worst = max(worst, t)
    alpha = target.inter_latency if crosses else target.intra_latency
    return alpha + worst


def schedule_time(target: Target, steps) -> float:
    """Sum of :func:`step_time` over ``steps`` (each an iterable of messages)."""
    return sum(step_time(target, s) for s in steps)


def overlapped_time(compute_steps, comm_steps) -> float:
    """Time of a double-buffered step loop: step i's compute overlaps step i's transfer (of the
    next block); the last compute step has no transfer beside it."""
    total = 0.0
    for i, c in enumerate(compute_steps):
        total += max(c, comm_steps[i] if i < len(comm_steps) else 0.0)
    return total


def allreduce_time(target: Target, nbytes: float, *, algorithm: str = "tree") -> float:
    """Seconds for an all-reduce of ``nbytes`` over all GPUs of the target.

    ``tree``: reduce + broadcast along a binary tree, 2*ceil(log2 n) latency-bound hops (the
    regime of small messages such as Tree Attention's (max, sum, weighted sum)). ``ring``:
    2(n-1) steps of nbytes/n each. Inter-node hops use the NIC bandwidth and latency.
    """
    n = target.world_size
    if n == 1:
        return 0.0
    multi = target.nodes > 1
    alpha = target.inter_latency if multi else target.intra_latency
    bw = min(target.nic_bw, target.peer_bw) if multi else target.peer_bw
    if algorithm == "tree":
        return 2 * math.ceil(math.log2(n)) * (alpha + nbytes / bw)
    if algorithm == "ring":
        return 2 * (n - 1) * (alpha + nbytes / n / bw)
    raise ValueError(f"algorithm must be 'tree' or 'ring', got {algorithm!r}")


def attention_flops(batch, seq_q, seq_k, heads, head_dim, *, causal=False, backward=False):
    """FLOPs of dense attention (4*Sq*Sk*H*D forward, halved if causal, x3.5 with backward)."""
    f = 4.0 * batch * seq_q * seq_k * heads * head_dim
    if causal:
        f /= 2
    return f * (3.5 if backward else 1.0)
