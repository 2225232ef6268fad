"""Exact combination of attention partials computed over disjoint key sets."""

from __future__ import annotations

import numpy as np


def tree_combine(outs, lses):
    """Combine partials ``out_i [B, S, H, D]`` / ``lse_i [B, H, S]`` into the attention over the
    union of their keys: ``lse = log sum_i exp(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i``.
    Partials with ``lse = -inf`` contribute nothing; if all are ``-inf`` the row is 0 / -inf.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError("tree_combine needs equally many (at least one) outs and lses")
    shapes = {np.shape(o) for o in outs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"outs must all be [B, S, H, D] of one shape, got {sorted(shapes)}")
    b, s, h, _ = next(iter(shapes))
    for x in lses:
        if np.shape(x) != (b, h, s):
            raise ValueError(f"lses must be [B, H, S] = {(b, h, s)}, got {np.shape(x)}")
    lse = np.stack([np.asarray(x, dtype=np.float64) for x in lses])  # [n, B, H, S]
    out = np.stack([np.asarray(x, dtype=np.float64) for x in outs])  # [n, B, S, H, D]
    mx = lse.max(axis=0)
    mx_safe = np.where(np.isfinite(mx), mx, 0.0)
    w = np.exp(lse - mx_safe)  # -inf partials -> 0
    den = w.sum(axis=0)
    with np.errstate(divide="ignore"):
        total = np.where(den > 0, mx_safe + np.log(np.where(den > 0, den, 1.0)), -np.inf)
    wn = w / np.where(den > 0, den, 1.0)  # [n, B, H, S]
    merged = np.einsum("nbhs,nbshd->bshd", wn, out)
    return merged, total
