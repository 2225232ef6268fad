"""Single-GPU benchmark: the compute side of one rank of an n-rank causal zigzag-ring step
sequence against one dense cuDNN causal call over the whole sequence divided by n.

    PYTHONPATH=common/src:reference/src:hamilton/src python hamilton/bench/bench_hamilton.py
    ... --smoke            # tiny configuration on the CPU (checks that the script works)

Default: 8 ranks x 8192 tokens per rank (65,536 tokens), H=32, D=128, bf16, B=1.

What runs: exactly what ``hamilton_attn`` does on one rank, minus the messages. Step 0 is the
causal attention of the local q/k/v; steps 1..n-1 call :func:`longattn.hamilton.attn.forward_step`
on a KV buffer laid out as the real loop holds it (``plan.calls[s]``: all of q against the
front half of the received block, or the back half of q against the whole block), and the
backward runs :func:`step_grads` and :func:`accumulate_step` per step, the step-0 backward and
the tails (:func:`finish_q_grads`, :func:`finish_kv_grads`), in the loop's order, with its side
stream (:class:`SideStream`) and its joins. Kernels through ``longattn.common.kernels`` with
``backend="auto"`` (``aten``: cuDNN on CUDA). Variants:

* ``kernels``  -- only the attention kernel calls, back to back (the target's definition);
* ``+merge``   -- everything the rank computes, with the shared ``merge_partials_``;
* ``+merge overlap`` -- the same with ``HamiltonConfig(overlap_merges=True)``: the merges and
  the gradient accumulation on a side stream, overlapping the next step's kernels;
* ``+merge defer_dq`` -- ``defer_dq=True``: dq partials kept, summed once at the end;
* ``+merge overlap defer_dq`` -- both;
* ``+merge defer_merge defer_dq`` (``defer_all``) -- ``defer_merge=True`` as well: the forward's
  calls write into slots (:class:`DeferredOut`) merged once at the end; with ``overlap``
  (``overlap+defer_all``) the backward's accumulation on the side stream too;
* ``+fused``   -- ``+merge`` with ``merge_partials_`` under ``torch.compile`` (fused
  elementwise).

``--variants`` picks the ``+merge`` family (default ``merge,overlap,overlap+defer``). Each
variant's first call is compared with ``+merge``'s on the same data (the same random inputs
per rank): ``overlap`` must give the same bits (a difference would be a race), ``defer_dq``
sums dq in another order (its largest relative difference is printed).

Baselines in the same run, alternated with the contenders (``bench.time_interleaved``): cuDNN
SDPA (``sdpa_kernel(CUDNN_ATTENTION)``) causal over all ``n * L`` tokens, divided by ``n``;
FlexAttention causal (compiled) likewise. Efficiency = (dense ms / n) / sequence ms. Ranks 0,
n/2 and n-1 are timed (their step shapes differ; all do equal FLOPs).

``--backends`` (default ``auto``): the local-kernel backends the rank sequences and the
correctness checks run on (``make_sequence`` / ``check``'s ``backend``), e.g. ``auto,fa4`` to
time FlashAttention-4 beside the current kernels in the same run: every mode once per backend,
all in the same alternated pool as the dense baselines (their efficiency against the same dense
cuDNN); names of a backend other than ``auto`` are tagged `` [name]`` (the ``auto`` rows keep
theirs) and every row records its ``backend``. A backend that cannot run here is reported in one
line and left out (the JSON's ``backends`` row).

Correctness first: a small sequence per rank, fed with the data each rank would hold at each
step (``plan.unit_labels``), forward and backward, is compared with the float64 oracle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback

import torch

from longattn.common import bench
from longattn.common.kernels import attention_backward, attention_forward, pick_backend
from longattn.common.layout import positions
from longattn.common.merge import merge_partials_
from longattn.hamilton import HamiltonConfig
from longattn.hamilton.args import resolve_schedule
from longattn.hamilton.attn import (
    DeferredDq,
    DeferredOut,
    SideStream,
    _pack,
    _token_index,
    accumulate_step,
    finish_kv_grads,
    finish_q_grads,
    forward_step,
    step_grads,
)
from longattn.hamilton.plan import kv_views, make_plan, new_buffer, unit_labels
from longattn.hamilton.schedules import multi_ring_schedule, ring_schedule

HERE = os.path.dirname(os.path.abspath(__file__))

# --variants: name -> (mode printed, HamiltonConfig fields over the run's config)
VARIANTS = {"merge": ("+merge", {}),
            "overlap": ("+merge overlap", {"overlap_merges": True}),
            "defer": ("+merge defer_dq", {"defer_dq": True}),
            "overlap+defer": ("+merge overlap defer_dq", {"overlap_merges": True,
                                                          "defer_dq": True}),
            "defer_all": ("+merge defer_merge defer_dq", {"defer_merge": True,
                                                          "defer_dq": True}),
            "overlap+defer_all": ("+merge overlap defer_merge defer_dq",
                                  {"overlap_merges": True, "defer_merge": True,
                                   "defer_dq": True})}
DEFAULT_VARIANTS = "merge,overlap,overlap+defer,overlap+defer_all"


def reorders(config):
    """Whether a variant sums in another order than ``+merge`` (its bits may differ)."""
    return config.defer_dq or config.defer_merge


def _schedule(name, n):
    return ring_schedule(n) if name == "ring" else multi_ring_schedule(n)


# ---------------------------------------------------------------------------------------------
# correctness: every rank's step sequence on the data it would hold, against the oracle


def check(device, dtype, n, length, heads, dim, sched_name, causal=True, config=None,
          backend="auto"):
    """Max relative error over out, lse, dq, dk, dv of the simulated n-rank run (global), and
    the global results (``{"out", "lse", "dq", "dk", "dv"}``, float64 on the CPU). ``backend``:
    the local kernels' (``longattn.common.kernels``) for every call."""
    config = HamiltonConfig() if config is None else config
    from longattn.reference import attention, causal_mask
    from longattn.reference import attention_backward as ref_backward

    sched = _schedule(sched_name, n)
    seq = n * length
    g = torch.Generator().manual_seed(0)
    glob = [torch.randn(1, seq, heads, dim, generator=g).to(dtype) for _ in range(4)]
    q, k, v, dout = glob
    mask = causal_mask(seq, seq) if causal else None
    np_in = [t.double().numpy() for t in (q, k, v)]
    out_r, lse_r = attention(*np_in, mask=mask)
    dq_r, dk_r, dv_r = ref_backward(dout.double().numpy(), *np_in, mask=mask)

    layout = "zigzag" if causal else "contiguous"
    pos = [positions(seq, r, n, layout) for r in range(n)]
    plans = [make_plan(sched, r, causal) for r in range(n)]
    labels = unit_labels(sched, causal)
    unit = length // plans[0].units
    idx = _token_index(plans[0], length, device)
    loc = [[t[:, p].to(device) for t in glob] for p in pos]
    buf0 = []
    for r in range(n):
        b = new_buffer(length, 1, heads, dim, dim, dtype, device)
        _pack(b, loc[r][1], loc[r][2], idx)
        buf0.append(b)

    def step_buffer(s, r):
        b = torch.empty_like(buf0[0])
        for u, (o, ou) in enumerate(labels[s][r]):
            b[u * unit:(u + 1) * unit] = buf0[o][ou * unit:(ou + 1) * unit]
        return b

    outs, lses, dqs = [], [], []
    gacc = [torch.zeros(length, 1, heads * 2 * dim, dtype=torch.float32, device=device)
            for _ in range(n)]
    dk0s, dv0s = [], []
    scale = dim ** -0.5
    for r in range(n):
        ql, kl, vl, dol = loc[r]
        side = SideStream(device, config.overlap_merges)
        out, acc_lse = rank_forward(ql, kl, vl, [step_buffer(s, r) for s in range(1, n)],
                                    plans[r], unit, heads, dim, scale, causal, backend, config,
                                    side)
        parts = DeferredDq(plans[r].calls[1:], ql) if config.defer_dq else None
        dq = torch.zeros(ql.shape, dtype=torch.float32, device=device)
        for s in range(n - 1, 0, -1):
            gbuf = torch.empty_like(gacc[0])  # written whole (first=True)
            grads = step_grads(dol, None, ql, out, acc_lse, step_buffer(s, r),
                               plans[r].calls[s], unit, hkv=heads, d=dim, softmax_scale=scale,
                               backend=backend, config=config, dq_parts=parts)
            accumulate_step(grads, dq, gbuf, unit, first=True, side=side,
                            dq_parts=parts)
            side.join()  # gbuf is read here
            for u, (o, ou) in enumerate(labels[s][r]):
                gacc[o][ou * unit:(ou + 1) * unit] += gbuf[u * unit:(u + 1) * unit]
        if parts is not None:
            side.run(functools.partial(parts.sum_into, dq))
        dq0, dk0, dv0 = attention_backward(dol, ql, kl, vl, out, acc_lse, softmax_scale=scale,
                                           causal=causal, backend=backend)
        side.join()
        outs.append(out)
        lses.append(acc_lse)
        dqs.append(finish_q_grads(dq, dq0, torch.float32))
        dk0s.append(dk0)
        dv0s.append(dv0)
    dks, dvs = [], []
    for r in range(n):
        dk, dv = finish_kv_grads(dk0s[r], dv0s[r], gacc[r], plans[r].own_units, hkv=heads,
                                 d=dim, dtypes=(torch.float32, torch.float32))
        dks.append(dk)
        dvs.append(dv)

    def glob_of(parts, dim_=1):
        full = torch.empty((parts[0].shape[0], seq) + tuple(parts[0].shape[2:]) if dim_ == 1
                           else (parts[0].shape[0], parts[0].shape[1], seq), dtype=torch.float64)
        for p, t in zip(pos, parts):
            if dim_ == 1:
                full[:, p] = t.double().cpu()
            else:
                full[:, :, p] = t.double().cpu()
        return full

    from longattn.common.testing import rel_error

    got = {"out": glob_of(outs), "lse": glob_of(lses, 2), "dq": glob_of(dqs),
           "dk": glob_of(dks), "dv": glob_of(dvs)}
    ref = {"out": out_r, "lse": lse_r, "dq": dq_r, "dk": dk_r, "dv": dv_r}
    return {key: rel_error(got[key], ref[key]) for key in got}, got


def rank_forward(q, k, v, bufs, plan, unit, heads, dim, scale, causal, backend, config,
                 side, merge=None):
    """One rank's forward as ``_forward`` runs it, minus the messages: ``(out in q's dtype,
    lse)``; ``bufs[s - 1]``: the K/V buffer of step ``s``. ``config.defer_merge``: every call
    written into a :class:`DeferredOut` slot, merged once; else merged per call into float32
    accumulators (``merge``: see ``forward_step``)."""
    if config.defer_merge:
        parts = DeferredOut(plan.calls[1:], q, v.shape[-1])
        parts.run("diag", q, k, v, softmax_scale=scale, causal=causal, backend=backend)
        for s, buf in enumerate(bufs, 1):
            forward_step(q, buf, plan.calls[s], unit, None, None, hkv=heads, d=dim,
                         softmax_scale=scale, backend=backend, config=config, parts=parts)
        return parts.finish(q.dtype)
    o0, l0 = attention_forward(q, k, v, softmax_scale=scale, causal=causal, backend=backend)
    acc_out, acc_lse = o0.float(), l0.float()
    for s, buf in enumerate(bufs, 1):
        forward_step(q, buf, plan.calls[s], unit, acc_out, acc_lse, hkv=heads, d=dim,
                     softmax_scale=scale, backend=backend, config=config, merge=merge,
                     side=side)
    side.join()
    return acc_out.to(q.dtype), acc_lse


def compare(got, base):
    """``(same bits, largest relative difference)`` of two result dicts (tensors or None)."""
    if got is None or base is None:
        return None, None
    same, worst = True, 0.0
    for key in base:
        a, b = got[key], base[key]
        same = same and torch.equal(a, b)
        norm = float(b.double().norm())
        worst = max(worst, float((a.double() - b.double()).norm()) / (norm or 1.0))
    return same, worst


# ---------------------------------------------------------------------------------------------
# timing


def make_sequence(device, dtype, n, length, heads, dim, rank, sched_name, mode, config,
                  backend="auto"):
    """(fwd, fwd_bwd) closures running rank ``rank``'s compute; ``mode`` is ``kernels``,
    ``+fused`` or a ``+merge`` variant (its options are ``config``'s). Both return the rank's
    results (``{"out"}``, ``{"dq", "dk", "dv"}``; None for ``kernels``), the same data for
    every mode (and ``backend``) of a rank. ``backend``: the local kernels' for every call."""
    sched = _schedule(sched_name, n)
    plan = make_plan(sched, rank, True)
    unit = length // plan.units
    scale = dim ** -0.5
    g = torch.Generator(device=device).manual_seed(rank)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q, k, v, dout = (rnd(1, length, heads, dim) for _ in range(4))
    buf = rnd(length, 1, heads * 2 * dim)
    merge = _fused_merge() if mode == "+fused" else None  # None: config.merge_backend
    o0, l0 = attention_forward(q, k, v, softmax_scale=scale, causal=True, backend=backend)
    out, lse = o0, l0.float()
    accs = [torch.zeros(length, 1, heads * 2 * dim, dtype=torch.float32, device=device)
            for _ in range(2)]
    half = length // 2

    def fwd():
        if mode == "kernels":
            attention_forward(q, k, v, softmax_scale=scale, causal=True, backend=backend)
            for s in range(1, n):
                for call in plan.calls[s]:
                    kk, vv = kv_views(buf, call.start * unit, call.stop * unit, heads, dim)
                    qs = q if call.rows == "all" else q[:, half:]
                    attention_forward(qs, kk, vv, softmax_scale=scale, causal=False,
                                      backend=backend)
            return None
        side = SideStream(device, config.overlap_merges)
        out, _ = rank_forward(q, k, v, [buf] * (n - 1), plan, unit, heads, dim, scale, True,
                              backend, config, side, merge)
        return {"out": out}

    def bwd():
        if mode == "kernels":
            for s in range(n - 1, 0, -1):
                for call in plan.calls[s]:
                    kk, vv = kv_views(buf, call.start * unit, call.stop * unit, heads, dim)
                    sl = slice(None) if call.rows == "all" else slice(half, None)
                    attention_backward(dout[:, sl], q[:, sl], kk, vv, out[:, sl],
                                       lse[:, :, sl], softmax_scale=scale, causal=False,
                                       backend=backend)
            attention_backward(dout, q, k, v, out, lse, softmax_scale=scale, causal=True,
                               backend=backend)
            return None
        # the order of attn._backward, without its messages
        side = SideStream(device, config.overlap_merges)
        parts = DeferredDq(plan.calls[1:], q) if config.defer_dq else None
        dq = (torch.empty if parts is not None else torch.zeros)(q.shape, dtype=torch.float32,
                                                                   device=device)
        cur = 0
        for s in range(n - 1, 0, -1):
            grads = step_grads(dout, None, q, out, lse, buf, plan.calls[s], unit, hkv=heads,
                               d=dim, softmax_scale=scale, backend=backend, config=config,
                               dq_parts=parts)
            if s < n - 1:
                side.join()  # the loop's h_g.wait() (its message was posted from the side)
            accumulate_step(grads, dq, accs[cur], unit, first=s == n - 1,
                            side=side, dq_parts=parts)
            cur = 1 - cur  # the real loop sends this one back and receives into the other
        if parts is not None:
            side.run(functools.partial(parts.sum_into, dq))
        dq0, dk0, dv0 = attention_backward(dout, q, k, v, out, lse, softmax_scale=scale,
                                           causal=True, backend=backend)
        side.join()
        dq = finish_q_grads(dq, dq0, dtype)
        dk, dv = finish_kv_grads(dk0, dv0, accs[cur], plan.own_units, hkv=heads, d=dim,
                                 dtypes=(dtype, dtype))
        return {"dq": dq, "dk": dk, "dv": dv}

    def fwd_bwd():
        fwd()
        return bwd()

    return fwd, fwd_bwd


@functools.cache
def _fused_merge():
    """``merge_partials_`` under ``torch.compile`` (compiled once per process)."""
    return torch.compile(merge_partials_, dynamic=False)


def dense_baselines(device, dtype, seq, heads, dim, use_flex):
    """{name: (fwd, fwd_bwd)} over the whole sequence (BHSD), causal."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, do = (torch.randn(1, heads, seq, dim, generator=g, device=device).to(dtype)
                   for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = {}

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_fwd_bwd():
        for t in (qg, kg, vg):
            t.grad = None
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)

    if device.type == "cuda":
        out["cudnn"] = (sdpa_fwd, sdpa_fwd_bwd)
    else:  # the CPU smoke run: the same math through the local kernels (torch backend)
        qs, ks, vs, dos = (t.transpose(1, 2) for t in (q, k, v, do))

        def dense_fwd():
            return attention_forward(qs, ks, vs, causal=True)

        def dense_fwd_bwd():
            o, l = attention_forward(qs, ks, vs, causal=True)
            attention_backward(dos, qs, ks, vs, o, l, causal=True)

        out["dense(torch)"] = (dense_fwd, dense_fwd_bwd)
    if use_flex and device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, seq, seq,
                                     device=device, _compile=True)
            flex = torch.compile(flex_attention, dynamic=False)

            def flex_fwd():
                return flex(q, k, v, block_mask=mask)

            def flex_fwd_bwd():
                for t in (qg, kg, vg):
                    t.grad = None
                flex(qg, kg, vg, block_mask=mask).backward(do)

            flex_fwd_bwd()  # compile outside the timings
            out["flex"] = (flex_fwd, flex_fwd_bwd)
        except Exception:  # noqa: BLE001 - a missing/failed baseline must not stop the run
            print("flex baseline failed:\n" + traceback.format_exc(), file=sys.stderr)
    return out


def step_sweep(device, dtype, out_dir, smoke):
    """Forward time of one non-causal L x L block (B=1, H=20, d=64) at the per-GPU lengths of
    the paper's sweep on 8 GPUs (420 * k tokens): the input of predict_hamilton.py."""
    lengths = [420 * k for k in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)]
    heads, dim = 20, 64
    if smoke:
        lengths, heads, dim = [16, 32], 2, 16
    rows = []
    for length in bench.progress(lengths, desc="step sweep"):
        try:
            q, k, v = (torch.randn(1, length, heads, dim, device=device).to(dtype)
                       for _ in range(3))
            ms = bench.time_fn(lambda q=q, k=k, v=v: attention_forward(q, k, v), device=device)
            rows.append({"tokens": length, "full_ms": ms})
        except Exception:  # noqa: BLE001
            print(f"step sweep L={length} failed:\n" + traceback.format_exc())
    data = {"device": bench.device_name(device), "batch": 1, "heads": heads, "head_dim": dim,
            "dtype": str(dtype), "backend": pick_backend(q, k, v), "rows": rows}
    path = os.path.join(out_dir, "step_times.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(bench.format_table(rows))
    print(f"wrote {path}")


def main(argv=None):
    p = bench.simulated_ranks_parser(__doc__, tokens=8192)
    p.add_argument("--schedule", default="ring", choices=["ring", "tasp"],
                   help="ring: zigzag ring (the efficiency target); tasp: TASP's causal steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--no-fused", action="store_true", help="skip the torch.compile'd merge")
    p.add_argument("--merge-backend", default="auto", choices=["auto", "torch", "triton"],
                   help="HamiltonConfig.merge_backend of the +merge variants")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated +merge variants to time, of " + ", ".join(VARIANTS)
                        + f" (default {DEFAULT_VARIANTS}): HamiltonConfig's overlap_merges / "
                        "defer_dq")
    p.add_argument("--contiguous-kv", action="store_true",
                   help="HamiltonConfig(contiguous_kv=True): contiguous K/V copies per call")
    p.add_argument("--step-sweep", action="store_true",
                   help="also time single L x L blocks over the paper's per-GPU lengths "
                        "(step_times.json, the input of predict_hamilton.py)")
    p.add_argument("--backends", default="auto", type=bench.backends_option(),
                   help="comma-separated local-kernel backends the rank sequences and checks "
                        "run on, each tagged (default auto; e.g. auto,fa4: FlashAttention-4 "
                        "beside the current kernels)")
    a = p.parse_args(argv)
    backend_names = a.backends
    if a.smoke:
        device = torch.device("cpu")
        a.ranks, a.tokens, a.heads, a.dim, a.rounds = 4, 48, 2, 16, 1
        a.no_flex = a.no_fused = True
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device; use --smoke on the CPU")
        device = torch.device("cuda")
    dtype = torch.bfloat16
    out_dir = bench.out_dir(os.path.join(HERE, "results"), a.out)
    n, length, heads, dim = a.ranks, a.tokens, a.heads, a.dim
    try:  # the length hamilton_attn itself would accept for this schedule (causal)
        resolve_schedule(_schedule(a.schedule, n), n, length, True)
    except ValueError as e:
        p.error(f"--tokens {length}: {e}")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        p.error(f"--variants: {bad or a.variants!r} not among {', '.join(VARIANTS)}")
    config = HamiltonConfig(merge_backend=a.merge_backend, contiguous_kv=a.contiguous_kv)
    # mode -> its HamiltonConfig (kernels and +fused: the run's config)
    configs = {VARIANTS[v][0]: dataclasses.replace(config, **VARIANTS[v][1])
               for v in dict.fromkeys(variants)}
    print(f"device: {bench.device_name(device)}; torch {torch.__version__}; {n} ranks x {length} "
          f"tokens, H={heads}, D={dim}, bf16, schedule {a.schedule} (causal, zigzag)")
    probe = torch.zeros(1, 8, heads, dim, device=device, dtype=dtype)
    print("local kernel backend (auto):", pick_backend(probe, probe, probe, causal=False))
    option = backend_names != ["auto"]  # rows record their backend only with the option
    runs, status = bench.usable_backends(backend_names, device, dtype, dim)
    extra = (lambda be: {"backend": be}) if option else (lambda be: {})
    results, rows = [], []
    t_start = time.time()

    # 1. correctness on a small case (every rank simulated, forward and backward), per
    # variant and backend; a variant that sums in +merge's order (no defer_dq, no defer_merge)
    # must give +merge's bits
    for be in runs:
        sfx = bench.backend_tag("", be)
        for sched_name in dict.fromkeys([a.schedule, "ring"]):
            clen = 12 if a.smoke else (16 * 2 * (n - 1) if sched_name == "tasp" else 128)
            base, noise = None, True
            for mode, cfg in configs.items():
                try:
                    errs, got = check(device, dtype, n, clen, 2 if a.smoke else 4, dim,
                                      sched_name, config=cfg, backend=be)
                    if mode == "+merge":  # twice: are the kernels deterministic here?
                        base = got
                        noise = compare(check(device, dtype, n, clen, 2 if a.smoke else 4, dim,
                                              sched_name, config=cfg, backend=be)[1], base)[0]
                    same, diff = compare(got, base) if mode != "+merge" else (None, None)
                    ok = (max(errs.values()) <= 2e-2
                          and (same is not False or reorders(cfg) or not noise))
                    print(f"correctness ({sched_name}, {n} ranks, {mode}{sfx}, bf16 vs float64 "
                          "oracle): " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
                          + (f"; a second run gives the same bits: {noise}" if mode == "+merge"
                             else "" if same is None else
                             f"; same bits as +merge: {same} (largest rel diff {diff:.1e})")
                          + ("  OK" if ok else "  FAILED"))
                    results.append(bench.result(
                        "hamilton", f"correctness {sched_name}"
                        + ("" if mode == "+merge" else f" {mode}") + sfx, median_ms=None,
                        device=device, dtype=dtype, errors=errs, ok=ok, variant=mode,
                        same_bits_as_merge=same, rel_diff_to_merge=diff,
                        deterministic=noise if mode == "+merge" else None, **extra(be)))
                except Exception:  # noqa: BLE001
                    print(f"correctness check {sched_name} {mode}{sfx} failed:\n"
                          + traceback.format_exc())

    # 2. timings: every backend's sequences and the baselines in one alternated pool
    contenders = {}
    for name, (f, fb) in dense_baselines(device, dtype, n * length, heads, dim,
                                         not a.no_flex).items():
        contenders[(name, "fwd")] = f
        contenders[(name, "fwd+bwd")] = fb
    modes = ["kernels", *configs] + ([] if a.no_fused else ["+fused"])
    ranks = sorted({0, n // 2, n - 1})
    meta = {}  # contender name -> (mode, backend)
    for r in ranks:
        for be in runs:
            sfx = bench.backend_tag("", be)
            base = None  # +merge's results on this rank's data
            noise = (True, True)  # whether a second +merge sequence gave +merge's bits
            for mode in modes:
                try:
                    f, fb = make_sequence(device, dtype, n, length, heads, dim, r, a.schedule,
                                          mode, configs.get(mode, config), backend=be)
                    # warm-up (and compilation of the fused merge) outside the timings; the
                    # first calls' results are compared with +merge's
                    got = f(), fb()
                    if mode == "+merge":
                        base = got
                        # the kernels may not be deterministic (atomics): a second +merge
                        # sequence on the same data says what "the same bits" can mean here
                        f2, fb2 = make_sequence(device, dtype, n, length, heads, dim, r,
                                                a.schedule, mode, configs[mode], backend=be)
                        again = f2(), fb2()
                        del f2, fb2
                    if mode in configs and base is not None:
                        other = again if mode == "+merge" else got
                        (sf, df), (sb, db) = (compare(other[0], base[0]),
                                              compare(other[1], base[1]))
                        if mode == "+merge":
                            noise = (sf, sb)
                            del again
                        del other
                        race = (not reorders(configs[mode]) and mode != "+merge"
                                and ((noise[0] and not sf) or (noise[1] and not sb)))
                        what = "a second +merge" if mode == "+merge" else mode
                        print(f"rank{r} {what}{sfx}: same bits as +merge: fwd {sf}, fwd+bwd "
                              f"{sb} (largest rel diff {df:.1e}, {db:.1e})"
                              + ("  RACE?" if race else ""))
                        results.append(bench.result(
                            "hamilton", f"rank{r} {mode} vs +merge{sfx}", median_ms=None,
                            device=device, dtype=dtype, variant=mode, same_bits_fwd=sf,
                            same_bits_fwd_bwd=sb, rel_diff_fwd=df, rel_diff_fwd_bwd=db,
                            race=race, **extra(be)))
                    del got
                    name = f"rank{r} {mode}{sfx}"
                    meta[name] = (mode, be)
                    contenders[(name, "fwd")] = f
                    contenders[(name, "fwd+bwd")] = fb
                except Exception:  # noqa: BLE001
                    print(f"sequence rank {r} {mode}{sfx} failed:\n" + traceback.format_exc())
            del base
    times = {}
    for direction in ("fwd", "fwd+bwd"):
        # alternate the contenders round by round (GPUs slow down under sustained load)
        fns = {name: fn for (name, d), fn in contenders.items() if d == direction}
        per = {name: [] for name in fns}
        order = [(rnd, name) for rnd in range(a.rounds) for name in fns]
        for _, name in bench.progress(order, desc=f"timing {direction}"):
            try:
                per[name].append(bench.time_fn(fns[name], device=device))
            except Exception:  # noqa: BLE001
                print(f"timing {direction} {name} failed:\n" + traceback.format_exc())
        for name, ts in per.items():
            if ts:
                times[(name, direction)] = statistics.median(ts)
    base = "cudnn" if device.type == "cuda" else "dense(torch)"
    for (name, direction), ms in sorted(times.items(), key=lambda x: (x[0][1], x[0][0])):
        dense = times.get((base, direction))
        per_rank = None if dense is None else dense / n
        eff = None if per_rank is None or name in (base, "flex") else per_rank / ms
        row = {"contender": name, "dir": direction, "ms": ms,
               "dense/n ms": per_rank if name not in (base, "flex") else ms / n,
               "efficiency": eff}
        rows.append(row)
        mode, be = meta.get(name, (None, None))
        opts = {} if mode not in configs else {
            "overlap_merges": configs[mode].overlap_merges, "defer_dq": configs[mode].defer_dq,
            "defer_merge": configs[mode].defer_merge}
        if be is not None:
            opts.update(extra(be))
        results.append(bench.result(
            "hamilton", f"{direction} {name}", median_ms=ms, device=device, dtype=dtype,
            shape={"ranks": n, "tokens_per_rank": length, "heads": heads, "head_dim": dim,
                   "batch": 1}, schedule=a.schedule, efficiency=eff,
            dense_over_n_ms=per_rank, baseline=base, variant=mode, **opts))
    print(bench.format_table(rows))
    if option:
        results.append(bench.result("hamilton", "backends", median_ms=None, device=device,
                                    backends=status))
    tagged = [bench.backend_tag(m, be) for be in runs for m in modes]
    width = max(map(len, tagged or modes))
    for direction in ("fwd", "fwd+bwd"):
        for mode in tagged:
            effs = [r["efficiency"] for r in rows if r["dir"] == direction
                    and r["contender"].split(" ", 1)[-1] == mode
                    and r["efficiency"] is not None]
            if effs:
                print(f"efficiency {direction:8s} {mode:{width}s}: worst rank {min(effs):.3f}, "
                      f"best {max(effs):.3f} (dense {base} / {n} over the rank's sequence)")
    path = bench.write_results(results, os.path.join(out_dir, "bench_hamilton.json"))
    print(f"wrote {path} ({time.time() - t_start:.0f} s)")
    if a.step_sweep:
        step_sweep(device, dtype, out_dir, a.smoke)
    return results


if __name__ == "__main__":
    main()
