"""ring_swa's answers to ``python -m longattn.common.repro ring_swa --target T``.

Context parallelism over the target's p GPUs, one causal forward+backward of a sequence of S
tokens (L = S / p per GPU), window W (``ring_swa/targets/<T>/target.json``'s sweep):

* compute at the useful-FLOP rates measured on one H200 (``bench/results/h200/
  bench_ring_swa.json``: the ring_swa local window step and dense causal cuDNN, forward+
  backward), scaled by the target's attention FLOP/s over the H200's: ring_swa does
  ``4 L (W+1) H D x 3.5`` per GPU, dense ring (zigzag, balanced) ``4 S^2/2 H D x 3.5 / p``;
* communication (``topology.step_time``): ring_swa receives the W keys before its chunk (from
  ``ceil(W / L)`` ranks) and sends their gradients back, not overlapped; dense ring makes
  p - 1 hand-offs of a K,V shard forward and of K,V plus dK,dV backward, overlapped with its
  p steps (``topology.overlapped_time``);
* peak K/V memory per GPU: ring_swa its shard, the W received keys and their gradients
  (``L + 2 min(W, S - L)`` tokens of K and V); dense ring its shard and the double-buffered
  K,V and dK,dV in flight (``5 L``).

The measured claim is the one-GPU ratio dense causal cuDNN / ring_swa local step at the
benchmark's shape, from the committed benchmark of the target's GPU model.
"""

from __future__ import annotations

import dataclasses
import math

from longattn.common import topology

BENCH = "bench/results/h200/bench_ring_swa.json"


def _rates(rows):
    """(ring_swa local, dense causal) forward+backward rows of a bench_ring_swa.py JSON."""
    by = {r["what"]: r for r in rows}
    return by["ring_swa local fwd+bwd"], by["cudnn dense causal fwd+bwd"]


def model(ctx, s, w, swa_flops, dense_flops):
    """(ring_swa s, dense ring s, ring_swa peak bytes, dense peak bytes) per GPU."""
    sw, hw = ctx.sweep, ctx.hw
    p = sw["world_size"]
    tg = hw if p == hw.world_size else dataclasses.replace(hw, nodes=1, gpus_per_node=p)
    L = s // p
    tok = 2 * sw["batch"] * sw["kv_heads"] * sw["head_dim"] * 2  # K and V bytes per token
    f_swa = 4 * L * (w + 1) * sw["heads"] * sw["head_dim"] * 3.5
    f_dense = 4 * s * s / 2 * sw["heads"] * sw["head_dim"] * 3.5 / p
    halo = []  # (source distance j, tokens) of the keys before this rank's chunk
    left = min(w, s - L)
    for j in range(1, math.ceil(left / L) + 1 if left else 1):
        halo.append((j, min(L, left - (j - 1) * L)))
    comm = 2 * sum(topology.step_time(tg, [(r - j, r, n * tok) for r in range(j, p)])
                   for j, n in halo)
    swa = f_swa / swa_flops + comm
    hop = topology.step_time(tg, [(r, (r + 1) % p, L * tok) for r in range(p)])
    # forward: K,V hand-offs; backward: K,V and dK,dV: three shards per step in all
    dense = topology.overlapped_time([f_dense / p / dense_flops] * p, [3 * hop] * (p - 1))
    return swa, dense, (L + 2 * left) * tok, 5 * L * tok


def run(ctx):
    sw = ctx.sweep
    swa_row, dense_row = _rates(ctx.load(BENCH))
    scale = ctx.hw.attn_flops_fwd_bwd / topology.get_target("H200-1").attn_flops_fwd_bwd
    swa_flops, dense_flops = swa_row["tflops"] * 1e12 * scale, dense_row["tflops"] * 1e12 * scale
    rows = []
    for s in sw["seq_lens"]:
        for w in sw["windows"]:
            a, b, ma, mb = model(ctx, s, w, swa_flops, dense_flops)
            rows.append({"S": s, "W": w, "gpus": sw["world_size"], "ring_swa_ms": a * 1e3,
                         "dense_ring_ms": b * 1e3, "time_ratio": b / a,
                         "ring_swa_kv_bytes": ma, "dense_ring_kv_bytes": mb})
    w0 = 4096 if 4096 in sw["windows"] else sw["windows"][-1]
    top = [r for r in rows if r["S"] == sw["seq_lens"][-1] and r["W"] == w0][0]
    basis = (f"alpha-beta model ({ctx.hw.name} figures, {sw['world_size']} GPUs) with the "
             f"forward+backward rates measured on an NVIDIA H200 ({swa_row['tflops']:.0f} "
             f"TFLOP/s window, {dense_row['tflops']:.0f} dense causal), scaled by attention "
             f"FLOP/s; S = {top['S']}, W = {top['W']}")
    series = {f"W = {w}": ([r["S"] for r in rows if r["W"] == w],
                           [r["time_ratio"] for r in rows if r["W"] == w])
              for w in sw["windows"]}
    ctx.answer("time_ratio", top["time_ratio"], "predicted", basis, source=BENCH,
               device=swa_row["device"], date=swa_row["date"], series=series,
               x="S (tokens)", y="dense ring / ring_swa time", logy=True)
    ctx.answer("memory_ratio", top["dense_ring_kv_bytes"] / top["ring_swa_kv_bytes"],
               "predicted", f"K/V tokens held per GPU: 5 L (dense ring) against L + 2 min(W, "
               f"S - L) (ring_swa); S = {top['S']}, W = {top['W']}")
    _measured(ctx)
    return {"rows": rows}


def _measured(ctx):
    cid = "local_vs_dense_fwd_bwd"
    m = ctx.measured_file()
    if ctx.measure:
        r = measure_local(ctx.sweep, 131072, 4096, device="cuda")
        ctx.answer(cid, r["dense_ms"] / r["ring_swa_ms"], "measured", "timed by this run",
                   device=r["device"])
    elif ctx.dry_run or m is None:
        ctx.answer(cid, None, "not measured yet", "a dry run measures nothing" if ctx.dry_run
                   else ctx.not_measured(f"no committed benchmark on a {ctx.hw.device}: "
                                         "python ring_swa/bench/bench_ring_swa.py"))
    else:
        swa, dense = _rates(ctx.load(m["file"]))
        ctx.answer(cid, dense["median_ms"] / swa["median_ms"], "measured",
                   f"committed benchmark: dense {dense['median_ms']:.4g} ms / ring_swa local "
                   f"{swa['median_ms']:.4g} ms", source=m["file"], device=swa["device"],
                   date=swa["date"])


def measure_local(sw, s, w, *, device):
    """One GPU: ring_swa's local window step against dense causal attention, fwd+bwd."""
    import torch

    from longattn.common import bench
    from longattn.common.dist import LOCAL
    from longattn.common.kernels import attention
    from longattn.ring_swa import ring_swa_attn

    dtype = getattr(torch, sw["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(sw["batch"], s, sw["heads"], sw["head_dim"], generator=g,
                           device=device).to(dtype).requires_grad_(True) for _ in range(3))

    def swa():
        ring_swa_attn(q, k, v, window_size=(w, 0), group=LOCAL).float().sum().backward()

    def dense():
        attention(q, k, v, causal=True).float().sum().backward()

    t = bench.time_interleaved({"swa": swa, "dense": dense}, device=device)
    return {"ring_swa_ms": t["swa"], "dense_ms": t["dense"], "device": bench.device_name(device)}
