"""Distributed dilated attention (LongNet section 3.1) on gloo worlds of 1..8 ranks.

One 8-rank world serves every world size n through the subgroup of ranks 0..n-1 (so group
ranks and global ranks are both exercised, and only one world has to start). Each case checks
forward and backward against the single-process result and counts the bytes exchanged: the
forward receives exactly the sparsified K/V of the other ranks its segments need (computed
here independently, from the oracle's per-branch masks), and the backward sends exactly that
much back.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from longattn.common import comm
from longattn.common.dist import LOCAL
from longattn.common.testing import rel_error, run_world
from longattn.dilated import dilated_attention
from longattn.reference.dilated import dilated_masks

_GROUPS = {}


def _subgroup(n):
    """Group of ranks 0..n-1; every rank of the world must call this in the same order."""
    if n not in _GROUPS:
        _GROUPS[n] = dist.new_group(list(range(n)))
    return _GROUPS[n]


def _expected_bytes(rank, n, l, hq, hkv, seg, rates, causal, b, d, dv, itemsize):
    """Bytes of the sparsified K/V rows (position, kv head) outside this rank's chunk that its
    queries attend to, per branch (one copy per branch, as section 3.1 all-gathers per branch)."""
    s = n * l
    m = dilated_masks(s, hq, seg, rates, causal=causal)  # [nb, H, S, S]
    lo, hi = rank * l, rank * l + l
    total = 0
    g = hq // hkv
    for mb in m:
        need = set()
        for h in range(hq):
            js = np.nonzero(mb[h, lo:hi].any(axis=0))[0]
            need |= {(j, h // g) for j in js if not lo <= j < hi}
        total += len(need)
    return total * b * (d + dv) * itemsize


# (segments, rates, l, Hq, Hkv): aligned powers of two, misaligned, and longer than S
CASES = [
    ((4, 16, 32), (1, 2, 4), 8, 4, 4),
    ((3, 10, 24), (1, 2, 3), 7, 6, 2),     # GQA 3 with r = 2: uneven kv groups
    ((2, 6, 100), (1, 3, 4), 5, 4, 1),
    ((8, 16), (2, 4), 6, 3, 3),             # no r = 1: uncovered rows
    ((4,), (2,), 1, 1, 1),                  # every other rank keeps no row and makes no call
]


def _run_cases(rank, world, sizes):
    out = []
    for n in sizes:
        group = _subgroup(n)
        if rank >= n:
            continue
        for ci, (seg, rates, l, hq, hkv) in enumerate(CASES):
            for causal in (False, True):
                b, d, dv = 2, 4, 3
                gen = torch.Generator().manual_seed(1000 * n + 10 * ci + causal)
                s = n * l
                mk = lambda *sh: torch.randn(*sh, generator=gen, dtype=torch.float64)  # noqa
                q, k, v, dout = mk(b, s, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, dv), mk(
                    b, s, hq, dv)
                full = [t.clone().requires_grad_() for t in (q, k, v)]
                o = dilated_attention(*full, seg, rates, causal=causal, group=LOCAL)
                (o * dout).sum().backward()
                sl = slice(rank * l, rank * l + l)
                loc = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
                with comm.counting() as cf:
                    ol, lse = dilated_attention(*loc, seg, rates, causal=causal, group=group,
                                                return_lse=True)
                with comm.counting() as cb:
                    (ol * dout[:, sl]).sum().backward()
                _, lse_full = dilated_attention(q, k, v, seg, rates, causal=causal,
                                                return_lse=True, group=LOCAL)
                errs = [rel_error(ol, o[:, sl]), rel_error(lse, lse_full[:, :, sl])]
                errs += [rel_error(a.grad, f.grad[:, sl]) for a, f in zip(loc, full)]
                want = _expected_bytes(rank, n, l, hq, hkv, seg, rates, causal, b, d, dv, 8)
                out.append(dict(n=n, case=ci, causal=causal, err=max(errs), want=want,
                                fwd_recv=cf.bytes_received, fwd_sent=cf.bytes_sent,
                                bwd_sent=cb.bytes_sent, bwd_recv=cb.bytes_received))
    return out


def test_distributed_equals_single_process_worlds_1_to_8():
    res = run_world(8, _run_cases, list(range(1, 9)), timeout=240)
    rows = [r for per_rank in res for r in per_rank]
    assert len(rows) == sum(n for n in range(1, 9)) * len(CASES) * 2
    worst = max(r["err"] for r in rows)
    assert worst <= 1e-10, worst
    for r in rows:
        assert r["fwd_recv"] == r["want"], r
        assert r["bwd_sent"] == r["want"], r  # gradients of exactly those rows go back
    for n in range(1, 9):
        for ci in range(len(CASES)):
            for causal in (False, True):
                sel = [r for r in rows if (r["n"], r["case"], r["causal"]) == (n, ci, causal)]
                assert sum(r["fwd_sent"] for r in sel) == sum(r["fwd_recv"] for r in sel)
                assert sum(r["bwd_recv"] for r in sel) == sum(r["bwd_sent"] for r in sel)
                if n == 1:
                    assert sel[0]["fwd_recv"] == 0
    # the long branches do communicate
    assert any(r["fwd_recv"] > 0 for r in rows)


def _bad_calls(rank, world):
    """Calls that are wrong on some ranks only: every rank must raise, none may hang."""
    group = _subgroup(world)
    good = torch.zeros(1, 6, 2, 4, dtype=torch.float64)
    wide = torch.zeros(1, 6, 3, 4, dtype=torch.float64)
    grad = good.clone().requires_grad_(rank == 0)
    cases = [  # (q, k, v, keyword arguments)
        # rank 1 has a different local length
        ((torch.zeros(1, 7 if rank == 1 else 6, 2, 4, dtype=torch.float64),) * 3, {}),
        # rank 2 passes float32 k (a local error there)
        ((good, good.float() if rank == 2 else good, good), {}),
        # every rank passes mismatched heads
        ((good, wide, wide), {}),
        # a different schedule on rank 0
        ((good, good, good), dict(segment_lengths=[4, 24] if rank == 0 else [4, 12])),
        # causal on rank 3 only
        ((good, good, good), dict(causal=rank == 3)),
        # softmax_scale on rank 1 only
        ((good, good, good), dict(softmax_scale=0.1 if rank == 1 else None)),
        # float32 everything on rank 2: consistent locally, not across ranks
        (((good.float(),) * 3 if rank == 2 else (good,) * 3), {}),
        # a gradient is needed on rank 0 only (its backward would wait for the others)
        ((grad, good, good), {}),
        # causal that is not a bool, on rank 4
        ((good, good, good), dict(causal="yes" if rank == 4 else True)),
        # a backend rank 1 does not know
        ((good, good, good), dict(backend="no_such_kernel" if rank == 1 else "auto")),
    ]
    msgs = []
    for (q, k, v), kw in cases:
        kw = dict(dict(segment_lengths=[4, 12], dilation_rates=[1, 2], causal=True), **kw)
        try:
            dilated_attention(q, k, v, group=group, **kw)
            msgs.append(None)
        except (ValueError, TypeError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
    return msgs


@pytest.mark.faults
def test_bad_call_raises_on_every_rank():
    res = run_world(8, _bad_calls, timeout=60)
    for msgs in res:
        assert all(m is not None for m in msgs), msgs
    expect = [
        ("ValueError", "q.shape must be the same on every rank"),
        ("TypeError", "dtypes differ"),
        ("ValueError", "heads"),
        ("ValueError", "segment_lengths must be the same on every rank"),
        ("ValueError", "causal must be the same on every rank"),
        ("ValueError", "softmax_scale must be the same on every rank"),
        ("ValueError", "dtype must be the same on every rank"),
        ("ValueError", "needs grad must be the same on every rank"),
        ("TypeError", "causal must be a bool"),
        ("ValueError", "backend"),
    ]
    for i, (cls, text) in enumerate(expect):
        for rank, msgs in enumerate(res):
            assert msgs[i].startswith(cls) and text in msgs[i], (i, rank, msgs[i])
        if i in (1, 2, 8, 9):  # a local error: the failing rank's message on every rank
            assert len({m[i] for m in res}) == 1
    assert "rank(s) [2]" in res[0][1] and "rank(s) [4]" in res[0][8]
    assert "rank(s) [1]" in res[0][9]


def _group_rule(rank, world):
    """The rule of group=None in a 2-rank world, LOCAL, and a 1-D DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from longattn.dilated import DilatedAttention, LongNetLM, MultiheadDilatedAttention

    seg, rates, l = (4, 8), (1, 2), 6
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2 * l, 2, 4, generator=gen, dtype=torch.float64)
               for _ in range(3))
    sl = slice(rank * l, rank * l + l)
    x = torch.randn(1, 2 * l, 8, generator=gen, dtype=torch.float64)
    out = {}
    calls = {
        "function": lambda g: dilated_attention(q[:, sl], k[:, sl], v[:, sl], seg, rates,
                                                causal=True, group=g),
        "DilatedAttention": lambda g: DilatedAttention(seg, rates, group=g)(
            q[:, sl], k[:, sl], v[:, sl], is_causal=True),
        "MultiheadDilatedAttention": lambda g: MultiheadDilatedAttention(
            8, 2, seg, rates, dtype=torch.float64, pos_emb="rotary", group=g)(
            x[:, sl], x[:, sl], x[:, sl], is_causal=True)[0],
        "LongNetLM": lambda g: LongNetLM(10, d_model=8, nhead=2, num_decoder_layers=1,
                                         dim_feedforward=8, segment_lengths=seg,
                                         dilation_rates=rates, group=g)(
            torch.zeros(1, l, dtype=torch.int64)),
    }
    for name, call in calls.items():
        try:
            call(None)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    out["local"] = dilated_attention(q, k, v, seg, rates, causal=True, group=LOCAL)[:, sl]
    out["world"] = calls["function"](dist.group.WORLD)
    out["mesh"] = calls["function"](init_device_mesh("cpu", (2,), mesh_dim_names=("cp",)))
    mesh2 = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp"))
    try:
        calls["function"](mesh2)
        out["mesh2"] = None
    except ValueError as e:
        out["mesh2"] = str(e)
    out["mesh2 cp"] = calls["function"](mesh2["cp"])
    return out


@pytest.mark.faults
def test_group_none_raises_in_a_two_rank_world_and_a_mesh_works():
    res = run_world(2, _group_rule, timeout=60)
    for r in res:
        for name in ("function", "DilatedAttention", "MultiheadDilatedAttention", "LongNetLM"):
            assert r[name] is not None and "group=None" in r[name], (name, r[name])
            assert "longattn.common.dist.LOCAL" in r[name]
        assert r["mesh2"] is not None and "1-D DeviceMesh" in r["mesh2"]
        for name in ("world", "mesh", "mesh2 cp"):
            assert rel_error(r[name], r["local"]) <= 1e-12, name


def _lm_case(rank, world, n, pos_emb):
    from longattn.dilated import LongNetLM

    group = _subgroup(n)
    if rank >= n:
        return None
    l, seg, rates = 9, (4, 8, 24), (1, 2, 4)
    kw = dict(d_model=16, nhead=4, num_decoder_layers=2, dim_feedforward=32,
              segment_lengths=seg, dilation_rates=rates, dtype=torch.float64, pos_emb=pos_emb)
    torch.manual_seed(0)
    single = LongNetLM(30, group=LOCAL, **kw)
    torch.manual_seed(0)
    par = LongNetLM(30, group=group, **kw)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 30, (2, n * l), generator=gen)
    w = torch.randn(2, n * l, 30, generator=gen, dtype=torch.float64)
    y = single(x)
    (y * w).sum().backward()
    sl = slice(rank * l, rank * l + l)
    yl = par(x[:, sl])
    (yl * w[:, sl]).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in par.parameters()])
    want = torch.cat([p.grad.reshape(-1) for p in single.parameters()])
    return rel_error(yl, y[:, sl]), grads, want


def test_distributed_longnet_lm_equals_single_process():
    for n, pos in ((3, "xpos"), (4, "rotary")):
        res = [r for r in run_world(8, _lm_case, n, pos, timeout=120) if r is not None]
        assert len(res) == n
        assert max(r[0] for r in res) <= 1e-10
        total = sum(r[1] for r in res)  # data-parallel style sum of the ranks' parameter grads
        assert rel_error(total, res[0][2]) <= 1e-10
