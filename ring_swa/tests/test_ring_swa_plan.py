"""The exchange plan against a brute-force reading of the oracle mask (hypothesis), and the
closed form of the dense case: C = min(ceil(w / M), r) sources, the farthest sending only the
w - (C - 1) M tokens the window reaches."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.reference import document_mask
from longattn.ring_swa.plan import make_plan


@st.composite
def layouts(draw):
    lengths = draw(st.lists(st.integers(0, 12), min_size=1, max_size=8))
    total = sum(lengths)
    n = draw(st.integers(1, 8))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=n - 1, max_size=n - 1)))
    offsets = [0, *cuts, total]
    w = draw(st.integers(0, 30))
    ns = draw(st.integers(0, 5))
    return lengths, offsets, w, ns


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_plan_matches_mask(layout):
    lengths, offsets, w, ns = layout
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    total = int(cu[-1])
    if total == 0:
        return
    m = document_mask(cu, cu, causal=True, window=(w, 0), num_sink_tokens=ns)
    plans = make_plan(offsets, cu, w, ns)
    n = len(offsets) - 1
    for r, p in enumerate(plans):
        lo, hi = offsets[r], offsets[r + 1]
        # received keys == keys outside the rank that some local query sees
        seen = set(np.nonzero(m[lo:hi].any(axis=0))[0].tolist()) - set(range(lo, hi))
        got = {j for iv in p.recv.values() for a, b in iv for j in range(a, b)}
        assert got == seen
        for src, iv in p.recv.items():
            assert src != r and all(offsets[src] <= a < b <= offsets[src + 1] for a, b in iv)
            assert plans[src].send[r] == iv
        assert p.num_remote_sinks + p.num_halo == len(seen)
        # the local pieces and their sinks reproduce the mask's diagonal block
        assert p.local_cu[-1] == hi - lo
        if hi > lo:
            loc = np.zeros((hi - lo, hi - lo), dtype=bool)
            for (a, b), s in zip(zip(p.local_cu, p.local_cu[1:]), p.local_sinks):
                i = np.arange(b - a)
                blk = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - w)
                blk |= (i[None, :] < s) & (i[None, :] <= i[:, None])
                loc[a:b, a:b] = blk
            assert (loc == m[lo:hi, lo:hi]).all()
    assert sum(len(p.send) for p in plans) == sum(len(p.recv) for p in plans) <= n * (n - 1)


@given(st.integers(1, 8), st.integers(1, 9), st.integers(0, 80))
def test_dense_hops_closed_form(n, m, w):
    plans = make_plan([r * m for r in range(n + 1)], [0, n * m], w)
    c_all = min(math.ceil(w / m), n - 1)
    for r, p in enumerate(plans):
        c = min(math.ceil(w / m), r)
        assert sorted(p.recv) == list(range(r - c, r))
        assert sorted(p.send) == [d for d in range(r + 1, min(n, r + c_all + 1))]
        for src, iv in p.recv.items():
            size = sum(b - a for a, b in iv)
            hop = r - src
            assert size == (m if hop < math.ceil(w / m) else w - (hop - 1) * m)
