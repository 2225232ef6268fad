"""Single-GPU benchmark: the local compute of ``n`` simulated ranks of the dense strategies
``allgather``, ``ulysses`` and ``usp_attn`` against dense cuDNN over the whole sequence / n.

    PYTHONPATH=common/src:reference/src:hamilton/src python hamilton/bench/bench_strategies.py
    ... --smoke            # tiny configuration on the CPU (checks that the script works)

Default: 8 ranks x 8192 tokens per rank (65,536 tokens), Hq = 32, Hkv = 8, D = 128, bf16, B = 1,
causal and full masks, forward and forward+backward.

What runs (the ``kernels`` definition of bench_hamilton.py: the attention kernel calls of a
rank, back to back, no messages): every rank's local calls after its communication, each an
``attention_forward`` (forward) or ``attention_forward`` then ``attention_backward`` (in reverse
order) of ``longattn.common.kernels`` -- the two functions that
``longattn.common.kernels.attention`` (what the strategies call) runs in its forward and
backward. The calls are inline in functions that also communicate, so their shapes come from
the package's own planning functions and are reproduced here:

* ``allgather`` (:func:`longattn.hamilton.allgather.allgather_attention`): one call per
  :func:`~longattn.hamilton.allgather.query_calls` entry -- the rank's queries (causal: each
  zigzag half) against the prefix of the gathered K/V they can see, ``backend`` as given;
* ``ulysses`` (:func:`longattn.hamilton.ulysses.ulysses_attention`): one call per
  :func:`~longattn.hamilton.ulysses.head_segments` entry -- the whole sequence (in global
  order) on the rank's ``Hq / n`` query heads and their KV heads, ``backend`` as given;
* ``usp HxS`` (:func:`longattn.hamilton.usp.usp_attn`, ``H`` head-group x ``S`` seq-group
  ranks): per head segment, the step loop of ``_HamiltonAttn`` over the seq group on ``H * L``
  tokens: the diagonal call on the local q/k/v, then each step's ``plan.calls`` with K/V as
  strided views of the KV buffer (:func:`~longattn.hamilton.plan.kv_views`), the schedule that
  ``usp_attn(schedule=--usp-schedule)`` resolves and the backends of
  :func:`~longattn.hamilton.args.resolve_kernels`, as ``usp_attn`` resolves them.

Not timed (as in bench_hamilton.py's ``kernels``): messages, allgather's split of the gathered
rows into K and V and the join of its two outputs, ulysses' permutation into global order and
back and its head-segment copies, usp's merges and dK/dV accumulator adds, autograd.

Rule (bench_hamilton.py's): each rank's time is compared with the dense time / n, and the
slowest rank decides (efficiency = (dense ms / n) / worst rank's ms; the mean over ranks is in
the JSON). Ranks whose calls have the same shapes and backends are timed once. Dense baselines
over all ``n * L`` tokens, alternated with the contenders round by round
(``bench.time_interleaved``): ``sdpa_cudnn`` (``sdpa_kernel(CUDNN_ATTENTION)``, ``enable_gqa``;
K/V heads repeated to Hq where that is refused: the same FLOPs) and ``kernels`` (one
``attention_forward`` / ``attention_backward`` call with ``backend``); the faster one is the
baseline. PASS: efficiency >= 0.90.

Correctness first, per strategy and mask, on a small sequence with the same ranks and heads:
every rank's calls on the slices of one global q/k/v they would see (K/V packed into a buffer
for the step calls), outputs merged with ``merge_partials_`` and gradients summed over ranks,
against float64 dense attention (``backend="torch"``): out, lse, dq, dk, dv within 2e-2. A
failed check skips that strategy's timings and the exit status is 1.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from typing import NamedTuple

import torch

from longattn.common import bench
from longattn.common.kernels import attention_backward, attention_forward, pick_backend
from longattn.common.layout import positions
from longattn.common.merge import merge_partials_
from longattn.common.testing import rel_error
from longattn.hamilton.allgather import query_calls
from longattn.hamilton.args import _units_needed, resolve_kernels, resolve_schedule
from longattn.hamilton.plan import kv_views, make_plan, unit_labels
from longattn.hamilton.sharding import layout_name
from longattn.hamilton.ulysses import head_ranges, head_segments, head_shapes

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 0.90
TOL = 2e-2
MASKS = {"causal": True, "full": False}
PASSES = ("fwd", "fwd+bwd")


class Work(NamedTuple):
    """One local kernel call of a rank, in global coordinates: query tokens ``q_tok`` (in the
    rank's local order) of query heads ``q_heads = (lo, hi)`` against keys ``kv_tok`` of KV
    heads ``kv_heads``, causal (bottom-right aligned) or not, with the backends given to
    ``attention_forward`` / ``attention_backward``. ``buf``: ``(tokens of every buffer row,
    row0, row1)`` when K/V are :func:`kv_views` of a step's KV buffer, None when contiguous."""

    q_tok: torch.Tensor
    q_heads: tuple
    kv_tok: torch.Tensor
    kv_heads: tuple
    causal: bool
    fwd: str
    bwd: str
    buf: tuple | None = None

    def signature(self):
        """What the call's speed depends on (shapes, mask, backends, buffer layout)."""
        b = None if self.buf is None else (len(self.buf[0]), self.buf[1], self.buf[2])
        return (len(self.q_tok), _width(self.q_heads), len(self.kv_tok), _width(self.kv_heads),
                self.causal, self.fwd, self.bwd, b)


def _width(r):
    return r[1] - r[0]


# ---------------------------------------------------------------------------------------------
# the local calls of every rank, from the package's planning functions


def allgather_ranks(n, length, hq, hkv, causal, backend):
    """{rank label: [Work]} of ``allgather_attention``: the gathered K/V are in global order."""
    out = {}
    for r in range(n):
        pos = positions(n * length, r, n, layout_name(causal))
        out[f"r{r}"] = [Work(pos[qa:qb], (0, hq), torch.arange(stop), (0, hkv), c, backend,
                             backend)
                        for qa, qb, stop, c in query_calls(n, r, length, length, causal)]
    return out


def ulysses_ranks(n, length, hq, hkv, causal, backend):
    """{rank label: [Work]} of ``ulysses_attention``: the whole sequence in global order (causal:
    after its local permutation; full: the contiguous shards in rank order)."""
    tok = torch.arange(n * length)
    q_ranges, kv_ranges = head_ranges(hq, hkv, n)
    out = {}
    for r in range(n):
        q0, k0 = q_ranges[r][0], kv_ranges[r][0]
        out[f"r{r}"] = [Work(tok, (q0 + qa, q0 + qb), tok, (k0 + ka, k0 + kb), causal, backend,
                             backend)
                        for (qa, qb), (ka, kb) in head_segments(hq, hkv, n, r)]
    return out


def usp_kernels(h, s, length, hq, hkv, dim, causal, sched, backend, device, dtype):
    """``usp_attn``'s backends, keyed by (query heads, KV heads) of a local call."""
    q = torch.empty(1, length, hq, dim, device=device, dtype=dtype)
    k = torch.empty(1, length, hkv, dim, device=device, dtype=dtype)
    return {heads: resolve_kernels(qh, kh, vh, n=s, causal=causal,
                                   units=_units_needed(sched, causal), backend=backend,
                                   grad=True, return_lse=False, contiguous_kv=False)
            for heads, (qh, kh, vh) in head_shapes(q, k, k, h).items()}


def _buffer_tokens(labels, plans, pos, step, rank, unit):
    """Global tokens of every row of ``rank``'s KV buffer at ``step`` (``unit_labels``: unit u
    holds unit ``ou`` of rank ``o``'s step-0 buffer, whose local token unit is its own_units)."""
    parts = []
    for o, ou in labels[step][rank]:
        t = plans[o].own_units[ou]
        parts.append(pos[o][t * unit:(t + 1) * unit])
    return torch.cat(parts)


def _step_loop(sr, s, pos, plans, labels, unit, qh, kh, causal, kern):
    """The calls of ``_HamiltonAttn`` on seq rank ``sr`` for one head segment."""
    calls = [Work(pos[sr], qh, pos[sr], kh, causal, kern.fwd["diag"], kern.bwd["diag"])]
    half = len(pos[sr]) // 2
    for step in range(1, s):
        btok = _buffer_tokens(labels, plans, pos, step, sr, unit)
        for c in plans[sr].calls[step]:
            a, b = c.start * unit, c.stop * unit
            q_tok = pos[sr] if c.rows == "all" else pos[sr][half:]
            calls.append(Work(q_tok, qh, btok[a:b], kh, False, kern.fwd[c.rows],
                              kern.bwd[c.rows], (btok, a, b)))
    return calls


def usp_ranks(h, s, sched, length, hq, hkv, dim, causal, backend, device, dtype):
    """{rank label: [Work]} of ``usp_attn`` on an ``h`` x ``s`` grid with seq-group schedule
    ``sched``: the seq-group part of ``h * length`` tokens, each head segment's step loop."""
    lh = h * length
    sched = resolve_schedule(sched, s, lh, causal)  # raises where the length does not fit
    kernels = usp_kernels(h, s, length, hq, hkv, dim, causal, sched, backend, device, dtype)
    pos = [positions(s * lh, r, s, layout_name(causal)) for r in range(s)]
    plans = [make_plan(sched, r, causal) for r in range(s)]
    labels = unit_labels(sched, causal)
    unit = lh // plans[0].units
    q_ranges, kv_ranges = head_ranges(hq, hkv, h)
    out = {}
    for hr in range(h):
        q0, k0 = q_ranges[hr][0], kv_ranges[hr][0]
        for sr in range(s):
            calls = []
            for (qa, qb), (ka, kb) in head_segments(hq, hkv, h, hr):
                calls += _step_loop(sr, s, pos, plans, labels, unit, (q0 + qa, q0 + qb),
                                    (k0 + ka, k0 + kb), causal, kernels[qb - qa, kb - ka])
            out[f"h{hr}s{sr}"] = calls
    return out


def strategies(a, device, dtype):
    """{name: builder(length, causal) -> {rank label: [Work]}} of the strategies to run."""
    n, hq, hkv, dim = a.ranks, a.heads, a.kv_heads, a.dim
    out = {"allgather": lambda L, c: allgather_ranks(n, L, hq, hkv, c, a.backend)}
    if hq % n == 0:
        out["ulysses"] = lambda L, c: ulysses_ranks(n, L, hq, hkv, c, a.backend)
    for h, s in usp_grids(a):
        # the Schedule usp_attn resolves at the timed length; the check reuses it
        scheds = {c: resolve_schedule(a.usp_schedule, s, h * a.tokens, c)
                  for c in MASKS.values()}
        out[f"usp {h}x{s}"] = (lambda L, c, h=h, s=s, scheds=scheds: usp_ranks(
            h, s, scheds[c], L, hq, hkv, dim, c, a.backend, device, dtype))
    return out


def usp_grids(a):
    """(head group, seq group) sizes: ``--usp-grids`` or every proper factorisation of n."""
    if a.usp_grids:
        grids = [tuple(int(x) for x in g.split("x")) for g in a.usp_grids.split(",")]
    else:
        grids = [(h, a.ranks // h) for h in range(2, a.ranks) if a.ranks % h == 0]
    return [(h, s) for h, s in grids if h * s == a.ranks and a.heads % h == 0]


def check_length(a, base):
    """The smallest length >= base that every strategy's layout takes (even: zigzag halves; the
    usp schedules' units on ``h * L`` tokens)."""
    m = 2
    for h, s in usp_grids(a):
        for c in MASKS.values():
            sched = resolve_schedule(a.usp_schedule, s, h * a.tokens, c)
            u = _units_needed(sched, c)
            m = math.lcm(m, u // math.gcd(u, h))
    return -(-base // m) * m


# ---------------------------------------------------------------------------------------------
# correctness: the simulated ranks' calls on one global q/k/v against dense float64 attention


def _operands(w, q, k, v, device):
    """A call's q, k, v sliced from the global [1, S, H, D] tensors (K/V through a packed
    buffer and kv_views for the step calls, as the step loop holds them)."""
    qs = q[:, w.q_tok.to(device), w.q_heads[0]:w.q_heads[1]]
    kh = slice(*w.kv_heads)
    if w.buf is None:
        idx = w.kv_tok.to(device)
        return qs, k[:, idx, kh], v[:, idx, kh]
    rows, r0, r1 = w.buf
    idx = rows.to(device)
    buf = torch.cat([k[:, idx, kh].flatten(2), v[:, idx, kh].flatten(2)], -1)
    kk, vv = kv_views(buf.transpose(0, 1).contiguous(), r0, r1, _width(w.kv_heads), k.shape[3])
    return qs, kk, vv


def _simulate(ranks, q, k, v, dout, scale, device):
    """out, lse, dq, dk, dv of every rank's calls: outputs merged, gradients summed."""
    seq, hq, dim = q.shape[1], q.shape[2], q.shape[3]
    acc = torch.zeros(1, seq, hq, dim, dtype=torch.float32, device=device)
    lse = torch.full((1, hq, seq), float("-inf"), dtype=torch.float32, device=device)
    works = [w for calls in ranks.values() for w in calls]
    for w in works:
        i, hs = w.q_tok.to(device), slice(*w.q_heads)
        o, l = attention_forward(*_operands(w, q, k, v, device), softmax_scale=scale,
                                 causal=w.causal, backend=w.fwd)
        a, al = acc[:, i, hs], lse[:, hs, i]
        merge_partials_(a, al, o, l)
        acc[:, i, hs], lse[:, hs, i] = a, al
    out = acc.to(q.dtype)
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in (q, k, v)]
    for w in works:
        i, hs, ks = w.q_tok.to(device), slice(*w.q_heads), slice(*w.kv_heads)
        dq, dk, dv = attention_backward(dout[:, i, hs], *_operands(w, q, k, v, device),
                                        out[:, i, hs], lse[:, hs, i], softmax_scale=scale,
                                        causal=w.causal, backend=w.bwd)
        j = w.kv_tok.to(device)
        grads[0][:, i, hs] += dq.float()
        grads[1][:, j, ks] += dk.float()
        grads[2][:, j, ks] += dv.float()
    return (out, lse, *grads)


def check(ranks, seq, hq, hkv, dim, causal, device, dtype):
    """Max-relative errors {out, lse, dq, dk, dv} of the simulated ranks against float64."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, seq, hq, dim), (1, seq, hkv, dim), (1, seq, hkv, dim), (1, seq, hq, dim)]
    glob = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    scale = dim ** -0.5
    ref = [t.double() for t in glob]
    o_r, l_r = attention_forward(*ref[:3], softmax_scale=scale, causal=causal, backend="torch")
    dq_r, dk_r, dv_r = attention_backward(ref[3], *ref[:3], o_r, l_r, softmax_scale=scale,
                                          causal=causal, backend="torch")
    got = _simulate(ranks, *(t.to(device) for t in glob), scale, device)
    names = ("out", "lse", "dq", "dk", "dv")
    return {n: rel_error(x, r) for n, x, r in zip(names, got, (o_r, l_r, dq_r, dk_r, dv_r))}


# ---------------------------------------------------------------------------------------------
# timing


def rank_fns(works, device, dtype, dim, seed):
    """(fwd, fwd_bwd) closures running one rank's calls on random data of their shapes, and the
    backend names the calls resolve to (forward and backward)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    scale, bufs, calls, names = dim ** -0.5, {}, [], set()
    for w in works:
        nq, nk, qh, kh = len(w.q_tok), len(w.kv_tok), _width(w.q_heads), _width(w.kv_heads)
        q, dout = rnd(1, nq, qh, dim), rnd(1, nq, qh, dim)
        if w.buf is None:
            k, v = rnd(1, nk, kh, dim), rnd(1, nk, kh, dim)
        else:  # one KV buffer per rank and head count, as the step loop holds it
            key = (len(w.buf[0]), kh)
            if key not in bufs:
                bufs[key] = rnd(len(w.buf[0]), 1, kh * 2 * dim)
            k, v = kv_views(bufs[key], w.buf[1], w.buf[2], kh, dim)
        out, lse = attention_forward(q, k, v, softmax_scale=scale, causal=w.causal,
                                     backend=w.fwd)
        calls.append((w, q, k, v, dout, out, lse))
        names |= {pick_backend(q, k, v, causal=w.causal, backend=b) for b in (w.fwd, w.bwd)}

    def fwd():
        for w, q, k, v, *_ in calls:
            attention_forward(q, k, v, softmax_scale=scale, causal=w.causal, backend=w.fwd)

    def fwd_bwd():
        fwd()
        for w, q, k, v, dout, out, lse in reversed(calls):
            attention_backward(dout, q, k, v, out, lse, softmax_scale=scale, causal=w.causal,
                               backend=w.bwd)

    return fwd, fwd_bwd, sorted(names)


def _sdpa_fns(q, k, v, do, causal):
    """SDPA with the cuDNN backend (BHSD); K/V heads repeated where enable_gqa is refused."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def fwd(qq=q, kk=k, vv=v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, **gqa)

    def fwd_bwd():
        for t in (qg, kg, vg):
            t.grad = None
        fwd(qg, kg, vg).backward(do)

    try:
        fwd_bwd()
        return fwd, fwd_bwd, "enable_gqa" if gqa else "mha"
    except RuntimeError:
        if not gqa:
            raise
        g = q.shape[1] // k.shape[1]
        rep = [t.repeat_interleave(g, 1) for t in (k, v)]
        fwd2, fb2, _ = _sdpa_fns(q, *rep, do, causal)
        return fwd2, fb2, "kv heads repeated"


def dense_fns(device, dtype, seq, hq, hkv, dim, causal, backend):
    """{name: (fwd, fwd_bwd, note)} over the whole sequence."""
    w = Work(torch.arange(seq), (0, hq), torch.arange(seq), (0, hkv), causal, backend, backend)
    f, fb, names = rank_fns([w], device, dtype, dim, 1)
    out = {"kernels": (f, fb, f"backend={backend}: {', '.join(names)}")}
    if device.type == "cuda":
        g = torch.Generator(device=device).manual_seed(1)
        q, k, v, do = (torch.randn(1, h, seq, dim, generator=g, device=device).to(dtype)
                       for h in (hq, hkv, hkv, hq))  # BHSD, as bench_hamilton.py
        try:
            out["sdpa_cudnn"] = _sdpa_fns(q, k, v, do, causal)
        except RuntimeError:  # reported; the kernels baseline remains
            print("sdpa_cudnn baseline failed:\n" + traceback.format_exc(), file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# driver


def run_checks(a, builders, device, dtype):
    """{(strategy, mask): ok} with a correctness record each."""
    base = 12 if a.smoke else 64
    length = check_length(a, base)
    oks, results = {}, []
    for name, build in builders.items():
        for mask, causal in MASKS.items():
            try:
                errs = check(build(length, causal), a.ranks * length, a.heads, a.kv_heads,
                             a.dim, causal, device, dtype)
            except Exception:  # noqa: BLE001 - reported, and counted as a failure
                print(f"correctness {name} {mask} raised:\n" + traceback.format_exc())
                errs = {"error": math.inf}
            ok = max(errs.values()) <= TOL
            oks[name, mask] = ok
            print(f"correctness {name:9s} {mask:6s} ({a.ranks} ranks x {length} tokens, bf16 vs "
                  f"float64): " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
                  + ("  OK" if ok else "  FAILED"))
            results.append(bench.result("hamilton", f"correctness {name} {mask}",
                                        median_ms=None, device=device, dtype=dtype,
                                        errors=errs, ok=ok, kind="correctness",
                                        tokens_per_rank=length))
    return oks, results


def contenders(a, builders, oks, device, dtype):
    """{(mask, pass): {name: fn}}, and per (strategy, mask) the timed groups of equal ranks:
    {(strategy, mask): [(contender name, [rank labels], backends)]}."""
    fns = {(m, p): {} for m in MASKS for p in PASSES}
    groups = {}
    for mask, causal in MASKS.items():
        for name, (f, fb, note) in dense_fns(device, dtype, a.ranks * a.tokens, a.heads,
                                              a.kv_heads, a.dim, causal, a.backend).items():
            fns[mask, "fwd"][f"dense {name}"], fns[mask, "fwd+bwd"][f"dense {name}"] = f, fb
            print(f"dense {name} ({mask}): {note}")
    for (name, mask), ok in bench.progress(list(oks.items()), desc="setup"):
        if not ok:
            continue
        by_sig = {}
        for label, works in builders[name](a.tokens, MASKS[mask]).items():
            by_sig.setdefault(tuple(w.signature() for w in works), []).append((label, works))
        groups[name, mask] = []
        for i, members in enumerate(by_sig.values()):
            label, works = members[0]
            try:
                f, fb, backends = rank_fns(works, device, dtype, a.dim, i)
                fb()  # warm-up outside the timings (and a failure shows here)
            except Exception:  # noqa: BLE001
                print(f"{name} {mask} {label} failed:\n" + traceback.format_exc())
                continue
            key = f"{name} {label}"
            fns[mask, "fwd"][key], fns[mask, "fwd+bwd"][key] = f, fb
            groups[name, mask].append((key, [m[0] for m in members], backends))
    return fns, groups


def _dense_times(times, mask, p):
    return {k[len("dense "):]: v for k, v in times[mask, p].items()
            if k.startswith("dense ") and not k.endswith(" spread")}


def summarize(a, groups, times, device, dtype):
    """Table rows and result records: one per (strategy, mask, pass), and the dense ones."""
    rows, results = [], []
    shape = {"ranks": a.ranks, "tokens_per_rank": a.tokens, "heads": a.heads,
             "kv_heads": a.kv_heads, "head_dim": a.dim, "batch": 1}
    for (mask, p), group in times.items():
        for name, ms in _dense_times(times, mask, p).items():
            results.append(bench.result(
                "hamilton", f"dense {name} {mask} {p}", median_ms=ms, device=device,
                dtype=dtype, shape=dict(shape, causal=MASKS[mask]), kind="dense", mask=mask,
                direction=p, spread=group.get(f"dense {name} spread")))
    for (name, mask), members in groups.items():
        for p in PASSES:
            dense = _dense_times(times, mask, p)
            per = {label: times[mask, p][key] for key, labels, _ in members for label in labels
                   if key in times[mask, p]}
            if not per or not dense:
                continue
            base = min(dense, key=dense.get)  # the faster dense cuDNN call: the stricter rule
            over_n = dense[base] / a.ranks
            worst = max(per, key=per.get)
            mean = sum(per.values()) / len(per)
            eff = over_n / per[worst]
            verdict = "PASS" if eff >= TARGET else "FAIL"
            rows.append({"strategy": name, "mask": mask, "pass": p, "ms": per[worst],
                         "rank": worst, "dense/n ms": over_n, "efficiency": eff,
                         f">= {TARGET}": verdict})
            results.append(bench.result(
                "hamilton", f"{name} {mask} {p}", median_ms=per[worst], device=device,
                dtype=dtype, shape=dict(shape, causal=MASKS[mask]), kind="strategy",
                strategy=name, mask=mask, direction=p, efficiency=eff, target=TARGET,
                verdict=verdict, worst_rank=worst, per_rank_ms=per, mean_rank_ms=mean,
                efficiency_mean=over_n / mean, dense_over_n_ms=over_n, baseline=base,
                dense_ms=dense, backends=sorted({b for _, _, bs in members for b in bs}),
                usp_schedule=a.usp_schedule if name.startswith("usp") else None))
    return rows, results


def parse(argv):
    p = bench.simulated_ranks_parser(__doc__, tokens=8192)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--backend", default="auto", help="backend= of the strategies' calls")
    p.add_argument("--usp-grids", default=None,
                   help="comma-separated HxS (head x seq group); default every proper one")
    p.add_argument("--usp-schedule", default="auto", help="usp_attn's seq-group schedule")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if a.smoke:
        a.ranks, a.tokens, a.heads, a.kv_heads, a.dim, a.rounds = 4, 24, 4, 2, 16, 1
    elif not torch.cuda.is_available():
        p.error("no CUDA device; use --smoke on the CPU")
    if a.heads % a.kv_heads or a.tokens % 2:
        p.error("--heads must be a multiple of --kv-heads and --tokens even (zigzag halves)")
    return a


def main(argv=None):
    """Run the checks and timings; returns the exit status (1 on a correctness failure)."""
    a = parse(argv)
    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.bfloat16
    out_dir = bench.out_dir(os.path.join(HERE, "results"), a.out)
    t0 = time.time()
    print(f"device: {bench.device_name(device)}; torch {torch.__version__}; {a.ranks} ranks x "
          f"{a.tokens} tokens, Hq={a.heads}, Hkv={a.kv_heads}, D={a.dim}, bf16, "
          f"backend={a.backend}")
    builders = strategies(a, device, dtype)
    oks, results = run_checks(a, builders, device, dtype)
    fns, groups = contenders(a, builders, oks, device, dtype)
    times = {}
    for key, group in bench.progress(list(fns.items()), desc="timing"):
        # alternated round by round (GPUs slow down under sustained load)
        times[key] = bench.time_interleaved(group, device=device, rounds=a.rounds)
    rows, recs = summarize(a, groups, times, device, dtype)
    print(bench.format_table(rows, width=100))
    path = bench.write_results(results + recs, os.path.join(out_dir, "bench_strategies.json"))
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return 0 if all(oks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
