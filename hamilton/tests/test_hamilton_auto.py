"""``schedule="auto"`` with a hardware target (``HamiltonConfig(target=...)``): on the 8-rank
CPU world the call runs exactly the strategy ``longattn.hamilton.explain`` predicts fastest
(the same messages and bit-identical results as naming that schedule), within 1e-10 of the
float64 oracle; ``usp_attn`` likewise for its seq-group schedule, with GQA 8:1, KV heads
fewer than the head group, and a 2-D DeviceMesh as ``head_group`` (a wrongly shaped mesh raises
on every rank).

The world is the 8-rank world of test_hamilton_dense.py (its groups and helpers are reused).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_hamilton_dense import _attn, _calls, _oracle, _per_case, _problem

from longattn.common.comm import counting
from longattn.common.testing import run_world
from longattn.hamilton import HamiltonConfig, explain, usp_attn

WORLD = 8
TARGET = "H200-1"
CONFIG = HamiltonConfig(target=TARGET)


def _expect(case):
    q, k, v = case["inputs"][:3]
    b, sq, hq, d = q.shape
    n = case["n"] if case["kind"] == "attn" else math.prod(case["grid"])
    e = explain(seqlen=sq, seqlen_k=k.shape[1], heads=hq, kv_heads=k.shape[2], head_dim=d,
                head_dim_v=v.shape[3], world=n, batch=b, causal=case["causal"], backward=True,
                dtype_bytes=8, target=TARGET,
                head_group=case["grid"][0] if case["kind"] == "usp" else 1)
    return e.best.schedule


def _cases():
    # (n, causal, hq, hkv, local lq, local lk): shapes on which the model's choice differs
    attn = [(8, True, 8, 2, 4, 4), (8, False, 12, 4, 2, 3), (4, True, 8, 1, 6, 6),
            (3, False, 6, 2, 4, 4), (8, True, 12, 4, 4, 4), (5, True, 10, 5, 2, 2)]
    cases = []
    for n, causal, hq, hkv, lq, lk in attn:
        inputs = _problem(len(cases), 1, n * lq, n * lk, hq, hkv, 4, 3)
        cases.append({"kind": "attn", "n": n, "causal": causal, "inputs": inputs})
    # usp grids (h, s): GQA 8:1, KV heads fewer than the head group, lengths TASP can and
    # cannot take
    for (h, s), causal, hq, hkv, lq in [((2, 3), True, 8, 1, 2), ((2, 3), True, 16, 2, 1),
                                        ((4, 2), False, 8, 1, 1), ((2, 2), True, 16, 2, 2)]:
        inputs = _problem(len(cases), 1, h * s * lq, h * s * lq, hq, hkv, 4, 4)
        cases.append({"kind": "usp", "grid": (h, s), "causal": causal, "inputs": inputs})
    for case in cases:
        case["scale"] = None
        case["ref"] = _oracle(case["inputs"], case["causal"], None)
        case["expect"] = _expect(case)
    return cases


def _run(rank, _, cases):
    def one(case, groups, tensors, part):
        q, k, v, dout, dlse = tensors
        runs = {}
        for sched in ("auto", case["expect"]):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            with counting() as c:
                out, lse = _attn(case, rank, groups, qq, kk, vv, sched, config=CONFIG)
                torch.autograd.backward((out, lse), (dout, dlse))
            runs[sched] = ({"out": out.detach(), "lse": lse.detach(), "dq": qq.grad,
                            "dk": kk.grad, "dv": vv.grad}, _calls(c.messages))
        auto, named = runs["auto"], runs[case["expect"]]
        same = auto[1] == named[1] and all(torch.equal(auto[0][x], named[0][x]) for x in auto[0])
        sq = {x: (float((t - part(case["ref"][x], 2 if x == "lse" else 1)).pow(2).sum()),
                  float(part(case["ref"][x], 2 if x == "lse" else 1).pow(2).sum()),
                  bool(torch.isfinite(t).all()))
              for x, t in auto[0].items()}
        return {"same": same, "sq": sq}

    return _per_case(rank, cases, one) + [_mesh(rank)]


def _mesh(rank):
    """usp_attn / usp_shard / usp_unshard with a 2-D (2 x 4) DeviceMesh as head_group; a 1-D
    and a 3-D mesh raise."""
    from torch.distributed.device_mesh import init_device_mesh

    from longattn.common.kernels import attention
    from longattn.hamilton import usp_shard, usp_unshard

    mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("head", "seq"))
    g = torch.Generator().manual_seed(11)
    full = [torch.randn(1, 48, h, 4, generator=g, dtype=torch.float64) for h in (8, 1, 1)]
    errs = []
    for causal in (False, True):
        loc = [usp_shard(t, head_group=mesh, seq_group=None, causal=causal) for t in full]
        out = usp_attn(*loc, head_group=mesh, seq_group=mesh, causal=causal, config=CONFIG)
        got = usp_unshard(out, head_group=mesh, seq_group=None, causal=causal)
        ref = attention(*full, causal=causal)
        errs.append(float((got - ref).norm() / ref.norm()))
    msgs = []
    for bad in (init_device_mesh("cpu", (8,)), init_device_mesh("cpu", (2, 2, 2))):
        try:
            usp_attn(*loc, head_group=bad, seq_group=None, causal=True)
        except ValueError as e:
            msgs.append(str(e))
        else:
            msgs.append(None)
    return {"errs": errs, "bad": msgs}


@pytest.fixture(scope="module")
def results():
    cases = _cases()
    return cases, run_world(WORLD, _run, cases, timeout=600)


def test_auto_runs_the_predicted_strategy(results):
    cases, per_rank = results
    for i, case in enumerate(cases):
        ranks = [r[i] for r in per_rank if r[i] is not None]
        assert ranks and all(r["same"] for r in ranks), (i, case["expect"])
    # the cases exercise more than one choice, for hamilton_attn and for usp_attn
    assert len({c["expect"] for c in cases if c["kind"] == "attn"}) >= 2
    assert len({c["expect"] for c in cases if c["kind"] == "usp"}) >= 2


def test_auto_against_the_float64_oracle(results):
    cases, per_rank = results
    for i, case in enumerate(cases):
        ranks = [r[i] for r in per_rank if r[i] is not None]
        for x in ("out", "lse", "dq", "dk", "dv"):
            assert all(r["sq"][x][2] for r in ranks), (i, x)
            err = math.sqrt(sum(r["sq"][x][0] for r in ranks) / sum(r["sq"][x][1] for r in ranks))
            assert err <= 1e-10, (i, case["expect"], x, err)


def test_usp_with_a_2d_device_mesh(results):
    _, per_rank = results
    for r in per_rank:
        mesh = r[-1]
        assert all(e <= 1e-10 for e in mesh["errs"]), mesh["errs"]
        one_d, three_d = mesh["bad"]
        assert one_d is not None and "2-D" in one_d and "head_group" in one_d
        assert three_d is not None and "2-D" in three_d and "(2, 2, 2)" in three_d
    assert len({tuple(r[-1]["bad"]) for r in per_rank}) == 1  # the same error on every rank


def _usp_one_head_rank(rank, world, causal):
    """usp_attn over a head group of one rank (LOCAL) and the whole world as seq group, with
    schedule="auto" and a target: the step-loop schedule the model picks for usp (never
    "allgather" / "ulysses", which are not usp_attn schedules), bit-identical to naming it."""
    import torch.distributed as tdist

    from longattn.common.dist import LOCAL
    from longattn.hamilton import usp_shard, usp_unshard
    from longattn.hamilton.strategy import auto_schedule, call_shape

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8 * world, h, 4, generator=g, dtype=torch.float64)
               for h in (4, 2, 2))
    kw = {"head_group": LOCAL, "seq_group": tdist.group.WORLD, "causal": causal}
    loc = [usp_shard(t, **kw) for t in (q, k, v)]
    named = auto_schedule(TARGET, call_shape(*loc, causal, False), world, usp=True)
    outs = [usp_attn(*loc, **kw, schedule=s, config=CONFIG) for s in ("auto", named)]
    from longattn.reference import attention, causal_mask

    mask = causal_mask(q.shape[1], k.shape[1]) if causal else None
    ref = torch.from_numpy(attention(q.numpy(), k.numpy(), v.numpy(), mask=mask)[0])
    err = float((usp_unshard(outs[0], **kw) - ref).norm() / ref.norm())
    return named, torch.equal(outs[0], outs[1]), err


@pytest.mark.parametrize("causal", [False, True])
def test_usp_auto_with_one_head_rank(causal):
    for named, same, err in run_world(2, _usp_one_head_rank, causal, timeout=120):
        assert named in ("tasp", "ring") and same and err <= 1e-10, (named, same, err)
