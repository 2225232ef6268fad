"""``merge.merge_slots``: the n-way merge of partials kept in slots (rows ``s < split`` from the
first ``n_front`` slots only). The one-pass Triton kernel (``merge_triton.merge_slots``, run by
the Triton interpreter on the CPU) and the eager twin (``backend="torch"``) against a float64
merge from the definition, on strided slices; garbage in never-read slots changes nothing; dead
slots, empty rows and NaN rows; equal to ``merge_stacked`` when every row uses every slot; bad
arguments raise naming the argument."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from longattn.common.merge import merge_slots, merge_stacked
from longattn.common.testing import rel_error

merge_triton = pytest.importorskip("longattn.common.merge_triton")

B, S, H, D = 2, 7, 3, 24  # odd S, head_dim not a power of two


def _slots(seed, n, dtype=torch.float32, lse_dtype=torch.float32, strided=True):
    """Random ``outs [n, B, S, H, D]`` and ``lses [n, B, H, S]``; ``strided``: both are slices
    of larger buffers (``lses`` a transposed ``[n, B, S, H]`` one), as a stacked buffer gives."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        outs = torch.randn(n + 1, B, S + 2, H, D + 8, generator=g).to(dtype)[1:, :, 1:-1, :, :D]
        lses = (torch.randn(n, B, S + 3, H, generator=g) * 3 + 20)[:, :, 2:-1].transpose(-1, -2)
        return outs, lses.to(lse_dtype)
    outs = torch.randn(n, B, S, H, D, generator=g).to(dtype)
    return outs, (torch.randn(n, B, H, S, generator=g) * 3 + 20).to(lse_dtype)


def _reference(outs, lses, n_front, split):
    """float64 from the definition, row by row: ``lse = logsumexp_i lse_i``, ``out = sum_i
    exp(lse_i - lse) out_i`` over the slots the row uses (dead ones, lse = -inf, give 0)."""
    n, b, s, h, d = outs.shape
    out = torch.zeros(b, s, h, d, dtype=torch.float64)
    lse = torch.full((b, h, s), float("-inf"), dtype=torch.float64)
    for r in range(s):
        k = n_front if r < split else n
        if k == 0:
            continue
        ls = lses[:k, :, :, r].double()  # [k, B, H]
        tot = torch.logsumexp(ls, 0)
        dead = torch.isneginf(ls)
        w = torch.where(dead, 0.0, torch.exp(ls - tot))
        o = torch.where(dead.unsqueeze(-1), 0.0, outs[:k, :, r].double())
        out[:, r] = (w.unsqueeze(-1) * o).sum(0)
        lse[:, :, r] = tot
    return out, lse


def _triton(outs, lses, n_front, split, out_dtype):
    """The kernel called directly, into fresh (strided) outputs."""
    out = torch.full((B, S + 1, H, D), 123.0, dtype=out_dtype)[:, 1:]
    lse = torch.full((B, H, S), 123.0)
    return merge_triton.merge_slots(outs, lses, n_front, split, out, lse)


def _both(outs, lses, n_front, split, out_dtype=torch.float32):
    tri = _triton(outs, lses, n_front, split, out_dtype)
    twin = merge_slots(outs, lses, n_front=n_front, split=split, out_dtype=out_dtype,
                       backend="torch")
    return tri, twin


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("front", ["none", "one", "all"])
@pytest.mark.parametrize("split", [0, S // 2, S])
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("seed", range(3))
def test_kernel_and_twin_equal_the_float64_definition(seed, n, split, front, in_dtype):
    n_front = {"none": 0, "one": 1, "all": n}[front]
    outs, lses = _slots(seed, n, in_dtype, strided=seed != 1)
    ref_o, ref_l = _reference(outs, lses, n_front, split)
    assert torch.isneginf(ref_l).any() == (n_front == 0 and split > 0)
    for out_dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
        for out, lse in _both(outs, lses, n_front, split, out_dtype):
            assert out.dtype == out_dtype and lse.dtype == torch.float32
            assert out.shape == (B, S, H, D) and lse.shape == (B, H, S)
            assert rel_error(out, ref_o) <= tol
            assert rel_error(lse, ref_l) <= 1e-6
            if split:
                assert (out[:, :split] == 0).all() == (n_front == 0)


@pytest.mark.parametrize("seed", range(3))
def test_wide_lse_spread_neither_overflows_nor_underflows(seed):
    outs, lses = _slots(seed, 6)
    lses = lses * 60 - 1000  # exp(lse_i - lse_j) far beyond float32's range
    ref_o, ref_l = _reference(outs, lses, 4, 3)
    for out, lse in _both(outs, lses, 4, 3):
        assert rel_error(out, ref_o) <= 1e-6 and rel_error(lse, ref_l) <= 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_float64_twin_and_float64_lses(seed):
    outs, lses = _slots(seed, 5, torch.float64, torch.float64)
    ref_o, ref_l = _reference(outs, lses, 2, 4)
    out, lse = merge_slots(outs, lses, n_front=2, split=4)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_error(out, ref_o) <= 1e-13 and rel_error(lse, ref_l) <= 1e-13
    outs32 = outs.float()  # float32 outs, float64 lses: the lse stays float64
    out, lse = merge_slots(outs32, lses, n_front=2, split=4)
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    assert rel_error(lse, ref_l) <= 1e-13


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_front,split", [(0, 4), (2, 4), (3, 7), (1, 1)])
def test_garbage_in_never_read_slots_changes_nothing(seed, n_front, split):
    n = 5
    outs, lses = _slots(seed, n)
    clean = _both(outs, lses, n_front, split, torch.bfloat16)
    for junk_o, junk_l in ((float("nan"), float("nan")), (3e38, 1e30), (-1e30, float("inf")),
                           (float("inf"), 80.0)):
        o, l_ = outs.clone(), lses.clone()
        o[n_front:, :, :split] = junk_o
        l_[n_front:, :, :, :split] = junk_l
        for (out, lse), (c_out, c_lse) in zip(_both(o, l_, n_front, split, torch.bfloat16),
                                              clean):
            assert torch.equal(out, c_out) and torch.equal(lse, c_lse)


@pytest.mark.parametrize("seed", range(4))
def test_dead_slots_contribute_nothing_and_all_dead_rows_are_empty(seed):
    n, n_front, split = 4, 2, 3
    outs, lses = _slots(seed, n)
    g = torch.Generator().manual_seed(100 + seed)
    dead = torch.rand(n, B, H, S, generator=g) < 0.4
    dead[:n_front, 0, 1, 0] = True  # a front row: every used slot dead
    dead[:, 1, 2, 5] = True  # a back row: every slot dead
    dead[:, 0, 0, 6] = False
    dead[1:, 0, 0, 6] = True  # one live slot only
    lses = lses.masked_fill(dead, float("-inf"))
    outs = outs.masked_fill(dead.transpose(-1, -2).unsqueeze(-1), float("nan"))
    ref_o, ref_l = _reference(outs, lses, n_front, split)
    for out, lse in _both(outs, lses, n_front, split):
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert rel_error(out, ref_o) <= 1e-6 and rel_error(lse, ref_l) <= 1e-6
        for b, h, s in ((0, 1, 0), (1, 2, 5)):
            assert (out[b, s, h] == 0).all() and torch.isneginf(lse[b, h, s])
        assert torch.equal(out[0, 6, 0], outs[0, 0, 6, 0])  # the live slot itself, exactly
        assert lse[0, 0, 6] == lses[0, 0, 0, 6]


@pytest.mark.parametrize("slot", [0, 2, 4])  # first, middle, last: tl.maximum may drop a NaN
@pytest.mark.parametrize("row", [1, 5])  # a front row (s < split), a back row
def test_a_nan_lse_in_a_used_slot_makes_exactly_that_row_nan(slot, row):
    n, n_front, split = 5, 5, 3
    outs, lses = _slots(7 + slot + row, n)
    clean = _both(outs, lses, n_front, split)
    lses = lses.clone()
    lses[slot, 1, 2, row] = float("nan")
    for (out, lse), (c_out, c_lse) in zip(_both(outs, lses, n_front, split), clean):
        nan_o = torch.zeros(B, S, H, dtype=torch.bool)
        nan_o[1, row, 2] = True
        assert torch.isnan(out).all(-1).eq(nan_o).all() and torch.isnan(out).any(-1).eq(nan_o).all()
        assert torch.isnan(lse).eq(nan_o.transpose(1, 2)).all()
        assert torch.equal(out[~nan_o], c_out[~nan_o])
        assert torch.equal(lse[~nan_o.transpose(1, 2)], c_lse[~nan_o.transpose(1, 2)])


@pytest.mark.parametrize("split", [0, 3, S])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_all_slots_everywhere_equals_merge_stacked(split, dtype):
    n = 6
    outs, lses = _slots(split, n, dtype, torch.float64 if dtype == torch.float64 else
                        torch.float32)
    lses[2, 0, 1] = float("-inf")  # some dead sides
    st_o, st_l = merge_stacked(outs, lses.transpose(-1, -2))
    st_l = st_l.transpose(-1, -2)
    tol = 1e-14 if dtype == torch.float64 else 1e-6  # the last bit of a vectorized divide
    out, lse = merge_slots(outs, lses, n_front=n, split=split, backend="torch")
    assert out.dtype == st_o.dtype and lse.dtype == st_l.dtype
    assert rel_error(out, st_o) <= tol and rel_error(lse, st_l) <= tol
    out = merge_slots(outs, lses, split=split)[0]  # n_front defaults to n
    assert rel_error(out, st_o) <= tol
    if dtype != torch.float64:
        out, lse = merge_slots(outs, lses, n_front=n, split=split, backend="triton")
        assert rel_error(out, st_o) <= 1e-6 and rel_error(lse, st_l) <= 1e-6


def test_triton_backend_through_the_dispatcher_and_why_it_refuses():
    outs, lses = _slots(3, 4)
    out, lse = merge_slots(outs, lses, n_front=1, split=2, out_dtype=torch.bfloat16,
                           backend="triton")
    ref_o, ref_l = _reference(outs, lses, 1, 2)
    assert out.dtype == torch.bfloat16 and rel_error(out, ref_o) <= 8e-3
    assert rel_error(lse, ref_l) <= 1e-6
    with pytest.raises(ValueError, match="backend='triton'.*float32"):
        merge_slots(outs, lses.double(), backend="triton")
    with pytest.raises(ValueError, match="backend='triton'.*float32"):
        merge_slots(outs.double(), lses, backend="triton")
    wide = torch.zeros(4, B, S, H, 2 * D)[..., ::2]  # head_dim not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        merge_slots(wide, lses, backend="triton")
    big = torch.zeros(1, 1, 1, 1, 520)
    with pytest.raises(ValueError, match="512"):
        merge_slots(big, torch.zeros(1, 1, 1, 1), backend="triton")


def test_auto_on_cpu_uses_the_twin(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the kernel ran on the CPU")

    monkeypatch.setattr(merge_triton, "merge_slots", boom)
    outs, lses = _slots(5, 3)
    out, lse = merge_slots(outs, lses, n_front=2, split=3)
    ref_o, ref_l = _reference(outs, lses, 2, 3)
    assert rel_error(out, ref_o) <= 1e-6 and rel_error(lse, ref_l) <= 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_slots_and_no_rows(backend):
    out, lse = merge_slots(torch.zeros(0, B, S, H, D), torch.zeros(0, B, H, S), backend=backend)
    assert (out == 0).all() and torch.isneginf(lse).all() and out.shape == (B, S, H, D)
    out, lse = merge_slots(torch.ones(3, B, 0, H, D), torch.ones(3, B, H, 0), backend=backend)
    assert out.shape == (B, 0, H, D) and lse.shape == (B, H, 0)


def test_bad_arguments_raise_naming_the_argument():
    outs, lses = _slots(0, 3, strided=False)
    bad = [
        (dict(outs=outs[0]), ValueError, "outs"),
        (dict(lses=lses[0]), ValueError, "lses"),
        (dict(lses=lses[:2]), ValueError, "lses"),  # n differs
        (dict(lses=lses.transpose(-1, -2)), ValueError, "lses"),  # [n, B, S, H]
        (dict(lses=lses[:, :1]), ValueError, "lses"),  # B differs
        (dict(lses=lses.half()), TypeError, "lses"),
        (dict(outs=outs.to(torch.int32)), TypeError, "outs"),
        (dict(outs=outs.numpy()), TypeError, "outs"),
        (dict(n_front=4), ValueError, "n_front"),
        (dict(n_front=-1), ValueError, "n_front"),
        (dict(n_front=1.0), TypeError, "n_front"),
        (dict(split=S + 1), ValueError, "split"),
        (dict(split=-1), ValueError, "split"),
        (dict(split=True), TypeError, "split"),
        (dict(out_dtype=torch.int8), TypeError, "out_dtype"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    for kw, exc, name in bad:
        args = dict(outs=outs, lses=lses, n_front=None, split=0)
        args.update(kw)
        with pytest.raises(exc, match=name):
            merge_slots(args.pop("outs"), args.pop("lses"), **args)
