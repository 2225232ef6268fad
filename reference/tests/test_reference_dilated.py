"""The dilated-attention oracle: a hand-computed 3-branch example, an independent formulation,
finite-difference gradients, and bad input."""

import numpy as np
import pytest

from longattn.reference import attention, causal_mask, dilated_attention
from longattn.reference.dilated import (
    dilated_attention_backward,
    dilated_attention_union,
    dilated_masks,
)

# Three branches on S = 5 (no segment length divides 5), Hq = 2 query heads sharing one kv head
# (GQA), D = 1, scale = 1:
#   A = (w 2, r 1): segments {0,1} {2,3} {4}            (both heads)
#   B = (w 4, r 2): head 0 (offset 0): {0,2} {4};  head 1 (offset 1): {1,3}
#   C = (w 8, r 4): head 0 (offset 0): {0,4};      head 1 (offset 1): {1}
# v = [1, 2, 4, 8, 16]. With q = 0 every visible key weighs 1, so each output is the mean of v
# over the multiset of keys its branches select, and lse = log(number of keys in the multiset).
SEG, RATES = [2, 4, 8], [1, 2, 4]
V = np.array([1.0, 2.0, 4.0, 8.0, 16.0])

# (row multiset of keys, by hand) -> value
HAND_NONCAUSAL = {  # [head][pos] = (sum of v over the multiset, multiset size)
    0: [(1 + 2 + 1 + 4 + 1 + 16, 6),  # A {0,1}, B {0,2}, C {0,4}
        (1 + 2, 2),                   # A {0,1}; B and C skip odd rows for offset 0
        (4 + 8 + 1 + 4, 4),           # A {2,3}, B {0,2}
        (4 + 8, 2),                   # A {2,3}
        (16 + 16 + 1 + 16, 4)],       # A {4}, B {4}, C {0,4}
    1: [(1 + 2, 2),                   # A {0,1}
        (1 + 2 + 2 + 8 + 2, 5),       # A {0,1}, B {1,3}, C {1}
        (4 + 8, 2),                   # A {2,3}
        (4 + 8 + 2 + 8, 4),           # A {2,3}, B {1,3}
        (16, 1)],                     # A {4}; B has no offset-1 row in {4}; C none either
}
HAND_CAUSAL = {
    0: [(1 + 1 + 1, 3),               # A {0}, B {0}, C {0}
        (1 + 2, 2),                   # A {0,1}
        (4 + 1 + 4, 3),               # A {2}, B {0,2}
        (4 + 8, 2),                   # A {2,3}
        (16 + 16 + 1 + 16, 4)],       # A {4}, B {4}, C {0,4}
    1: [(1, 1),                       # A {0}
        (1 + 2 + 2 + 2, 4),           # A {0,1}, B {1}, C {1}
        (4, 1),                       # A {2}
        (4 + 8 + 2 + 8, 4),           # A {2,3}, B {1,3}
        (16, 1)],                     # A {4}
}


def _hand_inputs(q_value, k_log_weights):
    q = np.full((1, 5, 2, 1), q_value)
    k = np.asarray(k_log_weights, dtype=np.float64).reshape(1, 5, 1, 1)
    v = V.reshape(1, 5, 1, 1)
    return q, k, v


@pytest.mark.parametrize("causal, table", [(False, HAND_NONCAUSAL), (True, HAND_CAUSAL)])
def test_hand_computed_three_branches_uniform(causal, table):
    q, k, v = _hand_inputs(0.0, np.zeros(5))
    out, lse = dilated_attention(q, k, v, SEG, RATES, causal=causal, scale=1.0)
    for h in (0, 1):
        for i, (num, cnt) in enumerate(table[h]):
            assert out[0, i, h, 0] == pytest.approx(num / cnt, rel=1e-14), (h, i)
            assert lse[0, h, i] == pytest.approx(np.log(cnt), rel=1e-14), (h, i)


def test_hand_computed_denominator_weights():
    # q = 1, k_j = log c_j, scale 1: key j weighs c_j. Head 0, row 0, non-causal:
    #   A {0,1}: c = 1, 2 -> s_A = 3, out_A = (1*1 + 2*2)/3 = 5/3
    #   B {0,2}: c = 1, 1 -> s_B = 2, out_B = (1 + 4)/2 = 5/2
    #   C {0,4}: c = 1, 1 -> s_C = 2, out_C = (1 + 16)/2 = 17/2
    #   denominator mixing: (3*5/3 + 2*5/2 + 2*17/2) / 7 = 27/7, lse = log 7
    # (the plain average of the three branches, 38/9, would be wrong).
    c = np.array([1.0, 2.0, 1.0, 3.0, 1.0])
    q, k, v = _hand_inputs(1.0, np.log(c))
    out, lse = dilated_attention(q, k, v, SEG, RATES, scale=1.0)
    assert out[0, 0, 0, 0] == pytest.approx(27 / 7, rel=1e-14)
    assert lse[0, 0, 0] == pytest.approx(np.log(7), rel=1e-14)
    # Head 1, row 3: A {2,3}: c 1,3 -> s 4, sum c*v = 4 + 24 = 28; B {1,3}: c 2,3 -> s 5,
    # sum c*v = 4 + 24 = 28. Mixed: 56 / 9, lse log 9.
    assert out[0, 3, 1, 0] == pytest.approx(56 / 9, rel=1e-14)
    assert lse[0, 1, 3] == pytest.approx(np.log(9), rel=1e-14)


SCHEDULES = [
    ([4], [1]),
    ([3, 6], [1, 2]),
    ([2, 4, 8], [1, 2, 4]),
    ([4, 8, 16], [1, 2, 3]),       # 8 is not a multiple of 3
    ([5, 7], [2, 3]),              # no r = 1 branch: some rows are uncovered
    ([2, 4, 8, 16, 32], [1, 2, 4, 6, 12]),   # the paper's shape, scaled down
]


def _rand(rng, b, s, hq, hkv, d, dv):
    return (rng.standard_normal((b, s, hq, d)), rng.standard_normal((b, s, hkv, d)),
            rng.standard_normal((b, s, hkv, dv)))


@pytest.mark.parametrize("seg, rates", SCHEDULES)
@pytest.mark.parametrize("causal", [False, True])
def test_literal_equals_union_of_keys(seg, rates, causal):
    rng = np.random.default_rng(len(seg) * 7 + causal)
    for s, hq, hkv in [(13, 4, 2), (17, 3, 3), (9, 6, 1)]:
        q, k, v = _rand(rng, 2, s, hq, hkv, 4, 3)
        out, lse = dilated_attention(q, k, v, seg, rates, causal=causal)
        out2, lse2 = dilated_attention_union(q, k, v, seg, rates, causal=causal)
        np.testing.assert_allclose(out, out2, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse2))
        fin = np.isfinite(lse)
        np.testing.assert_allclose(lse[fin], lse2[fin], rtol=1e-12, atol=1e-12)
        assert not np.isnan(out).any()


def test_uncovered_rows_are_zero():
    rng = np.random.default_rng(0)
    q, k, v = _rand(rng, 1, 10, 2, 2, 4, 4)
    out, lse = dilated_attention(q, k, v, [4], [2])  # head 0 keeps even rows, head 1 odd rows
    assert np.all(out[0, 1::2, 0] == 0) and np.all(np.isneginf(lse[0, 0, 1::2]))
    assert np.all(out[0, 0::2, 1] == 0) and np.all(np.isneginf(lse[0, 1, 0::2]))
    assert np.isfinite(lse[0, 0, 0::2]).all() and np.isfinite(lse[0, 1, 1::2]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_single_dense_branch_is_plain_attention(causal):
    rng = np.random.default_rng(1)
    q, k, v = _rand(rng, 2, 11, 4, 2, 5, 5)
    out, lse = dilated_attention(q, k, v, [16], [1], causal=causal)
    mask = causal_mask(11) if causal else None
    o2, l2 = attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, o2, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lse, l2, rtol=1e-13, atol=1e-13)


def test_causal_ignores_the_future():
    rng = np.random.default_rng(2)
    q, k, v = _rand(rng, 1, 20, 4, 4, 3, 3)
    seg, rates = [3, 6, 12], [1, 2, 4]
    out, _ = dilated_attention(q, k, v, seg, rates, causal=True)
    t = 11
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, t:] = rng.standard_normal(a[:, t:].shape)
    out2, _ = dilated_attention(q2, k2, v2, seg, rates, causal=True)
    np.testing.assert_array_equal(out[:, :t], out2[:, :t])
    assert np.abs(out[:, t:] - out2[:, t:]).max() > 1e-3


def test_masks_cover_heads_together():
    # With H >= r every position is kept by some head of each branch (section 2.3).
    m = dilated_masks(12, 4, [6, 12], [2, 4])
    diag = np.einsum("bhii->bhi", m)
    assert diag.any(axis=1).all()


@pytest.mark.parametrize("case", range(8))
def test_backward_matches_finite_differences(case):
    rng = np.random.default_rng(100 + case)
    seg, rates = SCHEDULES[case % len(SCHEDULES)]
    causal = bool(case % 2)
    s, hq, hkv = [(7, 2, 1), (9, 4, 2), (6, 3, 3), (10, 2, 2)][case % 4]
    q, k, v = _rand(rng, 1, s, hq, hkv, 3, 2)
    dout = rng.standard_normal((1, s, hq, 2))
    dlse = rng.standard_normal((1, hq, s)) if case % 3 == 0 else None

    def loss(q_, k_, v_):
        o, l = dilated_attention(q_, k_, v_, seg, rates, causal=causal)
        val = (o * dout).sum()
        if dlse is not None:
            val += (np.where(np.isfinite(l), l, 0.0) * dlse).sum()
        return val

    grads = dilated_attention_backward(dout, q, k, v, seg, rates, causal=causal, dlse=dlse)
    eps = 1e-6
    for x, g in zip((q, k, v), grads):
        num = np.zeros_like(x)
        it = np.nditer(x, flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            xp, xm = x.copy(), x.copy()
            xp[i] += eps
            xm[i] -= eps
            args_p = [xp if a is x else a for a in (q, k, v)]
            args_m = [xm if a is x else a for a in (q, k, v)]
            num[i] = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        err = np.linalg.norm(num - g) / max(np.linalg.norm(num), 1e-300)
        assert err <= 1e-6, err


def test_bad_input():
    q = np.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="segment_lengths"):
        dilated_attention(q, q, q, [4, 8], [1])
    with pytest.raises(ValueError, match="segment_lengths"):
        dilated_attention(q, q, q, [], [])
    with pytest.raises(ValueError, match="dilation_rates"):
        dilated_attention(q, q, q, [4], [0])
    with pytest.raises(ValueError, match="segment_lengths"):
        dilated_attention(q, q, q, [4.5], [1])
    with pytest.raises(ValueError, match="length"):
        dilated_attention(q, q[:, :4], q[:, :4], [4], [1])
    with pytest.raises(ValueError, match="heads"):
        dilated_attention(q, np.zeros((1, 8, 3, 4)), np.zeros((1, 8, 3, 4)), [4], [1])
