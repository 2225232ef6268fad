"""tree_combine: the exact LSE combination of partials over disjoint key sets."""

from __future__ import annotations

import numpy as np
import pytest

from longattn.reference import attention, causal_mask, random_mask, tree_combine


def rel(a, e):
    a, e = np.asarray(a), np.asarray(e)
    assert not np.isnan(a).any()
    n = np.linalg.norm(e.ravel())
    return np.linalg.norm((a - e).ravel()) / (n if n else 1.0)


def _split_points(rng, sk, parts):
    cuts = np.sort(rng.integers(0, sk + 1, size=parts - 1))  # repeated cuts: empty parts
    return [0, *cuts.tolist(), sk]


@pytest.mark.parametrize("seed", range(16))
def test_combining_key_splits_equals_full_attention(seed):
    rng = np.random.default_rng(seed)
    b, sq, sk = int(rng.integers(1, 3)), int(rng.integers(1, 7)), int(rng.integers(1, 12))
    hkv = int(rng.integers(1, 3))
    hq, d = hkv * int(rng.integers(1, 3)), int(rng.integers(1, 5))
    q = rng.standard_normal((b, sq, hq, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, d))
    mask = [None, causal_mask(sq, sk), random_mask((b, hq, sq, sk), 0.5, seed=seed)][seed % 3]
    full_o, full_l = attention(q, k, v, mask=mask)
    cuts = _split_points(rng, sk, int(rng.integers(1, 6)))
    outs, lses = [], []
    for a, z in zip(cuts, cuts[1:]):
        m = None if mask is None else np.broadcast_to(mask, (b, hq, sq, sk))[..., a:z]
        o, l_ = attention(q, k[:, a:z], v[:, a:z], mask=m) if z > a else (
            np.zeros_like(full_o), np.full_like(full_l, -np.inf))
        outs.append(o)
        lses.append(l_)
    order = rng.permutation(len(outs))  # the combination is order-free
    out, lse = tree_combine([outs[i] for i in order], [lses[i] for i in order])
    assert out.shape == full_o.shape and lse.shape == full_l.shape
    assert rel(out, full_o) <= 1e-13
    assert np.array_equal(np.isneginf(lse), np.isneginf(full_l))
    fin = np.isfinite(full_l)
    assert np.allclose(lse[fin], full_l[fin], rtol=1e-14, atol=1e-13)


def test_minus_inf_partials_contribute_exactly_nothing():
    rng = np.random.default_rng(1)
    o = rng.standard_normal((2, 3, 2, 4))
    l_ = rng.standard_normal((2, 2, 3))
    junk = rng.standard_normal(o.shape) * 1e6  # any out of a dead partial is ignored
    dead = np.full_like(l_, -np.inf)
    for outs, lses in (([o, junk], [l_, dead]), ([junk, o], [dead, l_]),
                       ([junk, o, junk], [dead, l_, dead])):
        out, lse = tree_combine(outs, lses)
        assert np.array_equal(out, o) and np.array_equal(lse, l_)


def test_all_minus_inf_gives_zero_and_minus_inf():
    z = np.zeros((1, 2, 3, 4))
    dead = np.full((1, 3, 2), -np.inf)
    out, lse = tree_combine([z, z, z], [dead, dead, dead])
    assert np.array_equal(out, z) and np.isneginf(lse).all()
    # partly dead rows
    o = np.ones((1, 2, 3, 4))
    l_ = np.array([[[0.0, -np.inf]] * 3])
    out, lse = tree_combine([o, z], [l_, dead])
    assert not np.isnan(out).any()
    assert np.array_equal(out[0, 0], o[0, 0]) and np.array_equal(lse, l_)


def test_single_partial_is_identity_and_nesting_is_associative():
    rng = np.random.default_rng(2)
    outs = [rng.standard_normal((1, 4, 2, 3)) for _ in range(4)]
    lses = [rng.standard_normal((1, 2, 4)) * 3 for _ in range(4)]
    o, l_ = tree_combine(outs[:1], lses[:1])
    assert np.allclose(o, outs[0], rtol=0, atol=1e-15) and np.allclose(l_, lses[0], atol=1e-15)
    flat = tree_combine(outs, lses)
    left = tree_combine(*zip(tree_combine(outs[:2], lses[:2]), tree_combine(outs[2:], lses[2:])))
    assert rel(left[0], flat[0]) <= 1e-14 and rel(left[1], flat[1]) <= 1e-14


def test_weights_follow_the_lse_rule():
    o1, o2 = np.full((1, 1, 1, 1), 1.0), np.full((1, 1, 1, 1), 3.0)
    l1, l2 = np.full((1, 1, 1), 0.0), np.full((1, 1, 1), np.log(3.0))
    out, lse = tree_combine([o1, o2], [l1, l2])
    assert np.isclose(out.item(), (1 * 1 + 3 * 3) / 4, rtol=1e-15)
    assert np.isclose(lse.item(), np.log(4.0), rtol=1e-15)


def test_extreme_lse_values_do_not_overflow():
    o = [np.full((1, 1, 1, 2), float(i)) for i in range(3)]
    l_ = [np.full((1, 1, 1), x) for x in (1e4, 1e4 - 1.0, -1e4)]
    out, lse = tree_combine(o, l_)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    w = np.exp([0.0, -1.0]) / np.exp([0.0, -1.0]).sum()
    assert np.allclose(out.ravel(), w @ [0.0, 1.0], rtol=1e-14)
    assert np.isclose(lse.item(), 1e4 + np.log1p(np.exp(-1.0)), rtol=1e-15)


def test_bad_input_raises():
    o = np.zeros((1, 2, 1, 3))
    l_ = np.zeros((1, 1, 2))
    with pytest.raises(ValueError):
        tree_combine([], [])
    with pytest.raises(ValueError):
        tree_combine([o, o], [l_])
    with pytest.raises(ValueError, match="outs"):
        tree_combine([o, np.zeros((1, 3, 1, 3))], [l_, np.zeros((1, 1, 3))])
    with pytest.raises(ValueError, match="lse"):  # lse [B, S, H] instead of [B, H, S]
        tree_combine([o], [np.zeros((1, 2, 1))])
