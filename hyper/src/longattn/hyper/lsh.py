"""Angular LSH with a true Gray-code bucket order.

Bit ``t`` of a row's code is ``x . projections[:, t] > 0``; its rank is the code's position in
the reflected Gray sequence ``g(n) = n ^ (n >> 1)``, i.e. ``g^-1(code)``, so buckets that are
neighbours in sorted order differ in exactly one hyperplane. (The public code sorts by
``g(code)`` instead, whose neighbours can differ in up to four of eight hyperplanes.)

Hashes are computed in float64 on the CPU -- so a float64 oracle replays them exactly -- and
on GPUs from the input dtype with fp32 accumulation (one fused Triton pass when triton
imports: :mod:`longattn.hyper.lsh_triton`).
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


_TABLES: dict = {}


def _table(r, device):
    key = (r, str(device))
    if key not in _TABLES:
        _TABLES[key] = gray_rank(torch.arange(1 << r)).to(torch.int32).to(device)
    return _TABLES[key]


def _fused():
    try:
        from longattn.hyper.lsh_triton import lsh_rank_fused
    except ImportError:  # no triton: the torch implementation
        return None
    return lsh_rank_fused


def lsh_rank(x: torch.Tensor, projections: torch.Tensor, *, narrow: bool = False
             ) -> torch.Tensor:
    """Gray ranks of the rows of ``x [B, S, H, D]`` as int32 ``[B, H, S]``.

    ``narrow``: the caller only sorts the ranks and takes any integer dtype; CUDA fp16 / bf16 /
    fp32 inputs then get uint8 (r <= 8) or int16 (r <= 15) ranks, written directly by the
    fused Triton kernel (:mod:`longattn.hyper.lsh_triton`, one pass; used on CUDA whenever
    triton imports). CPUs and float64 keep this torch implementation (the oracle replays it).
    """
    if x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        fused = _fused()
        if fused is not None:
            return fused(x, projections, narrow=narrow)
    if x.device.type == "cpu":
        dt = torch.float64
    else:  # half inputs: tensor-core matmul with fp32 accumulation, no fp32 copy of x
        dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    r = projections.shape[1]
    w = projections.to(device=x.device, dtype=dt)
    bits = torch.matmul(x.to(dt), w) > 0  # [B, S, H, r]
    pow2 = 1 << torch.arange(r, device=x.device, dtype=torch.int32)
    code = (bits.to(torch.int32) * pow2).sum(-1, dtype=torch.int32)
    return _table(r, x.device)[code.long()].transpose(1, 2).contiguous()


def sort_rows(rank: torch.Tensor) -> torch.Tensor:
    """Stable argsort along the last axis (sorted position -> row), int64."""
    return torch.sort(rank, dim=-1, stable=True).indices
