"""The strategy model: predicted step time of every way ``hamilton_attn`` can run a call, and the
choice of ``schedule="auto"`` when a hardware target is given (``HamiltonConfig.target``).

Strategies: ``ring`` (zigzag ring when causal), ``tasp``, ``two_level`` (targets of several
nodes), ``allgather`` and ``ulysses``; for ``usp_attn`` the step-loop schedules over the sequence
group, with the Ulysses all-to-alls over the head group added to each.

Per rank, ``n`` ranks, ``L = S / n`` local tokens, element size ``e`` (``dtype_bytes``):

* **communication**: the messages of each exchange (the byte formulas of hamilton/README.md,
  "All-gather, Ulysses and USP", and the schedule tables for the step loop), each exchange timed
  by :func:`longattn.common.topology.step_time` (alpha plus the slowest GPU's egress / ingress
  over fabric, single-peer and NIC bandwidths) on the target cut to ``n`` GPUs;
* **compute**: each local kernel call's FLOPs (``4 H D`` per visible (query, key) pair, the
  causal mask bottom-right aligned; x3.5 with the backward) over the target's attention
  FLOP/s times an efficiency that depends on the call's size: the single-GPU block times
  measured on an H200 (:data:`H200_BLOCK_MS`) relative to their largest block. Small calls run
  below the peak rate, which is what makes one big call (``allgather``, ``ulysses``) differ
  from ``n`` small ones (the step loop) beyond FLOPs;
* **overlap**: the step loop overlaps step ``s``'s compute with transition ``s``
  (:func:`longattn.common.topology.overlapped_time`); ``allgather`` and ``ulysses`` do not
  overlap (their exchanges are blocking), so their time is compute plus communication;
* **memory**: the extra bytes per rank the strategy holds for its exchanges (buffers, gathered
  K/V, head-sharded tensors), forward, and the larger of forward and backward with
  ``backward=True``; q, k, v, out themselves are not counted.

Everything is a pure function of agreed values (shapes, world size, ``causal``, whether a
backward runs, the dtype's size and the target), so every rank makes the same choice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from longattn.common import topology
from longattn.hamilton.schedules import multi_ring_schedule, ring_schedule, two_level_schedule

# Single-GPU forward time (ms) of one L x L block, B = 1, H = 20, D = 64, bf16, cuDNN, on an NVIDIA
# H200: (L, ms) from hamilton/bench/results/h200/step_times.json (bench_hamilton.py
# --step-sweep); a test checks these against the file.
H200_BLOCK_MS = (
    (420, 0.04633599892258644), (840, 0.08936000242829323), (1680, 0.06351999938488007),
    (2520, 0.11185600236058235), (3360, 0.1799200028181076), (5040, 0.3617599904537201),
    (6720, 0.6061600148677826), (10080, 1.2338240146636963), (13440, 1.8889280557632446),
    (20160, 5.0264317989349365), (26880, 8.017375946044922), (40320, 18.003263473510742),
    (53760, 31.919328689575195),
)
_REF_BH, _REF_D = 20, 64
_LAUNCH_MS = min(ms for _, ms in H200_BLOCK_MS)  # no call is modelled faster than this

STRATEGIES = ("tasp", "ring", "two_level", "allgather", "ulysses")
"""Every strategy, in the order ties are broken (the step loop first: it holds the least)."""


@dataclass(frozen=True)
class Prediction:
    """One strategy's predicted call on a target (times in ms, memory in bytes per rank).

    ``name``: ``"ring"`` / ``"zigzag_ring"`` (causal) / ``"tasp"`` / ``"two_level"`` /
    ``"allgather"`` / ``"ulysses"`` (``usp_attn``: ``"usp:<schedule>"``); ``schedule``: the
    value of ``schedule=`` that runs it; ``feasible``: whether it can serve the call (``reason``
    says why not; its times are then ``inf``). ``comm_ms`` is the sum of the exchanges' times;
    ``total_ms`` the modelled call, overlap included."""

    name: str
    schedule: str
    feasible: bool
    compute_ms: float
    comm_ms: float
    total_ms: float
    memory_bytes: int
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# compute


def _efficiency(x: float) -> float:
    """Measured rate of an ``x x x`` block (B*H = 20, D = 64) over the rate of the largest
    measured block: log-log interpolation, flat outside the measured range."""
    pts = [(math.log(t), math.log(4.0 * t * t * _REF_BH * _REF_D / ms)) for t, ms in H200_BLOCK_MS]
    top = pts[-1][1]
    if x <= H200_BLOCK_MS[0][0]:
        return math.exp(pts[0][1] - top)
    lx = math.log(x)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if lx <= x1:
            return math.exp(y0 + (y1 - y0) * (lx - x0) / (x1 - x0) - top)
    return 1.0


def call_ms(target, b, h, sq, sk, d, *, causal=False, backward=False) -> float:
    """Modelled time of one local attention call (ms) on ``target``: FLOPs over the target's
    attention FLOP/s times the measured efficiency of a call of this size."""
    if sq == 0 or sk == 0 or h == 0:
        return 0.0
    pairs = sq * sk - (min(sq, sk) ** 2 / 2 if causal else 0)  # bottom-right aligned mask
    flops = 4.0 * b * pairs * h * d * (3.5 if backward else 1.0)
    rate = target.attn_flops_fwd_bwd if backward else target.attn_flops_fwd
    x = math.sqrt(b * h * sq * sk / _REF_BH)
    return max(flops / (rate * _efficiency(x)) * 1e3, _LAUNCH_MS)


# ---------------------------------------------------------------------------------------------
# targets cut to n ranks


def target_for(target, n: int):
    """``target`` (a :class:`topology.Target` or a name in ``topology.ALL_TARGETS``) shaped for
    a group of ``n`` ranks: one node of ``n`` GPUs when ``n`` fits in a node, ``n / gpus_per_node``
    nodes when it divides, else one node of ``n`` GPUs (the node's fabric for every pair)."""
    t = topology.get_target(target) if isinstance(target, str) else target
    if n == t.world_size:
        return t
    if n <= t.gpus_per_node or n % t.gpus_per_node:
        return dataclasses.replace(t, nodes=1, gpus_per_node=n)
    return dataclasses.replace(t, nodes=n // t.gpus_per_node)


def _schedule(name, t):
    n = t.world_size
    if name == "ring":
        return ring_schedule(n)
    if name == "tasp":
        return multi_ring_schedule(n)
    return two_level_schedule(t.nodes, t.gpus_per_node)


def _units(sched, causal):
    return 2 * sched.num_slots if causal else sched.num_slots


# ---------------------------------------------------------------------------------------------
# the strategies


@dataclass(frozen=True)
class Shape:
    """The agreed shape of a call: per-rank lengths, heads, head dims, batch."""

    b: int
    lq: int
    lk: int
    hq: int
    hkv: int
    d: int
    dv: int
    e: int  # bytes per element of q / k / v
    causal: bool
    backward: bool


def _step_loop(name, t, s: Shape):
    n = t.world_size
    sched = _schedule(name, t)
    if n > 1 and s.lk % _units(sched, s.causal):
        u = _units(sched, s.causal)
        return None, f"the local KV length {s.lk} is not divisible by {u}"
    kv = s.b * s.lk * s.hkv * (s.d + s.dv)
    if s.causal:  # zigzag: every step after the diagonal is half a block
        diag = call_ms(t, s.b, s.hq, s.lq, s.lk, s.d, causal=True, backward=s.backward)
        step = call_ms(t, s.b, s.hq, s.lq, s.lk // 2, s.d, backward=s.backward)
    else:
        diag = step = call_ms(t, s.b, s.hq, s.lq, s.lk, s.d, backward=s.backward)
    comp = [diag] + [step] * (n - 1)
    fwd = [_transition(t, sched, st, kv * s.e) for st in range(n - 1)]
    if not s.backward:
        comm = fwd
        mem = 2 * kv * s.e if n > 1 else 0
    else:  # KV (n - 2 times) and the float32 dK/dV accumulators (n - 1 times) travel back
        comm = [_transition(t, sched, st, kv * 4 + (kv * s.e if st else 0))
                for st in range(n - 1)]
        mem = (3 * kv * s.e + 2 * kv * 4) if n > 1 else 0
    return (sum(comp), sum(comm), topology.overlapped_time(comp, comm), mem), ""


def _transition(t, sched, step, block_bytes):
    k = sched.num_slots
    msgs = [(r, int(sched.dst[step][c][r]), block_bytes / k)
            for r in range(sched.n) for c in range(k)]
    return topology.step_time(t, msgs) * 1e3


def _pairs(t, size):
    """One exchange in which rank r sends ``size(r, p)`` bytes to every peer p (ms)."""
    n = t.world_size
    return topology.step_time(t, [(r, p, size(r, p)) for r in range(n) for p in range(n)
                                  if r != p]) * 1e3


def _allgather(t, s: Shape):
    n = t.world_size
    if s.causal and n > 1 and (s.lq != s.lk or s.lk % 2):
        return None, "causal needs the same even local length for q and k/v"
    kv = s.b * s.lk * s.hkv * (s.d + s.dv) * s.e
    comm = _pairs(t, lambda r, p: kv) if n > 1 else 0.0
    if s.causal and n > 1:  # rank 0's two calls (every rank does the same FLOPs)
        h = s.lq // 2
        comp = (call_ms(t, s.b, s.hq, h, h, s.d, causal=True, backward=s.backward)
                + call_ms(t, s.b, s.hq, h, (2 * n) * h, s.d, causal=True, backward=s.backward))
    else:
        comp = call_ms(t, s.b, s.hq, s.lq, n * s.lk, s.d, causal=s.causal, backward=s.backward)
    mem = 2 * n * kv if n > 1 else 0
    if s.backward:
        comm *= 2  # the reduce-scatter of dK/dV: the same messages
    return (comp, comm, comp + comm, mem), ""


def _ulysses_sizes(s: Shape, n):
    """Bytes rank r sends peer p in the two forward exchanges (q + k + v; out)."""
    from longattn.hamilton.ulysses import head_ranges

    _, kvr = head_ranges(s.hq, s.hkv, n)
    per = s.hq // n

    def first(r, p):
        a, b = kvr[p]
        return s.b * s.lq * per * s.d * s.e + s.b * s.lk * (b - a) * (s.d + s.dv) * s.e

    def second(r, p):
        return s.b * s.lq * per * s.dv * s.e

    return first, second


def _ulysses(t, s: Shape, attend=None):
    """Ulysses over ``t``'s ranks; ``attend(s_heads) -> (compute, comm, total, memory)`` is the
    part between the all-to-alls (None: local attention over the whole sequence)."""
    n = t.world_size
    if s.hq % n:
        return None, f"{s.hq} query heads are not divisible by {n} ranks"
    if attend is None and s.causal and n > 1 and (s.lq != s.lk or s.lk % 2):
        return None, "causal needs the same even local length for q and k/v"
    first, second = _ulysses_sizes(s, n)
    comm = (_pairs(t, first) + _pairs(t, second)) if n > 1 else 0.0
    if s.backward:
        comm *= 2  # dout (the out sizes), then dq / dk / dv (the q / k / v sizes)
    from longattn.hamilton.ulysses import head_ranges

    _, kvr = head_ranges(s.hq, s.hkv, n)
    m = max(b - a for a, b in kvr)
    inner = dataclasses.replace(s, lq=n * s.lq, lk=n * s.lk, hq=s.hq // n, hkv=m)
    if attend is None:
        comp = call_ms(t, inner.b, inner.hq, inner.lq, inner.lk, s.d, causal=s.causal,
                       backward=s.backward)
        inner_comm, inner_total, inner_mem = 0.0, comp, 0
    else:
        value, reason = attend(inner)
        if value is None:
            return None, reason
        comp, inner_comm, inner_total, inner_mem = value
    own = (s.b * n * s.lq * (s.hq // n) * (s.d + s.dv)
           + s.b * n * s.lk * m * (s.d + s.dv)) * s.e if n > 1 else 0
    return (comp, comm + inner_comm, comm + inner_total, own + inner_mem), ""


def _shape(seqlen, heads, kv_heads, head_dim, head_dim_v, batch, world, causal, backward,
           dtype_bytes, seqlen_k):
    sk = seqlen if seqlen_k is None else seqlen_k
    for name, x in (("seqlen", seqlen), ("seqlen_k", sk), ("world", world)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    if seqlen % world or sk % world:
        raise ValueError(f"seqlen ({seqlen}) and seqlen_k ({sk}) must be divisible by world "
                         f"({world})")
    hkv = heads if kv_heads is None else kv_heads
    if hkv < 1 or heads % hkv:
        raise ValueError(f"kv_heads must divide heads ({heads}), got {kv_heads!r}")
    return Shape(batch, seqlen // world, sk // world, heads, hkv, head_dim,
                 head_dim if head_dim_v is None else head_dim_v, dtype_bytes, bool(causal),
                 bool(backward))


def _record(name, schedule, res):
    value, reason = res
    if value is None:
        inf = math.inf
        return Prediction(name, schedule, False, inf, inf, inf, 0, reason)
    comp, comm, total, mem = value
    return Prediction(name, schedule, True, comp, comm, total, int(mem))


def predict(target, s: Shape, n: int, *, head_group: int = 1) -> tuple:
    """Every strategy's :class:`Prediction` for a call of shape ``s`` on ``n`` ranks; with
    ``head_group = h > 1`` the ``usp_attn`` step-loop schedules over ``n / h`` ranks."""
    if head_group > 1:
        return _predict_usp(target, s, n, head_group)
    t = target_for(target, n)
    out = []
    for name in STRATEGIES:
        if name == "two_level" and t.nodes == 1:
            continue
        label = "zigzag_ring" if name == "ring" and s.causal else name
        if name in ("ring", "tasp", "two_level"):
            if name == "two_level" and t.gpus_per_node % 2:
                res = (None, "two_level needs an even number of GPUs per node")
            elif name != "ring" and s.causal and s.lq != s.lk and n > 1:
                res = (None, "causal needs the same local length for q and k/v")
            else:
                res = _step_loop(name, t, s)
        elif name == "allgather":
            res = _allgather(t, s)
        else:
            res = _ulysses(t, s)
        out.append(_record(label, name, res))
    return tuple(out)


def _predict_usp(target, s: Shape, n, h):
    if n % h:
        raise ValueError(f"head_group ({h}) must divide world ({n})")
    heads_t = target_for(target, h)
    seq_t = target_for(target, n // h)
    out = []
    for name in STRATEGIES[:3]:
        if name == "two_level" and seq_t.nodes == 1:
            continue
        res = _ulysses(heads_t, s, lambda inner, name=name: _step_loop(name, seq_t, inner))
        out.append(_record(f"usp:{name}", name, res))
    return tuple(out)


def choose(predictions) -> Prediction:
    """The fastest feasible prediction; ties go to the earlier strategy of :data:`STRATEGIES`."""
    ok = [p for p in predictions if p.feasible]
    if not ok:
        raise ValueError("no strategy can serve this call: "
                         + "; ".join(f"{p.name}: {p.reason}" for p in predictions))
    return min(ok, key=lambda p: (p.total_ms, STRATEGIES.index(p.schedule)))


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` returns: ``predictions`` (one :class:`Prediction` per strategy,
    infeasible ones with their reason), ``best`` (the one ``schedule="auto"`` picks with this
    target), ``target`` (its name) and the call's ``shape`` (per-rank :class:`Shape`).
    ``str()`` gives a text table."""

    predictions: tuple
    best: Prediction
    target: str
    shape: Shape

    def __str__(self):
        return (f"{self.target}: best {self.best.name} (schedule={self.best.schedule!r})\n"
                + format_predictions(self.predictions))


def explain(*, seqlen, heads, kv_heads=None, head_dim=128, world=8, target="H200-1", batch=1,
            causal=True, backward=False, dtype_bytes=2, head_dim_v=None, seqlen_k=None,
            head_group=1) -> Explanation:
    """Predicted time of every strategy for one attention call, and which one is fastest.

    ``seqlen`` (and ``seqlen_k``, default ``seqlen``): the GLOBAL lengths, divided over
    ``world`` ranks; ``heads`` / ``kv_heads`` (default ``heads``) / ``head_dim`` /
    ``head_dim_v``: as in q, k, v; ``dtype_bytes``: 2 for fp16 / bf16, 4 for float32;
    ``backward``: forward + backward instead of the forward; ``target``: a name in
    ``longattn.common.topology.ALL_TARGETS`` or a ``Target``, cut to ``world`` ranks;
    ``head_group``: ``usp_attn``'s head-group size (> 1: the step-loop schedules over
    ``world / head_group`` ranks, each with the Ulysses exchanges over the head group).
    """
    s = _shape(seqlen, heads, kv_heads, head_dim, head_dim_v, batch, world, causal, backward,
               dtype_bytes, seqlen_k)
    preds = predict(target, s, world, head_group=head_group)
    name = target if isinstance(target, str) else target.name
    return Explanation(preds, choose(preds), name, s)


def format_predictions(predictions) -> str:
    """A small text table of predictions (ms and MiB)."""
    lines = [f"{'strategy':14s} {'compute ms':>11s} {'comm ms':>9s} {'total ms':>9s} "
             f"{'memory MiB':>10s}"]
    for p in predictions:
        if p.feasible:
            lines.append(f"{p.name:14s} {p.compute_ms:11.3f} {p.comm_ms:9.3f} {p.total_ms:9.3f} "
                         f"{p.memory_bytes / 2**20:10.1f}")
        else:
            lines.append(f"{p.name:14s} {'-':>11s} {'-':>9s} {'-':>9s} {'-':>10s}  ({p.reason})")
    return "\n".join(lines)


def auto_schedule(target, s: Shape, n: int, *, head_group: int = 1, usp: bool = False):
    """What ``schedule="auto"`` runs with a ``target``: ``"tasp"``, ``"ring"``, ``"allgather"``,
    ``"ulysses"`` or a two-level :class:`~longattn.hamilton.schedules.Schedule` (the target's
    nodes). ``usp``: the seq group's step-loop schedule of ``usp_attn`` (also with a head group
    of one rank, where ``"allgather"`` / ``"ulysses"`` are not ``usp_attn`` schedules). Falls
    back to ``"ring"`` when the model finds nothing feasible (the call's own checks then say
    why)."""
    preds = (_predict_usp(target, s, n, head_group) if usp
             else predict(target, s, n, head_group=head_group))
    if not any(p.feasible for p in preds):
        return "ring"
    best = choose(preds).schedule
    if best == "two_level":
        return _schedule("two_level", target_for(target, n // head_group))
    return best


def call_shape(q, k, v, causal, grad) -> Shape:
    """The :class:`Shape` of a call on this rank's q, k, v (``[B, L, H, D]``)."""
    b, lq, hq, d = q.shape
    return Shape(b, lq, k.shape[1], hq, k.shape[2], d, v.shape[3], q.element_size(),
                 bool(causal), bool(grad))
