"""Ring SWA / streaming attention, dense and varlen, forward and backward, on gloo worlds of
1..8 ranks against the float64 oracle; the exact traffic of every case is asserted too. The
cases alternate between the canonical ``ring_swa_attn`` and the seed-compatible functions."""

from __future__ import annotations

import numpy as np
import pytest

from longattn.common.testing import run_world
from longattn.ring_swa.cases import errors, expected_messages, run_cases

M = 6  # tokens per rank (dense); varlen totals are about n * M
APIS = ("seed", "canonical")


def _varlen_layout(n, rng, equal):
    """>= 5 random sequence lengths (one of them 1) and the tokens of each rank."""
    lengths = [int(x) for x in rng.integers(1, 3 * M, size=int(rng.integers(5, 8)))]
    lengths[int(rng.integers(len(lengths)))] = 1
    total = sum(lengths)
    if equal:
        lengths[-1] += (-total) % n
        counts = [sum(lengths) // n] * n
    else:  # uneven cuts, some ranks may hold nothing
        cuts = np.sort(rng.integers(0, total + 1, size=n - 1))
        counts = np.diff(np.concatenate([[0], cuts, [total]])).tolist()
    return lengths, [int(c) for c in counts]


def make_cases(n, dtype="float64", seed=0, sinks=(0, 1, 4)):
    rng = np.random.default_rng(1000 * n + seed)
    windows = [0, 1, M - 1, M, M + 1, 3 * M, n * M + 7]
    cases = []
    for i, w in enumerate(windows):
        for ns in sinks:
            base = dict(n=n, hq=4, hkv=2, d=8, window=w, ns=ns, dtype=dtype,
                        seed=int(rng.integers(1 << 30)))
            cases.append(dict(base, kind="dense", b=2, m=M, api=APIS[(i + ns) % 2]))
            lengths, counts = _varlen_layout(n, rng, equal=(i + ns) % 2 == 0)
            cases.append(dict(base, kind="varlen", lengths=lengths, counts=counts,
                              seed=int(rng.integers(1 << 30)), api=APIS[i % 2]))
    if n >= 3:  # a rank holding no tokens in the middle of a crossing sequence
        lengths = [1, 4 * n, 3, 2, 5]
        counts = [7] * n
        counts[n // 2] = 0
        counts[-1] += sum(lengths) - sum(counts)
        cases.append(dict(n=n, hq=2, hkv=1, d=8, window=9, ns=2, dtype=dtype, kind="varlen",
                          lengths=lengths, counts=counts, seed=int(rng.integers(1 << 30)),
                          api="canonical"))
    return cases


def _check(cases, results, tol):
    fwd_msgs, bwd_msgs = zip(*[expected_messages(c) for c in cases])
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        errs = errors(per_rank, case)
        for key, e in errs.items():
            assert e <= tol, f"{key} rel err {e:.2e} > {tol:.0e} in {case}"
        for r, res in enumerate(per_rank):
            assert res["fwd"] == fwd_msgs[i][r], f"rank {r} forward traffic in {case}"
            assert res["bwd"] == bwd_msgs[i][r], f"rank {r} backward traffic in {case}"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_ring_swa_fp64_all_windows_sinks_varlen(n):
    cases = make_cases(n)
    _check(cases, run_world(n, run_cases, cases), 1e-10)


@pytest.mark.parametrize("n", [3, 8])
def test_ring_swa_bf16(n):
    cases = make_cases(n, dtype="bfloat16", seed=1, sinks=(0, 4))
    _check(cases, run_world(n, run_cases, cases), 2e-2)
