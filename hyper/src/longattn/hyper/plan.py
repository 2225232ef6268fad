"""The recursion plan of HyperAttention: which parts are exact, which are core calls.

Non-causal: exact attention if ``Sk <= min_seq_len``, else one core call over everything.
Causal (``Sq == Sk``): a segment of ``n`` rows is exact causal attention if
``n <= min_seq_len``; otherwise it splits into halves of ``ceil(n/2)`` and ``floor(n/2)`` rows,
both recurse, and the second half's queries get a core call over the first half's keys. This is
the public code's ``[B, 2H, N/2, D]`` trick written for any length, without padding rows (a
padded query would take a slot in the sorted blocks). Core calls are numbered breadth-first
(level by level, left to right); the sampled columns are drawn per call in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Plan:
    exact: bool  # non-causal and short: plain exact attention
    leaves: tuple  # (start, length): exact causal segments
    calls: tuple  # (q0, nq, k0, nk): core calls, breadth-first
    levels: tuple  # per recursion level, the indices of its calls

    @property
    def max_nk(self) -> int:
        return max((c[3] for c in self.calls), default=0)


def make_plan(sq: int, sk: int, causal: bool, min_seq_len: int) -> Plan:
    # a public helper: min_seq_len 0 would split a 1-row segment into 1 + 0 rows for ever
    # (checked before the cache, which takes True for 1)
    if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int):
        raise TypeError(f"min_seq_len must be an int, got {min_seq_len!r}")
    if min_seq_len < 1:
        raise ValueError(f"min_seq_len must be >= 1, got {min_seq_len}")
    return _make_plan(sq, sk, bool(causal), min_seq_len)


@lru_cache(maxsize=256)
def _make_plan(sq: int, sk: int, causal: bool, min_seq_len: int) -> Plan:
    if not causal:
        if sk <= min_seq_len:
            return Plan(True, (), (), ())
        return Plan(False, (), ((0, sq, 0, sk),), ((0,),))
    if sq != sk:
        raise ValueError(f"causal hyper attention needs Sq == Sk, got Sq={sq}, Sk={sk}")
    leaves, calls, levels, level = [], [], [], [(0, sq)]
    while level:
        nxt, ids = [], []
        for a, n in level:
            if n <= min_seq_len:
                leaves.append((a, n))
                continue
            n1 = n - n // 2
            ids.append(len(calls))
            calls.append((a + n1, n // 2, a, n1))
            nxt += [(a, n1), (a + n1, n // 2)]
        if ids:
            levels.append(tuple(ids))
        level = nxt
    return Plan(False, tuple(leaves), tuple(calls), tuple(levels))


def uniform_leaves(plan: Plan):
    """The common leaf length if every leaf has it and they tile the rows in order, else None
    (then the leaves can be one batched call on a ``[B * n_leaves, L, H, D]`` view)."""
    if not plan.leaves:
        return None
    n = plan.leaves[0][1]
    ok = all(a == i * n and m == n for i, (a, m) in enumerate(sorted(plan.leaves)))
    return n if ok else None
