"""Boolean mask builders (True = visible), broadcastable to ``[B, H, Sq, Sk]``.

Alignment follows flash-attn: with ``Sq != Sk`` the last query lines up with the last key
(bottom-right). Query ``i`` sits at aligned position ``i + Sk - Sq``.
"""

from __future__ import annotations

import numpy as np


def _length(name, n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {n!r}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return int(n)


def _lengths(sq, sk):
    sq = _length("sq", sq)
    return sq, (sq if sk is None else _length("sk", sk))


def _window(window):
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair, got {window!r}")
    for side, w in zip(("left", "right"), window):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"window {side} must be an int, got {w!r}")
        if w < -1:
            raise ValueError(f"window {side} must be >= -1 (-1 = unbounded), got {w}")
    return int(window[0]), int(window[1])


def _cu(name, cu):
    c = np.asarray(cu)
    if c.ndim != 1 or c.size < 2 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-d integer sequence [num_seqs + 1], got {cu!r}")
    if c[0] != 0 or (np.diff(c) < 0).any():
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {c.tolist()}")
    return c.astype(np.int64)


def _aligned(sq, sk):
    qi = np.arange(sq)[:, None] + (sk - sq)
    kj = np.arange(sk)[None, :]
    return qi, kj


def causal_mask(sq, sk=None):
    """``[Sq, Sk]``: query i sees key j iff ``j <= i + Sk - Sq``."""
    sq, sk = _lengths(sq, sk)
    qi, kj = _aligned(sq, sk)
    return kj <= qi


def window_mask(sq, sk=None, window=(-1, -1)):
    """``[Sq, Sk]``: query i sees key j iff ``i' - left <= j <= i' + right`` (-1 = unbounded)."""
    sq, sk = _lengths(sq, sk)
    left, right = _window(window)
    qi, kj = _aligned(sq, sk)
    m = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        m &= kj >= qi - left
    if right >= 0:
        m &= kj <= qi + right
    return m


def sink_mask(sq, sk=None, num_sink_tokens=1):
    """``[Sq, Sk]``: the first ``num_sink_tokens`` keys, visible only where causally allowed."""
    sq, sk = _lengths(sq, sk)
    num_sink_tokens = _length("num_sink_tokens", num_sink_tokens)
    qi, kj = _aligned(sq, sk)
    return (kj < num_sink_tokens) & (kj <= qi)


def document_mask(cu_seqlens_q, cu_seqlens_k=None, *, causal=False, window=(-1, -1),
                  num_sink_tokens=0):
    """``[Tq, Tk]`` for packed varlen sequences (flash-attn ``cu_seqlens``).

    A query sees only keys of its own sequence; inside each sequence the usual ``causal`` /
    ``window`` rules apply, aligned per sequence (bottom-right when its q and k lengths differ),
    and the sequence's own first ``num_sink_tokens`` keys stay visible (where causal allows).
    """
    cq = _cu("cu_seqlens_q", cu_seqlens_q)
    ck = cq if cu_seqlens_k is None else _cu("cu_seqlens_k", cu_seqlens_k)
    window = _window(window)
    num_sink_tokens = _length("num_sink_tokens", num_sink_tokens)
    if len(cq) != len(ck):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same number of sequences")
    m = np.zeros((cq[-1], ck[-1]), dtype=bool)
    for i in range(len(cq) - 1):
        sq, sk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        w = window_mask(sq, sk, window)
        if causal:
            w &= causal_mask(sq, sk)
        if num_sink_tokens:
            w |= sink_mask(sq, sk, num_sink_tokens) if causal else (
                np.arange(sk)[None, :] < num_sink_tokens
            )
        m[cq[i]:cq[i + 1], ck[i]:ck[i + 1]] = w
    return m


def random_mask(shape, density=0.5, *, seed=0):
    """Random boolean mask of ``shape`` (tests of arbitrary masks)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return np.random.default_rng(seed).random(shape) < density


def and_masks(*masks):
    """Visible where every mask is visible."""
    _need(masks)
    out = np.asarray(masks[0], dtype=bool)
    for m in masks[1:]:
        out = out & np.asarray(m, dtype=bool)
    return out


def or_masks(*masks):
    """Visible where any mask is visible."""
    _need(masks)
    out = np.asarray(masks[0], dtype=bool)
    for m in masks[1:]:
        out = out | np.asarray(m, dtype=bool)
    return out


def _need(masks):
    if not masks:
        raise ValueError("masks: need at least one mask")
    try:
        np.broadcast_shapes(*(np.shape(m) for m in masks))
    except ValueError:
        raise ValueError(f"masks have incompatible shapes {[np.shape(m) for m in masks]}") from None
