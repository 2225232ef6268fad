"""Mask builders and combinators: semantics checked against explicit loops over (i, j).

Conventions (docs/contract.md §2): bottom-right alignment (query i sits at i + Sk - Sq), window
(left, right) with -1 unbounded, sinks visible where causal allows, document masks aligned
per sequence.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from longattn.reference import (
    and_masks,
    causal_mask,
    document_mask,
    or_masks,
    random_mask,
    sink_mask,
    window_mask,
)

SIZES = [(1, 1), (4, 4), (3, 6), (6, 3), (5, 8), (7, 2), (1, 5), (5, 1)]


def loop_mask(sq, sk, *, causal=False, window=(-1, -1), sinks=0):
    m = np.zeros((sq, sk), bool)
    left, right = window
    for i in range(sq):
        a = i + sk - sq  # aligned position of query i
        for j in range(sk):
            ok = True
            if causal and j > a:
                ok = False
            if left != -1 and j < a - left:
                ok = False
            if right != -1 and j > a + right:
                ok = False
            if j < sinks and (not causal or j <= a):
                ok = True
            m[i, j] = ok
    return m


@pytest.mark.parametrize("sq,sk", SIZES)
def test_causal_is_bottom_right_aligned(sq, sk):
    m = causal_mask(sq, sk)
    assert m.shape == (sq, sk) and m.dtype == bool
    assert np.array_equal(m, loop_mask(sq, sk, causal=True))
    # the last query always sees every key; with Sq > Sk the first Sq - Sk rows see none
    assert m[-1].all()
    if sq > sk:
        assert not m[: sq - sk].any() and m[sq - sk, 0] and not m[sq - sk, 1:].any()
    if sq == sk:
        assert np.array_equal(m, np.tril(np.ones((sq, sq), bool)))


def test_causal_default_square():
    assert np.array_equal(causal_mask(5), causal_mask(5, 5))


@pytest.mark.parametrize("sq,sk", SIZES)
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (2, 0), (0, 2), (1, 3), (-1, 1), (3, -1),
                                    (0, -1), (-1, 0), (10, 10)])
def test_window_semantics(sq, sk, window):
    m = window_mask(sq, sk, window)
    assert m.shape == (sq, sk) and m.dtype == bool
    assert np.array_equal(m, loop_mask(sq, sk, window=window))


def test_window_special_cases():
    assert window_mask(4, 6).all()  # default unbounded
    assert window_mask(4, 6, (-1, -1)).all()
    assert np.array_equal(window_mask(5, 7, (-1, 0)), causal_mask(5, 7))
    # (0, 0) is the aligned diagonal
    d = window_mask(3, 5, (0, 0))
    assert [list(np.nonzero(r)[0]) for r in d] == [[2], [3], [4]]
    # ring_swa's window_size = w is (w, 0) + causal: w + 1 keys once far enough from the start
    w = 3
    m = window_mask(10, 10, (w, 0)) & causal_mask(10)
    assert list(m.sum(1)) == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]


@pytest.mark.parametrize("sq,sk", SIZES)
@pytest.mark.parametrize("n", [0, 1, 3])
def test_sink_semantics(sq, sk, n):
    m = sink_mask(sq, sk, n)
    want = np.zeros((sq, sk), bool)
    for i, j in itertools.product(range(sq), range(sk)):
        want[i, j] = j < n and j <= i + sk - sq
    assert np.array_equal(m, want)


def test_sink_default_is_one_token():
    assert np.array_equal(sink_mask(4), sink_mask(4, 4, 1))
    assert sink_mask(4)[:, 0].all() and not sink_mask(4)[:, 1:].any()


def test_streaming_llm_mask_composition():
    sq = sk = 9
    m = or_masks(sink_mask(sq, sk, 2), and_masks(causal_mask(sq), window_mask(sq, sk, (2, 0))))
    assert np.array_equal(m, loop_mask(sq, sk, causal=True, window=(2, 0), sinks=2))


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


@pytest.mark.parametrize("seed", range(10))
def test_document_mask_matches_per_sequence_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5))
    lq = rng.integers(0, 5, size=n)  # zero-length sequences allowed
    lk = lq.copy() if seed % 2 else rng.integers(0, 5, size=n)
    causal = bool(seed % 3)
    window = [(-1, -1), (1, -1), (0, 1), (2, 0)][seed % 4]
    sinks = seed % 3
    cq, ck = _cu(lq), _cu(lk)
    m = document_mask(cq, ck if seed % 2 == 0 else None, causal=causal, window=window,
                      num_sink_tokens=sinks)
    assert m.shape == (cq[-1], ck[-1]) and m.dtype == bool
    want = np.zeros((cq[-1], ck[-1]), bool)
    for i in range(n):
        want[cq[i]:cq[i + 1], ck[i]:ck[i + 1]] = loop_mask(int(lq[i]), int(lk[i]), causal=causal,
                                                         window=window, sinks=sinks)
    assert np.array_equal(m, want)


def test_document_mask_blocks_never_cross_sequences():
    cq = _cu([3, 2, 4])
    m = document_mask(cq)
    seq = np.repeat(np.arange(3), [3, 2, 4])
    assert np.array_equal(m, seq[:, None] == seq[None, :])
    mc = document_mask(cq, causal=True)
    assert np.array_equal(mc, m & np.tril(np.ones((9, 9), bool)))


def test_document_mask_accepts_lists_and_int64():
    a = document_mask([0, 2, 5], causal=True)
    b = document_mask(np.array([0, 2, 5], dtype=np.int64), causal=True)
    assert np.array_equal(a, b)


def test_and_or_masks():
    a = np.array([[True, True, False, False]])
    b = np.array([[True, False, True, False]])
    assert np.array_equal(and_masks(a, b), [[True, False, False, False]])
    assert np.array_equal(or_masks(a, b), [[True, True, True, False]])
    assert np.array_equal(and_masks(a), a) and np.array_equal(or_masks(b), b)
    c = np.array([[True], [False]])  # broadcasting
    assert np.array_equal(and_masks(a, c), np.vstack([a, np.zeros_like(a)]))
    assert and_masks(a, b, c).shape == (2, 4)
    assert and_masks([[1, 0]], [[1, 1]]).dtype == bool


def test_random_mask_is_seeded_and_has_its_density():
    a = random_mask((3, 40, 50), 0.3, seed=1)
    assert a.shape == (3, 40, 50) and a.dtype == bool
    assert np.array_equal(a, random_mask((3, 40, 50), 0.3, seed=1))
    assert not np.array_equal(a, random_mask((3, 40, 50), 0.3, seed=2))
    assert abs(a.mean() - 0.3) < 0.03
    assert not random_mask((4, 4), 0.0).any() and random_mask((4, 4), 1.0).all()


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("window", [(-2, 0), (0, -3)])
def test_window_below_minus_one_raises(window):
    with pytest.raises(ValueError, match="window"):
        window_mask(4, 4, window)
    with pytest.raises(ValueError, match="window"):
        document_mask([0, 4], window=window)


@pytest.mark.parametrize("window", [3, (1, 2, 3), (1.5, 0)])
def test_window_wrong_type_raises(window):
    with pytest.raises((TypeError, ValueError), match="window"):
        window_mask(4, 4, window)


def test_negative_lengths_and_sinks_raise():
    with pytest.raises(ValueError, match="sq"):
        causal_mask(-1)
    with pytest.raises(ValueError, match="sk"):
        window_mask(3, -2)
    with pytest.raises(ValueError, match="num_sink_tokens"):
        sink_mask(4, 4, -1)
    with pytest.raises(ValueError, match="num_sink_tokens"):
        document_mask([0, 4], num_sink_tokens=-1)


@pytest.mark.parametrize("cu", [[0, 3, 2, 5], [1, 3], [0], [[0, 2], [2, 4]]])
def test_bad_cu_seqlens_raise(cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        document_mask(cu)


def test_cu_seqlens_q_k_count_mismatch_raises():
    with pytest.raises(ValueError, match="cu_seqlens"):
        document_mask([0, 3], [0, 1, 2])


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_random_mask_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        random_mask((3, 3), density)


def test_combinators_need_a_mask_and_compatible_shapes():
    with pytest.raises(ValueError, match="mask"):
        and_masks()
    with pytest.raises(ValueError, match="mask"):
        or_masks()
    with pytest.raises(ValueError):
        and_masks(np.ones((2, 3), bool), np.ones((3, 2), bool))
