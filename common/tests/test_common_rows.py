"""The row scatter-add (``kernels.rows``): the Triton kernel, run by the Triton interpreter on
the CPU, against its slow twin and against a float64 loop; layers of distinct rows sum every
position onto its row in position order; bad shapes raise naming the argument. The dK/dV add
(``add_kv_``): the Triton kernel against its twin (same bits) and float64, on strided
accumulator rows, several batch rows, Dv != D and ragged column blocks."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.common.kernels.rows import (
    add_kv_,
    add_kv_torch_,
    add_rows_,
    add_rows_torch_,
    distinct_layers,
)

triton_rows = pytest.importorskip("longattn.common.kernels.rows_triton")


def _case(seed, n_dst, m, c, src_dtype, dst_dtype, with_src_rows):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n_dst, c + 3, generator=g).to(dst_dtype)
    dst = wide[:, 1:c + 1]  # a column slice: row stride c + 3
    rows = torch.randperm(n_dst, generator=g)[:m]
    n_src = m + 2 if with_src_rows else m
    src = torch.randn(n_src, c, generator=g).to(src_dtype)
    src_rows = torch.randperm(n_src, generator=g)[:m] if with_src_rows else None
    return dst, rows, src, src_rows


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("with_src_rows", [False, True])
@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float32),
                                                 (torch.float32, torch.float32),
                                                 (torch.float64, torch.float64)])
@pytest.mark.parametrize("seed", range(3))
def test_triton_equals_twin_and_float64(seed, src_dtype, dst_dtype, with_src_rows, store):
    c = [5, 64, 1100][seed]  # one column block, several, a ragged last one
    dst, rows, src, src_rows = _case(seed, 11, 7, c, src_dtype, dst_dtype, with_src_rows)
    want = dst.double().clone()
    picked = src if src_rows is None else src[src_rows]
    for i, r in enumerate(rows.tolist()):
        want[r] = picked[i].double() if store else want[r] + picked[i].double()
    got_t = add_rows_torch_(dst.clone(), rows, src, src_rows, store)
    got = triton_rows.add_rows_(dst.clone(), rows, src, src_rows, store)
    assert torch.equal(got, got_t)  # one rounding each way: the same bits
    tol = 1e-15 if dst_dtype == torch.float64 else 1e-6
    assert (got.double() - want).abs().max() <= tol * want.abs().max()
    untouched = torch.ones(dst.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(got[untouched], dst[untouched])


def test_nan_in_a_source_row_reaches_only_its_row():
    dst, rows, src, _ = _case(0, 9, 4, 8, torch.bfloat16, torch.float32, False)
    src[2, 3] = float("nan")
    got = triton_rows.add_rows_(dst.clone(), rows, src)
    assert torch.isnan(got[rows[2], 3]) and torch.isnan(got).sum() == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=30), st.integers(0, 2**31 - 1))
def test_layers_sum_every_position_onto_its_row_in_order(rows, seed):
    layers = distinct_layers(rows)
    seen = np.concatenate([p for p, _ in layers]) if layers else np.zeros(0, int)
    assert sorted(seen.tolist()) == list(range(len(rows)))  # every position once
    for pos, rws in layers:
        assert len(set(rws.tolist())) == len(rws)  # distinct in a layer
        assert np.array_equal(np.asarray(rows)[pos], rws)
    for r in set(rows):  # a row's positions come in their order, one layer after another
        order = [p for pos, _ in layers for p in pos.tolist() if rows[p] == r]
        assert order == sorted(order)
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(len(rows), 5, generator=g, dtype=torch.float64)
    dst = torch.zeros(7, 5, dtype=torch.float64)
    for pos, rws in layers:
        add_rows_(dst, torch.from_numpy(rws), src, torch.from_numpy(pos))
    want = torch.zeros(7, 5, dtype=torch.float64)
    for i, r in enumerate(rows):
        want[r] += src[i]
    assert torch.equal(dst, want)  # the same order of additions: the same bits


def test_bad_shapes_raise_naming_the_argument():
    dst = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="dst and src"):
        add_rows_(dst, torch.tensor([0]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="rows"):
        add_rows_(dst, torch.tensor([0, 1]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="column stride"):
        add_rows_(dst, torch.tensor([0, 1]), torch.zeros(3, 2).t())


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("b,t,hkv,d,dv", [(1, 9, 2, 8, 8), (3, 5, 3, 40, 24), (2, 7, 1, 1100, 64)])
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(2))
def test_add_kv_triton_equals_twin_and_float64(seed, src_dtype, b, t, hkv, d, dv, store):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(t + 4, b, hkv * (d + dv), generator=g)
    acc = wide[2:2 + t]  # rows of a larger buffer (a unit range of the ring's buffer)
    dk = torch.randn(b, t, hkv, d, generator=g).to(src_dtype)
    dvv = torch.randn(b, t, hkv, dv, generator=g).to(src_dtype)
    want = acc.double().clone()
    for bi in range(b):
        for ti in range(t):
            row = torch.cat([dk[bi, ti].flatten(), dvv[bi, ti].flatten()]).double()
            want[ti, bi] = row if store else want[ti, bi] + row
    got_t = add_kv_torch_(acc.clone(), dk, dvv, store)
    got = triton_rows.add_kv_(acc.clone(), dk, dvv, store)
    assert torch.equal(got, got_t)  # one conversion and one rounding each way: the same bits
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    out = wide.clone()
    assert add_kv_(out[2:2 + t], dk, dvv, store=store).data_ptr() == out[2:].data_ptr()
    assert torch.equal(out[2:2 + t], got) and torch.equal(out[:2], wide[:2])
    assert torch.equal(out[2 + t:], wide[2 + t:])


def test_add_kv_nan_reaches_only_its_element_and_bad_shapes_raise():
    acc = torch.zeros(4, 1, 2 * 6)
    dk, dv = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    dv[0, 1, 1, 2] = float("nan")
    got = triton_rows.add_kv_(acc.clone(), dk, dv)
    assert torch.isnan(got[1, 0, 6 + 5]) and torch.isnan(got).sum() == 1
    with pytest.raises(ValueError, match="acc must be"):
        add_kv_(torch.zeros(4, 1, 11), dk, dv)
    with pytest.raises(ValueError, match="acc must be"):
        add_kv_(acc, dk, dv[:, :3])
