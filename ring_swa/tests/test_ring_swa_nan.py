"""A NaN in a key makes exactly the rows that see that key NaN, never a hidden 0 / finite row:
a sink key (seen by every later query of its sequence, on this rank and the next ones) and a
halo key (the window tail a later rank receives), dense and varlen, on 1 to 3 ranks. And one
NaN element of q, k or v on any rank of 2- and 3-rank worlds: out, lse and the gradients of a
training step are NaN exactly where the float64 oracle is, equal to it elsewhere, and the loss
is NaN."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from longattn.common.testing import rel_error, run_world
from longattn.ring_swa.cases import (
    gather,
    global_inputs,
    oracle,
    oracle_mask,
    row_oracle,
    run_case,
)


def _nan_case(kind, n, key, **kw):
    base = dict(n=n, hq=2, hkv=1, d=8, window=3, ns=2, dtype="float64", seed=7, api="canonical")
    if kind == "dense":
        case = dict(base, kind="dense", b=2, m=6, nan_key=key, **kw)
    else:
        case = dict(base, kind="varlen", lengths=[3, 6 * n - 3], counts=[6] * n, nan_key=key,
                    **kw)
    return case


def nan_worker(rank, world, cases):
    return [run_case(rank, world, c) for c in cases]


def _expected(case):
    """[rows] (dense: [b, rows]) True where the row sees the NaN key."""
    m = oracle_mask(case)[:, case["nan_key"]]
    if case["kind"] == "dense":
        rows = torch.zeros(case["b"], len(m), dtype=torch.bool)
        rows[case.get("nan_batch", 0)] = torch.as_tensor(m)
        return rows
    return torch.as_tensor(m)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_nan_key_gives_nan_rows(n):
    m = 6
    cases = [
        _nan_case("dense", n, 1),  # a sink key on rank 0 (sinks are keys 0, 1)
        _nan_case("dense", n, m - 1, nan_batch=1),  # the last key of rank 0: the next rank's halo
        _nan_case("varlen", n, 4),  # the second sequence's (starts at 3) second sink
        _nan_case("varlen", n, m + 4 if n > 1 else 4),  # a key of rank 1 that rank 2's halo holds
    ]
    results = run_world(n, nan_worker, cases)
    for i, case in enumerate(cases):
        out = torch.cat([r[i]["out"] for r in results], dim=1 if case["kind"] == "dense" else 0)
        got = torch.isnan(out).any(-1).any(-1)  # rows with a NaN
        want = _expected(case)
        assert want.any() and not want.all()
        assert torch.equal(got, want), (case, got, want)
        # a NaN row is NaN in every head and element (nothing of it is hidden)
        assert torch.isnan(out[want]).all(), case


# --------------------------------------------------------------------------------------------
# one NaN in q, k or v, on any rank, against the float64 oracle


def _one_nan_cases(n):
    """One NaN element of q, k or v on each rank in turn: in a sink, in a key the next rank's
    halo holds (the rank's last token) and in a plain query / key (dense and varlen)."""
    m = 6
    base = dict(n=n, hq=2, hkv=1, d=4, window=3, ns=2, dtype="float64", api="canonical")
    cases = []
    for r in range(n):
        for i, (name, local) in enumerate((("q", 2), ("k", m - 1), ("v", m - 1), ("k", 1),
                                           ("v", 0), ("q", m - 1))):
            pos = r * m + local
            seed = 100 * n + 10 * r + i
            cases.append(dict(base, kind="dense", b=2, m=m, seed=seed,
                              nan=[(name, i % 2, pos, 0, i % 4)]))
            cases.append(dict(base, kind="varlen", lengths=[4, n * m - 4], counts=[m] * n,
                              seed=seed, nan=[(name, 0, pos, 0, i % 4)]))
    return cases


def _nan_worker(rank, world, cases):
    return [run_case(rank, world, c) for c in cases]


@functools.cache
def _one_nan_results(n):
    """Per case: (case, got {key: global numpy}, row oracle, dense oracle, loss)."""
    cases = _one_nan_cases(n)
    results = run_world(n, _nan_worker, cases, timeout=300)
    out = []
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        got = {key: gather(per_rank, case, key).numpy()
               for key in ("out", "lse", "dq", "dk", "dv")}
        dense = dict(zip(("out", "lse", "dq", "dk", "dv"), oracle(case, with_lse=True)))
        loss = (gather(per_rank, case, "out") * global_inputs(case)[3]).sum()
        out.append((case, got, row_oracle(case), dense, loss))
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_one_nan_in_q_k_or_v_on_any_rank_matches_the_oracle(n):
    """Two float64 oracles bound what a NaN may reach. The row oracle (each row over the keys it
    sees, masked keys absent): every element it makes NaN is NaN in out, lse, dq, dk, dv (a
    NaN is never hidden); lse (which no value and no 0-weight product touches) is NaN exactly
    there. The dense masked oracle (``longattn.reference`` on the global tensors and the window
    / sink mask): every element of out, dq, dk it keeps finite is finite and equal to it
    (1e-10; dv: the next test). Between the two lie the elements a masked NaN reaches through
    a zero weight inside one kernel tile (a NaN value of a key a row does not see,
    ``0 * nan``): the dense oracle and every tiled kernel make them NaN, the row oracle does
    not. The loss of the training step is NaN. 6 NaN placements per rank, dense and varlen."""
    for case, got, rows, dense, loss in _one_nan_results(n):
        assert np.isnan(rows["out"]).any() and not np.isnan(rows["out"]).all(), case
        for key, must in rows.items():
            assert np.isnan(got[key][np.isnan(must)]).all(), (key, "hidden NaN", case)
        fin = ~np.isnan(rows["lse"])
        assert np.array_equal(np.isnan(got["lse"]), ~fin), case
        assert rel_error(got["lse"][fin], rows["lse"][fin]) <= 1e-10, case
        for key in ("out", "dq", "dk"):
            fin = ~np.isnan(dense[key])
            assert rel_error(got[key][fin], dense[key][fin]) <= 1e-10, (key, case)
        assert torch.isnan(loss), case


@pytest.mark.parametrize("n", [2, 3])
def test_one_nan_dv_finite_where_dense_is(n):
    bad = []
    for case, got, _, dense, _ in _one_nan_results(n):
        fin = ~np.isnan(dense["dv"])
        if not rel_error(got["dv"][fin], dense["dv"][fin]) <= 1e-10:
            bad.append((case["kind"], case["nan"]))
    assert not bad, bad
