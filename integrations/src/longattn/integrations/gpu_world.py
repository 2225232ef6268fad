"""``longattn check --gpu-world N``: every distributed method, multi-rank, against one process.

Each case runs one distributed call (forward and, where the method has one, backward) on the
ranks of a world and the same call on one process (``group=LOCAL``, the full sequence, the same
dtype, backend and device) on every rank, and compares this rank's part of each tensor (``out``,
``lse`` where returned, ``dq``, ``dk``, ``dv``; for the transformers path ``logits``, ``loss``,
``grads``). The errors are relative, like :func:`longattn.common.testing.rel_error`, over the
whole global tensor (the ranks' squared sums add up); a NaN, or an infinity on one side only,
gives ``inf``. Tolerances: :data:`TOL` by dtype (a transformers loss: at least
:data:`LOSS_TOL`, transformers computes it in float32; a float64 transformers case builds its
model with float64 norms, ``demo.tiny_model(exact_norms=True)``); for every hamilton schedule
and backend the bf16 error at the largest world may be at most :data:`SCALING` times the
error at 2 ranks (a row of its own, method ``<method>/scaling``).

Worlds: without ``torchrun`` the ranks are spawned here (:func:`longattn.common.testing.run_world`,
gloo; with ``--device cuda`` every rank on ``cuda:0``, so CUDA tensors take gloo's path through
the host). Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) this process is one rank of the
world ``torchrun`` made, with the backend ``LONGATTN_DIST_BACKEND`` (default gloo; ``nccl``: one
GPU per rank, ``cuda:LOCAL_RANK``); rank 0 prints the table.

A backend that cannot serve a case (not installed: ``longattn.common.kernels.UNAVAILABLE``; or it
refuses the request, e.g. fp32 on a bf16-only kernel) gives a row with status ``unavailable`` and
the reason; it is neither a pass nor a failure. Any other error is a failure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

TOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-5, "float64": 1e-10}
SCALING = 1.5  # bf16 error at the largest world / error at 2 ranks, per hamilton schedule
METHODS = ("hamilton", "tree", "ring_swa", "dilated", "transformers")
HAMILTON_BACKENDS = ("auto", "cudnn", "band", "aten", "torch")
TREE_BACKENDS = ("torch", "triton_decode")
INJECT = 1.1  # the test hook's factor on rank 0's out: a 10% error that no tolerance admits


@dataclass(frozen=True)
class Sizes:
    """Shapes of the cases. ``seqlen`` is rounded up per run so that every world of the run
    shards it evenly for every schedule (:func:`seq_multiple`)."""

    batch: int = 1
    seqlen: int = 5376  # ring_swa windows of L/2 that "band" can split at 8 ranks (L = 672)
    heads_q: int = 8
    heads_kv: int = 2
    head_dim: int = 64
    decode_q: int = 4
    model_seq: int = 64


GPU_SIZES = Sizes()
CPU_SIZES = Sizes(batch=1, seqlen=24, heads_q=4, heads_kv=2, head_dim=8, decode_q=2,
                  model_seq=16)


@dataclass(frozen=True)
class Case:
    method: str  # hamilton / tree / ring_swa / dilated / transformers
    variant: str  # schedule and mask, window, ...
    world: int
    dtype: str
    backend: str
    params: dict = field(default_factory=dict)
    seed: int = 0

    @property
    def key(self):
        """What identifies a case across worlds (the scaling rows pair these)."""
        return (self.method, self.variant, self.dtype, self.backend)


# ---------------------------------------------------------------------------------------------
# which cases


def two_level_shape(n: int):
    """``(nodes, gpus_per_node)`` of the two-level schedule on ``n`` ranks, or None (it needs an
    even number of GPUs per node and at least two nodes)."""
    if n < 4 or n % 2:
        return None
    gpn = n // 2 if (n // 2) % 2 == 0 else 2
    return n // gpn, gpn


def hamilton_units(n: int) -> int:
    """The sub-chunks a rank's causal KV block must divide into, over every schedule on n."""
    units = [2, 2 * max(1, n - 1)]  # zigzag ring, TASP (n - 1 slots, zigzag halves)
    if two_level_shape(n):
        units.append(2 * two_level_shape(n)[1])
    return math.lcm(*units)


def seq_multiple(worlds) -> int:
    """The sequence length of every case must be a multiple of this for every world."""
    return math.lcm(*(n * hamilton_units(n) for n in worlds))


def _packed_supported() -> bool:
    from longattn.hamilton import hamilton_attn

    return "cu_seqlens" in inspect.signature(hamilton_attn).parameters


def make_cases(worlds, dtypes, methods, *, hamilton_backends, tree_backends):
    cases = []
    for n in worlds:
        for dt in dtypes:
            for m in methods:
                cases += _CASES[m](n, dt, hamilton_backends, tree_backends)
    return cases


def _hamilton_cases(n, dt, backends, _tree):
    scheds = ["ring", "tasp"] + (["two_level"] if two_level_shape(n) else [])
    out = []
    for sched in scheds:
        for causal in (True, False):
            for b in backends:
                variant = f"{sched} {'causal' if causal else 'full'} gqa"
                out.append(Case("hamilton", variant, n, dt, b,
                                {"schedule": sched, "causal": causal}))
    if _packed_supported():
        for b in backends:
            out.append(Case("hamilton", "tasp causal packed", n, dt, b,
                            {"schedule": "tasp", "causal": True, "packed": True}))
    return out


def _tree_cases(n, dt, _ham, backends):
    variants = [("tree_decode", None), ("ring_decode", None)]
    if two_level_shape(n):
        variants.insert(1, ("tree_decode", two_level_shape(n)))
    out = []
    for fn, hier in variants:
        name = fn + (f" hierarchy {hier[0]}x{hier[1]}" if hier else "")
        for b in backends:
            out.append(Case("tree", name, n, dt, b, {"fn": fn, "hierarchy": hier}))
    return out


def _ring_swa_cases(n, dt, backends, _tree):
    # windows inside one rank's chunk and spanning more than one; sinks; varlen documents; each
    # local-kernel backend (the window L/2 rows are the ones "band" can split: W | L, W >= 128)
    return [Case("ring_swa", v, n, dt, b, p) for v, p in [
        ("window L/2", {"window": 0.5}),
        ("window 1.5L", {"window": 1.5}),
        ("window L/2 sinks 3", {"window": 0.5, "sinks": 3}),
        ("varlen window L/2 sinks 2", {"window": 0.5, "sinks": 2, "varlen": True}),
    ] for b in backends]


def _dilated_cases(n, dt, _ham, _tree):
    return [Case("dilated", f"{'causal' if c else 'full'} group", n, dt, "auto", {"causal": c})
            for c in (True, False)]


def _transformers_cases(n, dt, _ham, _tree):
    return [Case("transformers", "llama zigzag", n, dt, "auto", {"kind": "llama"})]


_CASES = {"hamilton": _hamilton_cases, "tree": _tree_cases, "ring_swa": _ring_swa_cases,
          "dilated": _dilated_cases, "transformers": _transformers_cases}


# ---------------------------------------------------------------------------------------------
# one case on one rank


@dataclass
class Ctx:
    """What a case runner sees: the group, this rank, the device, the shapes."""

    group: object
    rank: int
    n: int
    device: torch.device
    sizes: Sizes


class Unavailable(Exception):
    """A backend that cannot serve the case (the reason is the message)."""


def _dtype(name):
    return getattr(torch, name)


def _qkv(ctx, c, sq, sk=None):
    from longattn.common.testing import random_qkv

    s = ctx.sizes
    return random_qkv(s.batch, sq, sk or sq, s.heads_q, s.heads_kv, s.head_dim,
                      dtype=_dtype(c.dtype), seed=c.seed, device=ctx.device)


def _dout(ctx, c, like):
    from longattn.common.testing import random_like

    return random_like(like, seed=c.seed + 1)


def _grads(fn, tensors, dout):
    """``fn(*leaves)`` on fresh leaves of ``tensors``, ``out.backward(dout)``; (result, grads)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    res = fn(*leaves)
    out = res[0] if isinstance(res, tuple) else res
    out.backward(dout)
    return res, [t.grad for t in leaves]


def _hamilton(ctx, c):
    from longattn.common.dist import LOCAL
    from longattn.hamilton import hamilton_attn, shard, two_level_schedule

    p, S = c.params, ctx.sizes.seqlen
    causal = p["causal"]
    q, k, v = _qkv(ctx, c, S)
    dout = _dout(ctx, c, q)
    sched = (two_level_schedule(*two_level_shape(ctx.n)) if p["schedule"] == "two_level"
             else p["schedule"])
    extra = {}
    if p.get("packed"):  # three documents; the boundaries do not fall on shard edges
        extra["cu_seqlens"] = torch.tensor([0, S // 3 + 1, (2 * S) // 3 - 1, S],
                                           dtype=torch.int32, device=ctx.device)

    def run(group, schedule, *t):
        return hamilton_attn(*t, group=group, causal=causal, schedule=schedule,
                             return_lse=True, backend=c.backend, **extra)

    (ro, rl), rg = _grads(lambda *t: run(LOCAL, "auto", *t), (q, k, v), dout)

    def loc(x, dim=1):  # the layout hamilton_attn expects (packed: by documents)
        return shard(x, group=ctx.group, causal=causal, dim=dim, **extra)

    (o, lse), g = _grads(lambda *t: run(ctx.group, sched, *t), [loc(t) for t in (q, k, v)],
                         loc(dout))
    return _named(out=(o, loc(ro)), lse=(lse, loc(rl, 2)),
                  **{n: (a, loc(b)) for n, a, b in zip(("dq", "dk", "dv"), g, rg)})


def _named(replicated=(), **pairs):
    """``{name: (actual, expected, replicated)}``."""
    return {n: (a, e, n in replicated) for n, (a, e) in pairs.items()}


def tree_lens(total: int, n: int):
    """Uneven per-rank KV lengths summing to ``total``: pairs of ranks give one key across."""
    lens = [total // n] * n
    lens[-1] += total - sum(lens)
    for i in range(0, n - 1, 2):
        lens[i], lens[i + 1] = lens[i] - 1, lens[i + 1] + 1
    return lens


def _tree(ctx, c):
    from longattn.common.dist import LOCAL
    from longattn.tree import ring_decode, tree_decode

    p, S = c.params, ctx.sizes.seqlen
    fn = tree_decode if p["fn"] == "tree_decode" else ring_decode
    q, k, v = _qkv(ctx, c, ctx.sizes.decode_q, S)
    lens = tree_lens(S, ctx.n)
    off = sum(lens[:ctx.rank])
    kl, vl = (t[:, off:off + lens[ctx.rank]] for t in (k, v))
    hier = {"hierarchy": tuple(p["hierarchy"])} if p["hierarchy"] else {}
    ro, rl = fn(q, k, v, group=LOCAL, causal=True, return_lse=True, backend=c.backend)
    o, lse = fn(q, kl, vl, group=ctx.group, causal=True, shard_lens=lens, return_lse=True,
                backend=c.backend, **hier)
    return _named(("out", "lse"), out=(o, ro), lse=(lse, rl))


def _ring_swa(ctx, c):
    from longattn.common.dist import LOCAL
    from longattn.ring_swa import ring_swa_attn

    p, S = c.params, ctx.sizes.seqlen
    L = S // ctx.n
    q, k, v = _qkv(ctx, c, S)
    dout = _dout(ctx, c, q)
    kw = {"window_size": (max(1, int(p["window"] * L)), 0),
          "num_sink_tokens": p.get("sinks", 0), "return_lse": True, "backend": c.backend}
    sl = slice(ctx.rank * L, ctx.rank * L + L)
    if p.get("varlen"):  # packed [T, H, D]: batch row 0, documents crossing rank borders
        q, k, v, dout = (t[0] for t in (q, k, v, dout))
        # (a world of 1, under torchrun, has no second rank for the third border to cross)
        ends = sorted({min(x, S) for x in (0, L // 2 + 1, L + L // 3, S - 2, S)})
        kw["cu_seqlens"] = torch.tensor(ends, dtype=torch.int32, device=ctx.device)

        def cut(t, dim=0):
            return t.narrow(dim, sl.start, L)
        lse_dim = 1
    else:
        def cut(t, dim=1):
            return t.narrow(dim, sl.start, L)
        lse_dim = 2
    (ro, rl), rg = _grads(lambda *t: ring_swa_attn(*t, group=LOCAL, **kw), (q, k, v), dout)
    (o, lse), g = _grads(lambda *t: ring_swa_attn(*t, group=ctx.group, **kw),
                         [cut(t) for t in (q, k, v)], cut(dout))
    return _named(out=(o, cut(ro)), lse=(lse, cut(rl, lse_dim)),
                  **{n: (a, cut(b)) for n, a, b in zip(("dq", "dk", "dv"), g, rg)})


def dilated_schedule(S: int):
    """Segment lengths and dilation rates: one segment shorter than a rank's chunk, one of half
    the sequence, one of all of it (LongNet's geometric shape)."""
    return (max(2, S // 8), S // 2, S), (1, 2, 4)


def _dilated(ctx, c):
    from longattn.common.dist import LOCAL
    from longattn.dilated import dilated_attention

    S = ctx.sizes.seqlen
    L = S // ctx.n
    seg, rates = dilated_schedule(S)
    q, k, v = _qkv(ctx, c, S)
    dout = _dout(ctx, c, q)
    kw = {"causal": c.params["causal"], "return_lse": True, "backend": c.backend}

    def cut(t, dim=1):
        return t.narrow(dim, ctx.rank * L, L)

    (ro, rl), rg = _grads(lambda *t: dilated_attention(*t, seg, rates, group=LOCAL, **kw),
                          (q, k, v), dout)
    (o, lse), g = _grads(lambda *t: dilated_attention(*t, seg, rates, group=ctx.group, **kw),
                         [cut(t) for t in (q, k, v)], cut(dout))
    return _named(out=(o, cut(ro)), lse=(lse, cut(rl, 2)),
                  **{n: (a, cut(b)) for n, a, b in zip(("dq", "dk", "dv"), g, rg)})


def _transformers(ctx, c):
    from longattn.integrations.demo import tiny_batch, tiny_model, train_step
    from longattn.integrations.transformers import layout_for, register

    kind, dtype = c.params["kind"], _dtype(c.dtype)
    ids, labels = (t.to(ctx.device) for t in tiny_batch(ctx.sizes.batch, ctx.sizes.model_seq,
                                                         c.seed))
    exact = dtype == torch.float64  # float64 throughout (tiny_model: its norms' float32)
    ref = train_step(tiny_model(kind, "sdpa", dtype, exact_norms=exact).to(ctx.device), ids,
                     labels)
    model = tiny_model(kind, register(backend=c.backend), dtype, exact_norms=exact).to(
        ctx.device)
    got = train_step(model, ids, labels, layout=layout_for(model.config), group=ctx.group)

    def flat(grads):  # every parameter's gradient as one vector (bf16 rounds small ones)
        return torch.cat([grads[n].reshape(-1) for n in sorted(grads)])

    return _named(("logits", "loss", "grads"), logits=(got[0], ref[0]),
                  loss=(got[1], ref[1]), grads=(flat(got[2]), flat(ref[2])))


RUNNERS = {"hamilton": _hamilton, "tree": _tree, "ring_swa": _ring_swa, "dilated": _dilated,
           "transformers": _transformers}


def partial_error(actual, expected):
    """``(||a - e||^2, ||e||^2)`` in float64: the pieces of a relative error that the ranks'
    shards add up. The rules of :func:`longattn.common.testing.rel_error`: ``-inf`` entries that
    agree are ignored; a NaN, or an infinity on one side only, makes the first ``inf``."""
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ {tuple(a.shape)} vs {tuple(e.shape)}")
    if torch.isnan(a).any() or torch.isnan(e).any():
        return math.inf, 1.0
    ia, ie = torch.isinf(a), torch.isinf(e)
    both = ia & ie & (torch.sign(a) == torch.sign(e))
    if bool((ia ^ ie).any()) or bool((ia & ie & ~both).any()):
        return math.inf, 1.0
    a, e = torch.where(both, 0.0, a), torch.where(both, 0.0, e)
    return float((a - e).pow(2).sum()), float(e.pow(2).sum())


def _unavailable_reason(c: Case):
    from longattn.common.kernels import UNAVAILABLE

    return UNAVAILABLE.get(c.backend)


def run_case(ctx: Ctx, c: Case, inject=None):
    """This rank's result of one case: ``{"status", "why", "parts": {name: (num, den, rep)}}``.

    A ValueError that names the backend, for a backend asked for by name, is the backend
    refusing the request (raised on every rank by the methods' argument agreement, before any
    communication): status ``unavailable``. Anything else propagates (a failure)."""
    why = _unavailable_reason(c)
    if why is not None:
        return {"status": "unavailable", "why": why, "parts": {}}
    try:
        pairs = RUNNERS[c.method](ctx, c)
    except ValueError as e:
        if c.backend != "auto" and "backend" in str(e):
            return {"status": "unavailable", "why": str(e).splitlines()[0], "parts": {}}
        raise
    parts = {}
    for name, (a, e, rep) in pairs.items():
        if inject == c.method and ctx.rank == 0 and name in ("out", "logits"):
            a = a.detach() * INJECT  # the test hook: a wrong result must fail its row
        parts[name] = (*partial_error(a, e), rep)
    return {"status": "ok", "why": "", "parts": parts}


# ---------------------------------------------------------------------------------------------
# worlds


def _device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def spawned_rank(rank, n, case, device, sizes, inject):
    """Worker of :func:`longattn.common.testing.run_world` (gloo): one case on this rank."""
    import torch.distributed as dist

    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return run_case(Ctx(dist.group.WORLD, rank, n, dev, sizes), case, inject)


def run_spawned(cases, device, sizes, inject=None, timeout=120.0, log=print):
    """Every case on a spawned gloo world of its size; ``[(case, per-rank results or error)]``."""
    from longattn.common.testing import RankError, WorldTimeout, run_world, shutdown_worlds

    out = []
    for i, c in enumerate(cases):
        if device == "cuda" and i and c.world != cases[i - 1].world:
            shutdown_worlds()  # the finished world's ranks hold a CUDA context each
        t0 = time.perf_counter()
        try:
            res = run_world(c.world, spawned_rank, c, device, sizes, inject, timeout=timeout)
        except (RankError, WorldTimeout) as e:
            res = str(e)
        out.append((c, res, time.perf_counter() - t0))
        log(f"  {c.method} {c.variant} x{c.world} {c.dtype} {c.backend}: "
            f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def run_torchrun(cases, device, sizes, inject=None, log=print):
    """Under torchrun: this process is one rank; every rank runs every case of its world size;
    rank 0 gets everyone's results (``all_gather_object``)."""
    import torch.distributed as dist

    backend = os.environ.get("LONGATTN_DIST_BACKEND", "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # nccl: one GPU per rank; gloo: LOCAL_RANK's GPU where there is one, else all on cuda:0
    dev = _device(device, local % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    made = not dist.is_initialized()
    if made:
        dist.init_process_group(backend)
    n, rank = dist.get_world_size(), dist.get_rank()
    mine = []
    for c in cases:
        t0 = time.perf_counter()
        try:
            mine.append(run_case(Ctx(dist.group.WORLD, rank, n, dev, sizes), c, inject))
        except Exception as e:  # noqa: BLE001 - the row reports it
            mine.append({"status": "error", "why": f"{type(e).__name__}: {e}", "parts": {}})
        if rank == 0:
            log(f"  {c.method} {c.variant} {c.dtype} {c.backend}: "
                f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    every = [None] * n
    dist.all_gather_object(every, mine)
    if made:  # a process that exits with its group alive can abort in gloo's destructors
        dist.barrier()
        dist.destroy_process_group()
    return [(c, [every[r][i] for r in range(n)], 0.0) for i, c in enumerate(cases)], rank


# ---------------------------------------------------------------------------------------------
# rows


def combine(per_rank) -> dict:
    """``{name: relative error}`` over the ranks' parts: shards add up, replicated tensors
    (identical on every rank) give the worst rank."""
    errs = {}
    for name, (_, _, rep) in per_rank[0]["parts"].items():
        pieces = [r["parts"][name] for r in per_rank]
        if rep:
            errs[name] = max(_ratio(nm, dn) for nm, dn, _ in pieces)
        else:
            errs[name] = _ratio(sum(p[0] for p in pieces), sum(p[1] for p in pieces))
    return errs


def _ratio(num, den):
    if not math.isfinite(num):
        return math.inf
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


# transformers computes the loss in float32 whatever the model's dtype (as the demo's "fp32
# loss" rows): a float64 row holds its loss to this, every other tensor to TOL
LOSS_TOL = 1e-6


def tensor_tol(c: Case, name: str) -> float:
    """The tolerance of tensor ``name`` of case ``c``: :data:`TOL` of its dtype, except a
    transformers loss, which is never finer than :data:`LOSS_TOL`."""
    if c.method == "transformers" and name == "loss":
        return max(TOL[c.dtype], LOSS_TOL)
    return TOL[c.dtype]


def make_row(c: Case, res, seconds=0.0) -> dict:
    row = {"method": c.method, "variant": c.variant, "world": c.world, "dtype": c.dtype,
           "backend": c.backend, "tol": TOL[c.dtype], "errors": {}, "seconds": round(seconds, 2)}
    if isinstance(res, str):
        return {**row, "status": "FAIL", "why": res.strip().splitlines()[-1][:300]}
    bad = [r for r in res if r["status"] == "error"]
    if bad:
        return {**row, "status": "FAIL", "why": bad[0]["why"][:300]}
    if any(r["status"] == "unavailable" for r in res):
        return {**row, "status": "unavailable", "why": res[0]["why"][:300]}
    errs = combine(res)
    ok = bool(errs) and all(e <= tensor_tol(c, name) for name, e in errs.items())
    return {**row, "errors": errs, "status": "pass" if ok else "FAIL",
            "why": "" if ok else "over tolerance"}


def scaling_rows(rows, dtype="bfloat16") -> list:
    """Per hamilton (variant, backend) with bf16 rows at 2 ranks and at a larger world: the
    error at the largest world must be at most :data:`SCALING` times the error at 2."""
    by_key = {}
    for r in rows:
        if r["method"] == "hamilton" and r["dtype"] == dtype and r["status"] == "pass":
            by_key.setdefault((r["variant"], r["backend"]), {})[r["world"]] = r
    out = []
    for (variant, backend), worlds in sorted(by_key.items()):
        top = max(worlds)
        if 2 not in worlds or top == 2:
            continue
        e2 = max(worlds[2]["errors"].values())
        et = max(worlds[top]["errors"].values())
        ok = et <= SCALING * e2
        out.append({"method": "hamilton/scaling", "variant": variant, "world": top,
                    "dtype": dtype, "backend": backend, "tol": SCALING,
                    "errors": {"max@2": e2, f"max@{top}": et,
                               "ratio": et / e2 if e2 > 0 else math.inf},
                    "status": "pass" if ok else "FAIL",
                    "why": "" if ok else f"error grows over {SCALING}x from 2 to {top} ranks",
                    "seconds": 0.0})
    return out


SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def format_rows(rows) -> str:
    """The table: one row per case, the relative error of every tensor it compares in one
    cell (``out=1.3e-15 lse=8.6e-17 ...``), wrapped to at most 100 columns."""
    from longattn.common.bench import format_table

    cols = ["method", "variant", "world", "dtype", "backend", "rel. errors",
            "status", "why"]
    flat = []
    for r in rows:
        f = {k: r[k] for k in ("method", "variant", "world", "backend", "status")}
        f["dtype"] = SHORT.get(r["dtype"], r["dtype"])
        f["why"] = r["why"][:70]
        if r["method"].endswith("/scaling"):
            errs = "{:.2e} -> {:.2e}".format(*list(r["errors"].values())[:2])
        else:
            errs = " ".join(f"{n}={e:.1e}" for n, e in r["errors"].items())
        f["rel. errors"] = errs
        flat.append(f)
    cols = [c for c in cols if c != "why" or any(f["why"] for f in flat)]
    return format_table(flat, cols, width=100)


# ---------------------------------------------------------------------------------------------
# command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``--gpu-world`` (shared by ``longattn check`` and the bench script)."""
    p.add_argument("--gpu-world", type=_worlds, metavar="N[,N...]",
                   help="run every distributed method on worlds of N ranks on one device "
                        "(e.g. 2,4,8) against one process")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="with --gpu-world: cuda (every spawned rank on cuda:0; under torchrun "
                        "with nccl cuda:LOCAL_RANK) or cpu (gloo, small shapes, fp32/fp64)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--dtypes", nargs="+", choices=list(TOL), default=None,
                   help="default bfloat16 float32 (cuda), float32 float64 (cpu)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="hamilton's local kernels (default: auto cudnn band aten torch on cuda, "
                        "auto torch on cpu)")
    p.add_argument("--tree-backends", nargs="+", default=None,
                   help="tree's local kernels (default: torch triton_decode on cuda, torch on cpu)")
    for name in ("seqlen", "batch", "heads_q", "heads_kv", "head_dim"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {getattr(GPU_SIZES, name)} (cuda), "
                            f"{getattr(CPU_SIZES, name)} (cpu)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per case (spawned)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--inject", default=None, help=argparse.SUPPRESS)  # test hook


def _worlds(text: str):
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--gpu-world must be N or N,N,..., got {text!r}") from None
    if not ns or any(n < 2 for n in ns):
        raise argparse.ArgumentTypeError(f"--gpu-world needs worlds of >= 2 ranks, got {text!r}")
    return sorted(set(ns))


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def plan(args):
    """(worlds, cases, sizes) from the options."""
    cpu = args.device == "cpu"
    base = CPU_SIZES if cpu else GPU_SIZES
    sizes = replace(base, **{k: getattr(args, k) for k in
                             ("seqlen", "batch", "heads_q", "heads_kv", "head_dim")
                             if getattr(args, k, None) is not None})
    worlds = args.gpu_world
    if _under_torchrun():
        worlds = [int(os.environ["WORLD_SIZE"])]
    m = seq_multiple(worlds)
    sizes = replace(sizes, seqlen=-(-sizes.seqlen // m) * m,
                    model_seq=-(-sizes.model_seq // (2 * math.lcm(*worlds)))
                    * 2 * math.lcm(*worlds))
    dtypes = args.dtypes or (["float32", "float64"] if cpu else ["bfloat16", "float32"])
    if cpu and set(dtypes) & {"bfloat16", "float16"}:
        raise SystemExit("longattn check: --device cpu takes --dtypes float32 / float64")
    hb = args.backends or (["auto", "torch"] if cpu else list(HAMILTON_BACKENDS))
    tb = args.tree_backends or (["torch"] if cpu else list(TREE_BACKENDS))
    cases = make_cases(worlds, dtypes, args.methods, hamilton_backends=hb, tree_backends=tb)
    return worlds, cases, sizes


def run(args, out=None) -> int:
    """``longattn check --gpu-world ...``: prints the table (to ``out``, default stdout);
    returns 1 if any row fails."""
    out = sys.stdout if out is None else out
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("longattn check --gpu-world: no CUDA device here (use --device cpu)")
    worlds, cases, sizes = plan(args)
    backend = os.environ.get("LONGATTN_DIST_BACKEND", "gloo")
    if not _under_torchrun() and backend != "gloo":
        raise SystemExit(f"longattn check --gpu-world: LONGATTN_DIST_BACKEND={backend} needs "
                         "torchrun (one GPU per rank); spawned worlds on one device use gloo")
    t0 = time.perf_counter()
    rank = 0
    if _under_torchrun():
        results, rank = run_torchrun(cases, args.device, sizes, args.inject)
    else:
        backend = "gloo"
        results = run_spawned(cases, args.device, sizes, args.inject, args.timeout)
    if rank != 0:
        return 0
    rows = [make_row(c, res, s) for c, res, s in results]
    rows += scaling_rows(rows)
    failed = [r for r in rows if r["status"] == "FAIL"]
    print(format_rows(rows), file=out)
    unavailable = sum(r["status"] == "unavailable" for r in rows)
    print(f"\n{len(rows)} rows: {len(rows) - len(failed) - unavailable} pass, {len(failed)} "
          f"FAIL, {unavailable} unavailable; worlds {worlds}, {backend}, {args.device}, "
          f"{time.perf_counter() - t0:.0f} s", file=out)
    if args.json:
        meta = {"worlds": worlds, "backend": backend, "device": args.device,
                "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "sizes": asdict(sizes), "torch": torch.__version__,
                "seconds": round(time.perf_counter() - t0, 1), "tolerances": TOL,
                "scaling": SCALING, "packed_hamilton": _packed_supported()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
    return 1 if failed else 0
