"""The fused Triton merge and gradient sum (run by the interpreter on the CPU:
TRITON_INTERPRET=1, set in conftest) against the eager path and the float64 oracle, forward
(out, lse) and backward (dq, dk, dv, with d(lse)). Shapes are tiny: the interpreter runs every
program in Python."""

import numpy as np
import pytest
import torch

from longattn.common.merge import merge_stacked
from longattn.common.testing import TOLERANCES, rel_error
from longattn.dilated import FusedConfig, dilated_attention
from longattn.dilated import attention as attn
from longattn.dilated.plan import make_plan
from longattn.reference.dilated import dilated_attention as ref_forward
from longattn.reference.dilated import dilated_attention_backward as ref_backward

pytest.importorskip("triton")
from longattn.dilated import fused  # noqa: E402

TOL = 1e-5  # float32, fused vs eager
TOL_ORACLE = TOLERANCES[torch.float32]  # float32 vs the float64 oracle

# (segments, rates, S, Hq, Hkv): every plan is strided calls only (the fused path's domain)
CASES = [
    ((8, 16, 32), (1, 2, 4), 37, 4, 4),         # the paper's schedule scaled down, partial tail
    ((4, 8, 16, 32, 64), (1, 2, 4, 6, 12), 40, 12, 12),  # paper rates over 12 heads, w < S
    ((6, 12, 24), (1, 2, 3), 29, 4, 4),         # r = 3 does not divide 4 heads nor 12 or 24
    ((7, 16), (2, 3), 31, 4, 4),                # no r = 1 branch: rows covered by no call
    ((3, 6), (5, 2), 17, 4, 4),                 # r > w, r > H: offsets that keep nothing
    ((8, 16), (1, 1), 37, 4, 2),                # GQA (r = 1 only: strided with Hq != Hkv)
    ((5, 40), (1, 1), 23, 3, 1),                # MQA, one segment longer than S
]


def _inputs(seed, s, hq, hkv, b=2, d=8, dv=8):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(b, s, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, dv), mk(b, s, hq, dv), mk(b, hq, s)


ON, OFF = FusedConfig(fused="on"), FusedConfig(fused="off")


def _run(config, seg, rates, causal, q, k, v, dout, dlse, dtype=torch.float32):
    """(out, lse, dq, dk, dv) with ``config``; the loss uses d(lse) on finite lse rows."""
    qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = dilated_attention(qq, kk, vv, seg, rates, causal=causal, return_lse=True,
                                 config=config)
    dl = torch.where(torch.isfinite(lse), dlse.to(lse.dtype), torch.zeros_like(lse))
    torch.autograd.backward([out, lse], [dout.to(out.dtype), dl])
    return out, lse, qq.grad, kk.grad, vv.grad


@pytest.fixture
def launches(monkeypatch):
    """Counts of fused merge / sum launches (proves the fused path ran)."""
    count = {"merge": 0, "sum": 0}
    for name, key in (("merge_strided", "merge"), ("sum_strided", "sum")):
        real = getattr(fused, name)

        def wrapped(*a, _real=real, _key=key, **kw):
            count[_key] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(fused, name, wrapped)
    return count


@pytest.fixture
def fused_fp32(monkeypatch):
    """Lets float32 inputs through to the fused kernels when ``fused="on"``, for these tests
    only. ``dilated_attention`` itself never fuses float32 (it merges float32 inputs eagerly,
    with float64 statistics: the kernels' float32 lse would cost accuracy at large logits), but
    the kernels' logic (tiles, index paths, masks, the merge and the sums) is the same for
    every dtype, and float32 lets the tests here hold it to 1e-5 against the eager path."""
    real = attn._use_fused

    def use_fused(q, plan, config):
        if q.dtype == torch.float32:  # decide as for fp16 on q's device
            q = torch.empty(0, dtype=torch.float16, device=q.device)
        return real(q, plan, config)

    monkeypatch.setattr(attn, "_use_fused", use_fused)


def test_interpreter_is_on():
    assert fused.INTERPRET


@pytest.mark.parametrize("ci", range(len(CASES)))
@pytest.mark.parametrize("causal", [False, True])
def test_fused_vs_eager_and_oracle(launches, fused_fp32, ci, causal):
    seg, rates, s, hq, hkv = CASES[ci]
    plan = make_plan(s, s, 0, 1, hq, hkv, seg, rates, causal)
    assert all(c.strided is not None for c in plan.calls)
    for seed in range(2):
        q, k, v, dout, dlse = _inputs(100 * ci + 10 * causal + seed, s, hq, hkv)
        got = _run(ON, seg, rates, causal, q, k, v, dout, dlse)
        want = _run(OFF, seg, rates, causal, q, k, v, dout, dlse)
        errs = [rel_error(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL, f"fused vs eager: out, lse, dq, dk, dv = {errs}"
        assert all(g.dtype == torch.float32 for g in got)
        assert not any(torch.isnan(g).any() for g in got)
        ro, rl = ref_forward(q.numpy(), k.numpy(), v.numpy(), seg, rates, causal=causal)
        dl = torch.where(torch.isfinite(got[1]), dlse, torch.zeros_like(dlse)).numpy()
        rg = ref_backward(dout.numpy(), q.numpy(), k.numpy(), v.numpy(), seg, rates,
                          causal=causal, dlse=dl)
        errs = [rel_error(a, b) for a, b in zip(got, (ro, rl, *rg))]
        assert max(errs) <= TOL_ORACLE, f"fused vs oracle: out, lse, dq, dk, dv = {errs}"
    assert launches == {"merge": 2, "sum": 6}


def test_uncovered_rows(launches, fused_fp32):
    # (7, 16) x (2, 3) keeps no row t of head h where t % 7 % 2 != h % 2 and t % 16 % 3 != h % 3
    seg, rates, s, hq = (7, 16), (2, 3), 30, 4
    q, k, v, dout, dlse = _inputs(7, s, hq, hq)
    out, lse, dq, dk, dv = _run(ON, seg, rates, True, q, k, v, dout, dlse)
    t, h = np.arange(s)[:, None], np.arange(hq)[None, :]
    empty = torch.from_numpy(((t % 7) % 2 != h % 2) & ((t % 16) % 3 != h % 3))  # [S, H]
    assert empty.any() and not empty.all()
    assert torch.all(lse.transpose(1, 2)[:, empty] == float("-inf"))
    assert torch.isfinite(lse.transpose(1, 2)[:, ~empty]).all()
    assert torch.all(out[:, empty] == 0) and torch.all(dq[:, empty] == 0)
    # keys of an empty row are read by nobody of that head: zero gradients there too
    assert torch.all(dk[:, empty] == 0) and torch.all(dv[:, empty] == 0)
    assert launches == {"merge": 1, "sum": 3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_vs_eager(launches, dtype):
    """The output is written in the input dtype straight from the float32 registers: within a
    rounding of the eager result (float32 merge, then ``.to(dtype)``)."""
    seg, rates, s, hq, hkv = CASES[0]
    q, k, v, dout, dlse = _inputs(3, s, hq, hkv)
    got = _run(ON, seg, rates, True, q, k, v, dout, dlse, dtype)
    want = _run(OFF, seg, rates, True, q, k, v, dout, dlse, dtype)
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[1].dtype == torch.float32
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= 1e-2, errs
    assert launches == {"merge": 1, "sum": 3}


def test_strided_results_any_layout():
    """Call results with non-contiguous strides (any kernel's output layout) merge and sum
    like contiguous ones."""
    seg, rates, s, h, d = (8, 16), (1, 2), 21, 4, 8
    plan = make_plan(s, s, 0, 1, h, h, seg, rates, False)
    calls = plan.calls
    g = torch.Generator().manual_seed(0)
    parts, flipped = [], []
    for c in calls:
        nseg, n, _, ho, _ = c.shape
        o = torch.randn(2 * nseg, n, ho, d, generator=g)
        lse = torch.randn(2 * nseg, ho, n, generator=g)
        parts.append((o, lse))
        # same values, other memory orders: heads outermost, rows outermost
        flipped.append((o.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3),
                        lse.transpose(1, 2).contiguous().transpose(1, 2)))
    o1, l1 = fused.merge_strided(parts, calls, 2, s, h, d, torch.float32)
    o2, l2 = fused.merge_strided(flipped, calls, 2, s, h, d, torch.float32)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    s1 = fused.sum_strided([o for o, _ in parts], calls, 2, s, h, d, torch.float32, 0)
    s2 = fused.sum_strided([o for o, _ in flipped], calls, 2, s, h, d, torch.float32, 0,
                           config=FusedConfig(rows=4, chunk=4))
    assert torch.equal(s1, s2)
    # one call's result at an odd element offset: offsets from the first call's tensor (whose
    # own alignment triton's pointer specialisation sees) promise no vectors; same numbers
    o, lse = parts[-1]
    odd = parts[:-1] + [(torch.empty(o.numel() + 1)[1:].view(o.shape).copy_(o), lse)]
    assert fused._table(calls, [o for o, _ in parts], [x for _, x in parts], 0, h, "cpu")[1] == 4
    assert fused._table(calls, [o for o, _ in odd], [x for _, x in odd], 0, h, "cpu")[1] == 1
    o4, l4 = fused.merge_strided(odd, calls, 2, s, h, d, torch.float32)
    assert torch.equal(o1, o4) and torch.equal(l1, l4)
    # against the eager merge of the same parts
    dev_calls = attn._device_plan(plan, torch.device("cpu"))[0]
    o3, l3 = attn.merge_calls(parts, dev_calls, 2, s, h, d, torch.float32, plan.first_covers)
    assert rel_error(o1, o3) <= TOL and rel_error(l1, l3) <= TOL


def _placed(parts, calls, b, s, h, d):
    """Every call's ``(out, lse)`` placed in full-size ``[B, S, H, D]`` / ``[B, S, H]`` tensors
    (rows the call does not write: out 0, lse -inf), stacked on dim 0."""
    outs, lses = [], []
    for (call, qr, _), (o, lse) in zip(calls, parts):
        of = torch.zeros(b, s, h, d, dtype=o.dtype)
        lf = torch.full((b, s, h), float("-inf"), dtype=lse.dtype)
        lc = attn._rows(call, b, lse)
        if call.strided is not None:
            ov = attn._sview(of, call)
            ov.copy_(o.unflatten(0, ov.shape[:2]))
            attn._sview(lf, call).copy_(lc)
        else:
            of.view(b, -1, d)[:, qr] = o.reshape(b, -1, d)
            lf.view(b, -1)[:, qr] = lc
        outs.append(of)
        lses.append(lf)
    return torch.stack(outs), torch.stack(lses)


def _random_parts(plan, b, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for c in plan.calls:
        nseg, nq, _, heads, _ = c.shape
        parts.append((torch.randn(b * nseg, nq, heads, d, generator=g, dtype=dtype),
                      3 * torch.randn(b * nseg, heads, nq, generator=g, dtype=dtype)))
    return parts


@pytest.mark.parametrize("seg, rates, s, hq, hkv", [
    ((8, 16), (1, 2), 21, 4, 4),         # strided calls, first_covers
    ((7, 16), (2, 3), 30, 4, 4),         # strided, rows of no call
    ((3, 10, 24), (1, 2, 3), 23, 6, 2),  # GQA: gathered calls
])
def test_merge_calls_is_merge_stacked_and_the_fused_merge(seg, rates, s, hq, hkv):
    """The eager merge (merge_calls) is common.merge.merge_stacked of the calls' results placed
    in full-size tensors, in float64, NaN rows included; the fused merge is the same in float32."""
    b, d = 2, 8
    plan = make_plan(s, s, 0, 1, hq, hkv, seg, rates, False)
    calls = attn._device_plan(plan, torch.device("cpu"))[0]
    parts = _random_parts(plan, b, d, torch.float64, seed=s)
    o_ref, l_ref = merge_stacked(*_placed(parts, calls, b, s, hq, d))
    o, lse = attn.merge_calls(parts, calls, b, s, hq, d, torch.float64, plan.first_covers)
    assert rel_error(o, o_ref) <= 1e-13 and rel_error(lse, l_ref) <= 1e-13
    assert torch.equal(torch.isneginf(lse), torch.isneginf(l_ref))
    assert torch.all(o[torch.isneginf(lse)] == 0)
    # a NaN lse makes its rows NaN in both
    o0, l0 = parts[-1]
    bad = l0.clone()
    bad[0, 0, 0] = float("nan")
    nan_parts = parts[:-1] + [(o0, bad)]
    on, ln = attn.merge_calls(nan_parts, calls, b, s, hq, d, torch.float64, plan.first_covers)
    o_ref, l_ref = merge_stacked(*_placed(nan_parts, calls, b, s, hq, d))
    assert torch.isnan(ln).sum() == 1 and torch.equal(torch.isnan(ln), torch.isnan(l_ref))
    assert torch.equal(torch.isnan(on), torch.isnan(o_ref)) and torch.isnan(on).sum() == d
    ok = ~torch.isnan(ln)
    assert rel_error(on[ok], o_ref[ok]) <= 1e-13
    if all(c.strided is not None for c in plan.calls):  # the fused merge's domain
        p32 = [(o.float(), x.float()) for o, x in parts]
        of, lf = fused.merge_strided(p32, plan.calls, b, s, hq, d, torch.float32)
        assert rel_error(of, o) <= TOL and rel_error(lf, lse) <= TOL
        assert torch.equal(torch.isneginf(lf), torch.isneginf(lse))


def test_auto_mode_keeps_cpu_eager(launches):
    """"auto" uses the fused kernels only on CUDA fp16/bf16; float32 and float64 never fuse,
    not even with "on" (their lse is float64: the eager merge, bit for bit)."""
    seg, rates, s, hq, hkv = CASES[0]
    q, k, v, dout, dlse = _inputs(1, s, hq, hkv)
    _run(FusedConfig(), seg, rates, False, q, k, v, dout, dlse)
    _run(None, seg, rates, False, q, k, v, dout, dlse)
    on = _run(ON, seg, rates, False, q, k, v, dout, dlse, torch.float32)
    off = _run(OFF, seg, rates, False, q, k, v, dout, dlse, torch.float32)
    assert on[1].dtype == torch.float64 and all(torch.equal(a, b) for a, b in zip(on, off))
    _run(ON, seg, rates, False, q, k, v, dout, dlse, torch.float64)  # (makes q a leaf)
    assert launches == {"merge": 0, "sum": 0}


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(fused="yes"), ValueError, "fused"),
    (dict(rows=0), ValueError, "rows"),
    (dict(rows=96), ValueError, "rows"),
    (dict(chunk=2.0), ValueError, "chunk"),
    (dict(num_warps=3), ValueError, "num_warps"),
    (dict(programs_per_sm=0), ValueError, "programs_per_sm"),
    (dict(fast_index=1), TypeError, "fast_index"),
])
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedConfig(**kwargs)
    with pytest.raises(AttributeError):  # frozen: a record per call, not a setting to flip
        ON.rows = 64


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("ci", [0, 2, 3, 4])
def test_small_tiles(monkeypatch, launches, fused_fp32, ci, fast):
    """Tiles of 2 positions: most calls hold no row of a tile (every member mask false), the
    last tile is partial (odd S); both index paths (every segment is >= 2 positions, so the
    division-free one runs unless fast_index is off)."""
    paths = _spy_paths(monkeypatch)
    seg, rates, s, hq, hkv = CASES[ci]
    assert hq == 4 and s % 2
    q, k, v, dout, dlse = _inputs(50 + ci, s, hq, hkv, b=1)
    got = _run(FusedConfig(fused="on", rows=2, fast_index=fast), seg, rates, True, q, k, v,
               dout, dlse)
    want = _run(OFF, seg, rates, True, q, k, v, dout, dlse)
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= TOL, f"fused vs eager: out, lse, dq, dk, dv = {errs}"
    assert launches == {"merge": 1, "sum": 3}
    assert paths == {fast}


def _spy_paths(monkeypatch):
    """The set of FAST flags the fused launches used."""
    paths = set()
    real = fused._launch

    def spy(kernel, table, *a, **kw):
        paths.add(table[2])
        return real(kernel, table, *a, **kw)

    monkeypatch.setattr(fused, "_launch", spy)
    return paths


def test_head_dim_chunks(monkeypatch, launches, fused_fp32):
    """The head dim in chunks of 4 columns: head dims 8 and 12 (padded to 16: a partial and an
    empty last chunk), both index paths in one run (segments 3 and 8 with tiles of 4)."""
    paths = _spy_paths(monkeypatch)
    for seg, rates in (((8, 16), (1, 2)), ((3, 8), (1, 3))):
        q, k, v, dout, dlse = _inputs(len(seg) + seg[0], 23, 4, 4, dv=12)
        got = _run(FusedConfig(fused="on", rows=4, chunk=4), seg, rates, True, q, k, v, dout,
                   dlse)
        want = _run(OFF, seg, rates, True, q, k, v, dout, dlse)
        errs = [rel_error(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL, f"fused vs eager: out, lse, dq, dk, dv = {errs}"
    assert paths == {True, False}


@pytest.mark.parametrize("ci, programs", [(0, 1), (1, 3), (3, 5), (6, 2)])
def test_persistent_programs(launches, fused_fp32, ci, programs):
    """With programs_per_sm set, each program strides over several position tiles of its (head,
    batch row) (on the CPU one "SM": splits = ceil(programs / (B*H)), i.e. one split here, so a
    program walks all tiles, the last one partial)."""
    config = FusedConfig(fused="on", rows=4, programs_per_sm=programs)
    seg, rates, s, hq, hkv = CASES[ci]
    q, k, v, dout, dlse = _inputs(70 + ci, s, hq, hkv)
    assert fused._splits(-(-s // 4), 2, hq, torch.device("cpu"), config) == 1  # 4 a tile
    got = _run(config, seg, rates, True, q, k, v, dout, dlse)
    want = _run(OFF, seg, rates, True, q, k, v, dout, dlse)
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= TOL, f"fused vs eager: out, lse, dq, dk, dv = {errs}"
    assert launches == {"merge": 1, "sum": 3}


def test_splits():
    """Programs per (head, batch row): one per tile by default; with programs_per_sm, enough to
    fill the SMs (one on the CPU), never more than the tiles and never fewer than one."""
    cpu = torch.device("cpu")
    assert fused._splits(10, 2, 4, cpu, FusedConfig()) == 10
    for p, want in ((8, 1), (17, 3), (1000, 10)):
        assert fused._splits(10, 2, 4, cpu, FusedConfig(programs_per_sm=p)) == want
