"""The HyperAttention oracle: exact cases, a hand-checked case, a second (literal, blockwise)
implementation of the algorithm, and its backward against finite differences."""

import numpy as np
import pytest

from longattn.reference import attention, causal_mask, tree_combine
from longattn.reference.hyper import (
    gray_rank,
    hyper_attention,
    hyper_attention_backward,
    hyper_plan,
    hyper_weights,
    lsh_rank,
    window_start,
)


def _rand(seed, b, sq, sk, hq, hkv, d, dv=None):
    rng = np.random.default_rng(seed)
    dv = d if dv is None else dv
    return (rng.standard_normal((b, sq, hq, d)), rng.standard_normal((b, sk, hkv, d)),
            rng.standard_normal((b, sk, hkv, dv)), rng.standard_normal((d, 4)))


def _rel(a, e):
    return np.linalg.norm((a - e).ravel()) / np.linalg.norm(e.ravel())


def _samples(seed, sq, sk, b, hkv, m, causal, min_seq_len):
    _, calls = hyper_plan(sq, sk, causal, min_seq_len)
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, nk, (b, hkv, m)) for (_, _, _, nk) in calls]) if calls \
        else np.zeros((0, b, hkv, m), dtype=np.int64)


# ---------------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [7, 16, 33])
def test_no_samples_one_block_is_exact(causal, s):
    q, k, v, p = _rand(s, 2, s, s, 4, 2, 8)
    samp = _samples(0, s, s, 2, 2, 0, causal, 2)
    out, lse = hyper_attention(q, k, v, projections=p, sample_indices=samp, block_size=s,
                               min_seq_len=2, causal=causal)
    mask = causal_mask(s) if causal else None
    ref, ref_lse = attention(q, k, v, mask=mask)
    assert _rel(out, ref) < 1e-12 and _rel(lse, ref_lse) < 1e-12
    assert len(hyper_plan(s, s, causal, 2)[1]) >= 1  # the approximate path really ran


@pytest.mark.parametrize("causal", [False, True])
def test_short_sequence_is_exact(causal):
    q, k, v, p = _rand(1, 1, 12, 12, 2, 1, 4)
    out, lse = hyper_attention(q, k, v, projections=p, sample_indices=None, block_size=2,
                               min_seq_len=12, causal=causal)
    ref, ref_lse = attention(q, k, v, mask=causal_mask(12) if causal else None)
    assert _rel(out, ref) < 1e-12 and _rel(lse, ref_lse) < 1e-12


def test_not_exact_when_approximating():
    q, k, v, p = _rand(2, 1, 32, 32, 2, 2, 8)
    samp = _samples(0, 32, 32, 1, 2, 4, False, 4)
    out, _ = hyper_attention(q, k, v, projections=p, sample_indices=samp, block_size=8,
                             min_seq_len=4, causal=False)
    assert _rel(out, attention(q, k, v)[0]) > 1e-3


# ---------------------------------------------------------------------------------- pieces


def test_plan_partitions_causal_triangle():
    for n, msl in [(1, 1), (9, 2), (33, 4), (64, 8), (100, 7)]:
        leaves, calls = hyper_plan(n, n, True, msl)
        cover = np.zeros((n, n), dtype=int)
        for a, m in leaves:
            assert m <= msl
            cover[a:a + m, a:a + m] += np.tril(np.ones((m, m), dtype=int))
        for q0, nq, k0, nk in calls:
            assert k0 + nk == q0 and nq in (nk, nk - 1)  # second half vs first half
            cover[q0:q0 + nq, k0:k0 + nk] += 1
        np.testing.assert_array_equal(cover, np.tril(np.ones((n, n), dtype=int)))
    assert hyper_plan(10, 20, False, 20) == ([], [])
    assert hyper_plan(10, 21, False, 20) == ([], [(0, 10, 0, 21)])
    # breadth-first order: the top split first
    assert hyper_plan(16, 16, True, 4)[1] == [(8, 8, 0, 8), (4, 4, 0, 4), (12, 4, 8, 4)]


def test_gray_rank_is_true_gray_order():
    r = 8
    n = np.arange(2 ** r)
    g = n ^ (n >> 1)
    np.testing.assert_array_equal(gray_rank(g), n)
    # codes in rank order: neighbours differ in exactly one hyperplane (incl. the wrap-around)
    codes = np.empty(2 ** r, dtype=np.int64)
    codes[gray_rank(n)] = n
    diff = codes ^ np.roll(codes, -1)
    assert all(bin(int(x)).count("1") == 1 for x in diff)


def test_lsh_rank_bits():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    w = np.eye(2)  # bit0 = x0 > 0, bit1 = x1 > 0
    # codes 1, 2, 0, 3 -> Gray ranks 1, 3, 0, 2
    np.testing.assert_array_equal(lsh_rank(x, w), [1, 3, 0, 2])


def test_window_start():
    i = np.arange(10)
    np.testing.assert_array_equal(window_start(i, 10, 4, False), [0, 0, 0, 0, 4, 4, 4, 4, 8, 8])
    np.testing.assert_array_equal(window_start(i, 10, 4, True), [0, 0, 0, 1, 2, 3, 4, 5, 6, 6])
    np.testing.assert_array_equal(window_start(i, 3, 4, True), np.zeros(10))


def test_hand_checked_weights():
    # D = 1, one hyperplane: rows with x > 0 hash to rank 1, others to rank 0.
    q = np.array([1.0, -1.0, 2.0, -2.0, 3.0])[None, :, None, None]
    k = np.array([-1.0, 1.0, -2.0, 2.0, -3.0])[None, :, None, None]
    proj = np.ones((1, 1))
    # sorted queries: 1, 3 (rank 0), 0, 2, 4 (rank 1); sorted keys: 0, 2, 4 (rank 0), 1, 3
    samples = np.array([0, 4, 4])[None, None, None, :]  # sorted key positions: keys 0, 3, 3
    w = hyper_weights(q, k, proj, samples, block_size=2, min_seq_len=1, causal=False)[0, 0]
    x = 5 / 3
    want = np.array([
        # keys:  0  1  2  3  4   (query 0 = sorted 2: window sorted keys [2, 4) = keys 4, 1)
        [x, 1, 0, 2 * x, 1],
        [1, 0, 1, 2 * x, 0],  # query 1 = sorted 0: window keys 0, 2; key 0 sampled in window
        [x, 1, 0, 2 * x, 1],  # query 2 = sorted 3: same block as query 0
        [1, 0, 1, 2 * x, 0],  # query 3 = sorted 1: same block as query 1
        [x, 0, 0, 1, 0],  # query 4 = sorted 4: tail block [4, 5) = key 3 only (no padding)
    ])
    np.testing.assert_allclose(w, want, rtol=0, atol=1e-15)
    ws = hyper_weights(q, k, proj, samples, block_size=2, min_seq_len=1, causal=False,
                       smooth_block=True)[0, 0]
    # smooth: start(i) = clip(i - 1, 0, 3): sorted 0 -> [0,2), 1 -> [0,2), 2 -> [1,3),
    # 3 -> [2,4), 4 -> [3,5); sorted keys 0..4 are keys 0, 2, 4, 1, 3
    want_s = np.array([
        [x, 0, 1, 2 * x, 1],  # query 0 = sorted 2: keys 2, 4
        [1, 0, 1, 2 * x, 0],  # query 1 = sorted 0: keys 0, 2
        [x, 1, 0, 2 * x, 1],  # query 2 = sorted 3: keys 4, 1
        [1, 0, 1, 2 * x, 0],  # query 3 = sorted 1
        [x, 1, 0, 1, 0],  # query 4 = sorted 4: keys 1, 3 (key 3 sampled in window: dropped)
    ])
    np.testing.assert_allclose(ws, want_s, rtol=0, atol=1e-15)


def test_tail_block_has_no_padding_keys():
    # 5 keys, block 4: the last sorted query's block holds exactly one key, so (no samples)
    # its lse is that key's score exactly (a zero-padded key would add exp(0)).
    q, k, v, p = _rand(3, 1, 5, 5, 1, 1, 4)
    w = hyper_weights(q, k, p, None, block_size=4, min_seq_len=1, causal=False)
    assert sorted(w[0, 0].sum(1).tolist()) == [1, 4, 4, 4, 4]
    _, lse = hyper_attention(q, k, v, projections=p, sample_indices=None, block_size=4,
                             min_seq_len=1, causal=False)
    row = int(np.argmin(w[0, 0].sum(1)))
    j = int(np.argmax(w[0, 0, row]))
    assert abs(lse[0, 0, row] - q[0, row, 0] @ k[0, j, 0] / 2) < 1e-12


# ------------------------------------------------------------------- literal second implementation


def _literal_core(q, k, v, proj, samp, bs, smooth, scale):
    """One core call for one head, written as the paper's code does it: sort, blocks, samples
    with an n/m weight, merge of two partials, un-sort. q [nq, D], k/v [nk, D]."""
    nq, nk = len(q), len(k)
    pq = np.argsort(lsh_rank(q, proj), kind="stable")
    pk = np.argsort(lsh_rank(k, proj), kind="stable")
    qs, ks, vs = q[pq], k[pk], v[pk]
    out = np.zeros((nq, v.shape[1]))
    lse = np.full(nq, -np.inf)
    for i in range(nq):
        lo = window_start(i, nk, bs, smooth)
        hi = min(lo + bs, nk)
        parts_o, parts_l = [], []
        if hi > lo:
            s = ks[lo:hi] @ qs[i] * scale
            mx = s.max()
            e = np.exp(s - mx)
            parts_o.append(e @ vs[lo:hi] / e.sum())
            parts_l.append(mx + np.log(e.sum()))
        keep = [j for j in (samp if samp is not None else []) if not lo <= j < hi]
        if keep:
            s = ks[keep] @ qs[i] * scale
            mx = s.max()
            e = np.exp(s - mx)
            parts_o.append(e @ vs[keep] / e.sum())
            parts_l.append(mx + np.log(e.sum()) + np.log(nk / len(samp)))
        if parts_o:
            o, l_ = tree_combine([p[None, None, None] for p in parts_o],
                                 [np.array(x).reshape(1, 1, 1) for x in parts_l])
            out[pq[i]], lse[pq[i]] = o[0, 0, 0], l_[0, 0, 0]
    return out, lse


def _literal(q, k, v, proj, samples, bs, msl, causal, smooth):
    b, s, hq, d = q.shape
    g = hq // k.shape[2]
    scale = d ** -0.5
    leaves, calls = hyper_plan(s, k.shape[1], causal, msl)
    cid = {c: i for i, c in enumerate(calls)}
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    lse = np.full((b, hq, s), -np.inf)
    for bi in range(b):
        for h in range(hq):
            qh, kh, vh = q[bi, :, h], k[bi, :, h // g], v[bi, :, h // g]

            def rec(a, n, qh=qh, kh=kh, vh=vh, bi=bi, h=h):
                if n <= msl:
                    o, l_ = attention(qh[None, a:a + n, None], kh[None, a:a + n, None],
                                      vh[None, a:a + n, None], mask=causal_mask(n))
                    return o[0, :, 0], l_[0, 0]
                n1 = n - n // 2
                o1, l1 = rec(a, n1)
                o2, l2 = rec(a + n1, n // 2)
                c = cid[(a + n1, n // 2, a, n1)]
                oc, lc = _literal_core(qh[a + n1:a + n], kh[a:a + n1], vh[a:a + n1], proj,
                                       samples[c, bi, h // g], bs, smooth, scale)
                o2, l2 = tree_combine([o2[None, :, None], oc[None, :, None]],
                                      [l2[None, None], lc[None, None]])
                return np.concatenate([o1, o2[0, :, 0]]), np.concatenate([l1, l2[0, 0]])

            if causal:
                o, l_ = rec(0, s)
            else:
                o, l_ = _literal_core(qh, kh, vh, proj, samples[0, bi, h // g], bs, smooth, scale)
            out[bi, :, h], lse[bi, h] = o, l_
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("s,bs,msl,m", [(37, 4, 5, 6), (24, 8, 3, 3), (19, 5, 2, 9)])
def test_matches_literal_blockwise_algorithm(causal, smooth, s, bs, msl, m):
    q, k, v, p = _rand(s * bs + m, 2, s, s, 4, 2, 6)
    samp = _samples(s, s, s, 2, 2, m, causal, msl)
    out, lse = hyper_attention(q, k, v, projections=p, sample_indices=samp, block_size=bs,
                               min_seq_len=msl, causal=causal, smooth_block=smooth)
    lo, ll = _literal(q, k, v, p, samp, bs, msl, causal, smooth)
    assert _rel(out, lo) < 1e-12 and _rel(lse, ll) < 1e-12


def test_noncausal_sq_ne_sk_matches_literal():
    q, k, v, p = _rand(5, 1, 9, 23, 2, 1, 4)
    samp = _samples(1, 9, 23, 1, 1, 5, False, 4)
    out, lse = hyper_attention(q, k, v, projections=p, sample_indices=samp, block_size=4,
                               min_seq_len=4, causal=False)
    lo, ll = _literal(q, k, v, p, samp, 4, 4, False, False)
    assert _rel(out, lo) < 1e-12 and _rel(lse, ll) < 1e-12


def test_duplicate_samples_count_twice():
    q, k, v, p = _rand(6, 1, 16, 16, 1, 1, 4)
    one = np.array([3, 11])[None, None, None]
    two = np.array([3, 3, 11, 11])[None, None, None]  # same estimate: each counts n/m = 4
    a = hyper_weights(q, k, p, one, block_size=4, min_seq_len=2, causal=False)
    b = hyper_weights(q, k, p, two, block_size=4, min_seq_len=2, causal=False)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    assert set(np.unique(a)) <= {0.0, 1.0, 8.0}


# ---------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("causal,smooth", [(False, False), (True, False), (True, True)])
def test_backward_matches_finite_differences(causal, smooth):
    q, k, v, p = _rand(7, 1, 13, 13, 2, 1, 3)
    samp = _samples(2, 13, 13, 1, 1, 4, causal, 3)
    kw = dict(projections=p, sample_indices=samp, block_size=3, min_seq_len=3, causal=causal,
              smooth_block=smooth)
    rng = np.random.default_rng(8)
    dout = rng.standard_normal(q.shape)
    dlse = rng.standard_normal((1, 2, 13))

    def loss(q, k, v):
        o, l_ = hyper_attention(q, k, v, **kw)
        return (o * dout).sum() + (l_ * dlse).sum()

    grads = hyper_attention_backward(dout, q, k, v, dlse=dlse, **kw)
    eps = 1e-6
    for t, g in zip((q, k, v), grads):
        num = np.zeros_like(t)
        for idx in np.ndindex(t.shape):
            tp, tm = t.copy(), t.copy()
            tp[idx] += eps
            tm[idx] -= eps
            args_p = [tp if x is t else x for x in (q, k, v)]
            args_m = [tm if x is t else x for x in (q, k, v)]
            num[idx] = (loss(*args_p) - loss(*args_m)) / (2 * eps)
        assert _rel(g, num) < 1e-6


def test_backward_exact_case_matches_attention_backward():
    q, k, v, p = _rand(9, 2, 10, 10, 4, 2, 5)
    rng = np.random.default_rng(0)
    dout, dlse = rng.standard_normal(q.shape), rng.standard_normal((2, 4, 10))
    got = hyper_attention_backward(dout, q, k, v, projections=p, sample_indices=None,
                                   block_size=16, min_seq_len=2, causal=True, dlse=dlse)
    from longattn.reference import attention_backward

    want = attention_backward(dout, q, k, v, mask=causal_mask(10), dlse=dlse)
    for a, e in zip(got, want):
        assert _rel(a, e) < 1e-12


# ---------------------------------------------------------------------------------- bad input


def test_bad_input():
    q, k, v, p = _rand(0, 1, 8, 8, 2, 1, 4)
    kw = dict(projections=p, sample_indices=None, block_size=2, min_seq_len=2, causal=True)
    with pytest.raises(ValueError, match="min_seq_len"):
        hyper_attention(q, k, v, **{**kw, "min_seq_len": 0})
    with pytest.raises(ValueError, match="block_size"):
        hyper_attention(q, k, v, **{**kw, "block_size": 0})
    with pytest.raises(ValueError, match="projections"):
        hyper_attention(q, k, v, **{**kw, "projections": np.ones((3, 2))})
    with pytest.raises(ValueError, match="Sq == Sk"):
        hyper_attention(q, k[:, :6], v[:, :6], **kw)
    with pytest.raises(ValueError, match="sample_indices"):
        hyper_attention(q, k, v, **{**kw, "sample_indices": np.zeros((1, 1, 1, 2), int)})
    n_calls = len(hyper_plan(8, 8, True, 2)[1])
    with pytest.raises(ValueError, match="sample_indices"):
        hyper_attention(q, k, v, **{**kw, "sample_indices": np.full((n_calls, 1, 1, 2), 99)})
    with pytest.raises(ValueError, match="multiple"):
        hyper_attention(q[:, :, :1], k.repeat(2, 2), v.repeat(2, 2), **kw)
