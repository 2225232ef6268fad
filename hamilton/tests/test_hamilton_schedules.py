"""Schedules: every n from 2 to 64 (and beyond), two-level {2,3,4,8} x {2,4,8}, validation, and
a symbolic execution of every rank's plan (messages matched pairwise, kernel calls covering
exactly the visible key blocks once, equal work per rank per step)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.hamilton.plan import make_plan
from longattn.hamilton.schedules import (
    Schedule,
    hamiltonian_cycles,
    multi_ring_schedule,
    ring_schedule,
    two_level_schedule,
    validate_cycles,
    validate_schedule,
)


def _simulate_visits(s: Schedule):
    """Independent of ``origins``: move every (slot, origin) token step by step and return the
    list of ranks it visits."""
    where = {(c, o): o for c in range(s.num_slots) for o in range(s.n)}
    visits = {key: [o] for key, o in where.items()}
    for step in range(s.n - 1):
        for key, r in where.items():
            where[key] = int(s.dst[step][key[0]][r])
            visits[key].append(where[key])
    return visits


def _arcs_per_step(s: Schedule):
    return [[(r, int(s.dst[step][c][r])) for c in range(s.num_slots) for r in range(s.n)]
            for step in range(s.n - 1)]


@pytest.mark.parametrize("n", range(2, 65))
def test_multi_ring_every_n(n):
    s = multi_ring_schedule(n)
    props = validate_schedule(s)
    assert s.num_slots == n - 1 and props["all_to_all"] and props["covers"]
    for key, ranks in _simulate_visits(s).items():
        assert sorted(ranks) == list(range(n)), (n, key, ranks)
    for arcs in _arcs_per_step(s):  # every arc of K_n* exactly once per step
        assert len(arcs) == len(set(arcs)) == n * (n - 1)
        assert all(a != b for a, b in arcs)
    if n in (4, 6):
        assert not props["static"] and s.cycles is None
    else:
        assert props["static"] and props["hamiltonian"] and props["edge_disjoint"]
        validate_cycles(s.cycles, n)


@pytest.mark.parametrize("n", [m for m in range(2, 131) if m not in (4, 6)])
def test_hamiltonian_cycles_every_n(n):
    cyc = hamiltonian_cycles(n)
    assert len(cyc) == n - 1
    arcs = set()
    for c in cyc:
        assert sorted(c) == list(range(n))
        arcs |= {(c[j], c[(j + 1) % n]) for j in range(n)}
    assert len(arcs) == n * (n - 1)  # each of the n(n-1) arcs once (n - 1 cycles of n arcs)


@pytest.mark.parametrize("n", [4, 6])
def test_no_decomposition_for_4_and_6(n):
    with pytest.raises(ValueError, match="Tillson"):
        hamiltonian_cycles(n)


@pytest.mark.parametrize("nodes", [2, 3, 4, 8])
@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_two_level(nodes, gpus):
    s = two_level_schedule(nodes, gpus)
    n = nodes * gpus
    props = validate_schedule(s)
    assert s.n == n and s.num_slots == gpus and s.gpus_per_node == gpus
    assert props["hamiltonian"] and props["edge_disjoint"] and props["one_remote"]
    for key, ranks in _simulate_visits(s).items():
        assert sorted(ranks) == list(range(n)), key
    for arcs in _arcs_per_step(s):
        per_rank = defaultdict(list)
        for a, b in arcs:
            per_rank[a].append(b)
        for r, peers in per_rank.items():
            local = [p for p in peers if p // gpus == r // gpus]
            remote = [p for p in peers if p // gpus != r // gpus]
            # m - 1 messages inside the node, one to each other local GPU, one to the next node
            assert sorted(local) == sorted(set(range(r // gpus * gpus, (r // gpus + 1) * gpus))
                                           - {r})
            assert remote == [((r // gpus + 1) % nodes) * gpus + (r % gpus + gpus // 2) % gpus]


def test_two_level_argument_errors():
    with pytest.raises(ValueError, match="gpus_per_node must be even"):
        two_level_schedule(2, 3)
    with pytest.raises(ValueError, match="nodes"):
        two_level_schedule(0, 4)
    with pytest.raises(TypeError, match="gpus_per_node"):
        two_level_schedule(2, 4.0)
    assert two_level_schedule(1, 8) == multi_ring_schedule(8)


@pytest.mark.parametrize("n", range(1, 65))
def test_ring(n):
    s = ring_schedule(n)
    props = validate_schedule(s)
    assert s.num_slots == 1 and props["hamiltonian"]
    if n > 1:
        assert [int(x) for x in s.dst[0][0]] == [(r + 1) % n for r in range(n)]


def _bad(dst, claims=(), n=None):
    dst = np.asarray(dst)
    n = dst.shape[2] if n is None else n
    return Schedule("bad", n, dst.shape[1], dst, frozenset(claims))


def test_validate_rejects_bad_schedules():
    with pytest.raises(ValueError, match="not a permutation"):
        validate_schedule(_bad([[[1, 1, 0]], [[1, 2, 0]]]))
    with pytest.raises(ValueError, match="sends to itself"):
        validate_schedule(_bad([[[0, 2, 1]], [[1, 2, 0]]]))
    # r -> r + 2 twice on 4 ranks: the sub-chunk comes back home after two steps
    with pytest.raises(ValueError, match="exactly once"):
        validate_schedule(_bad([[[2, 3, 0, 1]]] * 3))
    # r -> r+1 then r -> r-1: back home
    with pytest.raises(ValueError, match="exactly once"):
        validate_schedule(_bad([[[1, 2, 0]], [[2, 0, 1]]]))
    tv = multi_ring_schedule(4)
    with pytest.raises(ValueError, match="claims 'static'"):
        validate_schedule(Schedule("x", 4, 3, tv.dst, frozenset({"static"})))
    with pytest.raises(ValueError, match="claims 'all_to_all'"):
        validate_schedule(Schedule("x", 4, 1, ring_schedule(4).dst, frozenset({"all_to_all"})))
    with pytest.raises(ValueError, match="dst must be"):
        Schedule("x", 4, 2, np.zeros((3, 1, 4)), frozenset())
    with pytest.raises(TypeError):
        validate_schedule("ring")


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_validate_agrees_with_simulation(n, k, seed):
    """Random derangement schedules: validate_schedule accepts exactly those whose sub-chunks
    visit every rank once."""
    rng = np.random.default_rng(seed)
    dst = []
    for _ in range(n - 1):
        step = []
        for _ in range(k):
            while True:
                p = rng.permutation(n)
                if np.all(p != np.arange(n)):
                    break
            step.append(p)
        dst.append(step)
    s = _bad(dst, n=n)
    ok = all(sorted(v) == list(range(n)) for v in _simulate_visits(s).values())
    if ok:
        validate_schedule(s)
    else:
        with pytest.raises(ValueError, match="exactly once"):
            validate_schedule(s)


def test_schedules_hash_by_table():
    assert multi_ring_schedule(8) == multi_ring_schedule(8)
    assert hash(ring_schedule(5)) == hash(ring_schedule(5))
    assert ring_schedule(3) != multi_ring_schedule(3)
    assert ring_schedule(2) == multi_ring_schedule(2)  # one slot, 0 -> 1 -> 0
    with pytest.raises(ValueError):
        ring_schedule(0)


# ---------------------------------------------------------------------------------------------
# symbolic execution of the per-rank plans


def _execute(s: Schedule, causal: bool):
    """Run every rank's plan on labels instead of tensors. Returns, per rank, a dict
    ``(query_part, origin, origin_unit) -> count`` of attended key units (query_part "front"
    / "back" for causal, "all" otherwise) and the per-step work ``[steps][rank]``."""
    n = s.n
    plans = [make_plan(s, r, causal) for r in range(n)]
    units = plans[0].units
    bufs = [[(r, plans[r].own_units[i]) for i in range(units)] for r in range(n)]
    seen = [defaultdict(int) for _ in range(n)]
    work = []
    for step in range(n):
        if step > 0:
            w = []
            for r in range(n):
                total = 0
                for call in plans[r].calls[step]:
                    parts = (("front", "back") if call.rows == "all" else ("back",)) if causal \
                        else ("all",)
                    for lab in bufs[r][call.start:call.stop]:
                        assert lab[0] != r, "own block attended again"
                        for part in parts:
                            seen[r][(part,) + lab] += 1
                    total += (call.stop - call.start) * (2 if call.rows == "all" else 1)
                w.append(total)
            work.append(w)
        if step < n - 1:
            msgs = defaultdict(list)  # (src, dst) -> messages in posting order
            for r in range(n):
                for peer, a, b in plans[r].transfers[step].sends:
                    msgs[(r, peer)].append(bufs[r][a:b])
            new = [[None] * units for _ in range(n)]
            for r in range(n):
                for peer, a, b in plans[r].transfers[step].recvs:
                    m = msgs[(peer, r)].pop(0)
                    assert len(m) == b - a, "message sizes differ at the two ends"
                    new[r][a:b] = m
            assert all(not v for v in msgs.values()), "unreceived messages"
            assert all(x is not None for buf in new for x in buf)
            bufs = new
    return seen, work, plans


def _check_coverage(s, causal):
    n = s.n
    seen, work, plans = _execute(s, causal)
    k = plans[0].num_slots
    for r in range(n):
        want = {}
        for o in range(n):
            if o == r:
                continue
            for u in range(plans[r].units):
                if not causal:
                    want[("all", o, u)] = 1
                    continue
                # origin o's unit u lies in block o (u < k) or 2n-1-o; r's front block is r,
                # its back block 2n-1-r; a block sees strictly earlier blocks entirely
                kb = o if u < k else 2 * n - 1 - o
                for part, qb in (("front", r), ("back", 2 * n - 1 - r)):
                    if kb < qb:
                        want[(part, o, u)] = 1
        assert dict(seen[r]) == want, (s, causal, r)
    for w in work:  # equal work on every rank at every step
        assert len(set(w)) == 1, (s, causal, w)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", list(range(1, 13)) + [16, 23])
def test_plans_cover_every_visible_block_once(n, causal):
    _check_coverage(multi_ring_schedule(n), causal)
    _check_coverage(ring_schedule(n), causal)


@pytest.mark.parametrize("nodes,gpus", [(2, 2), (3, 2), (2, 4), (4, 4), (2, 8)])
def test_two_level_plans_cover(nodes, gpus):
    for causal in (False, True):
        _check_coverage(two_level_schedule(nodes, gpus), causal)


def test_plan_messages():
    """TASP: per step one message per peer (two when causal: front and back half) to n - 1
    distinct peers; ring: one message to rank + 1."""
    n = 7
    for causal in (False, True):
        for r in range(n):
            p = make_plan(multi_ring_schedule(n), r, causal)
            for t in p.transfers:
                peers = [m[0] for m in t.sends]
                assert sorted(set(peers)) == sorted(set(range(n)) - {r})
                assert len(peers) == (2 if causal else 1) * (n - 1)
                assert sum(b - a for _, a, b in t.sends) == p.units
            q = make_plan(ring_schedule(n), r, causal)
            assert all(t.sends == (((r + 1) % n, 0, q.units),) for t in q.transfers)
