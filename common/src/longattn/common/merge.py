"""Merge attention partials computed over disjoint key sets (the log-sum-exp rule).

``out`` is BSHD ``[B, S, H, D]``, ``lse`` is ``[B, H, S]``. Merged in float32 (float64 stays
float64). The sigmoid form ``out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)`` never
overflows; rows where one side is ``-inf`` take the other side exactly, and rows where both are
``-inf`` stay ``out = 0, lse = -inf`` (no NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weights(lse_a: torch.Tensor, lse_b: torch.Tensor):
    """(w_b [B,H,S], new_lse) with w_b = exp(lse_b - new_lse), exact at -inf."""
    a_dead = torch.isneginf(lse_a)
    b_dead = torch.isneginf(lse_b)
    diff = torch.where(a_dead | b_dead, torch.zeros_like(lse_a), lse_b - lse_a)
    w_b = torch.sigmoid(diff)
    w_b = torch.where(a_dead, torch.ones_like(w_b), w_b)
    w_b = torch.where(b_dead, torch.zeros_like(w_b), w_b)
    # lse_a - logsigmoid(lse_a - lse_b) == logaddexp(lse_a, lse_b), stable for finite values
    new = lse_a - F.logsigmoid(-diff)
    new = torch.where(a_dead, lse_b, new)
    new = torch.where(b_dead, lse_a, new)
    return w_b, new


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Return ``(out, lse)`` of attention over the union of the two partials' keys.

    Differentiable (autograd flows through both sides). ``out`` is returned in the
    accumulation dtype (float32, or float64 for float64 inputs).
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(
            f"merge_partials: shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
            f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}"
        )
    acc = _acc_dtype(out_a)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    w_b, lse = _weights(lse_a, lse_b)
    w = w_b.transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    oa, ob = out_a.to(acc), out_b.to(acc)
    return oa - w * (oa - ob), lse


@torch.no_grad()
def merge_partials_(out, lse, out_b, lse_b):
    """In-place merge of ``(out_b, lse_b)`` into the accumulators ``out`` / ``lse``.

    ``out`` and ``lse`` must already be in the accumulation dtype; they may be views (e.g. the
    back half of the rows, as zigzag ring attention needs). Returns ``(out, lse)``.
    """
    w_b, new = _weights(lse, lse_b.to(lse.dtype))
    w = w_b.transpose(1, 2).unsqueeze(-1)
    out.sub_(w * (out - out_b.to(out.dtype)))
    lse.copy_(new)
    return out, lse
