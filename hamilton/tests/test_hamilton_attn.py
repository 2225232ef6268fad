"""hamilton_attn against the float64 oracle on gloo worlds of 1..8 ranks, forward and backward."""

from __future__ import annotations

import pytest
import torch

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


def _case(rank, n, seed, shape, causal, sched, dtype, lq_mult, lk_mult, scale):
    """One global problem: every rank computes its shard; returns per-tensor rel. errors."""
    b, hq, hkv, d, dv = shape
    u = _units(n, sched, causal)
    per = 2 * n if causal else n
    sq, sk = per * u * lq_mult, per * u * lk_mult
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, dv, generator=g, dtype=torch.float64)
    dout = torch.randn(b, sq, hq, dv, generator=g, dtype=torch.float64)
    dlse = torch.randn(b, hq, sq, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the oracle sees the rounded inputs
    out_r, lse_r, (dq_r, dk_r, dv_r) = _oracle(q, k, v, dout, dlse, causal, scale)

    def loc(x, dim=1):
        return shard(x, causal=causal, dim=dim)

    ql, kl, vl = (loc(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = hamilton_attn(ql, kl, vl, causal=causal, scale=scale,
                             schedule=_sched_arg(sched), return_lse=True)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64
                                                 else torch.float32)
    (out.double() * loc(dout)).sum().add((lse.double() * loc(dlse, 2)).sum()).backward()
    ref = {"out": loc(torch.from_numpy(out_r)), "lse": loc(torch.from_numpy(lse_r), 2),
           "dq": loc(torch.from_numpy(dq_r)), "dk": loc(torch.from_numpy(dk_r)),
           "dv": loc(torch.from_numpy(dv_r))}
    got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    # relative errors of the *global* tensors: gather the shards' squared norms
    return {key: (float((got[key].detach().double() - ref[key]).pow(2).sum()),
                  float(ref[key].pow(2).sum())) for key in got}


def _global_err(per_rank):
    keys = per_rank[0].keys()
    return {k: (sum(r[k][0] for r in per_rank) / sum(r[k][1] for r in per_rank)) ** 0.5
            for k in keys}


def _fp64_cases(rank, n):
    res = []
    for causal in (False, True):
        for sched in _schedules(n):
            for si, shape in enumerate(SHAPES):
                lk = 1 + si  # also Sq != Sk when non-causal
                lq = lk if causal else 2 - si
                r = _case(rank, n, 100 * n + si, shape, causal, sched, torch.float64, lq, lk,
                          None if si == 0 else 0.3)
                res.append(((causal, str(sched), shape), r))
    return res


@pytest.mark.parametrize("n", range(1, 9))
def test_fp64_matches_oracle(n):
    per_rank = run_world(n, _fp64_cases, timeout=300)
    for i, (what, _) in enumerate(per_rank[0]):
        err = _global_err([pr[i][1] for pr in per_rank])
        worst = max(err.values())
        assert worst <= 1e-10, f"n={n} {what}: {err}"
