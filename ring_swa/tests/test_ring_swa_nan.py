"""A NaN in a key makes exactly the rows that see that key NaN, never a hidden 0 / finite row:
a sink key (seen by every later query of its sequence, on this rank and the next ones) and a
halo key (the window tail a later rank receives), dense and varlen, on 1 to 3 ranks."""

from __future__ import annotations

import pytest
import torch

from longattn.common.testing import run_world
from longattn.ring_swa.cases import oracle_mask, run_case


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
