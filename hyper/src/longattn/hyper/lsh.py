"""Angular LSH with a true Gray-code bucket order.

Bit ``t`` of a row's code is ``x . projections[:, t] > 0``; its rank is the code's position in
the reflected Gray sequence ``g(n) = n ^ (n >> 1)``, i.e. ``g^-1(code)``, so buckets that are
neighbours in sorted order differ in exactly one hyperplane. (The public code sorts by
``g(code)`` instead, whose neighbours can differ in up to four of eight hyperplanes.)

Hashes are computed in float64 on the CPU -- so a float64 oracle replays them exactly -- and
in float32 on GPUs.
"""

from __future__ import annotations

import torch

MAX_PROJS = 16


def gray_rank(code: torch.Tensor) -> torch.Tensor:
    """``g^-1(c) = c ^ (c >> 1) ^ (c >> 2) ^ ...`` elementwise (int64)."""
    r = code.to(torch.int64)
    shift = r >> 1
    for _ in range(MAX_PROJS):
        r = r ^ shift
        shift = shift >> 1
    return r


def lsh_rank(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Gray ranks of the rows of ``x [B, S, H, D]`` as int32 ``[B, H, S]``."""
    dt = torch.float64 if x.device.type == "cpu" else torch.float32
    w = projections.to(device=x.device, dtype=dt)
    bits = torch.matmul(x.to(dt), w) > 0  # [B, S, H, r]
    pow2 = 1 << torch.arange(w.shape[1], device=x.device, dtype=torch.int64)
    code = (bits.to(torch.int64) * pow2).sum(-1)
    return gray_rank(code).to(torch.int32).transpose(1, 2).contiguous()


def sort_rows(rank: torch.Tensor) -> torch.Tensor:
    """Stable argsort along the last axis (sorted position -> row), int64."""
    return torch.sort(rank, dim=-1, stable=True).indices
