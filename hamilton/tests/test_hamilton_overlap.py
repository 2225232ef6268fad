"""HamiltonConfig.overlap_merges, defer_dq and defer_merge against the default path and the
float64 oracle, on gloo worlds of 2 to 5 ranks (causal and full, GQA 4:1 and Hq == Hkv with
Dv != D, ring and TASP), forward and backward with gradients through out and lse; the exact
one-pass tails of the backward against their slow twins.

overlap_merges runs the same operations in the same order (on the CPU the side stream is none:
the work runs inline), so its results are bitwise the default's; defer_dq sums dq in another
order, and defer_merge merges the forward's partials once in another order, so they are
compared within 1e-12 relative in float64. The step loops also run with a side
stream that runs *late* (:class:`LateSide`: its work runs only when the loop must wait for it,
a join or a message sent from it): a loop that read an accumulator before joining the side
stream would return other values.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as tdist
from test_hamilton_attn import SHAPES, _global_err, _sched_arg, local_results, make_case, sq_errors

from longattn.common.dist import resolve_group
from longattn.common.testing import run_world
from longattn.hamilton import HamiltonConfig, shard
from longattn.hamilton.args import check_call
from longattn.hamilton.attn import (
    SideStream,
    _backward,
    _forward,
    _token_index,
    add_buffer_grads,
    add_kv_grads,
    finish_kv_grads,
    finish_q_grads,
    init_kv_grads,
)
from longattn.hamilton.plan import make_plan, new_buffer
from longattn.hamilton.schedules import multi_ring_schedule, ring_schedule

CONFIGS = {"default": HamiltonConfig(), "overlap": HamiltonConfig(overlap_merges=True),
           "defer": HamiltonConfig(defer_dq=True),
           "overlap+defer": HamiltonConfig(overlap_merges=True, defer_dq=True),
           "defer_merge": HamiltonConfig(defer_merge=True),
           "all": HamiltonConfig(overlap_merges=True, defer_dq=True, defer_merge=True)}
KEYS = ("out", "lse", "dq", "dk", "dv")


class LateSide(SideStream):
    """A side stream that runs as late as it may: queued work runs only when the current
    stream waits for it (``join``) or a message is posted from it (NCCL waits for it)."""

    def __init__(self):
        self.stream = None
        self.queue = []
        self.deferred = 0  # how many pieces of work ran later than queued

    def run(self, fn, keep=()):
        self.queue.append(fn)

    def post(self, post):
        self.join()
        return post(stream=None)

    def join(self):
        self.deferred += len(self.queue)
        while self.queue:
            self.queue.pop(0)()


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same_bits(a, b):
    return all(torch.equal(_bits(a[key]), _bits(b[key])) for key in KEYS)


def _sq_diff(a, b):
    """(squared difference, squared norm of b) per tensor."""
    return {key: (float((a[key] - b[key]).pow(2).sum()), float(b[key].pow(2).sum()))
            for key in KEYS}


def _late_loop(case, sched, config):
    """The step loops themselves (``_forward`` / ``_backward``, as ``hamilton_attn`` calls
    them) with :class:`LateSide` side streams; returns this rank's results and how many
    pieces of work the side streams ran late."""
    q, k, v, dout, dlse = case["inputs"]
    causal, dtype = case["causal"], case["dtype"]
    world = tdist.group.WORLD

    def loc(x, dim=1):
        return shard(x, group=world, causal=causal, dim=dim).to(dtype)

    ql, kl, vl = (loc(t).requires_grad_() for t in (q, k, v))
    g = resolve_group(world)
    scale, sch, kernels, cfg = check_call(ql, kl, vl, group=g, causal=causal,
                                          softmax_scale=case["scale"],
                                          schedule=_sched_arg(sched), return_lse=True,
                                          backend="auto", config=config)
    plan = make_plan(sch, g.rank, causal)
    fwd, bwd = LateSide(), LateSide()
    with torch.no_grad():
        ql, kl, vl = (t.detach() for t in (ql, kl, vl))
        out, lse, kv_last = _forward(ql, kl, vl, plan, g.pg, scale, kernels, cfg, side=fwd)
        dq, dk, dv = _backward(loc(dout), loc(dlse, 2), ql, kl, vl, out, lse, kv_last, plan,
                               g.pg, scale, kernels, cfg, side=bwd)
    got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    return got, fwd.deferred + bwd.deferred


def _rank(rank, n, cases):
    rows = []
    for case, sched in cases:
        res = {name: local_results(case, sched, cfg) for name, cfg in CONFIGS.items()}
        ref = res["default"][1]
        got = {name: r[0] for name, r in res.items()}
        late = {name: _late_loop(case, sched, CONFIGS[name]) for name in ("overlap",
                                                                          "overlap+defer")}
        rows.append({
            "oracle": {name: sq_errors(g, ref) for name, g in got.items()},
            "overlap bitwise": _same_bits(got["overlap"], got["default"]),
            "overlap+defer bitwise defer": _same_bits(got["overlap+defer"], got["defer"]),
            "defer diff": _sq_diff(got["defer"], got["default"]),
            "defer_merge diff": _sq_diff(got["defer_merge"], got["default"]),
            "all diff": _sq_diff(got["all"], got["default"]),
            "late bitwise": (_same_bits(late["overlap"][0], got["default"])
                             and _same_bits(late["overlap+defer"][0], got["defer"])),
            "late deferred": min(late["overlap"][1], late["overlap+defer"][1]),
        })
    return rows


def _cases(n):
    cases = []
    for (causal, sched), (si, shape) in itertools.product(
            itertools.product((False, True), ("ring", "tasp")), enumerate(SHAPES)):
        units = (2 if causal else 1) * (n - 1 if sched == "tasp" else 1)
        per = n * units * (2 if causal else 1)
        lq, lk = (1, 1) if causal else (2 - si, 1 + si)  # full attention: also Sq != Sk
        cases.append((make_case(300 + 10 * n + len(cases), shape, causal, torch.float64,
                                per * lq, per * lk, None if si == 0 else 0.3), sched))
    return cases


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_options_match_the_default_and_the_oracle(n):
    cases = _cases(n)
    per_rank = run_world(n, _rank, cases, timeout=300)
    for i, (case, sched) in enumerate(cases):
        rows = [pr[i] for pr in per_rank]
        what = (n, sched, case["causal"], tuple(case["inputs"][0].shape))
        for name in CONFIGS:
            err = _global_err([r["oracle"][name] for r in rows])
            assert max(err.values()) <= 1e-10, (what, name, err)
        assert all(r["overlap bitwise"] for r in rows), what
        assert all(r["overlap+defer bitwise defer"] for r in rows), what
        for key in ("defer diff", "defer_merge diff", "all diff"):
            diff = _global_err([r[key] for r in rows])
            assert max(diff.values()) <= 1e-12, (what, key, diff)
        assert all(r["late bitwise"] for r in rows), what
        assert all(r["late deferred"] > 0 for r in rows), what  # the late side ran late


# ---------------------------------------------------------------------------------------------
# the backward's one-pass tails and first-step dK/dV write against their slow twins


def _plans():
    for n, causal, sched in itertools.product((2, 3, 5), (False, True), ("ring", "tasp")):
        s = ring_schedule(n) if sched == "ring" else multi_ring_schedule(n)
        for r in range(n):
            yield make_plan(s, r, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float64])
def test_finish_grads_bitwise_the_slow_twins(dtype):
    """finish_kv_grads == dk0.to(acc) + add_buffer_grads + .to(dtype), finish_q_grads ==
    (dq += dq0).to(dtype), bit for bit (exact zeros of both signs included)."""
    g = torch.Generator().manual_seed(5)
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    for plan in _plans():
        b, hkv, d, dv, h = 2, 2, 4, 3, 2
        lk = plan.units * h
        dk0 = torch.randn(b, lk, hkv, d, generator=g).to(dtype)
        dv0 = torch.randn(b, lk, hkv, dv, generator=g).to(dtype)
        dk0[0, 0] = 0.0
        dv0[0, 0] = -0.0
        acc = new_buffer(lk, b, hkv, d, dv, acc_t, "cpu").normal_(generator=g)
        acc[0] = -0.0
        slow_k, slow_v = dk0.to(acc_t).clone(), dv0.to(acc_t).clone()
        add_buffer_grads(slow_k, slow_v, acc, _token_index(plan, lk, "cpu"), hkv=hkv, d=d)
        fk, fv = finish_kv_grads(dk0, dv0, acc, plan.own_units, hkv=hkv, d=d,
                                 dtypes=(dtype, dtype))
        assert fk.dtype == fv.dtype == dtype
        assert torch.equal(_bits(fk), _bits(slow_k.to(dtype)))
        assert torch.equal(_bits(fv), _bits(slow_v.to(dtype)))
    dq = torch.randn(2, 6, 4, 5, generator=g, dtype=acc_t)
    dq0 = torch.randn(2, 6, 4, 5, generator=g).to(dtype)
    dq[0, 0], dq0[0, 0] = 0.0, -0.0
    slow = (dq.clone() + dq0).to(dtype)
    assert torch.equal(_bits(finish_q_grads(dq.clone(), dq0, dtype)), _bits(slow))


def test_init_kv_grads_is_zero_then_add():
    """The first backward step writes every row of the dK/dV buffer: the same values as
    zeroing it and adding (copies into the calls' units, zeros elsewhere)."""
    g = torch.Generator().manual_seed(6)
    for plan in _plans():
        b, hkv, d, dv, h = 1, 2, 3, 2, 2
        lk = plan.units * h
        for calls in plan.calls[1:]:
            grads = [(c, torch.randn(b, (c.stop - c.start) * h, hkv, d, generator=g),
                      torch.randn(b, (c.stop - c.start) * h, hkv, dv, generator=g))
                     for c in calls]
            slow = new_buffer(lk, b, hkv, d, dv, torch.float32, "cpu").zero_()
            add_kv_grads(slow, grads, h)
            fast = new_buffer(lk, b, hkv, d, dv, torch.float32, "cpu").fill_(float("nan"))
            init_kv_grads(fast, grads, h)
            assert torch.equal(fast, slow)


def test_side_stream_without_cuda_runs_inline():
    side = SideStream("cpu", enabled=True)
    assert side.stream is None
    seen = []
    side.run(lambda: seen.append(1))
    assert seen == [1]
    assert side.post(lambda stream: stream) is None
    side.join()


@pytest.mark.parametrize("name", ["overlap_merges", "defer_dq", "defer_merge"])
def test_config_options_are_bools(name):
    assert getattr(HamiltonConfig(), name) is False
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        HamiltonConfig(**{name: 1})
