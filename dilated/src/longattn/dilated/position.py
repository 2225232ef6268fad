"""Relative position encodings applied to q and k: rotary (RoPE) and xPos.

Both act on the projected heads ``[B, S, H, D]`` (never on the embeddings: adding xPos to the
token embeddings, as some LongNet ports do, is not a relative encoding at all). Pairs are
``(x[..., i], x[..., i + D/2])`` (the "rotate half" convention).

xPos (Sun et al. 2022, used by LongNet) multiplies the rotated q by ``zeta^(n/gamma)`` and k by
``zeta^(-m/gamma)`` with ``zeta_i = (2i/D + 0.4) / 1.4`` per pair and ``gamma =
scale_base``, so the score carries ``zeta^((n-m)/gamma)``: it only depends on ``n - m``. The
absolute factors over- or underflow for large ``|n|`` (``0.29^(n/512)`` leaves float32 range
near ``|n| = 36k``), so positions should be as small as possible. :func:`xpos_positions` uses
``p mod L`` (centered), ``L`` the least common multiple of the segment lengths, when ``L <=
2^16``: every dilated-attention segment then lies inside one ``L`` block, every relative
distance the attention ever sees is unchanged, and the factors stay within
``zeta^(+-L/(2*gamma))``. (``L`` is the largest segment when every segment divides it, as in
LongNet's schedules.) :func:`apply_position` raises where the factors would leave the range
of q's dtype rather than return non-finite scores.
"""

from __future__ import annotations

import math

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


# The largest block xpos_positions reduces positions to: |position| <= 2^15, whose factors at
# the default scale_base 512 stay inside float32 (32768 / 512 * ln 3.5 = 80.2 < ln(3.4e38) - 4.6)
_XPOS_MOD_MAX = 1 << 16


def _xpos_block(segment_lengths):
    """``L`` of the module docstring, or None where it exceeds ``_XPOS_MOD_MAX``."""
    lcm = math.lcm(*segment_lengths)
    return lcm if lcm <= _XPOS_MOD_MAX else None


def xpos_positions(start, length, segment_lengths, device=None):
    """Positions for xPos of tokens ``start .. start+length-1`` (see the module docstring)."""
    p = torch.arange(start, start + length, device=device)
    block = _xpos_block(segment_lengths)
    return p if block is None else p % block - block // 2


def check_xpos_range(segment_lengths, total, scale_base, dtype):
    """Raise ``ValueError`` where xPos at the positions :func:`xpos_positions` gives tokens
    ``0 .. total-1`` has factors ``zeta^(+-n/scale_base)`` beyond ``dtype``'s range (less a
    margin of 100 for the values they multiply). Depends only on its arguments, so every rank
    of a sharded sequence (``total`` the global length) decides alike."""
    block = _xpos_block(segment_lengths)
    top = 0 if total < 1 else block // 2 if block is not None else total - 1
    exponent = top / scale_base * math.log(3.5)  # |ln zeta| at its smallest zeta, 0.4 / 1.4
    limit = math.log(torch.finfo(dtype).max) - math.log(100.0)
    if exponent > limit:
        raise ValueError(
            f"pos_emb='xpos' at positions up to {top} with xpos_scale_base {scale_base} needs "
            f"factors up to e^{exponent:.1f}, beyond {dtype} (e^{limit:.1f}): use segment "
            f"lengths whose least common multiple is at most {_XPOS_MOD_MAX}, a larger "
            "xpos_scale_base, a wider dtype, or pos_emb='rotary'")


def apply_position(kind, q, k, start, segment_lengths, *, scale_base=512.0, base=10000.0,
                   total=None):
    """Dispatch on ``kind`` in (None, "rotary", "xpos") for tokens starting at ``start``;
    ``total``: the whole sequence's length (default ``start + q.shape[1]``; a sharded caller
    passes the global one so every rank checks the xPos range alike)."""
    if kind is None:
        return q, k
    if kind == "rotary":
        pos = torch.arange(start, start + q.shape[1], device=q.device)
        return apply_rotary(q, k, pos, base=base)
    if kind == "xpos":
        total = start + q.shape[1] if total is None else total
        check_xpos_range(segment_lengths, total, scale_base, q.dtype)
        pos = xpos_positions(start, q.shape[1], segment_lengths, device=q.device)
        return apply_xpos(q, k, pos, scale_base=scale_base, base=base)
    raise ValueError(f"pos_emb must be None, 'rotary' or 'xpos', got {kind!r}")
