"""Relative position encodings applied to q and k: rotary (RoPE) and xPos.

Both act on the projected heads ``[B, S, H, D]`` (never on the embeddings: adding xPos to the
token embeddings, as some LongNet ports do, is not a relative encoding at all). Pairs are
``(x[..., i], x[..., i + D/2])`` (the "rotate half" convention).

xPos (Sun et al. 2022, used by LongNet) multiplies the rotated q by ``zeta^(n/gamma)`` and k by
``zeta^(-m/gamma)`` with ``zeta_i = (2i/D + 0.4) / 1.4`` per pair and ``gamma =
scale_base``, so the score carries ``zeta^((n-m)/gamma)``: it only depends on ``n - m``. The
absolute factors over- or underflow for large ``|n|`` (``0.29^(n/512)`` leaves float32 range
near ``|n| = 36k``), so positions should be as small as possible. :func:`xpos_positions` uses
``p mod w_max`` (centered) when every segment length divides the largest one ``w_max``: every
dilated-attention segment then lies inside one ``w_max`` block, every relative distance the
attention ever sees is unchanged, and the factors stay within ``zeta^(+-w_max/(2*gamma))``.
"""

from __future__ import annotations

import torch

from longattn.common.dtypes import acc_dtype


def rotary_cos_sin(positions, dim, *, base=10000.0, dtype=torch.float32):
    """``cos, sin`` of shape ``[S, dim/2]`` for integer ``positions [S]``."""
    if dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {dim}")
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def _rotate(x, cos, sin):
    """Rotate pairs of ``x [B, S, H, D]`` by the angles of ``cos``/``sin [S, D/2]``."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def apply_rotary(q, k, positions, *, base=10000.0):
    """RoPE on q ``[B, S, Hq, D]`` and k ``[B, S, Hkv, D]`` at integer ``positions [S]``."""
    acc = acc_dtype(q.dtype)
    cos, sin = rotary_cos_sin(positions, q.shape[-1], base=base, dtype=acc)
    return (_rotate(q.to(acc), cos, sin).to(q.dtype), _rotate(k.to(acc), cos, sin).to(k.dtype))


def xpos_scale(positions, dim, *, scale_base=512.0, dtype=torch.float32):
    """``zeta^(n / scale_base)`` of shape ``[S, dim/2]``."""
    zeta = (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) + 0.4 * dim) / (
        1.4 * dim)
    return (zeta[None, :] ** (positions.to(torch.float64)[:, None] / scale_base)).to(dtype)


def apply_xpos(q, k, positions, *, scale_base=512.0, base=10000.0):
    """xPos on q and k at integer ``positions [S]``: rotary plus the decaying scale."""
    acc = acc_dtype(q.dtype)
    cos, sin = rotary_cos_sin(positions, q.shape[-1], base=base, dtype=acc)
    sc = xpos_scale(positions, q.shape[-1], scale_base=scale_base, dtype=acc)
    sc = torch.cat([sc, sc], dim=-1)[None, :, None, :]
    qr = _rotate(q.to(acc), cos, sin) * sc
    kr = _rotate(k.to(acc), cos, sin) / sc
    return qr.to(q.dtype), kr.to(k.dtype)


def xpos_positions(start, length, segment_lengths, device=None):
    """Positions for xPos of tokens ``start .. start+length-1`` (see the module docstring)."""
    p = torch.arange(start, start + length, device=device)
    wmax = max(segment_lengths)
    if all(wmax % w == 0 for w in segment_lengths):
        return p % wmax - wmax // 2
    return p


def apply_position(kind, q, k, start, segment_lengths, *, scale_base=512.0, base=10000.0):
    """Dispatch on ``kind`` in (None, "rotary", "xpos") for tokens starting at ``start``."""
    if kind is None:
        return q, k
    if kind == "rotary":
        pos = torch.arange(start, start + q.shape[1], device=q.device)
        return apply_rotary(q, k, pos, base=base)
    if kind == "xpos":
        pos = xpos_positions(start, q.shape[1], segment_lengths, device=q.device)
        return apply_xpos(q, k, pos, scale_base=scale_base, base=base)
    raise ValueError(f"pos_emb must be None, 'rotary' or 'xpos', got {kind!r}")
