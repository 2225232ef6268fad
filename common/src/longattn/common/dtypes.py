"""The accumulation-dtype rules, one home for every package.

``acc_dtype``: partial outputs and merged ``out`` accumulate in float32 for fp16 / bf16 / fp32
inputs and in float64 for float64 inputs (the oracle comparisons at 1e-10 need float64 all the
way). ``lse_dtype``: the softmax statistics (``lse``, running maxima, their accumulators and
all-reduced statistics) are float32 for fp16 / bf16 inputs and float64 for float32 / float64
inputs (merge precision at large logits). ``split_lse``: a float64 ``lse`` as two float32
parts, for ``exp(s - lse)`` in float32 without losing the float64 ``lse``'s precision.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax statistics (``lse``, running maxima) of ``dtype`` inputs:
    float32 for fp16 / bf16 (what the fused cuDNN / flash kernels return), float64 for float32
    and float64. A float32 ``lse`` near 1e4 is only good to ~1e-3 absolute, so merging float32
    partials by ``exp(lse_b - lse_a)`` would lose accuracy linearly in the logit scale; in
    float64 the merged result stays at float32 accuracy (logits up to 1e4 and beyond)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def split_lse(lse: torch.Tensor, dtype: torch.dtype):
    """``(hi, lo)`` in ``dtype`` with ``hi + lo == lse`` to ``dtype``'s precision relative to
    ``lo``: ``exp((s - hi) - lo)`` is ``exp(s - lse)`` for ``dtype`` scores ``s`` near ``lse``
    (``s - hi`` is exact there). ``lo`` is None when ``lse`` is not wider than ``dtype`` (then
    ``hi`` is ``lse`` itself, so nothing changes for fp16 / bf16 paths); it is 0 where ``lse``
    is not finite (``-inf``, ``+inf``, NaN go through ``hi``)."""
    if lse.dtype.itemsize <= dtype.itemsize:
        return lse.to(dtype), None
    hi = lse.to(dtype)
    lo = torch.where(torch.isfinite(lse) & torch.isfinite(hi), lse - hi.to(lse.dtype),
                     torch.zeros_like(lse)).to(dtype)
    return hi, lo
