"""longattn.common.merge: merging partials over any split of the keys equals attention over
all keys; -inf partials exact on either side; no NaN; in-place == out-of-place, also on views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn import reference as ref
from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.merge import merge_partials, merge_partials_
from longattn.common.testing import rel_error

HYP = settings(max_examples=60, deadline=None, derandomize=True)


def partials(rng, b, sq, sk, hq, hkv, d, cuts, mask):
    """Oracle attention over all keys and over each key range ``cuts[i]:cuts[i+1]``."""
    q = rng.standard_normal((b, sq, hq, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, d))
    full = ref.attention(q, k, v, mask=mask)
    m = None if mask is None else np.broadcast_to(mask, (b, hq, sq, sk))
    parts = []
    for a, z in zip(cuts, cuts[1:]):
        if z == a:  # an empty key range: out 0, lse -inf
            parts.append((np.zeros_like(full[0]), np.full_like(full[1], -np.inf)))
        else:
            parts.append(ref.attention(q, k[:, a:z], v[:, a:z],
                                       mask=None if m is None else m[..., a:z]))
    return full, parts


@st.composite
def splits(draw):
    hkv = draw(st.integers(1, 2))
    sk = draw(st.integers(1, 16))
    n = draw(st.integers(1, 6))
    cuts = sorted(draw(st.lists(st.integers(0, sk), min_size=n - 1, max_size=n - 1)))
    return dict(seed=draw(st.integers(0, 2**20)), b=draw(st.integers(1, 2)),
                sq=draw(st.integers(1, 9)), sk=sk, hq=hkv * draw(st.integers(1, 3)), hkv=hkv,
                d=draw(st.integers(1, 5)), cuts=[0, *cuts, sk],
                mask=draw(st.sampled_from(["none", "causal", "random", "window"])),
                tree=draw(st.booleans()))


def _mask(kind, rng, b, hq, sq, sk):
    if kind == "causal":
        return ref.causal_mask(sq, sk)
    if kind == "random":  # some rows and some partials fully masked
        return ref.random_mask((b, hq, sq, sk), 0.4, seed=int(rng.integers(1 << 30)))
    if kind == "window":
        return ref.window_mask(sq, sk, (1, 0))
    return None


def _merge_all(parts, dtype, tree):
    ts = [(torch.from_numpy(o).to(dtype), torch.from_numpy(l_).to(lse_dtype(dtype)))
          for o, l_ in parts]
    if len(ts) == 1:  # still merge once: into an empty accumulator (out 0, lse -inf)
        ts.insert(0, (torch.zeros_like(ts[0][0]), torch.full_like(ts[0][1], float("-inf"))))
    if not tree:  # left fold, as a ring does
        out, lse = ts[0]
        for o, l_ in ts[1:]:
            out, lse = merge_partials(out, lse, o, l_)
        return out, lse
    while len(ts) > 1:  # pairwise, as a tree does
        nxt = [merge_partials(*ts[i], *ts[i + 1]) for i in range(0, len(ts) - 1, 2)]
        ts = nxt + ([ts[-1]] if len(ts) % 2 else [])
    return ts[0]


@HYP
@given(splits())
def test_merging_any_key_split_equals_full_attention_fp64(c):
    rng = np.random.default_rng(c["seed"])
    mask = _mask(c["mask"], rng, c["b"], c["hq"], c["sq"], c["sk"])
    (fo, fl), parts = partials(rng, c["b"], c["sq"], c["sk"], c["hq"], c["hkv"], c["d"],
                               c["cuts"], mask)
    out, lse = _merge_all(parts, torch.float64, c["tree"])
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert rel_error(out, fo) <= 1e-12
    assert rel_error(lse, fl) <= 1e-12  # also: -inf exactly where the oracle has -inf
    dead = torch.from_numpy(np.isneginf(fl)).transpose(1, 2)
    assert (out[dead] == 0).all()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(splits(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_merging_low_precision_partials_accumulates_in_fp32(c, dtype):
    rng = np.random.default_rng(c["seed"])
    mask = _mask(c["mask"], rng, c["b"], c["hq"], c["sq"], c["sk"])
    (fo, fl), parts = partials(rng, c["b"], c["sq"], c["sk"], c["hq"], c["hkv"], c["d"],
                               c["cuts"], mask)
    out, lse = _merge_all(parts, dtype, c["tree"])
    assert out.dtype == torch.float32 and lse.dtype == lse_dtype(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert rel_error(out, fo) <= tol and rel_error(lse, fl) <= 1e-5


# --------------------------------------------------------------------------------------------
# -inf partials, NaN


def _rand(shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minus_inf_partial_on_either_side_is_exact(dtype):
    o = _rand((2, 5, 3, 4), 0).to(dtype)
    l_ = _rand((2, 3, 5), 1, 5.0).to(dtype)
    junk = _rand((2, 5, 3, 4), 2, 1e4).to(dtype)  # whatever a dead partial holds is ignored
    dead = torch.full_like(l_, float("-inf"))
    for args in ((o, l_, junk, dead), (junk, dead, o, l_)):
        out, lse = merge_partials(*args)
        assert torch.equal(out, o) and torch.equal(lse, l_)
        acc_o, acc_l = args[0].clone(), args[1].clone()
        merge_partials_(acc_o, acc_l, args[2], args[3])
        assert torch.equal(acc_o, o) and torch.equal(acc_l, l_)


def test_both_minus_inf_stays_zero_and_minus_inf():
    z = torch.zeros(1, 4, 2, 3)
    dead = torch.full((1, 2, 4), float("-inf"))
    out, lse = merge_partials(z, dead, torch.zeros_like(z), dead.clone())
    assert torch.equal(out, z) and torch.isneginf(lse).all()
    acc_o, acc_l = z.clone(), dead.clone()
    merge_partials_(acc_o, acc_l, z, dead)
    assert torch.equal(acc_o, z) and torch.isneginf(acc_l).all()


def test_mixed_rows_some_dead_on_each_side():
    o_a, o_b = _rand((1, 4, 1, 2), 3), _rand((1, 4, 1, 2), 4)
    l_a = torch.tensor([[[0.5, float("-inf"), 1.0, float("-inf")]]], dtype=torch.float64)
    l_b = torch.tensor([[[float("-inf"), 2.0, 1.0, float("-inf")]]], dtype=torch.float64)
    o_a[0, 1] = 7.0  # dead rows may carry anything
    o_b[0, 0] = -9.0
    o_a[0, 3] = 0.0
    o_b[0, 3] = 0.0
    out, lse = merge_partials(o_a, l_a, o_b, l_b)
    assert torch.equal(out[0, 0], o_a[0, 0]) and torch.equal(out[0, 1], o_b[0, 1])
    assert torch.allclose(out[0, 2], (o_a[0, 2] + o_b[0, 2]) / 2, rtol=1e-15, atol=0)
    assert torch.equal(out[0, 3], torch.zeros(1, 2, dtype=torch.float64))
    assert lse[0, 0, 0] == 0.5 and lse[0, 0, 1] == 2.0
    assert torch.isclose(lse[0, 0, 2], torch.tensor(1.0 + np.log(2.0), dtype=torch.float64))
    assert torch.isneginf(lse[0, 0, 3])


@pytest.mark.parametrize("gap", [0.0, 1e-8, 30.0, 700.0, 1e4, 1e30, 3e38])
def test_extreme_lse_differences_never_nan(gap):
    o_a, o_b = torch.ones(1, 2, 1, 2), -torch.ones(1, 2, 1, 2)
    l_a = torch.tensor([[[0.0, gap]]])
    l_b = torch.tensor([[[gap, 0.0]]])
    out, lse = merge_partials(o_a, l_a, o_b, l_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    w = torch.sigmoid(torch.tensor(gap, dtype=torch.float64)).float()
    assert torch.allclose(out[0, 0], (1 - 2 * w).expand(1, 2), atol=1e-6)
    assert torch.allclose(out[0, 1], (2 * w - 1).expand(1, 2), atol=1e-6)
    assert torch.allclose(lse, torch.logaddexp(l_a, l_b), rtol=1e-6)


def test_result_does_not_depend_on_argument_order():
    o_a, o_b = _rand((2, 3, 2, 4), 5), _rand((2, 3, 2, 4), 6)
    l_a, l_b = _rand((2, 2, 3), 7, 3.0), _rand((2, 2, 3), 8, 3.0)
    x = merge_partials(o_a, l_a, o_b, l_b)
    y = merge_partials(o_b, l_b, o_a, l_a)
    assert rel_error(x[0], y[0]) <= 1e-15 and rel_error(x[1], y[1]) <= 1e-15


# --------------------------------------------------------------------------------------------
# in-place variant


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 2**20), st.integers(1, 3), st.integers(1, 8), st.integers(1, 3),
       st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_in_place_equals_out_of_place(seed, b, s, h, dtype):
    acc = acc_dtype(dtype)
    o_a = _rand((b, s, h, 3), seed).to(acc)
    o_b = _rand((b, s, h, 3), seed + 1).to(dtype)
    l_a = _rand((b, h, s), seed + 2, 4.0).to(acc)
    l_b = _rand((b, h, s), seed + 3, 4.0).to(acc)
    l_a[..., ::3] = float("-inf")
    l_b[..., 1::4] = float("-inf")
    want_o, want_l = merge_partials(o_a, l_a, o_b, l_b)
    out, lse = o_a.clone(), l_a.clone()
    ret = merge_partials_(out, lse, o_b, l_b)
    assert ret[0] is out and ret[1] is lse
    assert torch.equal(out, want_o) and torch.equal(lse, want_l)


def test_in_place_on_views_of_row_halves():
    """Zigzag ring attention merges into the back half of the rows of its accumulators."""
    b, s, h, d = 2, 8, 3, 4
    acc_o = _rand((b, s, h, d), 10)
    acc_l = _rand((b, h, s), 11, 2.0)
    o_b = _rand((b, s // 2, h, d), 12)
    l_b = _rand((b, h, s // 2), 13, 2.0)
    l_b[0, 1, 2] = float("-inf")
    before_o, before_l = acc_o.clone(), acc_l.clone()
    want = merge_partials(acc_o[:, s // 2:], acc_l[:, :, s // 2:], o_b, l_b)
    view_o, view_l = acc_o[:, s // 2:], acc_l[:, :, s // 2:]  # non-contiguous lse view
    assert not view_l.is_contiguous()
    merge_partials_(view_o, view_l, o_b, l_b)
    assert torch.equal(acc_o[:, s // 2:], want[0]) and torch.equal(acc_l[:, :, s // 2:], want[1])
    assert torch.equal(acc_o[:, : s // 2], before_o[:, : s // 2])  # other half untouched
    assert torch.equal(acc_l[:, :, : s // 2], before_l[:, :, : s // 2])
    # front half, too (strided along seq inside a zigzag block pair)
    acc2_o, acc2_l = before_o.clone(), before_l.clone()
    want2 = merge_partials(before_o[:, ::2], before_l[:, :, ::2], o_b, l_b)
    merge_partials_(acc2_o[:, ::2], acc2_l[:, :, ::2], o_b, l_b)
    assert torch.equal(acc2_o[:, ::2], want2[0]) and torch.equal(acc2_l[:, :, ::2], want2[1])
    assert torch.equal(acc2_o[:, 1::2], before_o[:, 1::2])


# --------------------------------------------------------------------------------------------
# autograd through merge_partials (ring attention differentiates through the merges)


def test_merge_is_differentiable_and_gradcheck_passes():
    o_a = _rand((1, 3, 2, 2), 20).requires_grad_()
    o_b = _rand((1, 3, 2, 2), 21).requires_grad_()
    l_a = _rand((1, 2, 3), 22).requires_grad_()
    l_b = _rand((1, 2, 3), 23).requires_grad_()
    assert torch.autograd.gradcheck(merge_partials, (o_a, l_a, o_b, l_b))


def test_gradients_through_a_dead_side_are_finite_and_exact():
    o_a = _rand((1, 3, 2, 2), 24).requires_grad_()
    o_b = _rand((1, 3, 2, 2), 25).requires_grad_()
    l_a = _rand((1, 2, 3), 26).requires_grad_()
    l_b = torch.full((1, 2, 3), float("-inf"), dtype=torch.float64, requires_grad=True)
    out, lse = merge_partials(o_a, l_a, o_b, l_b)
    (out.sum() * 2 + lse.sum() * 3).backward()
    for t in (o_a, o_b, l_a, l_b):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(o_a.grad, torch.full_like(o_a, 2.0))
    assert torch.equal(o_b.grad, torch.zeros_like(o_b))
    assert torch.equal(l_a.grad, torch.full_like(l_a, 3.0))
    assert torch.equal(l_b.grad, torch.zeros_like(l_b))


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises():
    o, l_ = torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        merge_partials(o, l_, torch.zeros(1, 4, 2, 4), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="out_a"):
        merge_partials(None, l_, o, l_)
    with pytest.raises(TypeError, match="lse_b"):
        merge_partials(o, l_, o, np.zeros((1, 2, 3)))
    # lse laid out [B, S, H] instead of [B, H, S]
    with pytest.raises(ValueError, match="lse"):
        merge_partials(o, torch.zeros(1, 3, 2), o, torch.zeros(1, 3, 2))
    sq = torch.zeros(1, 2, 2, 4)  # S == H: a transposed lse has the right shape
    assert merge_partials(sq, torch.zeros(1, 2, 2), sq, torch.zeros(1, 2, 2))[0].shape == sq.shape


def test_bad_input_raises_in_place():
    o, l_ = torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="out_b"):  # would broadcast silently
        merge_partials_(o.clone(), l_.clone(), torch.zeros(1, 3, 2, 1), l_)
    with pytest.raises(ValueError, match="lse"):
        merge_partials_(o.clone(), l_.clone(), o, torch.zeros(1, 2, 1))
    with pytest.raises(TypeError, match="out"):  # accumulators must be fp32 / fp64
        merge_partials_(o.bfloat16(), l_.clone(), o, l_)
