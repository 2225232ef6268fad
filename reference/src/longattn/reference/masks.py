"""Boolean mask builders (True = visible), broadcastable to ``[B, H, Sq, Sk]``.

Alignment follows flash-attn: with ``Sq != Sk`` the last query lines up with the last key
(bottom-right). Query ``i`` sits at aligned position ``i + Sk - Sq``.
"""

from __future__ import annotations

import numpy as np


def _aligned(sq, sk):
    qi = np.arange(sq)[:, None] + (sk - sq)
    kj = np.arange(sk)[None, :]
    return qi, kj


def causal_mask(sq, sk=None):
    """``[Sq, Sk]``: query i sees key j iff ``j <= i + Sk - Sq``."""
    sk = sq if sk is None else sk
    qi, kj = _aligned(sq, sk)
    return kj <= qi


def window_mask(sq, sk=None, window=(-1, -1)):
    """``[Sq, Sk]``: query i sees key j iff ``i' - left <= j <= i' + right`` (-1 = unbounded)."""
    sk = sq if sk is None else sk
    left, right = window
    qi, kj = _aligned(sq, sk)
    m = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        m &= kj >= qi - left
    if right >= 0:
        m &= kj <= qi + right
    return m


def sink_mask(sq, sk=None, num_sink_tokens=1):
    """``[Sq, Sk]``: the first ``num_sink_tokens`` keys, visible only where causally allowed."""
    sk = sq if sk is None else sk
    qi, kj = _aligned(sq, sk)
    return (kj < num_sink_tokens) & (kj <= qi)


def document_mask(cu_seqlens_q, cu_seqlens_k=None, *, causal=False, window=(-1, -1),
                  num_sink_tokens=0):
    """``[Tq, Tk]`` for packed varlen sequences (flash-attn ``cu_seqlens``).

    A query sees only keys of its own sequence; inside each sequence the usual ``causal`` /
    ``window`` rules apply, aligned per sequence (bottom-right when its q and k lengths differ),
    and the sequence's own first ``num_sink_tokens`` keys stay visible (where causal allows).
    """
    cq = np.asarray(cu_seqlens_q, dtype=np.int64)
    ck = cq if cu_seqlens_k is None else np.asarray(cu_seqlens_k, dtype=np.int64)
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
    return np.random.default_rng(seed).random(shape) < density


def and_masks(*masks):
    """Visible where every mask is visible."""
    out = np.asarray(masks[0], dtype=bool)
    for m in masks[1:]:
        out = out & np.asarray(m, dtype=bool)
    return out


def or_masks(*masks):
    """Visible where any mask is visible."""
    out = np.asarray(masks[0], dtype=bool)
    for m in masks[1:]:
        out = out | np.asarray(m, dtype=bool)
    return out
