"""The NaN rule through hamilton_attn: one NaN in q, k or v on one rank (rank 0 or the last) of
gloo worlds of 2 and 3 ranks, causal and full, ring and TASP, float64 and float32 (96 ids).

Two float64 dense oracles on the unsharded inputs (``_oracle``), both checked against
``longattn.reference.attention`` / ``attention_backward`` wherever they are finite:

* ``rows=True``, each query row over exactly the keys it sees: what the mathematics makes NaN
  (a NaN query row; every row that sees a NaN key; the column of a NaN value in every row that
  sees it; and through the backward every gradient those rows reach). Every such element of
  ``out`` and of the gradients must be NaN, and ``lse`` must be NaN in exactly those rows.
* ``rows=False``, one dense block over all keys with a kernel's formulas: there a zero weight
  times a NaN is NaN too (a NaN value in rows that do not see it, causal; a NaN row's gradient
  into keys it does not see), as in ``longattn.reference.attention`` and in the local kernels
  within one block (here the diagonal block of the NaN's rank). No element may be NaN where
  even this oracle is finite, and every element finite in both equals dense attention (the
  dtype's tolerance).

And the loss of the training step, ``sum(out * r)`` (``r`` random) summed over the ranks, is
NaN.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as tdist

from longattn.common.layout import positions
from longattn.common.testing import TOLERANCES, random_like, random_qkv, rel_error, run_world
from longattn.hamilton import HamiltonConfig, hamilton_attn, layout_name, shard, unshard

B, S, HQ, HKV, D = 1, 24, 4, 2, 8  # S / n splits into ring and TASP sub-chunks for n = 2, 3
NAN = float("nan")
SPOT = {"q": (1, 2), "k": (1, 3), "v": (0, 5)}  # (head, dim) of the NaN in each tensor
DTYPES = {"float64": torch.float64, "float32": torch.float32}
CASES = [(dt, causal, sched, which) for dt in DTYPES for causal in (False, True)
         for sched in ("ring", "tasp") for which in "qkv"]


def _inputs(n, dt, causal, which, bad_rank):
    """Global q, k, v (float64 holding ``dt``-rounded values) with one NaN in ``which`` at a
    token ``bad_rank`` holds, and the loss weights ``r``."""
    q, k, v = (t.double() for t in random_qkv(B, S, S, HQ, HKV, D, dtype=DTYPES[dt], seed=5))
    t = positions(S, bad_rank, n, layout_name(causal))[S // n // 2 + 1]  # a middle local token
    h, d = SPOT[which]
    {"q": q, "k": k, "v": v}[which][0, t, h, d] = NAN
    r = random_like(torch.empty(B, S, HQ, D, dtype=torch.float64), seed=9)
    return q, k, v, r


def _rank(rank, n, deferred=False):
    world = tdist.group.WORLD
    config = HamiltonConfig(defer_merge=True, defer_dq=True) if deferred else None
    res = []
    for dt, causal, sched, which in CASES:
        for bad_rank in sorted({0, n - 1}):
            q, k, v, r = _inputs(n, dt, causal, which, bad_rank)
            loc = [shard(x, group=world, causal=causal).to(DTYPES[dt]) for x in (q, k, v)]
            for x in loc:
                x.requires_grad_()
            out, lse = hamilton_attn(*loc, group=world, causal=causal, schedule=sched,
                                     return_lse=True, config=config)
            loss = (out.double() * shard(r, group=world, causal=causal)).sum()
            loss.backward()
            total = loss.detach().reshape(1).clone()
            tdist.all_reduce(total, group=world)
            res.append({"out": out.detach(), "lse": lse.detach(), "dq": loc[0].grad,
                        "dk": loc[1].grad, "dv": loc[2].grad, "loss": float(total)})
    return res


@functools.cache
def _world(n, deferred=False):
    per_rank = run_world(n, _rank, deferred, timeout=300)
    got, i = {}, 0
    for dt, causal, sched, which in CASES:
        for bad_rank in sorted({0, n - 1}):
            got[(dt, causal, sched, which, bad_rank)] = {
                name: (per_rank[0][i][name] if name == "loss" else
                       unshard([r[i][name] for r in per_rank], causal=causal,
                               dim=2 if name == "lse" else 1))
                for name in per_rank[0][i]}
            i += 1
    return got


def _oracle(q, k, v, r, causal, *, rows):
    """Dense float64 attention: out, lse and the gradients of ``sum(out * r)``. ``rows=True``:
    each query row over exactly the keys it sees (what the mathematics makes NaN);
    ``rows=False``: one dense block over all keys, masked scores ``-inf`` and ``p = exp(s -
    lse)``, as a local kernel computes a block (a zero weight times a NaN is NaN there)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    g = HQ // HKV
    kr, vr = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    if rows:
        outs, lses = [], []
        for i in range(S):
            m = i + 1 if causal else S
            s = torch.einsum("bhd,bkhd->bhk", q[:, i], kr[:, :m]) * D ** -0.5
            lse = torch.logsumexp(s, dim=-1)  # NaN if a score is NaN
            outs.append(torch.einsum("bhk,bkhd->bhd", torch.exp(s - lse[..., None]),
                                     vr[:, :m]))
            lses.append(lse)
        out, lse = torch.stack(outs, 1), torch.stack(lses, 2)
    else:  # the formulas of a kernel (forward and backward) over one block of every key
        with torch.no_grad():
            sc = D ** -0.5
            s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * sc
            if causal:
                s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
            lse = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse[..., None])
            out = torch.einsum("bhqk,bkhd->bqhd", p, vr)
            dp = torch.einsum("bqhd,bkhd->bhqk", r, vr)
            ds = p * (dp - (r * out).sum(-1).transpose(1, 2)[..., None])
            dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr) * sc
            dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) * sc
            dv = torch.einsum("bhqk,bqhd->bkhd", p, r)
            dk, dv = (x.reshape(B, S, HKV, g, D).sum(3) for x in (dk, dv))
        return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    (out * r).sum().backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@functools.cache
def _oracles(n, dt, causal, which, bad_rank):
    from longattn.reference import attention, attention_backward, causal_mask

    q, k, v, r = _inputs(n, dt, causal, which, bad_rank)
    row = _oracle(q, k, v, r, causal, rows=True)
    block = _oracle(q, k, v, r, causal, rows=False)
    mask = causal_mask(S, S) if causal else None
    args = [t.numpy() for t in (q, k, v)]
    out, _ = attention(*args, mask=mask)
    dq, dk, dv = attention_backward(r.numpy(), *args, mask=mask)
    dense = {name: torch.from_numpy(x) for name, x in
             {"out": out, "dq": dq, "dk": dk, "dv": dv}.items()}
    for name, x in dense.items():  # the two oracles agree wherever both are finite
        fin = ~torch.isnan(row[name]) & ~torch.isnan(x)
        assert rel_error(row[name][fin], x[fin]) <= 1e-12, name
    for name in ("out", "dq", "dk", "dv"):  # block NaNs include the row NaNs
        nan = torch.isnan(block[name])
        assert torch.equal(nan | torch.isnan(row[name]), nan), name
    assert torch.equal(torch.isnan(dense["out"]), torch.isnan(block["out"]))
    return row, block


@pytest.mark.parametrize("bad", ["first", "last"])
@pytest.mark.parametrize("dt,causal,sched,which", CASES,
                         ids=[f"{dt}-{'causal' if c else 'full'}-{s}-nan_in_{w}"
                              for dt, c, s, w in CASES])
@pytest.mark.parametrize("n,deferred", [(2, False), (3, False), (3, True)],
                         ids=["2", "3", "3-defer_merge-defer_dq"])
def test_one_nan_on_one_rank(n, deferred, dt, causal, sched, which, bad):
    """``deferred``: with ``HamiltonConfig(defer_merge=True, defer_dq=True)`` (the forward's
    partials merged once from their slots, dq summed once)."""
    bad_rank = 0 if bad == "first" else n - 1
    got = _world(n, deferred)[(dt, causal, sched, which, bad_rank)]
    row, block = _oracles(n, dt, causal, which, bad_rank)
    tol = TOLERANCES[DTYPES[dt]]
    assert torch.isnan(got["out"]).any() and got["loss"] != got["loss"], "the loss must be NaN"
    for name in ("out", "dq", "dk", "dv"):
        must = torch.isnan(row[name])
        may = torch.isnan(block[name])
        nan = torch.isnan(got[name])
        assert nan[must].all(), f"{name}: {int((must & ~nan).sum())} elements lost their NaN"
        assert not nan[~may].any(), f"{name}: NaN where even one dense block is finite"
        fin = ~may & ~must
        assert rel_error(got[name][fin], row[name][fin]) <= tol, name
    must = torch.isnan(row["lse"])
    assert torch.equal(torch.isnan(got["lse"]), must)
    assert rel_error(got["lse"][~must], row["lse"][~must]) <= tol
