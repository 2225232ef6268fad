"""dilated's answers to ``python -m longattn.common.repro dilated --target T``.

LongNet's claims: the runtime per token of dilated attention stays nearly constant from 8K to
1B tokens (the sequence split over GPUs past one GPU's memory), while dense attention's grows
linearly per token, so dilated wins past some length.

* measured: time per token of forward+backward over 32K..1M tokens per sequence (2^20 tokens
  per batch) on one GPU, max / min: timed by the run itself on a GPU of the target's model
  (:func:`measure_flatness`), else read from the committed benchmark of that model;
* predicted (``dilated/targets/<T>/target.json``'s sweep, ``tokens_per_gpu`` tokens on each
  GPU, p = S / tokens_per_gpu GPUs past one; more nodes of the target's type where p exceeds
  it): compute per token from the one-H200 measurement
  (``bench/results/bench_dilated_h200.json``, the sweep's branches) scaled by the keys each
  token sees, ``sum_b min(w_b, S) / r_b``, and by attention FLOP/s; and, for every branch
  whose segment spans several GPUs (LongNet section 3.1), an all-gather of the sparsified K and V
  (``L / r`` rows per head per GPU) in the forward and a reduce-scatter of their gradients in
  the backward, ring algorithm over ``w / L`` GPUs (``topology.step_time``). The branches are
  the sweep's, then (``extend_segments``) segments doubling up to S with the last branch's
  ``w / r``, so that attention reaches the whole sequence.
* dense crossover: dense causal cuDNN's forward+backward time per token measured at 32K on
  the H200, times S / 32K, against the dilated prediction.
"""

from __future__ import annotations

import dataclasses
import math

from longattn.common import topology

BENCH = "bench/results/bench_dilated_h200.json"
# what the measured claim times (as bench_dilated.py): 2^20 tokens a batch, S = 32K .. 1M
MEASURE_TOKENS = 1 << 20
MEASURE_LENGTHS = tuple(1 << p for p in range(15, 21))


def _ns(rows, what):
    """{S: ns per token} of the rows named ``what``."""
    return {r["shape"]["S"]: r["extra"]["ns_per_token"] for r in rows if r["what"] == what}


def branches(sw, s):
    segs, rates = list(sw["segments"]), list(sw["rates"])
    if sw.get("extend_segments"):
        ratio = segs[-1] / rates[-1]
        w = segs[-1] * 2
        while w <= s:
            segs.append(w)
            rates.append(w / ratio)
            w *= 2
    return [(w, r) for w, r in zip(segs, rates)]


def keys_per_token(sw, s):
    return sum(min(w, s) / r for w, r in branches(sw, s))


def _cluster(hw, p):
    g = min(p, hw.gpus_per_node)
    return dataclasses.replace(hw, nodes=max(1, p // g), gpus_per_node=g)


def dilated_ns(ctx, s, ns_ref, keys_ref):
    """Predicted forward+backward ns per token at sequence length s."""
    sw = ctx.sweep
    per_gpu = sw["tokens_per_gpu"]
    compute = ns_ref * keys_per_token(sw, s) / keys_ref
    p = max(1, int(s // per_gpu))
    if p == 1:
        return compute, 0.0
    tg = _cluster(ctx.hw, p)
    comm = 0.0
    row = sw["heads"] * sw["head_dim"] * 2 * 2  # K and V of one sparsified row, all heads, bf16
    for w, r in branches(sw, s):
        g = min(p, math.ceil(w / per_gpu))
        if g <= 1:
            continue
        chunk = per_gpu / r * row
        hop = topology.step_time(tg, [(i, (i + 1) % g, chunk) for i in range(g)])
        comm += 2 * (g - 1) * hop  # all-gather forward, reduce-scatter of the gradients
    return compute, comm / per_gpu * 1e9


def run(ctx):
    sw = ctx.sweep
    ref = ctx.load(BENCH)
    dil, dense = _ns(ref, "dilated fwd+bwd"), _ns(ref, "dense causal fwd+bwd")
    s_ref = min(dil)
    scale = topology.get_target("H200-1").attn_flops_fwd_bwd / ctx.hw.attn_flops_fwd_bwd
    ns_ref = dil[s_ref] * scale
    keys_ref = keys_per_token({**sw, "extend_segments": False}, s_ref)
    dense_ref = dense[min(dense)] * scale
    rows = []
    for s in sw["seq_lens"]:
        c, m = dilated_ns(ctx, s, ns_ref, keys_ref)
        rows.append({"S": s, "gpus": max(1, s // sw["tokens_per_gpu"]),
                     "branches": len(branches(sw, s)), "dilated_ns_per_token": c + m,
                     "compute_ns": c, "comm_ns": m,
                     "dense_ns_per_token": dense_ref * s / min(dense)})
    ys = [r["dilated_ns_per_token"] for r in rows]
    basis = (f"per-token compute from the one-H200 measurement at S = {s_ref} "
             f"({dil[s_ref]:.4g} ns/token), keys per token, attention FLOP/s; "
             f"communication: alpha-beta ({ctx.hw.name} node type); "
             f"{'segments extended to S' if sw.get('extend_segments') else 'fixed branches'}")
    ctx.answer("runtime_flatness_predicted", max(ys) / min(ys), "predicted", basis,
               source=BENCH, date=ref[0]["date"], device=ref[0]["device"],
               series={"dilated (predicted)": ([r["S"] for r in rows], ys),
                       "dense causal (measured at 32K, x S)": (
                           [r["S"] for r in rows], [r["dense_ns_per_token"] for r in rows])},
               x="S (tokens)", y="fwd+bwd ns per token", logy=True)
    ctx.answer("dense_crossover", _crossover(ctx, ns_ref, keys_ref, dense_ref, min(dense)),
               "predicted", "the length where dense causal cuDNN's forward+backward time per "
               "token (linear in S, measured at 32K) meets the dilated prediction",
               source=BENCH, date=ref[0]["date"], device=ref[0]["device"])
    _measured(ctx)
    return {"rows": rows}


def _crossover(ctx, ns_ref, keys_ref, dense_ref, s_dense):
    lo, hi = 16.0, float(max(ctx.sweep["seq_lens"]))  # bisection in log S: one sign change
    f = lambda s: dense_ref * s / s_dense - sum(dilated_ns(ctx, s, ns_ref, keys_ref))  # noqa
    if f(lo) > 0 or f(hi) < 0:
        return None
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return lo


def _measured(ctx):
    cid = "runtime_flatness_measured"
    if ctx.dry_run:
        ctx.answer(cid, None, "not measured yet", "a dry run measures nothing")
        return
    if ctx.measure:
        ns, dev = measure_flatness(ctx.sweep, device="cuda")
        xs = sorted(ns)
        ctx.answer(cid, max(ns.values()) / min(ns.values()), "measured",
                   f"timed by this run, S = {xs[0]}..{xs[-1]}", device=dev,
                   series={"dilated fwd+bwd (measured)": (xs, [ns[s] for s in xs])},
                   x="S (tokens)", y="fwd+bwd ns per token")
        return
    m = ctx.measured_file()
    if m is None:
        ctx.answer(cid, None, "not measured yet", ctx.not_measured(
            f"no committed benchmark on a {ctx.hw.device}: python dilated/bench/bench_dilated.py"))
        return
    rows = ctx.load(m["file"])
    ns = _ns(rows, "dilated fwd+bwd")
    r0 = next(r for r in rows if r["what"] == "dilated fwd+bwd")
    xs = sorted(ns)
    ctx.answer(cid, max(ns.values()) / min(ns.values()), "measured",
               f"committed benchmark, S = {xs[0]}..{xs[-1]}", source=m["file"],
               device=r0["device"], date=r0["date"],
               series={"dilated fwd+bwd (measured)": (xs, [ns[s] for s in xs])},
               x="S (tokens)", y="fwd+bwd ns per token")


def measure_flatness(sw, *, device, tokens=MEASURE_TOKENS, lengths=MEASURE_LENGTHS):
    """``({S: ns per token}, device name)``: causal dilated attention's forward+backward on one
    GPU with the sweep's branches (not extended), heads, head dim and dtype, ``tokens`` tokens
    per batch (B = tokens / S) at each S of ``lengths`` (what bench_dilated.py times)."""
    import torch

    from longattn.common import bench
    from longattn.dilated import dilated_attention

    dtype = getattr(torch, sw["dtype"])
    h, d = sw["heads"], sw["head_dim"]
    seg, rates = tuple(sw["segments"]), tuple(sw["rates"])
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for s in lengths:
        b = max(1, tokens // s)
        q, k, v, do = (torch.randn(b, s, h, d, generator=g, device=device).to(dtype)
                       for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def step(q=q, k=k, v=v, do=do):
            o = dilated_attention(q, k, v, seg, rates, causal=sw["causal"])
            torch.autograd.grad(o, (q, k, v), do)

        out[s] = bench.time_fn(step, device=device, **bench.timing_kw(device)) * 1e6 / (b * s)
        del q, k, v, do
    return out, bench.device_name(device)
