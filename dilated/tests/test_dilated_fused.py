"""The fused Triton merge and gradient sum (run by the interpreter on the CPU:
TRITON_INTERPRET=1, set in conftest) against the eager path and the float64 oracle, forward
(out, lse) and backward (dq, dk, dv, with d(lse)). Shapes are tiny: the interpreter runs every
program in Python."""

import numpy as np
import pytest
import torch

from longattn.common.testing import TOLERANCES, rel_error
from longattn.dilated import attention as attn
from longattn.dilated import dilated_attention
from longattn.dilated.plan import build_plan
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


def _run(monkeypatch, mode, seg, rates, causal, q, k, v, dout, dlse, dtype=torch.float32):
    """(out, lse, dq, dk, dv) with FUSED = mode; the loss uses d(lse) on finite lse rows."""
    monkeypatch.setattr(attn, "FUSED", mode)
    qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = dilated_attention(qq, kk, vv, seg, rates, is_causal=causal, return_lse=True)
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


def test_interpreter_is_on():
    assert fused.INTERPRET


@pytest.mark.parametrize("ci", range(len(CASES)))
@pytest.mark.parametrize("causal", [False, True])
def test_fused_vs_eager_and_oracle(monkeypatch, launches, ci, causal):
    seg, rates, s, hq, hkv = CASES[ci]
    plan = build_plan(s, s, 0, 1, hq, hkv, seg, rates, causal)
    assert all(c.strided is not None for c in plan.calls)
    for seed in range(2):
        q, k, v, dout, dlse = _inputs(100 * ci + 10 * causal + seed, s, hq, hkv)
        got = _run(monkeypatch, "on", seg, rates, causal, q, k, v, dout, dlse)
        want = _run(monkeypatch, "off", seg, rates, causal, q, k, v, dout, dlse)
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


def test_uncovered_rows(monkeypatch, launches):
    # (7, 16) x (2, 3) keeps no row t of head h where t % 7 % 2 != h % 2 and t % 16 % 3 != h % 3
    seg, rates, s, hq = (7, 16), (2, 3), 30, 4
    q, k, v, dout, dlse = _inputs(7, s, hq, hq)
    out, lse, dq, dk, dv = _run(monkeypatch, "on", seg, rates, True, q, k, v, dout, dlse)
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
def test_half_precision_vs_eager(monkeypatch, launches, dtype):
    """The output is written in the input dtype straight from the float32 registers: within a
    rounding of the eager result (float32 merge, then ``.to(dtype)``)."""
    seg, rates, s, hq, hkv = CASES[0]
    q, k, v, dout, dlse = _inputs(3, s, hq, hkv)
    got = _run(monkeypatch, "on", seg, rates, True, q, k, v, dout, dlse, dtype)
    want = _run(monkeypatch, "off", seg, rates, True, q, k, v, dout, dlse, dtype)
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[1].dtype == torch.float32
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= 1e-2, errs
    assert launches == {"merge": 1, "sum": 3}


def test_strided_results_any_layout():
    """Call results with non-contiguous strides (any kernel's output layout) merge and sum
    like contiguous ones."""
    seg, rates, s, h, d = (8, 16), (1, 2), 21, 4, 8
    plan = build_plan(s, s, 0, 1, h, h, seg, rates, False)
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
    s2 = fused.sum_strided([o for o, _ in flipped], calls, 2, s, h, d, torch.float32, 0)
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


def test_auto_mode_keeps_cpu_eager(monkeypatch, launches):
    """"auto" uses the fused kernels only on CUDA fp16/bf16; float64 never fuses."""
    seg, rates, s, hq, hkv = CASES[0]
    q, k, v, dout, dlse = _inputs(1, s, hq, hkv)
    _run(monkeypatch, "auto", seg, rates, False, q, k, v, dout, dlse)
    _run(monkeypatch, "on", seg, rates, False, q, k, v, dout, dlse, torch.float64)
    assert launches == {"merge": 0, "sum": 0}
    monkeypatch.setattr(attn, "FUSED", "yes")
    with pytest.raises(ValueError, match="FUSED"):
        dilated_attention(q, k, v, seg, rates)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("ci", [0, 2, 3, 4])
def test_small_tiles(monkeypatch, launches, ci, fast):
    """Tiles of 2 positions: most calls hold no row of a tile (every member mask false), the
    last tile is partial (odd S); both index paths (every segment is >= 2 positions, so the
    division-free one runs unless FAST_INDEX is off)."""
    monkeypatch.setattr(fused, "ROWS", 2)
    monkeypatch.setattr(fused, "FAST_INDEX", fast)
    paths = _spy_paths(monkeypatch)
    seg, rates, s, hq, hkv = CASES[ci]
    assert hq == 4 and s % 2
    q, k, v, dout, dlse = _inputs(50 + ci, s, hq, hkv, b=1)
    got = _run(monkeypatch, "on", seg, rates, True, q, k, v, dout, dlse)
    want = _run(monkeypatch, "off", seg, rates, True, q, k, v, dout, dlse)
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= TOL, f"fused vs eager: out, lse, dq, dk, dv = {errs}"
    assert launches == {"merge": 1, "sum": 3}
    assert paths == {fast}


def _spy_paths(monkeypatch):
    """The set of FAST flags the fused launches used."""
    paths = set()
    real = fused._launch

    def spy(kernel, table, *a):
        paths.add(table[2])
        return real(kernel, table, *a)

    monkeypatch.setattr(fused, "_launch", spy)
    return paths


def test_head_dim_chunks(monkeypatch, launches):
    """The head dim in chunks of 4 columns: head dims 8 and 12 (padded to 16: a partial and an
    empty last chunk), both index paths in one run (segments 3 and 8 with tiles of 4)."""
    monkeypatch.setattr(fused, "CHUNK", 4)
    monkeypatch.setattr(fused, "ROWS", 4)
    paths = _spy_paths(monkeypatch)
    for seg, rates in (((8, 16), (1, 2)), ((3, 8), (1, 3))):
        q, k, v, dout, dlse = _inputs(len(seg) + seg[0], 23, 4, 4, dv=12)
        got = _run(monkeypatch, "on", seg, rates, True, q, k, v, dout, dlse)
        want = _run(monkeypatch, "off", seg, rates, True, q, k, v, dout, dlse)
        errs = [rel_error(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL, f"fused vs eager: out, lse, dq, dk, dv = {errs}"
    assert paths == {True, False}


@pytest.mark.parametrize("ci, programs", [(0, 1), (1, 3), (3, 5), (6, 2)])
def test_persistent_programs(monkeypatch, launches, ci, programs):
    """With PROGRAMS_PER_SM set, each program strides over several position tiles of its (head,
    batch row) (on the CPU one "SM": splits = ceil(programs / (B*H)), i.e. one split here, so a
    program walks all tiles, the last one partial)."""
    monkeypatch.setattr(fused, "ROWS", 4)
    monkeypatch.setattr(fused, "PROGRAMS_PER_SM", programs)
    seg, rates, s, hq, hkv = CASES[ci]
    q, k, v, dout, dlse = _inputs(70 + ci, s, hq, hkv)
    assert fused._splits(-(-s // 4), 2, hq, torch.device("cpu")) == 1  # 4 positions a tile
    got = _run(monkeypatch, "on", seg, rates, True, q, k, v, dout, dlse)
    want = _run(monkeypatch, "off", seg, rates, True, q, k, v, dout, dlse)
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= TOL, f"fused vs eager: out, lse, dq, dk, dv = {errs}"
    assert launches == {"merge": 1, "sum": 3}


def test_splits(monkeypatch):
    """Programs per (head, batch row): one per tile by default; with PROGRAMS_PER_SM, enough to
    fill the SMs (one on the CPU), never more than the tiles and never fewer than one."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(fused, "PROGRAMS_PER_SM", None)
    assert fused._splits(10, 2, 4, cpu) == 10
    for p, want in ((8, 1), (17, 3), (1000, 10)):
        monkeypatch.setattr(fused, "PROGRAMS_PER_SM", p)
        assert fused._splits(10, 2, 4, cpu) == want
