"""Packed documents (``cu_seqlens``) in hamilton_attn, shard and unshard, every schedule.

One gloo world of 8 ranks serves every distributed test: groups of 1 to 8 ranks are
subgroups of it (``new_group`` of the first n ranks, made once per world), so the cases of all
group sizes share one world start-up. The float64 oracle is ``longattn.reference.attention``
with ``longattn.reference.document_mask``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.common.comm import counting
from longattn.common.dtypes import lse_dtype
from longattn.common.testing import readme_python_blocks, run_world
from longattn.hamilton import (
    hamilton_attn,
    make_packed_plan,
    multi_ring_schedule,
    packed_layout,
    pad_packed,
    ring_schedule,
    shard,
    two_level_schedule,
    unpad_packed,
    unshard,
)
from longattn.hamilton import packed_attn as _packed_attn
from longattn.hamilton.packing import MAX_CHUNKS_PER_RANK, TOLERANCE
from longattn.hamilton.schedules import origins

WORLD = 8
_GROUPS: dict = {}


def _group(n):
    """The group of the first ``n`` ranks of the 8-rank world (every rank makes all of them,
    in the same order, on first use)."""
    if not _GROUPS:
        for m in range(1, WORLD):
            _GROUPS[m] = tdist.new_group(list(range(m)))
        _GROUPS[WORLD] = tdist.group.WORLD
    return _GROUPS[n]


def _schedules(n):
    out = [("ring",), ("tasp",)]
    out += [("two_level", u, n // u) for u in range(2, n) if n % u == 0 and (n // u) % 2 == 0]
    return out + [("allgather",)]


def _schedule(spec, n):
    if spec[0] == "two_level":
        return two_level_schedule(spec[1], spec[2])
    if spec[0] == "allgather":
        return "allgather"
    return ring_schedule(n) if spec[0] == "ring" else multi_ring_schedule(n)


def draw_lengths(rng, total, per_rank):
    """Document lengths summing to ``total``: one document longer than a rank's share (when
    the total allows), the rest 1 to 5 tokens with many 1-token documents, shuffled."""
    lens = []
    if total > per_rank + 1:
        lens.append(int(rng.integers(per_rank + 1, min(total, 2 * per_rank + 2))))
    while sum(lens) < total:
        lens.append(int(min(total - sum(lens), 1 if rng.random() < 0.4 else rng.integers(2, 6))))
    rng.shuffle(lens)
    return lens


def _cu(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# the oracle and one case


def make_case(n, causal, spec, dtype, seed, per_rank, shape=(4, 2, 8, 6), scale=None,
              lens=None):
    """A packed problem on ``n`` ranks with its float64 oracle (computed here, once); the
    document lengths ``lens`` (summing to ``n * per_rank``), else drawn from ``seed``."""
    from longattn.reference import attention, attention_backward, document_mask

    rng = np.random.default_rng(seed)
    total = n * per_rank
    cu = _cu(draw_lengths(rng, total, per_rank) if lens is None else lens)
    assert int(cu[-1]) == total, (lens, n, per_rank)
    hq, hkv, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, total, h, e, generator=g, dtype=torch.float64).to(dtype).double()
               for h, e in ((hq, d), (hkv, d), (hkv, dv)))
    dout = torch.randn(1, total, hq, dv, generator=g, dtype=torch.float64)
    dlse = torch.randn(1, hq, total, generator=g, dtype=torch.float64)
    mask = document_mask(cu.numpy(), causal=causal)
    args = [t.numpy() for t in (q, k, v)]
    out, lse = attention(*args, mask=mask, scale=scale)
    dq, dk, dv_ = attention_backward(dout.numpy(), *args, mask=mask, scale=scale,
                                     dlse=dlse.numpy())
    ref = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv_}
    return {"n": n, "causal": causal, "spec": spec, "dtype": dtype, "scale": scale, "cu": cu,
            "inputs": (q, k, v, dout, dlse),
            "ref": {key: torch.from_numpy(x) for key, x in ref.items()}}


def run_case(rank, case, group):
    """This rank's out, lse, dq, dk, dv (and, on rank 0, the all-gathered out)."""
    n, causal, cu, dtype = case["n"], case["causal"], case["cu"], case["dtype"]
    q, k, v, dout, dlse = case["inputs"]

    def loc(x, dim=1):
        return shard(x, group=group, causal=causal, dim=dim, cu_seqlens=cu)

    ql, kl, vl = (loc(t).to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = hamilton_attn(ql, kl, vl, group=group, causal=causal,
                             softmax_scale=case["scale"], schedule=_schedule(case["spec"], n),
                             return_lse=True, cu_seqlens=cu)
    assert out.dtype == dtype and lse.dtype == lse_dtype(dtype)
    loss = (out.double() * loc(dout)).sum() + (lse.double() * loc(dlse, 2)).sum()
    loss.backward()
    assert (ql.grad.dtype, kl.grad.dtype, vl.grad.dtype) == (dtype,) * 3
    full = unshard(out.detach(), group=group, causal=causal, cu_seqlens=cu)
    got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    return {key: t.detach() for key, t in got.items()}, (full if rank == 0 else None)


def _run_cases(rank, world, cases):
    _group(1)
    res = []
    for case in cases:
        n = case["n"]
        res.append(run_case(rank, case, _group(n)) if rank < n else None)
    return res


def _errors(case, parts):
    """Relative errors of the gathered (list-form unshard) results against the oracle."""
    from longattn.common.testing import oracle_errors

    causal, cu = case["causal"], case["cu"]
    got = {key: unshard([p[key].double() for p in parts], causal=causal, cu_seqlens=cu,
                        dim=2 if key == "lse" else 1) for key in parts[0]}
    return oracle_errors(got, case["ref"]), got["out"]


def _check_cases(cases, tol):
    """Every case within ``tol``; returns the largest error of each quantity."""
    per_rank = run_world(WORLD, _run_cases, cases, timeout=600)
    worst: dict = {}
    for i, case in enumerate(cases):
        n = case["n"]
        parts = [per_rank[r][i][0] for r in range(n)]
        errs, full = _errors(case, parts)
        what = (n, case["spec"], case["causal"], case["dtype"], case["cu"].tolist())
        assert max(errs.values()) <= tol, f"{what}: {errs}"
        assert torch.equal(per_rank[0][i][1].double(), full), what  # collective unshard
        for key, e in errs.items():
            worst[key] = max(worst.get(key, 0.0), e)
    return worst


@functools.cache
def _fp64_cases():
    cases = []
    for n in range(1, WORLD + 1):
        for j, spec in enumerate(_schedules(n)):
            causal = (n + j) % 2 == 0  # each group size and each schedule both ways
            seed = 1000 * n + 10 * j
            cases.append(make_case(n, causal, spec, torch.float64, seed, 5 + seed % 4,
                                   scale=None if j % 2 else 0.3))
    return cases


def test_fp64_matches_oracle_every_group_size_and_schedule():
    """Groups of 1..8 ranks, every schedule that fits (ring, TASP, two-level, all-gather),
    causal and full alternating so that each group size and each schedule runs both, GQA 4:2
    with Dv != D, random documents with 1-token ones and one longer than a rank's share,
    gradients through out and lse: relative error <= 1e-10 (28 cases in one world run)."""
    _check_cases(_fp64_cases(), 1e-10)


def test_bf16_within_tolerance():
    cases = [make_case(n, causal, ("tasp",), torch.bfloat16, 7 + n + causal, 24,
                       shape=(4, 2, 16, 16))
             for n in (3, 8) for causal in (False, True)]
    _check_cases(cases, 2e-2)


def test_one_process_matches_oracle():
    """group=None without torch.distributed: one varlen call over the whole sequence."""
    for causal in (False, True):
        case = make_case(1, causal, ("ring",), torch.float64, 5 + causal, 30)
        errs, _ = _errors(case, [run_case(0, case, None)[0]])
        assert max(errs.values()) <= 1e-10, errs


# ---------------------------------------------------------------------------------------------
# what is sent and computed: exactly the blocks with visible entries


def expected_traffic(cu, n, causal, sched):
    """Per rank, from the document mask alone: KV rows received per step (visible rows of each
    (origin, slot) block the schedule gives it), blocks given / with visible rows, rows sent,
    and the (query, key) pairs of its queries."""
    from longattn.reference import document_mask

    mask = document_mask(cu.numpy(), causal=causal)
    lay = packed_layout(cu, n, causal)
    pos = [lay.positions(r) for r in range(n)]
    per, k, o = cu[-1].item() // n, sched.num_slots, origins(sched)
    sees = [mask[pos[x]].any(axis=0) for x in range(n)]  # [total]: a key x's queries see
    out = []
    for x in range(n):
        recv, sent, blocks, live = [], 0, 0, 0
        for s in range(1, n):
            rows = 0
            for c in range(k):
                sl = slice(c * per // k, (c + 1) * per // k)
                vis = int(sees[x][pos[int(o[s, c, x])][sl]].sum())
                blocks += sl.stop > sl.start
                live += vis > 0
                rows += vis
                h = int(np.flatnonzero(o[s, c] == x)[0])
                sent += int(sees[h][pos[x][sl]].sum())
            recv.append(rows)
        out.append({"recv": recv, "sent": sent, "blocks": blocks, "live": live,
                    "pairs": int(mask[pos[x]].sum())})
    return out


def _pairs(cu_q, cu_k, causal):
    lq, lk = np.diff(cu_q.tolist()), np.diff(cu_k.tolist())
    if causal:
        return int(np.sum(lq * (lk - lq) + lq * (lq + 1) // 2))
    return int(np.sum(lq * lk))


def _counted(rank, world, cases):
    """Bytes sent per direction and the varlen calls (their number and pairs), forward and
    backward, of every case (ranks outside a case's group return None)."""
    _group(1)
    calls = []
    fwd, bwd = _packed_attn.attention_forward_varlen, _packed_attn.attention_backward_varlen

    def count_fwd(q, k, v, cq, ck, **kw):
        calls.append(("fwd", _pairs(cq, ck, kw["causal"])))
        return fwd(q, k, v, cq, ck, **kw)

    def count_bwd(do, q, k, v, o, lse, cq, ck, **kw):
        calls.append(("bwd", _pairs(cq, ck, kw["causal"])))
        return bwd(do, q, k, v, o, lse, cq, ck, **kw)

    _packed_attn.attention_forward_varlen = count_fwd
    _packed_attn.attention_backward_varlen = count_bwd
    try:
        return [_count_one(rank, case, calls) if rank < case[0] else None for case in cases]
    finally:
        _packed_attn.attention_forward_varlen, _packed_attn.attention_backward_varlen = fwd, bwd


def _count_one(rank, case, calls):
    n, causal, cu, spec, per = case
    group = _group(n)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, per, h, 4, generator=g, dtype=torch.float64).requires_grad_()
               for h in (2, 1, 1))
    calls.clear()
    with counting() as cf:
        out = hamilton_attn(q, k, v, group=group, causal=causal, schedule=_schedule(spec, n),
                            cu_seqlens=cu)
    fwd_calls = list(calls)
    calls.clear()
    with counting() as cb:
        out.sum().backward()
    return {"fwd": (cf.bytes_sent, cf.bytes_received, fwd_calls),
            "bwd": (cb.bytes_sent, cb.bytes_received, list(calls))}


def test_traffic_is_exactly_the_visible_blocks():
    """Many short documents: every byte sent and every kernel call (and the (query, key)
    pairs it computes) are those of blocks with visible entries, exactly as the document mask
    says; the plan's counts agree; fewer bytes than dense context parallelism."""
    rng = np.random.default_rng(3)
    cases = []
    for n, spec in ((3, ("tasp",)), (4, ("ring",)), (4, ("two_level", 2, 2)), (8, ("tasp",))):
        for causal in (False, True):
            per = 24
            lens = [int(x) for x in rng.integers(1, 7, size=n * per)]
            lens = lens[:np.searchsorted(np.cumsum(lens), n * per)]
            lens.append(n * per - sum(lens))
            cases.append((n, causal, _cu(lens), spec, per))
    got = run_world(WORLD, _counted, cases, timeout=300)
    row = 8 * (1 * 4 + 1 * 4)  # float64 K and V of Hkv = 1, D = 4
    skipped = 0
    for i, (n, causal, cu, spec, per) in enumerate(cases):
        sched = _schedule(spec, n)
        exp = expected_traffic(cu, n, causal, sched)
        for x in range(n):
            e, plan = exp[x], make_packed_plan(cu, n, x, causal, sched)
            (fs, fr, fcalls), (bs, br, bcalls) = got[x][i]["fwd"], got[x][i]["bwd"]
            what = (n, spec, causal, x)
            assert fr == sum(e["recv"]) * row and fs == e["sent"] * row, what
            assert fr < (n - 1) * per * row, what  # dense CP receives n - 1 whole blocks
            live_steps = sum(r > 0 for r in e["recv"])
            assert [c for c, _ in fcalls] == ["fwd"] * (1 + live_steps), what
            assert sum(p for _, p in fcalls) == e["pairs"], what
            assert sorted(p for _, p in bcalls) == sorted(p for _, p in fcalls), what
            # backward: the KV rows of steps 1..n-2 again, and every step's dK/dV rows (float64)
            assert br == (sum(e["recv"][:-1]) + e["sent"]) * row, what
            assert bs == (e["sent"] - _last_sent(exp, x, n, sched, cu, causal)
                          + sum(e["recv"])) * row, what
            assert (plan.blocks, plan.blocks_sent) == (e["blocks"], e["live"]), what
            assert plan.blocks_skipped == e["blocks"] - e["live"], what
            assert plan.kernel_calls == 1 + live_steps and plan.pairs == e["pairs"], what
            skipped += plan.blocks_skipped
    assert skipped > 0  # blocks were left out


def _last_sent(exp, x, n, sched, cu, causal):
    """Rows rank x sends at the last step (the backward keeps that step's buffer, so they are
    not sent again)."""
    if n < 2:
        return 0
    from longattn.reference import document_mask

    mask = document_mask(cu.numpy(), causal=causal)
    lay = packed_layout(cu, n, causal)
    pos = [lay.positions(r) for r in range(n)]
    per, k, o = cu[-1].item() // n, sched.num_slots, origins(sched)
    total = 0
    for c in range(k):
        h = int(np.flatnonzero(o[n - 1, c] == x)[0])
        sl = slice(c * per // k, (c + 1) * per // k)
        total += int(mask[pos[h]].any(axis=0)[pos[x][sl]].sum())
    return total


# ---------------------------------------------------------------------------------------------
# the layout and the plan, for any documents (one process)

SCHEDULES = ("ring", "tasp", "two_level")


@st.composite
def packed_problems(draw):
    n = draw(st.integers(1, 8))
    lens = draw(st.lists(st.integers(1, 12), min_size=1, max_size=30))
    total = sum(lens)
    if total % n:
        lens.append(n - total % n)
    return n, lens, draw(st.booleans()), draw(st.sampled_from(SCHEDULES))


@settings(max_examples=60, deadline=None)
@given(packed_problems())
def test_layout_and_plan_match_the_document_mask(problem):
    n, lens, causal, name = problem
    cu = _cu(lens)
    total = int(cu[-1])
    lay = packed_layout(cu, n, causal)
    pos = [lay.positions(r) for r in range(n)]
    assert sorted(np.concatenate(pos).tolist()) == list(range(total))
    assert all(len(p) == total // n for p in pos)
    m = lay.chunks_per_rank
    assert m <= MAX_CHUNKS_PER_RANK and (total // n) % m == 0
    from longattn.hamilton.packing import token_work

    w = token_work(tuple(cu.tolist()), causal)
    loads = [int(w[p].sum()) for p in pos]
    assert lay.imbalance == pytest.approx(max(loads) / (sum(loads) / n) - 1)
    if name == "two_level" and n % 4:
        name = "tasp"
    sched = two_level_schedule(2, n // 2) if name == "two_level" else _schedule((name,), n)
    exp = expected_traffic(cu, n, causal, sched)
    plans = [make_packed_plan(cu, n, x, causal, sched) for x in range(n)]
    for x, (plan, e) in enumerate(zip(plans, exp)):
        assert [st_.rows for st_ in plan.steps[1:]] == e["recv"]
        assert plan.rows_sent == e["sent"] and plan.pairs == e["pairs"]
        assert (plan.blocks, plan.blocks_sent) == (e["blocks"], e["live"])
        for s, step in enumerate(plan.steps[1:], 1):  # both ends of every message agree
            for h, idx in step.sends:
                assert (x, len(idx)) in [(o_, r) for o_, r, _ in plans[h].steps[s].recvs]


def test_one_causal_document_is_the_zigzag_layout():
    for n in (2, 3, 8):
        lay = packed_layout(_cu([4 * n]), n, True)
        assert lay.chunks_per_rank == 2 and lay.imbalance == 0
        assert all(lay.chunks_of(r) == [r, 2 * n - 1 - r] for r in range(n))
        assert packed_layout(_cu([4 * n]), n, False).chunks_per_rank == 1  # contiguous


def test_skewed_documents_are_balanced():
    """Documents of 1k-32k tokens (the benchmark's draw) on 8 ranks: within the tolerance."""
    rng = np.random.default_rng(0)
    total, lens = 8 * 32768, []
    while sum(lens) < total:
        lens.append(min(total - sum(lens), 1024 * int(rng.integers(1, 33))))
    for causal in (False, True):
        lay = packed_layout(_cu(lens), 8, causal)
        assert lay.imbalance <= TOLERANCE, (causal, lay.imbalance, lay.chunks_per_rank)


def test_pad_packed_round_trip():
    x = torch.randn(1, 13, 2, 4, dtype=torch.float64)
    xp, cup = pad_packed(x, _cu([5, 1, 7]), 8)
    assert xp.shape[1] == 16 and cup.tolist() == [0, 5, 6, 13, 14, 15, 16]
    assert torch.equal(unpad_packed(xp, 13), x) and not xp[:, 13:].any()
    out = hamilton_attn(xp, xp[:, :, :1], xp[:, :, :1], causal=True, cu_seqlens=cup)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# bad cu_seqlens: every rank raises the same error, naming cu_seqlens, before any message

def _bad_cu(kind, cu):
    return {"int64": cu.long(), "list": cu.tolist(), "2-d": cu[None],
            "not from 0": cu + 1, "decreasing": cu.flip(0),
            "wrong total": torch.cat([cu[:-1], cu[-1:] + 1]),
            "differs": torch.tensor([0, 1] + cu[1:].tolist(), dtype=torch.int32)}[kind]


CU_FAULTS = {  # kind -> (error class, words, names the bad rank)
    "int64": (TypeError, ["cu_seqlens must be an int32 torch.Tensor"], True),
    "list": (TypeError, ["cu_seqlens must be an int32 torch.Tensor"], True),
    "2-d": (ValueError, ["cu_seqlens must be 1-d"], True),
    "not from 0": (ValueError, ["cu_seqlens must"], True),
    "decreasing": (ValueError, ["cu_seqlens must"], True),
    "wrong total": (ValueError, ["cu_seqlens must end at"], True),
    "differs": (ValueError, ["cu_seqlens must be the same on every rank"], False),
}
ENTRIES = ("hamilton_attn", "hamilton_attn allgather", "shard", "unshard")


def _entry_call(entry, n, group, cu):
    per = 6
    x = torch.arange(n * per * 4, dtype=torch.float64).reshape(1, n * per, 4, 1)
    if entry == "shard":
        return shard(x, group=group, causal=True, cu_seqlens=cu)
    part = x[:, :per]
    if entry == "unshard":
        return unshard(part, group=group, causal=True, cu_seqlens=cu)
    schedule = "allgather" if entry.endswith("allgather") else "auto"
    return hamilton_attn(part, part, part, group=group, causal=True, schedule=schedule,
                         cu_seqlens=cu)


def _inject(rank, world, n, bad_rank):
    _group(1)
    if rank >= n:
        return None
    group, cu = _group(n), _cu([2, 1] * (2 * n))
    res = {}
    for entry in ENTRIES:
        for kind in CU_FAULTS:
            try:
                _entry_call(entry, n, group, _bad_cu(kind, cu) if rank == bad_rank else cu)
            except Exception as e:  # noqa: BLE001 - the test records whatever was raised
                res[(entry, kind)] = (type(e).__name__, str(e))
            else:
                res[(entry, kind)] = (None, "returned")
    good = [tuple(_entry_call(entry, n, group, cu).shape) for entry in ENTRIES]
    return res, good


@functools.cache
def _faults(n):
    return {bad: run_world(WORLD, _inject, n, bad, timeout=120) for bad in sorted({0, n - 1})}


@pytest.mark.faults
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("kind", list(CU_FAULTS))
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_cu_seqlens_on_one_rank(entry, kind, n):
    cls, words, names_rank = CU_FAULTS[kind]
    for bad, per_rank in _faults(n).items():
        got = {per_rank[r][0][(entry, kind)] for r in range(n)}
        assert len(got) == 1, (bad, got)  # the same error on every rank
        name, msg = got.pop()
        assert name == cls.__name__, (bad, name, msg)
        assert all(w in msg for w in words), msg
        if names_rank:
            assert f"bad argument on rank(s) [{bad}]" in msg, msg
        assert all(per_rank[r][1] == per_rank[0][1] for r in range(n))  # still works after


def test_bad_packed_calls_name_cu_seqlens():
    x = torch.randn(2, 8, 2, 4, dtype=torch.float64)
    cu = _cu([3, 5])
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        hamilton_attn(x, x, x, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens needs the same local length"):
        hamilton_attn(x[:1], x[:1, :4], x[:1, :4], cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must be divisible by the group size 3"):
        packed_layout(cu, 3, True)
    with pytest.raises(ValueError, match="pad_packed"):
        packed_layout(cu, 3, False)


# ---------------------------------------------------------------------------------------------
# the README's packed quick start, and the benchmark's CPU path

README = Path(__file__).resolve().parents[1] / "README.md"


def _packed_quick_start():
    blocks = readme_python_blocks(README, "Packed documents")
    assert len(blocks) == 1, "the packed-documents section holds one python block"
    return blocks[0]


def _exec(code):
    ns: dict = {"__name__": "__main__"}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own README
    return ns


def _quick_start_on_rank(rank, world, code):
    ns = _exec(code)
    return tuple(ns["out"].shape), tuple(ns["full"].shape), ns["ql"].grad is not None


def test_readme_packed_quick_start():
    assert not tdist.is_initialized()
    ns = _exec(_packed_quick_start())
    assert ns["group"] is None and ns["full"].shape == (1, 96, 8, 32)
    for out_shape, full_shape, has_grad in run_world(WORLD, _quick_start_on_rank,
                                                     _packed_quick_start()):
        assert out_shape == (1, 96 // WORLD, 8, 32) and full_shape == (1, 96, 8, 32)
        assert has_grad


def _bench_module(name):
    """hamilton/bench/bench_packed.py loaded as module ``name``."""
    from longattn.common.testing import load_script

    return load_script(Path(__file__).resolve().parents[1] / "bench" / "bench_packed.py", name)


def test_bench_smoke(tmp_path, capsys):
    """bench_packed.py --smoke: the simulated 4-rank run matches the oracle and every rank's
    timings land in the JSON."""

    mod = _bench_module("bench_packed")
    mod.main(["--smoke", "--out", str(tmp_path)])
    check_bench_smoke(tmp_path)
    assert "efficiency fwd+bwd" in capsys.readouterr().out


def check_bench_smoke(out_dir):
    """bench_packed.json of a --smoke run: the correctness row passed and every rank's
    sequences were timed. Returns the rows."""
    import json

    data = json.loads((out_dir / "bench_packed.json").read_text())
    check = [r for r in data if r["what"] == "packed correctness [auto]"]
    assert check and check[0]["extra"]["ok"], check
    timed = {r["what"] for r in data if r["median_ms"] is not None}
    for rank in range(4):
        for mode in ("calls", "+merge"):
            assert f"packed fwd+bwd rank{rank} {mode}" in timed, timed
    return data


# ---------------------------------------------------------------------------------------------
# NaN rows and large logits


def _packed_rank(rank, world, cases, schedule="auto"):
    """Per case, this rank's out, lse and (if the case asks) gradients; None outside the
    group."""
    _group(1)
    res = []
    for n, causal, cu, q, k, v, dout, scale in cases:
        if rank >= n:
            res.append(None)
            continue
        group = _group(n)
        ql, kl, vl = (shard(t, group=group, causal=causal, cu_seqlens=cu).requires_grad_()
                      for t in (q, k, v))
        out, lse = hamilton_attn(ql, kl, vl, group=group, causal=causal, softmax_scale=scale,
                                 return_lse=True, schedule=schedule, cu_seqlens=cu)
        loss = (out * shard(dout, group=group, causal=causal, cu_seqlens=cu)).sum()
        loss.backward()
        res.append({"out": out.detach(), "lse": lse.detach(), "dq": ql.grad, "dk": kl.grad,
                    "dv": vl.grad, "loss": float(loss)})
    return res


def _gathered(per_rank, i, n, causal, cu):
    parts = [per_rank[r][i] for r in range(n)]
    return {key: unshard([p[key] for p in parts], causal=causal, cu_seqlens=cu,
                         dim=2 if key == "lse" else 1) for key in ("out", "lse", "dq", "dk", "dv")
            }, [p["loss"] for p in parts]


def test_nan_rows_follow_the_document_mask():
    """One NaN in q or k: exactly the rows the document mask lets see it are NaN (out and lse),
    the others equal the float64 oracle, and the loss summed over the ranks is NaN."""
    from longattn.reference import attention, document_mask

    cases, meta = [], []
    for n, causal, which in ((3, True, "q"), (3, False, "k"), (4, True, "k"), (4, False, "q")):
        per = 8
        cu = _cu(draw_lengths(np.random.default_rng(n), n * per, per))
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, n * per, h, 8, generator=g, dtype=torch.float64)
                   for h in (4, 2, 2))
        {"q": q, "k": k}[which][0, n * per // 2, 1, 3] = float("nan")
        dout = torch.randn(1, n * per, 4, 8, generator=g, dtype=torch.float64)
        cases.append((n, causal, cu, q, k, v, dout, None))
        meta.append(document_mask(cu.numpy(), causal=causal))
    per_rank = run_world(WORLD, _packed_rank, cases, timeout=300)
    for i, (n, causal, cu, q, k, v, _, _) in enumerate(cases):
        got, losses = _gathered(per_rank, i, n, causal, cu)
        ref_out, ref_lse = attention(*(t.numpy() for t in (q, k, v)), mask=meta[i])
        ref_out, ref_lse = torch.from_numpy(ref_out), torch.from_numpy(ref_lse)
        assert torch.equal(got["out"].isnan(), ref_out.isnan()), (n, causal)
        assert torch.equal(got["lse"].isnan(), ref_lse.isnan()), (n, causal)
        assert ref_lse.isnan().any() and not ref_lse.isnan().all()
        fin = ~ref_out.isnan()
        assert torch.allclose(got["out"][fin], ref_out[fin], rtol=1e-10, atol=1e-12)
        assert np.isnan(sum(losses))


def test_large_logits_within_1e5():
    """float32 inputs with scores near 1e4 (exact in float32, softmax_scale=1): out, lse and
    gradients within 1e-5 of float64 attention with the document mask (the lse accumulators
    are float64 for float32 inputs)."""
    from longattn.common.testing import large_logit_qkv, rel_error
    from longattn.reference import attention, attention_backward, document_mask

    cases = []
    for n, causal in ((4, True), (4, False)):
        per = 12
        cu = _cu(draw_lengths(np.random.default_rng(11 + causal), n * per, per))
        q, k, v = large_logit_qkv(1, n * per, n * per, 4, 2, 16, logit=1e4, seed=3 + causal)
        dout = torch.randn(1, n * per, 4, 16, generator=torch.Generator().manual_seed(2))
        cases.append((n, causal, cu, q, k, v, dout, 1.0))
    per_rank = run_world(WORLD, _packed_rank, cases, timeout=300)
    for i, (n, causal, cu, q, k, v, dout, _) in enumerate(cases):
        got, _ = _gathered(per_rank, i, n, causal, cu)
        mask = document_mask(cu.numpy(), causal=causal)
        args = [t.double().numpy() for t in (q, k, v)]
        out, lse = attention(*args, mask=mask, scale=1.0)
        dq, dk, dv = attention_backward(dout.double().numpy(), *args, mask=mask, scale=1.0)
        ref = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
        errs = {key: rel_error(got[key], ref[key]) for key in ref}
        assert max(errs.values()) <= 1e-5, (causal, errs)
        assert got["lse"].dtype == torch.float64
