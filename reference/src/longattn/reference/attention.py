"""Dense masked softmax attention in float64, forward and analytic backward."""

from __future__ import annotations

import numpy as np


def _check(q, k, v, mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k, v must be 4-d [batch, seq, heads, head_dim]; "
            f"got q{q.shape} k{k.shape} v{v.shape}"
        )
    b, _, hq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch differs: q{q.shape} k{k.shape} v{v.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k{k.shape} and v{v.shape} must agree in batch, seq and heads")
    if k.shape[3] != d:
        raise ValueError(f"k head_dim {k.shape[3]} != q head_dim {d}")
    if hq % k.shape[2] != 0:
        raise ValueError(f"q heads {hq} must be a multiple of kv heads {k.shape[2]}")


def _scale(scale, d):
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a float, got {scale!r}")
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _scores(q, k, mask, scale):
    """Masked scores [B, Hq, Sq, Sk] in float64; -inf where masked."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kr = np.repeat(k, hq // hkv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        try:
            m = np.broadcast_to(m, (b, hq, sq, sk))
        except ValueError:
            raise ValueError(
                f"mask of shape {m.shape} must broadcast to [B, H, Sq, Sk] = {(b, hq, sq, sk)}"
            ) from None
        s = np.where(m, s, -np.inf)
    return s


def _softmax(s):
    """Row softmax and lse of masked scores; rows with no visible key give p = 0, lse = -inf;
    a row holding a NaN score gives NaN lse and NaN p on its visible keys (0 on masked keys:
    a key the row does not see gets no gradient from it)."""
    mx = s.max(axis=-1, keepdims=True, initial=-np.inf)
    mx = np.where(np.isneginf(mx) | np.isnan(mx), 0.0, mx)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(s - mx)
        den = e.sum(axis=-1, keepdims=True)
        some = den != 0  # True for NaN: a NaN row stays NaN
        p = np.where(np.isneginf(s), 0.0, e / np.where(some, den, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(some, mx + np.log(np.where(some, den, 1.0)), -np.inf)
    return p, lse[..., 0]


def attention(q, k, v, *, mask=None, scale=None):
    """Exact attention.

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` with ``Hq % Hkv == 0``
    (GQA: query head h reads kv head ``h // (Hq // Hkv)``). ``mask`` is boolean, broadcastable
    to ``[B, Hq, Sq, Sk]``, True = visible. Returns ``out [B, Sq, Hq, Dv]`` and
    ``lse [B, Hq, Sq]``, both float64. Rows with no visible key: out 0, lse -inf.
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    _check(q, k, v, mask)
    scale = _scale(scale, q.shape[-1])
    p, lse = _softmax(_scores(q, k, mask, scale))
    hq, hkv = q.shape[2], k.shape[2]
    vr = np.repeat(v, hq // hkv, axis=2)
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    return out, lse


def attention_backward(dout, q, k, v, *, mask=None, scale=None, dlse=None):
    """Analytic gradients of :func:`attention`.

    ``dout`` is the gradient of ``out`` ``[B, Sq, Hq, Dv]``; ``dlse`` (optional, ``[B, Hq, Sq]``)
    the gradient of ``lse``. Returns ``(dq, dk, dv)`` in float64 with the shapes of q, k, v
    (GQA gradients summed over each kv head's query group). Fully masked rows give zeros.
    """
    dout, q, k, v = (np.asarray(t, dtype=np.float64) for t in (dout, q, k, v))
    _check(q, k, v, mask)
    scale = _scale(scale, q.shape[-1])
    b, sq, hq, d = q.shape
    want = (b, sq, hq, v.shape[-1])
    if dout.shape != want:
        raise ValueError(f"dout must have the shape of out {want}, got {dout.shape}")
    if dlse is not None and np.shape(dlse) != (b, hq, sq):
        raise ValueError(f"dlse must have the shape of lse {(b, hq, sq)}, got {np.shape(dlse)}")
    p, _ = _softmax(_scores(q, k, mask, scale))
    return backward_from_probs(p, dout, q, k, v, scale, dlse)


def backward_from_probs(p, dout, q, k, v, scale, dlse=None):
    """Gradients of attention whose probabilities ``p [B, Hq, Sq, Sk]`` are given (any score
    shift that does not depend on q or k, such as log key weights, leaves them unchanged)."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    kr = np.repeat(k, g, axis=2)
    vr = np.repeat(v, g, axis=2)
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    delta = np.einsum("bqhd,bqhd->bhq", dout, out)[..., None]
    if dlse is not None:
        delta = delta - np.asarray(dlse, dtype=np.float64)[..., None]
    ds = p * (dp - delta)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dkr = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dvr = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dk = dkr.reshape(b, sk, hkv, g, d).sum(axis=3)
    dv = dvr.reshape(b, sk, hkv, g, v.shape[-1]).sum(axis=3)
    return dq, dk, dv
