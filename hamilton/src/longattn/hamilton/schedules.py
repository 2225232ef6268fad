"""Communication schedules for context-parallel attention: who sends which KV sub-chunk where.

A :class:`Schedule` over ``n`` ranks cuts every rank's local KV block into ``num_slots`` equal
sub-chunks ("slots"). Compute runs ``n`` steps; between step ``s`` and ``s + 1`` (a
*transition*, ``s = 0 .. n-2``) the rank ``r`` sends what it holds in slot ``c`` to
``dst[s][c][r]`` and receives slot ``c`` from the rank whose ``dst`` is ``r``. A schedule is
valid when every ``dst[s][c]`` is a permutation without fixed points and, for every slot, the
sub-chunk that starts on any rank visits every rank exactly once over the ``n`` steps (then
every rank sees every sub-chunk of every rank exactly once, which is what attention needs).

* :func:`ring_schedule` -- Ring Attention: one slot, ``r -> r + 1`` every step.
* :func:`hamiltonian_cycles` -- ``n - 1`` arc-disjoint directed Hamiltonian cycles of the
  complete digraph ``K_n*`` (exist for every ``n`` except 4 and 6, Tillson 1980), by
  construction (below).
* :func:`multi_ring_schedule` -- TASP: slot ``c`` travels around cycle ``c``; every step is one
  full all-to-all (each rank sends one sub-chunk to each other rank). For ``n`` in {4, 6} no
  such static decomposition exists; there a *time-varying* schedule keeps both properties
  (each step a full all-to-all, each sub-chunk visiting every rank once).
* :func:`two_level_schedule` -- ``nodes`` x ``gpus_per_node``: slot ``p`` follows the
  intra-node Hamiltonian path ``P_p`` on every node and crosses to the next node over one NIC
  link, so each rank sends ``gpus_per_node - 1`` intra-node messages and one inter-node
  message per step.
* :func:`validate_schedule` -- checks every property a schedule claims.

Constructions (all deterministic, O(n^2)):

* odd ``n``: Walecki. Vertices ``Z_{n-1}`` plus ``inf``; the zigzag ``z = 0, 1, -1, 2, -2,
  ..., (n-1)/2`` is a Hamiltonian path of ``Z_{n-1}`` whose arc differences ``+1, -2, +3, ...``
  are all distinct, so the ``n - 1`` translates ``[inf, z + i]`` (as directed cycles) use every
  arc exactly once.
* even ``n >= 8``: take the Walecki decomposition of ``K*_{n-1}`` on ``Z_N + {A}`` (``N = n -
  2``), and add the vertex ``B`` by breaking one arc ``x_i -> y_i`` of each of the ``N`` cycles
  into ``x_i -> B -> y_i``. The broken arcs plus ``B -> A`` and ``end -> B`` form the last cycle
  iff the broken arcs form a Hamiltonian path of ``Z_N + {A}`` starting at ``A``. We break, in
  cycle ``i``, the arc ``(N/2 - 1 + i) -> (N/2 + 1 + i)`` (difference +2), except: cycle 0
  breaks ``A -> 0``; cycles ``N/2 - 2``, ``N/2 - 1`` and ``N - 2`` break their first finite arc
  ``i -> i + 1``; cycle ``N - 1`` breaks ``(N/2 - 3) -> (N/2 + 1)``. The broken arcs then walk
  ``A -> 0 -> 2 -> ...`` over the even vertices, switch to the odd ones through the four
  exceptional arcs and end at ``N - 3`` (for ``N = 0 mod 4``: ``0..N/2-2 -> N/2-1 -> N/2..N-2
  -> N-1, 1..N/2-3 -> N/2+1..N-3``; for ``N = 2 mod 4`` the same pieces in another order), a
  Hamiltonian path: so this is a decomposition for every even ``n >= 8`` (the tests check it
  for every n up to 130).
* ``n`` in {4, 6}: translations of a group ``G`` of order ``n`` (``Z_2 x Z_2`` for 4, ``Z_6``
  for 6): at step ``s`` slot ``c`` moves every rank ``x`` to ``x * g[c][s]``. Each step is an
  all-to-all iff ``{g[c][s]}_c`` is ``G`` minus the identity; each sub-chunk visits every rank iff
  the partial products of ``g[c]`` are distinct and not the identity. A small deterministic
  search (milliseconds) finds such a table.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from functools import cache

import numpy as np

__all__ = [
    "Schedule",
    "hamiltonian_cycles",
    "multi_ring_schedule",
    "ring_schedule",
    "schedule_from_cycles",
    "two_level_schedule",
    "validate_cycles",
    "validate_schedule",
]

# Properties a schedule may claim (validate_schedule checks every claimed one):
#   static          the same permutations at every step
#   hamiltonian     static, and each slot's permutation is a single n-cycle
#   edge_disjoint   static, and no arc (r -> d) is used by two slots
#   all_to_all      num_slots == n - 1 and every step sends one slot to each other rank
#   distinct_peers  at every step a rank sends its slots to distinct ranks
#   one_remote      (two-level) exactly one of a rank's sends per step leaves its node
CLAIMS = ("static", "hamiltonian", "edge_disjoint", "all_to_all", "distinct_peers", "one_remote")


@dataclass(frozen=True, eq=False)
class Schedule:
    """A communication schedule over ``n`` ranks with ``num_slots`` sub-chunks per rank.

    ``dst[s, c, r]`` (a read-only int array ``[n - 1, num_slots, n]``) is where rank ``r``
    sends slot ``c`` after compute step ``s``. ``claims`` lists the properties
    :func:`validate_schedule` must confirm.
    ``gpus_per_node`` is set for hierarchical schedules (ranks ``node * g .. node * g + g - 1``
    share a node). ``cycles`` holds the Hamiltonian cycles of a static multi-ring schedule.
    Schedules compare and hash by their tables (``key``).
    """

    name: str
    n: int
    num_slots: int
    dst: np.ndarray
    claims: frozenset = frozenset()
    gpus_per_node: int | None = None
    cycles: tuple | None = None
    key: str = field(default="", compare=False)

    def __post_init__(self):
        dst = np.asarray(self.dst, dtype=np.int64)
        if dst.size == 0:
            dst = dst.reshape(max(self.n - 1, 0), self.num_slots, self.n)
        if dst.ndim != 3 or dst.shape != (self.n - 1, self.num_slots, self.n):
            raise ValueError(f"schedule {self.name!r}: dst must be [n - 1, num_slots, n] = "
                             f"{(self.n - 1, self.num_slots, self.n)}, got {dst.shape}")
        if dst.flags.writeable:
            dst = dst.copy()
            dst.flags.writeable = False
        object.__setattr__(self, "dst", dst)
        if not self.key:
            h = hashlib.sha1(f"{self.n},{self.num_slots}".encode())
            h.update(np.ascontiguousarray(dst, dtype=np.int32).tobytes())
            object.__setattr__(self, "key", h.hexdigest())

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return (f"Schedule({self.name!r}, n={self.n}, num_slots={self.num_slots}, "
                f"claims={sorted(self.claims)})")

    @property
    def table(self) -> np.ndarray:
        """``dst`` (an int array ``[n - 1, num_slots, n]``)."""
        return self.dst

    @property
    def key_int(self) -> int:
        """63-bit integer digest of the table (for cross-rank agreement checks)."""
        return int(self.key[:15], 16)


def _check_n(n, name="n", minimum=1):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {n!r}")
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return int(n)


# ---------------------------------------------------------------------------------------------
# Hamiltonian decompositions of K_n*


def _zigzag(m: int) -> list[int]:
    """0, 1, -1, 2, -2, ... (mod m): a Hamiltonian path of Z_m (m even) with distinct
    differences +1, -2, +3, ... (Walecki / Williams)."""
    z = [0]
    for t in range(1, m // 2):
        z += [t % m, (-t) % m]
    z.append(m // 2)
    return z


def _walecki(m: int) -> list[list[int]]:
    """m directed Hamiltonian cycles of K*_{m+1} on Z_m + {m}, m even: [m] + (zigzag + i)."""
    z = _zigzag(m)
    return [[m] + [(x + i) % m for x in z] for i in range(m)]


def _even_cycles(n: int) -> list[list[int]]:
    """n - 1 directed Hamiltonian cycles of K_n*, n even >= 8 (see the module docstring)."""
    N, A, B = n - 2, n - 2, n - 1
    half = N // 2
    # position j of the broken arc c[j] -> c[j+1] in base cycle c = [A, z_0 + i, ...]
    # (j = 0: A -> i; j = 1: i -> i + 1; j = N - 4: (N/2 - 3) + i -> ...; default N - 2)
    special = {0: 0, half - 2: 1, half - 1: 1, N - 2: 1, N - 1: N - 4}
    out, succ = [], {}
    for i, c in enumerate(_walecki(N)):
        j = special.get(i, N - 2)
        rot = c[j + 1:] + c[:j + 1]  # starts at the broken arc's head, ends at its tail
        out.append([B] + rot)
        succ[rot[-1]] = rot[0]
    last, v = [B, A], A
    while len(last) < n:
        v = succ[v]
        last.append(v)
    out.append(last)
    return out


@cache
def _cycles(n: int) -> tuple:
    if n == 1:
        return ()
    if n == 2:
        return ((0, 1),)
    if n in (4, 6):
        raise ValueError(
            f"n={n}: K_{n}* has no decomposition into {n - 1} directed Hamiltonian cycles "
            "(Tillson 1980: none exists for n = 4 and n = 6); multi_ring_schedule uses a "
            "time-varying schedule there"
        )
    cyc = _walecki(n - 1) if n % 2 == 1 else _even_cycles(n)
    validate_cycles(cyc, n)  # O(n^2); the constructions are proven, this guards the code
    return tuple(tuple(c) for c in cyc)


def hamiltonian_cycles(n: int) -> list[list[int]]:
    """``n - 1`` arc-disjoint directed Hamiltonian cycles of ``K_n*`` (every arc exactly once).

    Cycle ``c`` is a list of the ``n`` ranks; it is read cyclically (``c[j] -> c[j + 1]``, last
    -> first). ``n = 1`` gives ``[]``, ``n = 2`` gives ``[[0, 1]]``. Raises ``ValueError`` for
    ``n`` in {4, 6}, where no such decomposition exists.
    """
    n = _check_n(n)
    return [list(c) for c in _cycles(n)]


def validate_cycles(cycles, n: int) -> None:
    """Raise ``ValueError`` unless ``cycles`` are ``n - 1`` directed Hamiltonian cycles of
    ``K_n*`` that use every arc exactly once."""
    if len(cycles) != max(n - 1, 0):
        raise ValueError(f"expected {n - 1} cycles for n={n}, got {len(cycles)}")
    seen = set()
    for i, c in enumerate(cycles):
        if sorted(c) != list(range(n)):
            raise ValueError(f"cycle {i} is not a permutation of range({n}): {list(c)}")
        for j in range(n):
            arc = (c[j], c[(j + 1) % n])
            if arc in seen:
                raise ValueError(f"arc {arc} used twice (again in cycle {i})")
            seen.add(arc)
    if n > 1 and len(seen) != n * (n - 1):
        raise ValueError(f"{len(seen)} arcs covered, expected {n * (n - 1)}")


# ---------------------------------------------------------------------------------------------
# schedules


def _static(name, n, perms, claims, **kw) -> Schedule:
    """Schedule whose slot c applies the permutation perms[c] (a list r -> dst) every step."""
    step = np.asarray(perms, dtype=np.int64).reshape(-1, n)
    dst = np.broadcast_to(step, (max(n - 1, 0),) + step.shape)
    return Schedule(name, n, step.shape[0], dst, frozenset(claims), **kw)


def ring_schedule(n: int) -> Schedule:
    """Ring Attention: one slot (the whole local KV block) sent to ``rank + 1`` every step."""
    n = _check_n(n)
    return _static("ring", n, [[(r + 1) % n for r in range(n)]], {"static", "hamiltonian"})


def schedule_from_cycles(cycles, n: int, name: str = "multi_ring") -> Schedule:
    """Static multi-ring schedule: slot ``c`` moves one position along ``cycles[c]`` per step."""
    cyc = np.asarray(cycles, dtype=np.int64).reshape(-1, n)
    perms = np.empty_like(cyc)
    np.put_along_axis(perms, cyc, np.roll(cyc, -1, axis=1), axis=1)  # perms[c, cyc[j]] = cyc[j+1]
    claims = {"static", "hamiltonian", "edge_disjoint", "distinct_peers"}
    if len(cycles) == n - 1:
        claims.add("all_to_all")
    return _static(name, n, perms, claims, cycles=tuple(tuple(c) for c in cycles))


def _group(n):
    """(multiply, elements with the identity first) of the group used for n in {4, 6}."""
    if n == 4:  # Z_2 x Z_2 as XOR on 0..3 (Z_4 has no suitable table)
        return (lambda a, b: a ^ b), list(range(4))
    return (lambda a, b: (a + b) % n), list(range(n))


@cache
def _translation_table(n: int) -> tuple:
    """g[c][s] (group elements) for a time-varying all-to-all schedule; see module docstring."""
    mul, elems = _group(n)
    e, non = elems[0], elems[1:]
    inv = {x: next(y for y in elems if mul(x, y) == e) for x in elems}
    rows = []  # every sequence whose partial products run through all non-identity elements
    for order in itertools.permutations(non):
        prev, g = e, []
        for p in order:
            g.append(mul(inv[prev], p))
            prev = p
        rows.append(tuple(g))
    k = n - 1
    chosen, cols = [], [set() for _ in range(k)]

    def dfs(start):
        if len(chosen) == k:
            return True
        for i in range(start, len(rows)):
            row = rows[i]
            if any(row[s] in cols[s] for s in range(k)):
                continue
            chosen.append(row)
            for s in range(k):
                cols[s].add(row[s])
            if dfs(i + 1):
                return True
            chosen.pop()
            for s in range(k):
                cols[s].discard(row[s])
        return False

    if not dfs(0):  # pragma: no cover - the search succeeds for n = 4 and 6 (tested)
        raise RuntimeError(f"no translation schedule found for n={n}")
    return tuple(chosen)


def _time_varying(n: int) -> Schedule:
    mul, _ = _group(n)
    g = _translation_table(n)
    dst = [[[mul(r, g[c][s]) for r in range(n)] for c in range(n - 1)] for s in range(n - 1)]
    return Schedule("multi_ring", n, n - 1, dst, frozenset({"all_to_all", "distinct_peers"}))


def multi_ring_schedule(n: int) -> Schedule:
    """TASP's schedule for every ``n >= 1``: ``n - 1`` slots, each step one full all-to-all.

    Static (slot ``c`` travels around :func:`hamiltonian_cycles` ``(n)[c]``) where a
    Hamiltonian decomposition exists; for ``n`` in {4, 6} a time-varying schedule with the same
    two properties. ``n = 1`` and ``n = 2`` coincide with :func:`ring_schedule`.
    """
    n = _check_n(n)
    if n == 1:
        return Schedule("multi_ring", 1, 1, np.zeros((0, 1, 1)), frozenset({"static",
                                                                          "hamiltonian"}))
    if n in (4, 6):
        return _time_varying(n)
    return schedule_from_cycles(_cycles(n), n)


def _paths(m: int) -> list[list[int]]:
    """m directed Hamiltonian paths of K_m* (m even) using every arc once:
    P_p = p, p+1, p-1, p+2, p-2, ..., p+m/2 (mod m)."""
    return [[(x + p) % m for x in _zigzag(m)] for p in range(m)]


def two_level_schedule(nodes: int, gpus_per_node: int) -> Schedule:
    """TASP's hierarchical schedule for ``nodes`` nodes of ``gpus_per_node`` (even) GPUs.

    Global rank ``node * gpus_per_node + g``. Slot ``p`` (of ``gpus_per_node``) runs along the
    intra-node path ``P_p`` (see :func:`_paths`) on node 0, then from the path's end (local GPU
    ``p + m/2``) over the network to local GPU ``p`` of the next node, along ``P_p`` there, and
    so on around the nodes: one Hamiltonian cycle per slot, the cycles arc-disjoint. Per step a
    rank sends ``m - 1`` messages inside its node (one to each other local GPU) and one to the
    next node, each ``1/m`` of its KV block. ``nodes = 1`` returns
    :func:`multi_ring_schedule` ``(gpus_per_node)``.
    """
    u = _check_n(nodes, "nodes")
    m = _check_n(gpus_per_node, "gpus_per_node", 2)
    if m % 2:
        raise ValueError(f"gpus_per_node must be even (intra-node Hamiltonian paths), got {m}")
    if u == 1:
        return multi_ring_schedule(m)
    cycles = []
    for path in _paths(m):
        cycles.append([k * m + g for k in range(u) for g in path])
    s = schedule_from_cycles(cycles, u * m, name="two_level")
    return Schedule(s.name, s.n, s.num_slots, s.dst,
                    frozenset({"static", "hamiltonian", "edge_disjoint", "distinct_peers",
                               "one_remote"}),
                    gpus_per_node=m, cycles=s.cycles)


# ---------------------------------------------------------------------------------------------
# validation and derived tables


def origins(schedule: Schedule) -> np.ndarray:
    """``o[s, c, r]``: the rank whose slot-``c`` sub-chunk rank ``r`` holds at compute step
    ``s`` (``s = 0 .. n-1``; ``o[0, c, r] = r``). Assumes permutations (validated)."""
    n, k = schedule.n, schedule.num_slots
    o = np.empty((n, k, n), dtype=np.int64)
    o[0] = np.arange(n)
    t = schedule.dst
    for s in range(n - 1):  # the content of (c, r) moves to (c, t[s, c, r])
        np.put_along_axis(o[s + 1], t[s], o[s], axis=1)
    return o


def validate_schedule(s: Schedule) -> dict:
    """Check a schedule; return ``{property: bool}`` for every property in :data:`CLAIMS` plus
    ``permutations`` and ``covers``.

    Raises ``ValueError`` if a permutation is malformed (not a permutation of the ranks, or a
    rank sends to itself), if some rank would not see every other rank's sub-chunks exactly
    once, or if a property in ``s.claims`` does not hold.
    """
    schedule = s
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    n, k = schedule.n, schedule.num_slots
    if k < 1:
        raise ValueError(f"schedule {schedule.name!r}: num_slots must be >= 1, got {k}")
    if len(schedule.dst) != n - 1:
        raise ValueError(f"schedule {schedule.name!r}: {len(schedule.dst)} transitions, "
                         f"expected n - 1 = {n - 1}")
    t = schedule.dst
    ranks = np.arange(n)
    if n > 1:
        if not np.array_equal(np.sort(t, axis=2), np.broadcast_to(ranks, t.shape)):
            st, c = (int(x) for x in np.argwhere(np.any(np.sort(t, axis=2) != ranks, axis=2))[0])
            raise ValueError(f"schedule {schedule.name!r}: step {st} slot {c} is not a "
                             f"permutation: {t[st, c].tolist()}")
        if np.any(t == ranks):
            st, c, r = (int(x) for x in np.argwhere(t == ranks)[0])
            raise ValueError(f"schedule {schedule.name!r}: step {st} slot {c}: rank {r} sends "
                             "to itself")
    o = origins(schedule)
    srt = np.sort(o, axis=0)
    if not np.array_equal(srt, np.broadcast_to(ranks[:, None, None], o.shape)):
        bad = np.argwhere(srt != ranks[:, None, None])[0]
        raise ValueError(f"schedule {schedule.name!r}: rank {int(bad[2])} does not see every "
                         f"rank's slot-{int(bad[1])} sub-chunk exactly once")
    props = {"permutations": True, "covers": True}
    props["static"] = bool(n <= 2 or np.all(t == t[:1]))
    props["hamiltonian"] = bool(props["static"] and (
        n == 1 or all(_is_single_cycle(t[0, c]) for c in range(k))))
    if n > 1 and props["static"]:
        props["edge_disjoint"] = np.unique(ranks * n + t[0]).size == k * n
    else:
        props["edge_disjoint"] = props["static"]
    srt = np.sort(t, axis=1)
    props["distinct_peers"] = bool(k == 1 or n == 1 or np.all(srt[:, 1:] != srt[:, :-1]))
    props["all_to_all"] = props["distinct_peers"] and k == n - 1
    g = schedule.gpus_per_node
    if g:
        node = ranks // g
        remote = (node[None, None, :] != node[t]).sum(axis=1)  # [steps, n]
        props["one_remote"] = bool(np.all(remote == 1))
    else:
        props["one_remote"] = False
    for claim in schedule.claims:
        if claim not in props:
            raise ValueError(f"schedule {schedule.name!r} claims unknown property {claim!r}")
        if not props[claim]:
            raise ValueError(f"schedule {schedule.name!r} (n={n}) claims {claim!r}, which "
                             "does not hold")
    return props


def _is_single_cycle(p) -> bool:
    n, r, seen = len(p), 0, 0
    while True:
        r = int(p[r])
        seen += 1
        if r == 0:
            return seen == n
