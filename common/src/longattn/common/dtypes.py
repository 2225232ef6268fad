"""The accumulation-dtype rule, one home for every package.

Partial results, softmax statistics (``lse``) and merges accumulate in float32 for fp16 / bf16 /
fp32 inputs and in float64 for float64 inputs: the oracle comparisons at 1e-10 need float64
all the way, and a float32 ``lse`` would cap float64 accuracy at ~1e-7.
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
