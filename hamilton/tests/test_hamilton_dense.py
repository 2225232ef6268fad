"""schedule="allgather" / "ulysses" of hamilton_attn and the 2-D usp_attn against the float64
oracle, forward and backward (gradients through out and lse), with the bytes of every message
checked against the formulas of hamilton/README.md ("All-gather, Ulysses and USP").

One 8-rank gloo world serves every case: groups of n ranks are the first n ranks
(``new_group``), USP grids ``h x s`` the first ``h * s`` ranks with rank ``a * s + b`` at head
rank ``a`` and seq rank ``b``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as tdist

from longattn.common import layout
from longattn.common.comm import counting
from longattn.common.dist import LOCAL
from longattn.common.testing import run_world
from longattn.hamilton import hamilton_attn, layout_name, usp_attn, usp_shard, usp_unshard
from longattn.hamilton.ulysses import head_ranges

WORLD = 8
_GROUPS: dict = {}
GRIDS = [(1, 2), (2, 1), (2, 2), (2, 3), (4, 2)]


def _groups():
    """Every group the cases use, made once per world in the same order on every rank."""
    if not _GROUPS:
        world = tdist.get_world_size()
        for m in range(1, world):
            _GROUPS[m] = tdist.new_group(list(range(m)))
        _GROUPS[world] = tdist.group.WORLD
        for h, s in (grid for grid in GRIDS if grid[0] * grid[1] <= world):
            for b in range(s):
                _GROUPS[("head", h, s, b)] = tdist.new_group([a * s + b for a in range(h)])
            for a in range(h):
                _GROUPS[("seq", h, s, a)] = tdist.new_group([a * s + b for b in range(s)])
    return _GROUPS


def _problem(seed, b, sq, sk, hq, hkv, d, dv):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, dv), (b, sq, hq, dv), (b, hq, sq)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def _oracle(inputs, causal, scale):
    from longattn.reference import attention, attention_backward, causal_mask

    q, k, v, dout, dlse = (t.numpy() for t in inputs)
    mask = causal_mask(q.shape[1], k.shape[1]) if causal else None
    out, lse = attention(q, k, v, mask=mask, scale=scale)
    dq, dk, dv = attention_backward(dout, q, k, v, mask=mask, scale=scale, dlse=dlse)
    return {n: torch.from_numpy(x) for n, x in
            zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv))}


def _cases():
    cases = []
    for n, strategy, causal in itertools.product(range(1, WORLD + 1), ("allgather", "ulysses"),
                                                 (False, True)):
        hq = math.lcm(n, 8) if strategy == "ulysses" else 8
        for i, hkv in enumerate((hq // 4, hq // 8) + ((4,) if n in (3, 6) else ())):
            if hkv == 4 and strategy == "allgather":
                continue
            hq_c = 12 if hkv == 4 else hq  # 12 query heads on 4 KV heads: uneven GQA groups
            b, lq = 2 - i % 2, 4
            lk = lq if causal or i else 6  # full attention: also Sq != Sk
            scale = 0.3 if i else None
            inputs = _problem(len(cases), b, n * lq, n * lk, hq_c, hkv, 4, 3 + i % 2)
            cases.append({"kind": strategy, "n": n, "causal": causal, "inputs": inputs,
                          "scale": scale, "ref": _oracle(inputs, causal, scale)})
    for (h, s), causal, sched in itertools.product(GRIDS, (False, True), ("ring", "tasp")):
        lq = 2 * max(1, s - 1) if sched == "tasp" else 2
        inputs = _problem(len(cases), 1, h * s * lq, h * s * lq, 4 * h, 2, 4, 4)
        cases.append({"kind": "usp", "grid": (h, s), "sched": sched, "causal": causal,
                      "inputs": inputs, "scale": None, "ref": _oracle(inputs, causal, None)})
    return cases


def _local(case, rank):
    """This rank's (q, k, v, dout, dlse) parts, or None when it is not in the case's group."""
    q, k, v, dout, dlse = case["inputs"]
    causal = case["causal"]
    if case["kind"] == "usp":
        h, s = case["grid"]
        if rank >= h * s:
            return None
        a, b = divmod(rank, s)

        def part(x, dim=1):
            x = layout.take_shard(x, b, s, layout=layout_name(causal), dim=dim)
            return layout.take_shard(x, a, h, dim=dim)
    else:
        n = case["n"]
        if rank >= n:
            return None

        def part(x, dim=1):
            return layout.take_shard(x, rank, n, layout=layout_name(causal), dim=dim)
    return [part(t) for t in (q, k, v, dout)] + [part(dlse, 2)], part


def _usp_groups(groups, h, s, rank):
    """(head group, seq group) of this rank in the ``h x s`` grid (rank ``a * s + b``); the
    whole world as the head group (``s = 1``) is the world and LOCAL."""
    if s == 1 and h == tdist.get_world_size():
        return tdist.group.WORLD, LOCAL
    a, b = divmod(rank, s)
    return groups[("head", h, s, b)], groups[("seq", h, s, a)]


def _attn(case, rank, groups, q, k, v, schedule=None, **kw):
    """The case's call on this rank, with lse: ``usp_attn`` over its (head, seq) grid, else
    ``hamilton_attn`` over its group with its softmax scale; ``schedule`` defaults to the
    case's, ``kw`` (e.g. ``config``) reaches either."""
    if case["kind"] == "usp":
        hg, sg = _usp_groups(groups, *case["grid"], rank)
        return usp_attn(q, k, v, head_group=hg, seq_group=sg, causal=case["causal"],
                        schedule=schedule or case["sched"], return_lse=True, **kw)
    return hamilton_attn(q, k, v, group=groups[case["n"]], causal=case["causal"],
                         softmax_scale=case.get("scale"), schedule=schedule or case["kind"],
                         return_lse=True, **kw)


def _per_case(rank, cases, one):
    """``one(case, groups, (q, k, v, dout, dlse), part)`` for each case with a part on this
    rank; None for the others (a case may use fewer ranks than the world)."""
    groups = _groups()
    return [None if got is None else one(case, groups, *got)
            for case, got in ((case, _local(case, rank)) for case in cases)]


def _run(rank, _, cases):
    def one(case, groups, tensors, part):
        q, k, v, dout, dlse = tensors
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        with counting() as fwd:
            out, lse = _attn(case, rank, groups, q, k, v)
        with counting() as bwd:
            torch.autograd.backward((out, lse), (dout, dlse))
        got = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
        ref = case["ref"]
        sq = {name: (float((got[name].detach() - part(ref[name], 2 if name == "lse" else 1))
                           .pow(2).sum()), bool(torch.isfinite(got[name]).all()))
              for name in got}
        return {"sq": sq, "fwd": _calls(fwd.messages), "bwd": _calls(bwd.messages),
                "lse_dtype": lse.dtype}

    return _per_case(rank, cases, one)


def _calls(messages):
    """The messages of each exchange call as (sends, recvs) lists of (peer, bytes)."""
    calls = []
    for kind, grp in itertools.groupby(messages, key=lambda m: m[0]):
        pairs = [(p, nb) for _, p, nb in grp]
        if kind == "send":
            calls.append([pairs, []])
        else:
            if not calls or calls[-1][1]:
                calls.append([[], []])
            calls[-1][1] = pairs
    return calls


@pytest.fixture(scope="module")
def results():
    cases = _cases()
    return cases, run_world(WORLD, _run, cases, timeout=600)


def test_against_the_float64_oracle(results):
    cases, per_rank = results
    for i, case in enumerate(cases):
        parts = [r[i] for r in per_rank if r[i] is not None]
        for name, ref in case["ref"].items():
            assert all(p["sq"][name][1] for p in parts), (case["kind"], name)
            err = math.sqrt(sum(p["sq"][name][0] for p in parts)) / float(ref.norm())
            assert err <= 1e-10, (case["kind"], case.get("n", case.get("grid")),
                                  case["causal"], name, err)
        assert all(p["lse_dtype"] == torch.float64 for p in parts)


def test_allgather_bytes_exact(results):
    cases, per_rank = results
    for i, case in enumerate(cases):
        if case["kind"] != "allgather":
            continue
        n, causal = case["n"], case["causal"]
        _, k, v, _, _ = case["inputs"]
        b, hkv, d, dv = k.shape[0], k.shape[2], k.shape[3], v.shape[3]
        lk = k.shape[1] // n
        row = b * hkv * (d + dv) * 8  # one token of K and V, float64
        pieces = [lk // 2, lk // 2] if causal and n > 1 else [lk]
        for me in range(n):
            fwd, bwd = per_rank[me][i]["fwd"], per_rank[me][i]["bwd"]
            want = sorted((p, x * row) for p in range(n) if p != me for x in pieces)
            for calls in (fwd, bwd):  # one exchange each way: K/V out, dK/dV back
                assert len(calls) == (1 if n > 1 else 0)
                for sends, recvs in calls:
                    assert sorted(sends) == want and sorted(recvs) == want


def _ulysses_messages(case, me):
    """README formula: per peer p, (sent, received) message sizes of the four exchanges: q/k/v
    to heads, out/lse back; dout/dlse to heads, dq/dk/dv back (float64: 8 bytes)."""
    n = case["n"]
    q, k, v, _, _ = case["inputs"]
    b, hq, hkv, d, dv = q.shape[0], q.shape[2], k.shape[2], k.shape[3], v.shape[3]
    lq, lk, hn, e = q.shape[1] // n, k.shape[1] // n, hq // n, 8
    _, kvr = head_ranges(hq, hkv, n)
    m = [hi - lo for lo, hi in kvr]
    peers = [p for p in range(n) if p != me]

    def qkv(heads):
        return [b * lq * hn * d * e, b * lk * heads * d * e, b * lk * heads * dv * e]

    to_heads_sent = sorted((p, x) for p in peers for x in qkv(m[p]))
    to_heads_recv = sorted((p, x) for p in peers for x in qkv(m[me]))
    back = sorted((p, x) for p in peers for x in (b * lq * hn * dv * e, b * hn * lq * e))
    return ([(to_heads_sent, to_heads_recv), (back, back)],
            [(back, back), (to_heads_recv, to_heads_sent)])


def test_ulysses_bytes_exact(results):
    cases, per_rank = results
    for i, case in enumerate(cases):
        if case["kind"] != "ulysses":
            continue
        for me in range(case["n"]):
            got = [[(sorted(s), sorted(r)) for s, r in per_rank[me][i][w]]
                   for w in ("fwd", "bwd")]
            if case["n"] == 1:
                assert got == [[], []]
                continue
            assert got == list(_ulysses_messages(case, me)), (case["n"], me)


def test_usp_bytes_exact(results):
    """Ulysses over the head group as above (group-rank peers), then the step loop over the seq
    group: (s - 1) KV blocks forward, (s - 2) KV + (s - 1) dK/dV blocks backward (its README)."""
    cases, per_rank = results
    for i, case in enumerate(cases):
        if case["kind"] != "usp":
            continue
        h, s = case["grid"]
        q, k, v, _, _ = case["inputs"]
        b, hq, hkv, d = q.shape[0], q.shape[2], k.shape[2], q.shape[3]
        loc = q.shape[1] // (h * s)
        hn, e = hq // h, 8
        for me in range(h * s):
            a, _ = divmod(me, s)
            _, kvr = head_ranges(hq, hkv, h)
            m = kvr[a][1] - kvr[a][0]
            ring_block = b * h * loc * m * 2 * d * e  # the KV block of the step loop
            uly_in_sent = sum(b * loc * (hn + 2 * (kvr[p][1] - kvr[p][0])) * d * e
                              for p in range(h) if p != a)
            uly_back = (h - 1) * (b * loc * hn * d * e + b * hn * loc * e)
            fwd_sent = sum(nb for sends, _ in per_rank[me][i]["fwd"] for _, nb in sends)
            bwd_sent = sum(nb for sends, _ in per_rank[me][i]["bwd"] for _, nb in sends)
            uly_out_grad = (h - 1) * b * loc * (hn + 2 * m) * d * e
            assert fwd_sent == uly_in_sent + uly_back + (s - 1) * ring_block, (h, s, me)
            assert bwd_sent == (uly_back + uly_out_grad + max(0, s - 2) * ring_block
                                + (s - 1) * ring_block), (h, s, me)


def _usp_layout(rank, _):
    groups = _groups()
    out = []
    for (h, s), causal in itertools.product(GRIDS, (False, True)):
        if rank >= h * s:
            continue
        a, b = divmod(rank, s)
        hg, sg = groups[("head", h, s, b)], groups[("seq", h, s, a)]
        x = torch.arange(2 * 2 * h * s * 3, dtype=torch.float64).reshape(2, 2 * h * s, 3)
        part = usp_shard(x, head_group=hg, seq_group=sg, causal=causal)
        out.append(torch.equal(usp_unshard(part, head_group=hg, seq_group=sg, causal=causal),
                               x))
    return out


def test_usp_shard_unshard_roundtrip():
    assert all(all(r) for r in run_world(WORLD, _usp_layout))


def _usp_many_segments(rank, world):
    """usp_attn over a head group of 3 ranks with 21 query heads on 7 KV heads: the ranks hold
    four shapes of local head segments (ulysses.head_segments), forward and backward."""
    q, k, v, dout, dlse = _problem(11, 1, 6, 6, 21, 7, 4, 4)
    ref = _oracle((q, k, v, dout, dlse), False, None)
    kw = {"head_group": tdist.group.WORLD, "seq_group": LOCAL, "causal": False}
    loc = [usp_shard(t, **kw).requires_grad_() for t in (q, k, v)]
    out, lse = usp_attn(*loc, **kw, return_lse=True)
    mine = usp_shard(dout, **kw)
    lse_part = usp_shard(dlse.transpose(1, 2), **kw).transpose(1, 2)
    torch.autograd.backward((out, lse), (mine, lse_part))
    got = {"out": out} | {n: t.grad for n, t in zip(("dq", "dk", "dv"), loc)}
    errs = {}
    for name, t in got.items():
        whole = usp_unshard(t.detach(), **kw)
        errs[name] = float((whole - ref[name]).norm() / ref[name].norm())
    return errs


def test_usp_with_many_head_segments():
    for errs in run_world(3, _usp_many_segments, timeout=120):
        assert max(errs.values()) <= 1e-10, errs
