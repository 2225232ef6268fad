"""The local step of a decode: the new tokens' queries against one KV shard, with lse.

Global positions (the convention of every function in this package): the KV shards of the
ranks are contiguous pieces of one cache in group-rank order, so rank ``r`` holds the keys at
global positions ``[off_r, off_r + n_r)`` with ``off_r = n_0 + ... + n_{r-1}``, and the whole
cache holds ``N = n_0 + ... + n_{p-1}`` keys. The ``Lq`` new tokens are the last ``Lq``
positions of the cache (their keys are already in it): new token ``t`` sits at position
``N - Lq + t`` and, when causal, sees the keys at positions ``<= N - Lq + t`` (bottom-right
alignment, as in flash-attn's ``flash_attn_with_kvcache``).

Against one shard this is the window ``(-1, right)`` with ``right = N - off_r - n_r`` (the
number of keys after the shard) in the kernels' bottom-right aligned coordinates, so the
shared local kernels serve it unchanged.
"""

from __future__ import annotations

import torch

from longattn.common.kernels import attention_forward


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def shard_right(lens, index: int, lq: int, causal: bool) -> int:
    """Window ``right`` for the shard ``index`` of ``lens`` (-1: every key visible)."""
    if not causal:
        return -1
    right = sum(lens[index + 1:])
    # The earliest new token sees up to global N - Lq; if the whole shard lies before that,
    # nothing is masked and the unmasked (faster) kernels apply.
    return -1 if right >= lq - 1 else right


def local_attention(q, k, v, *, scale: float, right: int = -1, backend: str = "auto"):
    """``(out, lse)`` of ``q [B, Lq, Hq, D]`` against ``k, v [B, n, Hkv, D]`` with the window
    ``(-1, right)``; ``out`` in the accumulation dtype (float32, float64 for float64),
    ``lse [B, Hq, Lq]`` likewise. An empty shard gives ``out = 0``, ``lse = -inf``.

    ``backend``: ``"auto"`` uses the split-K Triton decode kernel
    (:mod:`longattn.tree.triton_decode`) on CUDA where it applies, else the shared kernels'
    ``auto``; ``"triton_decode"`` forces that kernel; any other name is a backend of
    :mod:`longattn.common.kernels`.
    """
    acc = acc_dtype(q.dtype)
    b, lq, hq, _ = q.shape
    if k.shape[1] == 0:
        out = torch.zeros(b, lq, hq, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, hq, lq), float("-inf"), dtype=acc, device=q.device)
        return out, lse
    if backend == "triton_decode" or (backend == "auto" and q.device.type == "cuda"):
        from longattn.tree import triton_decode

        reason = triton_decode.supports(q, k, v)
        if reason is None:
            return triton_decode.decode(q, k, v, scale=scale, right=right)
        if backend == "triton_decode":
            raise ValueError(f"backend 'triton_decode' cannot serve this call: {reason}")
        backend = "auto"
    out, lse = attention_forward(q, k, v, scale=scale, window=(-1, right), backend=backend)
    return out.to(acc), lse.to(acc)
