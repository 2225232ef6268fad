"""Precision of the merges at large logits: float32 inputs whose scores sit near 1e2 and 1e4
(``longattn.common.testing.large_logit_qkv``, ``softmax_scale=1.0``: every score exact in
float32), sharded over gloo worlds of 2 and 4 ranks, ring and TASP, causal and full. The
forward ``out`` and the gradients of a loss through ``out`` must be within 1e-5 (relative, as
``longattn.common.testing.rel_error``) of float64 dense attention on the unsharded inputs.

One float32 kernel over all keys is exact here to float32 rounding; what ``hamilton_attn`` adds
is the merge of ``n`` (ring) or more (TASP) partials through their ``lse``. With float32 ``lse``
that merge loses accuracy linearly in the logit (~1e-4 at 1e4); the ``lse`` accumulators are
in ``longattn.common.dtypes.lse_dtype`` (float64 for float32 inputs), so it does not. The
returned ``lse`` is float64 for float32 inputs.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as tdist

from longattn.common.testing import large_logit_qkv, random_like, rel_error, run_world
from longattn.hamilton import hamilton_attn, shard, unshard

B, S, HQ, HKV, D = 1, 48, 4, 2, 16  # S / n splits into the sub-chunks of ring and TASP, n = 2, 4
LOGITS = (1e2, 1e4)
CASES = [(logit, causal, sched) for logit in LOGITS for causal in (False, True)
         for sched in ("ring", "tasp")]
TOL = 1e-5


def _inputs(logit):
    q, k, v = large_logit_qkv(B, S, S, HQ, HKV, D, logit=logit, seed=int(logit) % 97)
    dout = random_like(torch.empty(B, S, HQ, D), seed=3)
    return q, k, v, dout


def _rank(rank, n):
    """Every case on this rank: this rank's out, lse, dq, dk, dv (float32 inputs)."""
    world = tdist.group.WORLD
    res = []
    for logit, causal, sched in CASES:
        q, k, v, dout = _inputs(logit)
        ql, kl, vl = (shard(t, group=world, causal=causal).requires_grad_() for t in (q, k, v))
        out, lse = hamilton_attn(ql, kl, vl, group=world, causal=causal, softmax_scale=1.0,
                                 schedule=sched, return_lse=True)
        (out * shard(dout, group=world, causal=causal)).sum().backward()
        res.append({"out": out.detach(), "lse": lse.detach(), "dq": ql.grad, "dk": kl.grad,
                    "dv": vl.grad})
    return res


@functools.cache
def _oracle(logit, causal):
    from longattn.reference import attention, attention_backward, causal_mask

    q, k, v, dout = _inputs(logit)
    mask = causal_mask(S, S) if causal else None
    args = [t.double().numpy() for t in (q, k, v)]
    out, lse = attention(*args, mask=mask, scale=1.0)
    dq, dk, dv = attention_backward(dout.double().numpy(), *args, mask=mask, scale=1.0)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


@functools.cache
def _world(n):
    """{case: {name: global tensor}} of every case on an n-rank world (one world run)."""
    per_rank = run_world(n, _rank, timeout=300)
    got = {}
    for i, (logit, causal, sched) in enumerate(CASES):
        got[(logit, causal, sched)] = {
            name: unshard([r[i][name] for r in per_rank], causal=causal,
                          dim=2 if name == "lse" else 1)
            for name in per_rank[0][i]}
    return got


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("logit,causal,sched", CASES,
                         ids=[f"logit{int(lg)}-{'causal' if c else 'full'}-{s}"
                              for lg, c, s in CASES])
def test_fp32_large_logits_match_float64_dense(n, logit, causal, sched):
    got = _world(n)[(logit, causal, sched)]
    ref = _oracle(logit, causal)
    assert got["out"].dtype == torch.float32 and got["lse"].dtype == torch.float64
    errs = {name: rel_error(got[name], ref[name]) for name in ref}
    print(f"n={n} logit={logit:g} causal={causal} {sched}: "
          + " ".join(f"{k}={e:.2e}" for k, e in errs.items()))
    assert errs["out"] <= TOL and errs["lse"] <= TOL, errs
    for name in ("dq", "dk", "dv"):
        assert errs[name] <= TOL, (name, errs)
