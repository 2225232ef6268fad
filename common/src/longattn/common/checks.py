"""Argument checks shared by every public function.

Each check raises ``ValueError`` / ``TypeError`` whose message names the argument, the value
and what was expected. Distributed functions call them inside
:func:`longattn.common.dist.agree` on every rank *before* any communication, so a bad call
fails everywhere instead of hanging a world.
"""

from __future__ import annotations

import torch

from longattn.common.dtypes import FLOAT_DTYPES


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


def check_bool(name: str, x) -> bool:
    """``x`` must be a real ``bool`` (``causal="no"`` or ``None`` are errors, not truthiness)."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {x!r}")
    return x


def check_qkv(q, k, v, *, varlen: bool = False):
    """BSHD (or packed THD when ``varlen``) q/k/v: same dtype and device, GQA-compatible heads.

    Returns ``(Hq, Hkv, D)``.
    """
    nd = 3 if varlen else 4
    layout = "[total_tokens, heads, head_dim]" if varlen else "[batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.ndim != nd:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree except head_dim")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) != batch of k ({k.shape[0]})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim of q ({q.shape[-1]}) != head_dim of k ({k.shape[-1]})")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"head_dim of q and v must be >= 1, got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    return hq, hkv, q.shape[-1]


def check_window(window, name: str = "window_size"):
    """``(left, right)`` with ints >= -1 (-1 = unbounded). Returns the normalised tuple."""
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{name} must be a (left, right) pair, got {window!r}")
    left, right = window
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{name} {side} must be an int, got {w!r}")
        if w < -1:
            raise ValueError(f"{name} {side} must be >= -1 (-1 = unbounded), got {w}")
    return (int(left), int(right))


def check_scale(scale, head_dim: int, name: str = "softmax_scale"):
    """Default ``head_dim ** -0.5``; otherwise a finite positive-or-negative float."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a float, got {scale!r}")
    try:
        value = float(scale)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be finite, got an int of {scale.bit_length()} "
                         "bits") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {scale}")
    return value


def check_cu_seqlens(cu_seqlens, total_tokens: int, name: str = "cu_seqlens"):
    """int32/int64 1-d, starts at 0, non-decreasing, ends at ``total_tokens``. Returns a list."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-d [num_seqs + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {cu}")
    if cu[-1] != total_tokens:
        raise ValueError(f"{name} must end at the token count {total_tokens}, got {cu[-1]}")
    return cu



def config_or_default(config, cls, default, *, expected: str):
    """A knob record (``config=``) of type ``cls``: None gives ``default``; any other type is a
    ``TypeError`` saying ``expected`` (what the caller takes) and what it got."""
    if config is None:
        return default
    if not isinstance(config, cls):
        raise TypeError(f"{expected}, got {type(config).__name__}")
    return config
