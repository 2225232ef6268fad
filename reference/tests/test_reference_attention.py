"""The float64 oracle itself: forward against an independent per-row formulation, backward
against central finite differences, fully-masked rows, GQA, Sq != Sk, dlse, bad input.

numpy only (this package's tests run with nothing but longattn-reference installed).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from longattn.reference import (
    and_masks,
    attention,
    attention_backward,
    causal_mask,
    document_mask,
    or_masks,
    random_mask,
    sink_mask,
    window_mask,
)

# --------------------------------------------------------------------------------------------
# helpers


def rel(a, e):
    a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
    assert a.shape == e.shape
    assert not np.isnan(a).any() and not np.isnan(e).any()
    d = np.linalg.norm((a - e).ravel())
    n = np.linalg.norm(e.ravel())
    return d / n if n > 0 else d


def qkv(rng, b, sq, sk, hq, hkv, d, dv=None):
    dv = d if dv is None else dv
    return (rng.standard_normal((b, sq, hq, d)), rng.standard_normal((b, sk, hkv, d)),
            rng.standard_normal((b, sk, hkv, dv)))


def loop_attention(q, k, v, mask=None, scale=None):
    """Second, independent formulation: one explicit softmax per (batch, head, query row),
    python floats for the normaliser, no einsum, no repeat of kv heads."""
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    m = np.ones((b, hq, sq, sk), bool) if mask is None else np.broadcast_to(mask, (b, hq, sq, sk))
    out = np.zeros((b, sq, hq, dv))
    lse = np.full((b, hq, sq), -np.inf)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                js = [j for j in range(sk) if m[bi, h, i, j]]
                if not js:
                    continue
                s = [scale * float(np.dot(q[bi, i, h], k[bi, j, kh])) for j in js]
                mx = max(s)
                e = [math.exp(x - mx) for x in s]
                den = math.fsum(e)
                lse[bi, h, i] = mx + math.log(den)
                for w, j in zip(e, js):
                    out[bi, i, h] += (w / den) * v[bi, j, kh]
    return out, lse


def _loss(q, k, v, mask, scale, dout, dlse):
    out, lse = attention(q, k, v, mask=mask, scale=scale)
    total = float(np.sum(dout * out))
    if dlse is not None:
        fin = np.isfinite(lse)
        total += float(np.sum(np.where(fin, dlse * np.where(fin, lse, 0.0), 0.0)))
    return total


def finite_difference(q, k, v, mask, scale, dout, dlse, h=1e-5):
    """Central differences of L = <dout, out> + <dlse, lse> (lse over visible rows)."""
    grads = []
    args = [q.copy(), k.copy(), v.copy()]
    for t in range(3):
        x = args[t]
        g = np.zeros_like(x)
        flat, gflat = x.reshape(-1), g.reshape(-1)
        for idx in range(flat.size):
            old = flat[idx]
            flat[idx] = old + h
            lp = _loss(*args, mask, scale, dout, dlse)
            flat[idx] = old - h
            lm = _loss(*args, mask, scale, dout, dlse)
            flat[idx] = old
            gflat[idx] = (lp - lm) / (2 * h)
        grads.append(g)
    return grads


# --------------------------------------------------------------------------------------------
# finite-difference gradient checks: >= 20 random cases over every mask kind


def _mask_for(kind, rng, b, sq, sk, hq):
    """Returns (mask, sq, sk) - document masks fix the lengths from their cu_seqlens."""
    if kind == "none":
        return None, sq, sk
    if kind == "causal":
        return causal_mask(sq, sk), sq, sk
    if kind == "window":
        left, right = int(rng.integers(-1, 4)), int(rng.integers(-1, 3))
        m = window_mask(sq, sk, (left, right))
        if rng.random() < 0.5:
            m = and_masks(m, causal_mask(sq, sk))
        return m, sq, sk
    if kind == "document":
        nseq = int(rng.integers(1, 4))
        lq = rng.integers(1, 4, size=nseq)
        lk = rng.integers(1, 4, size=nseq)
        cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        m = document_mask(cq, ck, causal=bool(rng.random() < 0.6),
                          window=(int(rng.integers(-1, 3)), -1),
                          num_sink_tokens=int(rng.integers(0, 2)))
        return m, int(cq[-1]), int(ck[-1])
    if kind == "sink":
        w = int(rng.integers(0, 3))
        local = and_masks(causal_mask(sq, sk), window_mask(sq, sk, (w, 0)))
        return or_masks(sink_mask(sq, sk, int(rng.integers(1, 3))), local), sq, sk
    if kind == "random":
        return random_mask((b, hq, sq, sk), float(rng.uniform(0.2, 0.8)),
                           seed=int(rng.integers(1 << 30))), sq, sk
    raise AssertionError(kind)


KINDS = ["none", "causal", "window", "document", "sink", "random"]
# (b, sq, sk, hq, hkv, d, dv): GQA / MQA / MHA, Sq < Sk, Sq > Sk, Sq == Sk, Dv != D
_SHAPES = [
    (1, 3, 3, 2, 1, 2, 2), (2, 4, 5, 4, 2, 3, 2), (1, 5, 3, 3, 3, 2, 4), (2, 2, 6, 2, 2, 3, 3),
    (1, 4, 2, 4, 1, 2, 2), (2, 3, 4, 6, 3, 2, 3),
]
# 24 cases: every mask kind with 4 shapes each, dlse on two thirds of them
FD_CASES = [
    (KINDS[i % 6], *_SHAPES[(i + i // 6) % 6], i % 3 != 0, 100 + i) for i in range(24)
]


@pytest.mark.parametrize("case", FD_CASES, ids=[f"{c[0]}-{c[-1]}" for c in FD_CASES])
def test_backward_matches_finite_differences(case):
    kind, b, sq, sk, hq, hkv, d, dv, use_dlse, seed = case
    rng = np.random.default_rng(seed)
    mask, sq, sk = _mask_for(kind, rng, b, sq, sk, hq)
    q, k, v = qkv(rng, b, sq, sk, hq, hkv, d, dv)
    scale = None if seed % 2 else 0.7
    dout = rng.standard_normal((b, sq, hq, dv))
    dlse = rng.standard_normal((b, hq, sq)) if use_dlse else None
    dq, dk, dv_ = attention_backward(dout, q, k, v, mask=mask, scale=scale, dlse=dlse)
    fq, fk, fv = finite_difference(q, k, v, mask, scale, dout, dlse)
    for name, a, f in (("dq", dq, fq), ("dk", dk, fk), ("dv", dv_, fv)):
        assert a.shape == f.shape, name
        assert not np.isnan(a).any(), name
        if np.linalg.norm(f) == 0:
            assert np.array_equal(a, np.zeros_like(a)), name
        else:
            assert rel(a, f) <= 1e-6, f"{name}: rel err {rel(a, f):.2e}"


def test_fd_cases_cover_every_mask_gqa_and_uneven_lengths():
    assert len(FD_CASES) >= 20
    assert {c[0] for c in FD_CASES} == set(KINDS)
    assert any(c[4] != c[5] for c in FD_CASES)  # GQA
    assert any(c[5] == 1 and c[4] > 1 for c in FD_CASES)  # MQA
    assert any(c[2] < c[3] for c in FD_CASES) and any(c[2] > c[3] for c in FD_CASES)
    assert any(c[8] for c in FD_CASES) and not all(c[8] for c in FD_CASES)


# --------------------------------------------------------------------------------------------
# forward against the per-row formulation


@pytest.mark.parametrize("seed", range(12))
def test_forward_matches_row_loop(seed):
    rng = np.random.default_rng(seed)
    kind = KINDS[seed % 6]
    b, sq, sk = 2, int(rng.integers(1, 7)), int(rng.integers(1, 7))
    hkv = int(rng.integers(1, 3))
    hq = hkv * int(rng.integers(1, 4))
    mask, sq, sk = _mask_for(kind, rng, b, sq, sk, hq)
    q, k, v = qkv(rng, b, sq, sk, hq, hkv, 4, int(rng.integers(1, 6)))
    scale = None if seed % 3 else float(rng.uniform(0.1, 2.0))
    out, lse = attention(q, k, v, mask=mask, scale=scale)
    ro, rl = loop_attention(q, k, v, mask, scale)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == (b, sq, hq, v.shape[3]) and lse.shape == (b, hq, sq)
    assert rel(out, ro) <= 1e-13
    assert np.array_equal(np.isneginf(lse), np.isneginf(rl))
    fin = np.isfinite(rl)
    assert np.allclose(lse[fin], rl[fin], rtol=1e-13, atol=1e-13)


def test_default_scale_and_explicit_scale():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 1, 3, 4, 2, 2, 9)
    a = attention(q, k, v)
    b = attention(q, k, v, scale=1 / 3)
    c = attention(q * 2, k, v, scale=1 / 6)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    for x, y in zip(a, c):
        assert np.allclose(x, y, rtol=1e-14, atol=1e-14)


def test_all_true_mask_equals_no_mask_and_key_permutation_invariance():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 2, 5, 7, 4, 2, 3)
    o0, l0 = attention(q, k, v)
    o1, l1 = attention(q, k, v, mask=np.ones((5, 7), bool))
    assert np.array_equal(o0, o1) and np.array_equal(l0, l1)
    m = random_mask((5, 7), 0.6, seed=3)
    perm = rng.permutation(7)
    o2, l2 = attention(q, k, v, mask=m)
    o3, l3 = attention(q, k[:, perm], v[:, perm], mask=m[:, perm])
    assert rel(o3, o2) <= 1e-14
    assert np.array_equal(np.isneginf(l2), np.isneginf(l3))


def test_large_scores_do_not_overflow():
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 4, 6, 2, 1, 3)
    out, lse = attention(q * 300, k * 300, v)
    ro, rl = loop_attention(q * 300, k * 300, v)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert rel(out, ro) <= 1e-12 and rel(lse, rl) <= 1e-12
    dq, dk, dv = attention_backward(np.ones_like(out), q * 300, k * 300, v)
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))


def test_mask_broadcasting_per_batch_and_head():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 2, 4, 5, 2, 1, 3)
    m = random_mask((2, 2, 4, 5), 0.5, seed=6)
    out, lse = attention(q, k, v, mask=m)
    for bi in range(2):
        for h in range(2):
            o, l_ = attention(q[bi:bi + 1, :, h:h + 1], k[bi:bi + 1], v[bi:bi + 1],
                              mask=m[bi, h])
            assert np.allclose(out[bi, :, h], o[0, :, 0], rtol=1e-14, atol=1e-14)
            assert np.array_equal(np.isneginf(lse[bi, h]), np.isneginf(l_[0, 0]))


# --------------------------------------------------------------------------------------------
# fully masked rows, GQA reduction, dlse


def test_fully_masked_rows_forward_and_backward():
    rng = np.random.default_rng(7)
    b, sq, sk, hq, hkv, d = 2, 5, 4, 4, 2, 3
    q, k, v = qkv(rng, b, sq, sk, hq, hkv, d)
    m = random_mask((b, hq, sq, sk), 0.7, seed=8)
    m[0, 1, 2] = False
    m[1, :, 0] = False
    m[1, 3] = False  # a whole head sees nothing
    dead = ~m.any(-1)  # [b, hq, sq]
    out, lse = attention(q, k, v, mask=m)
    dout = rng.standard_normal(out.shape)
    dlse = rng.standard_normal(lse.shape)
    dq, dk, dv = attention_backward(dout, q, k, v, mask=m, dlse=dlse)
    for x in (out, dq, dk, dv):
        assert not np.isnan(x).any()
    assert np.isneginf(lse[dead]).all() and np.isfinite(lse[~dead]).all()
    out_t, dq_t = out.transpose(0, 2, 1, 3), dq.transpose(0, 2, 1, 3)  # [b, h, s, d]
    assert np.array_equal(out_t[dead], np.zeros_like(out_t[dead]))
    assert np.array_equal(dq_t[dead], np.zeros_like(dq_t[dead]))
    fq, fk, fv = finite_difference(q, k, v, m, None, dout, dlse)
    assert rel(dq, fq) <= 1e-6 and rel(dk, fk) <= 1e-6 and rel(dv, fv) <= 1e-6


def test_everything_masked_gives_zeros_and_minus_inf():
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, 1, 3, 4, 2, 1, 2)
    m = np.zeros((3, 4), bool)
    out, lse = attention(q, k, v, mask=m)
    assert np.array_equal(out, np.zeros_like(out)) and np.isneginf(lse).all()
    grads = attention_backward(np.ones_like(out), q, k, v, mask=m, dlse=np.ones_like(lse))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and np.array_equal(g, np.zeros_like(t))


def test_causal_with_more_queries_than_keys_has_empty_leading_rows():
    rng = np.random.default_rng(10)
    q, k, v = qkv(rng, 1, 6, 3, 1, 1, 2)
    out, lse = attention(q, k, v, mask=causal_mask(6, 3))
    assert np.isneginf(lse[0, 0, :3]).all() and np.isfinite(lse[0, 0, 3:]).all()
    assert np.array_equal(out[0, :3], np.zeros_like(out[0, :3]))
    assert np.allclose(out[0, 3, 0], v[0, 0, 0], rtol=0, atol=1e-15)  # row 3 sees key 0 only


def test_zero_keys_gives_empty_rows():
    """Sk = 0: every row sees nothing -> out 0, lse -inf, zero grads, no error."""
    rng = np.random.default_rng(11)
    q, k, v = qkv(rng, 1, 3, 0, 2, 1, 4)
    out, lse = attention(q, k, v)
    assert out.shape == (1, 3, 2, 4) and np.array_equal(out, np.zeros_like(out))
    assert np.isneginf(lse).all()
    dq, dk, dv = attention_backward(np.ones_like(out), q, k, v)
    assert np.array_equal(dq, np.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


def test_zero_queries():
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, 1, 0, 3, 2, 1, 4)
    out, lse = attention(q, k, v)
    assert out.shape == (1, 0, 2, 4) and lse.shape == (1, 2, 0)
    dq, dk, dv = attention_backward(np.zeros_like(out), q, k, v)
    assert np.array_equal(dk, np.zeros_like(k)) and np.array_equal(dv, np.zeros_like(v))


def test_gqa_equals_replicated_kv_heads_with_summed_gradients():
    rng = np.random.default_rng(13)
    b, sq, sk, hq, hkv, d = 2, 4, 5, 6, 2, 3
    q, k, v = qkv(rng, b, sq, sk, hq, hkv, d)
    g = hq // hkv
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    m = causal_mask(sq, sk)
    o1, l1 = attention(q, k, v, mask=m)
    o2, l2 = attention(q, kr, vr, mask=m)
    assert np.array_equal(o1, o2) and np.array_equal(l1, l2)
    dout = rng.standard_normal(o1.shape)
    dq1, dk1, dv1 = attention_backward(dout, q, k, v, mask=m)
    dq2, dk2, dv2 = attention_backward(dout, q, kr, vr, mask=m)
    assert np.allclose(dq1, dq2, rtol=1e-14, atol=1e-14)
    assert np.allclose(dk1, dk2.reshape(b, sk, hkv, g, d).sum(3), rtol=1e-13, atol=1e-14)
    assert np.allclose(dv1, dv2.reshape(b, sk, hkv, g, d).sum(3), rtol=1e-13, atol=1e-14)


def test_dlse_none_equals_zero_dlse_and_is_linear():
    rng = np.random.default_rng(14)
    q, k, v = qkv(rng, 1, 4, 4, 2, 1, 3)
    m = causal_mask(4)
    out, lse = attention(q, k, v, mask=m)
    dout = rng.standard_normal(out.shape)
    dlse = rng.standard_normal(lse.shape)
    a = attention_backward(dout, q, k, v, mask=m)
    z = attention_backward(dout, q, k, v, mask=m, dlse=np.zeros_like(lse))
    for x, y in zip(a, z):
        assert np.array_equal(x, y)
    only = attention_backward(np.zeros_like(dout), q, k, v, mask=m, dlse=dlse)
    both = attention_backward(dout, q, k, v, mask=m, dlse=dlse)
    for x, y, s in zip(a, only, both):
        assert np.allclose(x + y, s, rtol=1e-13, atol=1e-13)
    # dlse alone: d lse / d v = 0
    assert np.array_equal(only[2], np.zeros_like(v))


def test_accepts_lower_precision_and_lists_and_returns_float64():
    rng = np.random.default_rng(15)
    q, k, v = qkv(rng, 1, 2, 3, 1, 1, 2)
    out, lse = attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert out.dtype == np.float64 and lse.dtype == np.float64
    out2, _ = attention(q.tolist(), k.tolist(), v.tolist())
    assert np.array_equal(out2, attention(q, k, v)[0])


# --------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument


def test_bad_shapes_raise_naming_the_tensors():
    rng = np.random.default_rng(16)
    q, k, v = qkv(rng, 1, 3, 4, 4, 2, 3)
    with pytest.raises(ValueError, match="q"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="batch"):
        attention(q, np.concatenate([k, k]), np.concatenate([v, v]))
    with pytest.raises(ValueError, match="head"):
        attention(q[:, :, :3], k, v)  # 3 q heads over 2 kv heads
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="k"):
        attention(q, k[:, :3], v)
    with pytest.raises(ValueError, match="q"):
        attention_backward(np.zeros((1, 3, 4, 3)), q[0], k, v)


def test_mask_that_does_not_broadcast_raises_naming_mask():
    rng = np.random.default_rng(17)
    q, k, v = qkv(rng, 1, 3, 4, 2, 1, 3)
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, mask=np.ones((4, 3), bool))
    with pytest.raises(ValueError, match="mask"):
        attention_backward(np.zeros((1, 3, 2, 3)), q, k, v, mask=np.ones((3, 5), bool))


def test_bad_dout_and_dlse_raise_naming_them():
    rng = np.random.default_rng(18)
    q, k, v = qkv(rng, 1, 3, 4, 2, 1, 3)
    with pytest.raises(ValueError, match="dout"):
        attention_backward(np.zeros((1, 3, 2, 2)), q, k, v)
    with pytest.raises(ValueError, match="dout"):
        attention_backward(np.zeros((1, 1, 2, 3)), q, k, v)  # would broadcast silently
    with pytest.raises(ValueError, match="dlse"):
        attention_backward(np.zeros((1, 3, 2, 3)), q, k, v, dlse=np.zeros(3))  # broadcasts
    with pytest.raises(ValueError, match="dlse"):
        attention_backward(np.zeros((1, 3, 2, 3)), q, k, v, dlse=np.zeros((1, 3, 2)))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "x"])
def test_bad_scale_raises_naming_scale(scale):
    rng = np.random.default_rng(19)
    q, k, v = qkv(rng, 1, 2, 2, 1, 1, 2)
    with pytest.raises((ValueError, TypeError), match="scale"):
        attention(q, k, v, scale=scale)


def test_nan_score_row_gives_nan_out_and_lse():
    """A NaN in one key makes exactly the rows that see it NaN, in out and lse (never -inf)."""
    from longattn.reference import causal_mask

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 6, 2, 4)) for _ in range(3))
    k[0, 3, 1, 2] = np.nan
    out, lse = attention(q, k, v, mask=causal_mask(6, 6))
    sees = np.arange(6) >= 3
    assert np.isnan(lse[0, 1, sees]).all() and np.isfinite(lse[0, 1, ~sees]).all()
    assert np.isnan(out[0, sees, 1]).all() and np.isfinite(out[0, ~sees, 1]).all()
    assert np.isfinite(lse[0, 0]).all() and np.isfinite(out[0, :, 0]).all()
