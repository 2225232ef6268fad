"""Packed documents (``cu_seqlens``) with ``schedule="allgather"``: one varlen call per rank.

One gloo world of 8 ranks serves every distributed test: groups of 1 to 8 ranks are subgroups
of it (``new_group`` of the first n ranks, made once per world), as in
``test_hamilton_packed.py``. The float64 oracle is ``longattn.reference.attention`` with
``longattn.reference.document_mask``; document lengths are drawn by hypothesis (one-token
documents and one document longer than a rank's share in every draw that has room for it).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import test_hamilton_packed as _packed
import torch
import torch.distributed as tdist
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hamilton_packed import (
    WORLD,
    _bench_module,
    _check_cases,
    _cu,
    _errors,
    _group,
    _pairs,
    run_case,
)

from longattn.common.comm import counting
from longattn.common.dtypes import acc_dtype
from longattn.common.testing import run_world
from longattn.hamilton import hamilton_attn, packed_layout
from longattn.hamilton import packed_allgather as _pag
from longattn.hamilton.packing import TILE, call_tiles, make_allgather_plan


@st.composite
def documents(draw, total, per_rank, longest=5):
    """Document lengths summing to ``total``: one longer than a rank's share when the total
    has room for it, the others 1 to ``longest`` tokens (1 drawn half the time), in drawn
    order."""
    long = 0
    if total > per_rank + 1:
        long = draw(st.integers(per_rank + 1, min(total, 2 * per_rank + 1)))
    lens, left = [], total - long
    while left:
        lens.append(min(left, draw(st.one_of(st.just(1), st.integers(1, longest)))))
        left -= lens[-1]
    if long:
        lens.insert(draw(st.integers(0, len(lens))), long)
    return lens


@st.composite
def worlds(draw, lo=2, hi=7):
    """``[(n, lens)]`` for n = 1..8, ``lo``..``hi`` tokens per rank."""
    out = []
    for n in range(1, WORLD + 1):
        per = draw(st.integers(lo, hi))
        out.append((n, draw(documents(n * per, per))))
    return out


# ---------------------------------------------------------------------------------------------
# the oracle and one case


def make_case(n, lens, causal, dtype, seed, shape=(4, 2, 8, 6), scale=None):
    """A packed problem with documents ``lens`` on ``n`` ranks, schedule="allgather", with its
    float64 oracle (``test_hamilton_packed.make_case``)."""
    return _packed.make_case(n, causal, ("allgather",), dtype, seed, sum(lens) // n,
                             shape=shape, scale=scale, lens=lens)


@settings(max_examples=3, deadline=None)
@given(worlds())
def test_fp64_matches_oracle(problems):
    """Groups of 1..8 ranks, causal and full, GQA 4:2 with Dv != D, explicit and default
    softmax_scale, gradients through out and lse: relative error <= 1e-10 (16 cases per
    example, one world run)."""
    cases = [make_case(n, lens, causal, torch.float64, 100 * n + causal,
                       scale=0.3 if (n + causal) % 2 else None)
             for n, lens in problems for causal in (False, True)]
    _check_cases(cases, 1e-10)


@settings(max_examples=1, deadline=None)
@given(st.lists(documents(3 * 24, 24, 12), min_size=2, max_size=2),
       st.lists(documents(8 * 24, 24, 12), min_size=2, max_size=2))
def test_bf16_within_tolerance(lens3, lens8):
    cases = [make_case(n, lens[causal], causal, torch.bfloat16, 7 + n + causal,
                       shape=(4, 2, 16, 16))
             for n, lens in ((3, lens3), (8, lens8)) for causal in (False, True)]
    _check_cases(cases, 2e-2)


def test_one_document_both_ways_of_keeping_the_keys():
    """One causal document (the zigzag layout: the two segments of ranks 0..n-2 gather more
    keys than the n * L gathered rows, so their backward keeps those rows and gathers again;
    rank n - 1's chunks are adjacent, one segment, fewer keys) and one full
    document (the contiguous layout: the keys are the gathered rows in order, no index)."""
    cases = []
    for n in (2, 5):
        per = 4
        for causal in (True, False):
            plans = [make_allgather_plan(_cu([n * per]), n, r, causal) for r in range(n)]
            if causal:
                assert all(p.keys > n * per for p in plans[:-1]) and plans[-1].keys < n * per
            else:
                assert all(p.keys == n * per and p.kidx is None for p in plans)
            cases.append(make_case(n, [n * per], causal, torch.float64, n + causal))
    _check_cases(cases, 1e-10)


def test_one_process_matches_oracle():
    """group=None without torch.distributed: the plan's call over the whole sequence."""
    assert not tdist.is_initialized()
    for causal in (False, True):
        case = make_case(1, [7, 1, 12, 1, 3, 6], causal, torch.float64, 5 + causal)
        errs, _ = _errors(case, [run_case(0, case, None)[0]])
        assert max(errs.values()) <= 1e-10, errs


# ---------------------------------------------------------------------------------------------
# the plan against the document mask (one process)


def _tiles_brute(mask, tile):
    """Tiles of ``mask`` (a segment's [queries, keys]) holding a visible pair."""
    lq, nk = mask.shape
    return sum(bool(mask[i:i + tile, j:j + tile].any())
               for i in range(0, lq, tile) for j in range(0, nk, tile))


def packed_problems():
    """``(n, lens, causal)``: test_hamilton_packed's problems without their schedule."""
    return _packed.packed_problems().map(lambda p: p[:3])


@settings(max_examples=60, deadline=None)
@given(packed_problems(), st.sampled_from([1, 2, 3, 4, TILE]))
def test_plan_matches_the_document_mask(problem, tile):
    """Every rank's one call: its segments cover its rows in order, each segment's keys are
    exactly the keys the document mask lets its queries see (global order; causal: the
    segment's own tokens last, so bottom-right alignment is the mask; the backward's split
    finds those as the local rows and the rest in the rank's buffer), the pairs and the tiles
    (against a brute-force count) are the mask's."""
    from longattn.reference import document_mask

    n, lens, causal = problem
    cu = _cu(lens)
    mask = document_mask(cu.numpy(), causal=causal)
    lay = packed_layout(cu, n, causal)
    pos = [lay.positions(r) for r in range(n)]
    per = int(cu[-1]) // n
    origin = np.concatenate(pos)  # row p * per + i of the gathered buffer: pos[p][i]
    for x in range(n):
        plan = make_allgather_plan(cu, n, x, causal)
        assert plan.cu_q[0] == 0 and plan.cu_q[-1] == per == plan.query_rows
        seen = mask[pos[x]].any(axis=0)  # the keys some query of rank x sees
        assert plan.kernel_calls == 1 and plan.rows_received == int(
            sum(seen[pos[p]].sum() for p in range(n) if p != x)) <= (n - 1) * per
        kidx = np.arange(n * per) if plan.kidx is None else plan.kidx
        assert len(kidx) == plan.keys == plan.cu_k[-1]
        pairs = tiles = 0
        for j in range(len(plan.cu_q) - 1):
            rows = pos[x][plan.cu_q[j]:plan.cu_q[j + 1]]
            keys = origin[kidx[plan.cu_k[j]:plan.cu_k[j + 1]]]
            sub = mask[np.ix_(rows, keys)]
            assert np.array_equal(keys, np.flatnonzero(mask[rows].any(axis=0))), (x, j)
            assert np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))  # a run
            if causal:  # bottom-right aligned: query i sees the first nk - lq + i + 1 keys
                lq, nk = sub.shape
                assert np.array_equal(sub, np.tri(lq, nk, nk - lq, dtype=bool))
                # the backward's split: the last lq keys are the segment's own local rows,
                # the others (cu_past) its document's keys before it, found by past_tensors
                own = kidx[plan.cu_k[j + 1] - lq:plan.cu_k[j + 1]]
                assert np.array_equal(own, x * per + np.arange(plan.cu_q[j], plan.cu_q[j + 1]))
                cp, kpos, krow = plan.past_tensors("cpu")
                assert cp[j + 1] - cp[j] == nk - lq
                past = kpos[cp[j]:cp[j + 1]].numpy()
                assert np.array_equal(past, np.arange(plan.cu_k[j], plan.cu_k[j + 1] - lq))
                buf_rows = np.concatenate([p * per + r for p, r in enumerate(plan.rows_from)])
                assert np.array_equal(buf_rows[krow[cp[j]:cp[j + 1]].numpy()], kidx[past])
            else:
                assert sub.all()
            pairs += int(sub.sum())
            tiles += _tiles_brute(sub, tile)
        assert plan.segment_steps == len(plan.cu_q) - 1
        assert plan.pairs == pairs == int(mask[pos[x]].sum())
        assert plan.tiles(tile) == tiles


def test_call_tiles_counts_bottom_right_tiles():
    """Any query and key counts (more queries than keys, none of either), causal and full."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        lq, nk = (int(x) for x in rng.integers(0, 20, size=2))
        for causal in (False, True):
            m = np.tri(lq, nk, nk - lq, dtype=bool) if causal else np.ones((lq, nk), bool)
            assert call_tiles((0, lq), (0, nk), causal, 4) == _tiles_brute(m, 4), (lq, nk)


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="rank must be an int in"):
        make_allgather_plan(_cu([4, 4]), 2, 2, True)
    with pytest.raises(ValueError, match="pad_packed"):
        make_allgather_plan(_cu([4, 3]), 2, 0, True)


# ---------------------------------------------------------------------------------------------
# what is sent and computed: the all-gather and one call each way


def _counted(rank, world, cases):
    """Per case: bytes sent / received and exchanges, and the varlen calls (direction, pairs,
    query rows, key rows), forward and backward (None outside the case's group)."""
    _group(1)
    calls = []
    fwd, bwd = _pag.attention_forward_varlen, _pag.attention_backward_varlen

    def count_fwd(q, k, v, cq, ck, **kw):
        calls.append(("fwd", _pairs(cq, ck, kw["causal"]), q.shape[0], k.shape[0]))
        return fwd(q, k, v, cq, ck, **kw)

    def count_bwd(do, q, k, v, o, lse, cq, ck, **kw):
        calls.append(("bwd", _pairs(cq, ck, kw["causal"]), q.shape[0], k.shape[0]))
        return bwd(do, q, k, v, o, lse, cq, ck, **kw)

    _pag.attention_forward_varlen, _pag.attention_backward_varlen = count_fwd, count_bwd
    try:
        return [_count_one(rank, case, calls) if rank < case[0] else None for case in cases]
    finally:
        _pag.attention_forward_varlen, _pag.attention_backward_varlen = fwd, bwd


def _count_one(rank, case, calls):
    n, causal, cu, per = case
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, per, h, 4, generator=g).to(torch.bfloat16).requires_grad_()
               for h in (2, 1, 1))
    calls.clear()
    with counting() as cf:
        out = hamilton_attn(q, k, v, group=_group(n), causal=causal, schedule="allgather",
                            cu_seqlens=cu)
    fwd_calls = list(calls)
    calls.clear()
    with counting() as cb:
        out.float().sum().backward()
    return {"fwd": (cf.bytes_sent, cf.bytes_received, cf.calls, fwd_calls),
            "bwd": (cb.bytes_sent, cb.bytes_received, cb.calls, list(calls))}


def test_traffic_and_calls():
    """bf16, many short documents and a long one: in one exchange the forward sends each peer
    exactly the K/V rows (bf16) some query of that peer sees under the document mask and
    receives those of its own queries, and makes one varlen call (the rank's pairs under the
    document mask, all its query rows, the plan's keys); the backward makes one call on the
    same pairs (causal: two, each segment against its own rows and, unmasked, against its
    document's keys before it: together the same pairs) and returns the dK/dV of the received
    rows to their owners, in float32
    (acc_dtype), one exchange: fewer bytes both ways than the whole shards."""
    from longattn.reference import document_mask

    rng = np.random.default_rng(5)
    cases = []
    for n in (1, 3, 4, 8):
        for causal in (False, True):
            per = 12
            lens = [2 * per] + [int(x) for x in rng.integers(1, 5, size=n * per)]
            lens = lens[:np.searchsorted(np.cumsum(lens), n * per)]
            lens.append(n * per - sum(lens))
            cases.append((n, causal, _cu(lens), per))
    got = run_world(WORLD, _counted, cases, timeout=300)
    hkv_width = 1 * (4 + 4)  # Hkv = 1, D = Dv = 4
    dense_bytes = sparse_bytes = 0
    for i, (n, causal, cu, per) in enumerate(cases):
        lay = packed_layout(cu, n, causal)
        mask = document_mask(cu.numpy(), causal=causal)
        for x in range(n):
            plan = make_allgather_plan(cu, n, x, causal)
            (fs, fr, fx, fcalls), (bs, br, bx, bcalls) = got[x][i]["fwd"], got[x][i]["bwd"]
            what = (n, causal, x)
            shard_bytes = per * hkv_width
            seen = [mask[lay.positions(r)].any(axis=0) for r in range(n)]  # keys r's sees
            rows = [[int(seen[r][lay.positions(p)].sum()) for p in range(n)] for r in range(n)]
            received = sum(rows[x][p] for p in range(n) if p != x) * hkv_width
            sent = sum(rows[r][x] for r in range(n) if r != x) * hkv_width
            assert (fs, fr, fx) == (sent * 2, received * 2, int(n > 1)), what
            assert (bs, br, bx) == (received * 4, sent * 4, int(n > 1)), what
            assert (plan.rows_sent, plan.rows_received) == \
                (sent // hkv_width, received // hkv_width), what
            dense_bytes += 2 * (n - 1) * shard_bytes * (2 + 4)
            sparse_bytes += fs + fr + bs + br

            pairs = int(mask[lay.positions(x)].sum())
            assert fcalls == [("fwd", pairs, per, plan.keys)], what
            if causal:  # each segment against its own rows, then unmasked against the past
                lq = np.diff(plan.cu_q)
                own = int((lq * (lq + 1) // 2).sum())
                want = [("bwd", own, per, per)]
                if plan.past_keys:
                    want.append(("bwd", pairs - own, per, plan.past_keys))
                assert bcalls == want, what
                assert plan.past_keys == plan.keys - per, what
            else:
                assert bcalls == [("bwd", pairs, per, plan.keys)], what
            assert plan.pairs == pairs, what
    assert 0 < sparse_bytes < dense_bytes
    assert acc_dtype(torch.bfloat16) == torch.float32


# ---------------------------------------------------------------------------------------------
# NaN rows


def test_nan_in_a_key_makes_exactly_its_rows_nan():
    """One NaN in one key: exactly the query rows the document mask lets see it are NaN (out
    and lse), the others equal the float64 oracle; the gradients stay finite outside the key's
    document and equal the oracle's wherever that is finite (inside the document, where a
    masked 0 times NaN spreads it, the NaN pattern is the kernels'; the dense oracle's spreads
    to every document); the loss summed over the ranks is NaN."""
    from longattn.reference import attention, attention_backward, document_mask

    cases, masks, ats = [], [], []
    for n, causal, at in ((3, True, 11), (3, False, 4), (5, True, 20), (8, False, 30)):
        per = 6
        rng = np.random.default_rng(n + causal)
        lens = [int(x) for x in rng.integers(1, 4, size=n * per)] + [per + 2]
        rng.shuffle(lens)
        lens = lens[:np.searchsorted(np.cumsum(lens), n * per)]
        lens.append(n * per - sum(lens))
        cu = _cu(lens)
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, n * per, h, 8, generator=g, dtype=torch.float64)
                   for h in (4, 2, 2))
        k[0, at, 1, 3] = float("nan")
        dout = torch.randn(1, n * per, 4, 8, generator=g, dtype=torch.float64)
        cases.append((n, causal, cu, q, k, v, dout))
        masks.append(document_mask(cu.numpy(), causal=causal))
        ats.append(at)
    per_rank = run_world(WORLD, _packed._packed_rank, [c + (None,) for c in cases],
                         "allgather", timeout=300)
    for i, (n, causal, cu, q, k, v, dout) in enumerate(cases):
        got, losses = _packed._gathered(per_rank, i, n, causal, cu)
        args = [t.numpy() for t in (q, k, v)]
        out, lse = attention(*args, mask=masks[i])
        dq, dk, dv = attention_backward(dout.numpy(), *args, mask=masks[i])
        ref = {key: torch.from_numpy(a) for key, a in
               (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv))}
        sees = torch.from_numpy(masks[i][:, [c for c in range(n * per) if
                                             k[0, c].isnan().any()]].any(axis=1))
        assert sees.any() and not sees.all(), (n, causal)
        assert torch.equal(got["out"][0].isnan().any(-1).any(-1), sees), (n, causal)
        doc = int(np.searchsorted(cu.numpy(), ats[i], side="right")) - 1
        inside = torch.zeros(n * per, dtype=torch.bool)
        inside[int(cu[doc]):int(cu[doc + 1])] = True
        for key in ref:
            what = (n, causal, key)
            if key in ("out", "lse"):
                assert torch.equal(got[key].isnan(), ref[key].isnan()), what
            else:
                assert got[key][0, inside].isnan().any(), what
                assert not got[key][0, ~inside].isnan().any(), what
            fin = ~ref[key].isnan()
            assert torch.allclose(got[key][fin], ref[key][fin], rtol=1e-10, atol=1e-12), what
        assert np.isnan(sum(losses))


# ---------------------------------------------------------------------------------------------
# bad input: the same error on every rank, before any message

FAULTS = {  # name -> (error class, words, names the bad rank)
    "batch 2": (ValueError, ["cu_seqlens needs batch size 1"], True),
    "q and k lengths differ": (ValueError, ["cu_seqlens needs the same local length"], True),
    "cu_seqlens int64": (TypeError, ["cu_seqlens must be an int32 torch.Tensor"], True),
    "cu_seqlens wrong total": (ValueError, ["cu_seqlens must end at"], True),
    "cu_seqlens differs": (ValueError, ["cu_seqlens must be the same on every rank"], False),
    "cu_seqlens on one rank only": (ValueError, ["cu_seqlens must be the same on every rank"],
                                    False),
    "ulysses with cu_seqlens": (ValueError, ["cu_seqlens", "not served by schedule='ulysses'"],
                                True),
    "causal differs": (ValueError, ["causal must be the same on every rank"], False),
    "heads not divisible": (ValueError, ["q heads (3) must be a positive multiple"], True),
}


def _fault_call(rank, n, bad, fault):
    per, cu = 6, _cu([2, 1, 3 * n, 2 * n - 3] + [1] * (n * 6 - 5 * n))
    kw = {"causal": True, "schedule": "allgather", "cu_seqlens": cu}
    shapes = [(1, per, 4), (1, per, 2), (1, per, 2)]
    if bad:
        if fault == "batch 2":
            shapes = [(2, per, 4), (2, per, 2), (2, per, 2)]
        elif fault == "q and k lengths differ":
            shapes[1], shapes[2] = (1, per - 1, 2), (1, per - 1, 2)
        elif fault == "cu_seqlens int64":
            kw["cu_seqlens"] = cu.long()
        elif fault == "cu_seqlens wrong total":
            kw["cu_seqlens"] = torch.cat([cu[:-1], cu[-1:] + 1])
        elif fault == "cu_seqlens differs":
            kw["cu_seqlens"] = _cu([1] * (n * per))
        elif fault == "cu_seqlens on one rank only":
            kw["cu_seqlens"] = None
        elif fault == "ulysses with cu_seqlens":
            kw["schedule"] = "ulysses"
        elif fault == "causal differs":
            kw["causal"] = False
        elif fault == "heads not divisible":
            shapes[0] = (1, per, 3)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(b, s, h, 4, generator=g, dtype=torch.float64) for b, s, h in shapes)
    return hamilton_attn(q, k, v, group=_group(n), **kw)


def _inject(rank, world, n, bad_rank):
    _group(1)
    if rank >= n:
        return None
    res = {}
    for fault in FAULTS:
        with counting() as c:
            try:
                _fault_call(rank, n, rank == bad_rank, fault)
            except Exception as e:  # noqa: BLE001 - the test records whatever was raised
                res[fault] = (type(e).__name__, str(e), c.calls, c.bytes_sent)
            else:
                res[fault] = (None, "returned", c.calls, c.bytes_sent)
    return res, tuple(_fault_call(rank, n, False, None).shape)


@functools.cache
def _faults(n):
    return {bad: run_world(WORLD, _inject, n, bad, timeout=120) for bad in sorted({0, n - 1})}


@pytest.mark.faults
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("fault", list(FAULTS), ids=[f.replace(" ", "_") for f in FAULTS])
def test_bad_input_raises_on_every_rank_before_any_message(fault, n):
    cls, words, names_rank = FAULTS[fault]
    for bad, per_rank in _faults(n).items():
        got = {per_rank[r][0][fault] for r in range(n)}
        assert len(got) == 1, (bad, got)  # the same error on every rank, and no message
        name, msg, exchanges, sent = got.pop()
        assert (name, exchanges, sent) == (cls.__name__, 0, 0), (bad, name, msg)
        assert all(w in msg for w in words), msg
        if names_rank:
            assert f"bad argument on rank(s) [{bad}]" in msg, msg
        assert all(per_rank[r][1] == (1, 6, 4, 4) for r in range(n))  # still works after


# ---------------------------------------------------------------------------------------------
# the benchmark's CPU path


def test_bench_smoke_allgather(tmp_path, capsys):
    """bench_packed.py --smoke --schedule allgather: the simulated 4-rank run matches the
    oracle, every rank's timings land in the JSON, and the layout line gives both strategies'
    counts."""

    mod = _bench_module("bench_packed_allgather")
    mod.main(["--smoke", "--schedule", "allgather", "--out", str(tmp_path)])
    data = _packed.check_bench_smoke(tmp_path)
    out = capsys.readouterr().out
    assert "efficiency fwd+bwd" in out
    assert "allgather per rank (calls/(segment, step) pairs with keys/128x128 tiles/query " \
        "rows): r0 1/" in out and "multi_ring per rank" in out
    counts = [r for r in data if r["what"] == "packed plan counts"][0]["extra"]["counts"]
    assert [c["query_rows"] for c in counts["allgather"]] == [48] * 4
    assert all(c["kernel_calls"] == 1 for c in counts["allgather"])


def test_bench_smoke_both_strategies(tmp_path):
    """--schedule tasp,allgather: both checked and timed in one run, names tagged."""
    import json

    mod = _bench_module("bench_packed_both")
    mod.main(["--smoke", "--schedule", "tasp,allgather", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_packed.json").read_text())
    for name in ("multi_ring", "allgather"):
        check = [r for r in data if r["what"] == f"packed correctness [auto] {name}"]
        assert check and check[0]["extra"]["ok"], (name, check)
        timed = {r["what"]: r["extra"]["schedule"] for r in data if r["median_ms"] is not None}
        for rank in range(4):
            assert timed[f"packed fwd+bwd rank{rank} +merge {name}"] == name, timed
    # the tile bound: the one-call baseline's tiles (the document mask's, counted by brute
    # force) / 4 over the worst rank's tiles
    from longattn.reference import document_mask

    plan = [r for r in data if r["what"] == "packed plan counts"][0]["extra"]
    lens = plan["documents"]
    mask = document_mask(_cu(lens).numpy(), causal=plan["causal"])
    base = sum(_tiles_brute(mask[a:b, a:b], TILE) for a, b in zip(
        np.cumsum([0] + lens[:-1]), np.cumsum(lens)))
    assert plan["baseline_tiles"] == base
    for label, cs in plan["counts"].items():
        want = min(base / 4 / c[f"tiles{TILE}"] for c in cs)
        assert plan["tile_bounds"][label] == pytest.approx(want, rel=1e-12), label
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--schedule", "tasp,zigzag"])


def test_bench_plan_only_writes_the_counts_and_bounds_without_timing(tmp_path):
    """--plan-only (no GPU needed): the layout's plans, counts and tile bounds, nothing timed."""
    import json

    mod = _bench_module("bench_packed_plan_only")
    mod.main(["--plan-only", "--schedule", "tasp,allgather", "--ranks", "4", "--tokens", "512",
              "--min-doc", "16", "--max-doc", "700", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_packed.json").read_text())
    assert [r["what"] for r in data] == ["packed plan counts"]
    extra = data[0]["extra"]
    assert set(extra["tile_bounds"]) == {"multi_ring", "allgather"}
    assert all(0 < b <= 1 for b in extra["tile_bounds"].values())
    assert all(c["kernel_calls"] == 1 for c in extra["counts"]["allgather"])


def test_profile_cases_run_on_the_cpu():
    """common/bench/profile_kernels.py's packed-allgather, packed-baseline and cudnn alignment
    closures (GPU configurations there), at a tiny size on the CPU: each builds and runs
    once."""
    from pathlib import Path

    from longattn.common.testing import load_script

    mod = load_script(Path(__file__).resolve().parents[2] / "common" / "bench" /
                      "profile_kernels.py", "profile_kernels_packed")
    for kind in ("allgather", "baseline"):
        fn = mod.packed_case(kind, device="cpu", n=3, tokens=16, heads=2, dim=8, min_doc=1,
                             max_doc=20, backend="auto")
        assert fn() is None
    for bottom_right in (False, True):
        assert mod.alignment_case(bottom_right, device="cpu", s=40, heads=2, dim=8,
                                  backend="auto")() is None


def test_bench_pool_shares_its_buffers():
    """bench_packed.Pool: requests under one name share one buffer (views of its start), a
    larger request gets a larger buffer (earlier views keep theirs), names, row shapes and
    dtypes are kept apart, zeros are zeros and keep copies."""
    pool = _bench_module("bench_packed_pool").Pool("cpu")
    a = pool.rand("x", 4, 3, dtype=torch.float32)
    b = pool.rand("x", 2, 3, dtype=torch.float32)
    assert b.data_ptr() == a.data_ptr() and torch.equal(b, a[:2]) and a.std() > 0
    c = pool.rand("x", 10, 3, dtype=torch.float32)
    assert c.shape == (10, 3) and c.data_ptr() != a.data_ptr() and a.shape == (4, 3)
    assert pool.rand("y", 2, 3, dtype=torch.float32).data_ptr() != c.data_ptr()
    assert pool.rand("x", 2, 4, dtype=torch.float32).data_ptr() != c.data_ptr()
    assert pool.rand("x", 2, 3, dtype=torch.float64).dtype == torch.float64
    assert torch.count_nonzero(pool.zeros("z", 5, 2, dtype=torch.float32)) == 0
    t = torch.randn(3, 2)
    kept = pool.keep("k", t)
    assert torch.equal(kept, t) and kept.data_ptr() != t.data_ptr()
