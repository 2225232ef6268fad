"""hamilton_attn against the float64 oracle on gloo worlds of 1..8 ranks, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from longattn.common.dtypes import lse_dtype
from longattn.common.testing import run_world
from longattn.hamilton import hamilton_attn, shard, two_level_schedule

# (B, Hq, Hkv, D, Dv) shapes; every case runs with every schedule that fits the world size
SHAPES = [(1, 4, 1, 8, 8), (2, 2, 2, 6, 4)]


def _schedules(n):
    out = ["ring", "tasp"]
    for nodes in range(2, n + 1):
        if n % nodes == 0 and (n // nodes) % 2 == 0:
            out.append(("two_level", nodes, n // nodes))
    return out


def _sched_arg(s):
    return two_level_schedule(s[1], s[2]) if isinstance(s, tuple) else s


def _units(n, s, causal):
    if n == 1:
        return 1
    k = {"ring": 1, "tasp": n - 1}.get(s) if isinstance(s, str) else s[2]
    return 2 * k if causal else k


def _oracle(q, k, v, dout, dlse, causal, scale):
    from longattn.reference import attention, attention_backward, causal_mask

    sq, sk = q.shape[1], k.shape[1]
    mask = causal_mask(sq, sk) if causal else None
    args = [t.double().numpy() for t in (q, k, v)]
    out, lse = attention(*args, mask=mask, scale=scale)
    grads = attention_backward(dout.double().numpy(), *args, mask=mask, scale=scale,
                               dlse=dlse.double().numpy())
    return out, lse, grads


def _problem(seed, shape, sq, sk, dtype):
    b, hq, hkv, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, dv, generator=g, dtype=torch.float64)
    dout = torch.randn(b, sq, hq, dv, generator=g, dtype=torch.float64)
    dlse = torch.randn(b, hq, sq, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the oracle sees the rounded inputs
    return q, k, v, dout, dlse


def make_case(seed, shape, causal, dtype, sq, sk, scale, use_lse=True):
    """A global problem and its float64 oracle (computed once, in the pytest process)."""
    q, k, v, dout, dlse = _problem(seed, shape, sq, sk, dtype)
    if not use_lse:
        dlse = torch.zeros_like(dlse)
    out_r, lse_r, (dq_r, dk_r, dv_r) = _oracle(q, k, v, dout, dlse, causal, scale)
    ref = {"out": out_r, "lse": lse_r, "dq": dq_r, "dk": dk_r, "dv": dv_r}
    return {"inputs": (q, k, v, dout, dlse), "ref": {k: torch.from_numpy(x) for k, x in
                                                     ref.items()},
            "causal": causal, "dtype": dtype, "scale": scale, "use_lse": use_lse}


def local_results(case, sched, config=None):
    """This rank's ``hamilton_attn`` results for ``case`` over the world (``{"out", "lse",
    "dq", "dk", "dv"}``, detached) and the oracle's part of them (the same keys)."""
    q, k, v, dout, dlse = case["inputs"]
    causal, dtype = case["causal"], case["dtype"]

    world = tdist.group.WORLD

    def loc(x, dim=1):
        return shard(x, group=world, causal=causal, dim=dim)

    ql, kl, vl = (loc(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = hamilton_attn(ql, kl, vl, group=world, causal=causal,
                             softmax_scale=case["scale"],
                             schedule=_sched_arg(sched), return_lse=True, config=config)
    # lse in lse_dtype: float64 for float32 / float64 inputs, float32 for fp16 / bf16
    assert out.dtype == dtype and lse.dtype == lse_dtype(dtype)
    loss = (out.double() * loc(dout)).sum()
    if case["use_lse"]:
        loss = loss + (lse.double() * loc(dlse, 2)).sum()
    loss.backward()
    ref = {key: loc(r, 2 if key == "lse" else 1) for key, r in case["ref"].items()}
    got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    return {key: t.detach() for key, t in got.items()}, ref


def sq_errors(got, ref):
    """(squared error, squared reference norm) per tensor, so the caller gets the relative
    error of the global tensors (:func:`_global_err`)."""
    return {key: (float((got[key].double() - ref[key].double()).pow(2).sum()),
                  float(ref[key].double().pow(2).sum())) for key in got}


def run_case(rank, n, case, sched):
    """This rank's part of ``case``: (squared error, squared reference norm) per tensor."""
    return sq_errors(*local_results(case, sched))


def _run_cases(rank, n, cases):
    return [run_case(rank, n, case, sched) for case, sched in cases]


def _global_err(per_rank):
    keys = per_rank[0].keys()
    return {k: (sum(r[k][0] for r in per_rank) / sum(r[k][1] for r in per_rank)) ** 0.5
            for k in keys}


def _fp64_cases(n):
    cases = []
    for causal in (False, True):
        for sched in _schedules(n):
            for si, shape in enumerate(SHAPES):
                per = (2 * n if causal else n) * _units(n, sched, causal)
                lk = 1 + si  # also Sq != Sk when non-causal
                lq = lk if causal else 2 - si
                case = make_case(100 * n + si, shape, causal, torch.float64, per * lq, per * lk,
                                 None if si == 0 else 0.3)
                cases.append((case, sched))
    return cases


@pytest.mark.parametrize("n", range(1, 9))
def test_fp64_matches_oracle(n):
    """Every schedule that fits n, causal and not, GQA 4:1 and Hq == Hkv, Dv != D, Sq != Sk,
    default and explicit softmax_scale, gradients through out and lse."""
    cases = _fp64_cases(n)
    per_rank = run_world(n, _run_cases, cases, timeout=300)
    for i, (case, sched) in enumerate(cases):
        err = _global_err([pr[i] for pr in per_rank])
        what = (sched, case["causal"], tuple(case["inputs"][0].shape))
        assert max(err.values()) <= 1e-10, f"n={n} {what}: {err}"


# ---------------------------------------------------------------------------------------------
# bf16: error within tolerance, and not growing with the number of ranks

BF16_SHAPE = (1, 8, 2, 32, 32)  # GQA 4:1
BF16_S = 224  # divisible by 2 * 8 * 7 (TASP causal on 8 ranks) and by 2 * 2


def test_bf16_error_does_not_grow_with_ranks():
    cases = []
    for causal in (False, True):
        case = make_case(7, BF16_SHAPE, causal, torch.bfloat16, BF16_S, BF16_S, None,
                         use_lse=False)
        cases += [(case, "ring"), (case, "tasp")]
    errs = {}
    for n in (2, 8):
        per_rank = run_world(n, _run_cases, cases, timeout=300)
        for i, (case, sched) in enumerate(cases):
            errs[(n, case["causal"], sched)] = _global_err([pr[i] for pr in per_rank])
    for (n, causal, sched), e in errs.items():
        for t in ("out", "dq", "dk", "dv"):
            assert e[t] <= 2e-2, (n, causal, sched, t, e[t])
            if n == 8:
                e2 = errs[(2, causal, sched)][t]
                assert e[t] <= 1.5 * e2, (causal, sched, t, e[t], e2)
