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

Backends (``backend=``): ``"auto"`` (the split-K Triton decode kernel on CUDA where it serves
the call, else the shared kernels' ``"auto"``), ``"triton_decode"`` (that kernel, or an error
saying why it cannot serve), or any backend name of :mod:`longattn.common.kernels`.
"""

from __future__ import annotations

import torch

from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import BACKENDS, attention_forward, pick_backend

TRITON_DECODE = "triton_decode"


def shard_right(lens, index: int, lq: int, causal: bool) -> int:
    """Window ``right`` for the shard ``index`` of ``lens`` (-1: every key visible)."""
    if not causal:
        return -1
    right = sum(lens[index + 1:])
    # The earliest new token sees up to global N - Lq; if the whole shard lies before that,
    # nothing is masked and the unmasked (faster) kernels apply.
    return -1 if right >= lq - 1 else right


def resolve_backend(q, k, v, backend, *, causal: bool) -> str:
    """The backend name a decode call runs with, decided from this rank's tensors: ``"auto"``
    becomes ``"triton_decode"`` on CUDA where that kernel serves the call (it does not depend
    on the shard length) and stays ``"auto"`` otherwise (the shared kernels' choice, which
    always finds one). A named backend that cannot serve ``q``'s device / dtype / head dim
    raises ``ValueError`` naming ``backend``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto', {TRITON_DECODE!r} or a name of "
                        f"longattn.common.kernels.BACKENDS), got {backend!r}")
    if backend in ("auto", TRITON_DECODE):
        reason = _triton_reason(q, k, v)
        if backend == TRITON_DECODE and reason is not None:
            raise ValueError(f"backend {TRITON_DECODE!r} cannot serve this call: {reason}")
        if backend == TRITON_DECODE or (q.device.type == "cuda" and reason is None):
            return TRITON_DECODE
        return "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', {TRITON_DECODE!r} or one of "
                         f"{sorted(BACKENDS)}, got {backend!r}")
    kp, vp = _probe(q, k, v, 1)
    pick_backend(q, kp, vp, causal=False, window_size=(-1, -1), backend=backend)  # raises
    return backend


def check_backend_geometry(q, k, v, lens, *, causal: bool, backend: str, shards) -> None:
    """Raise ``ValueError`` if the named shared-kernel ``backend`` cannot serve the window of
    one of ``shards`` (indices into ``lens``). Decided from shapes alone, so every rank that
    passes the agreed ``lens`` raises the same error. ``"auto"`` / ``"triton_decode"`` serve
    every shard."""
    if backend in ("auto", TRITON_DECODE):
        return
    lq = q.shape[1]
    for i in shards:
        if lens[i]:
            kp, vp = _probe(q, k, v, lens[i])
            right = shard_right(lens, i, lq, causal)
            try:
                pick_backend(q, kp, vp, causal=False, window_size=(-1, right), backend=backend)
            except ValueError as e:
                raise ValueError(f"{e} (the shard of rank {i}: {lens[i]} keys, window "
                                 f"(-1, {right}))") from None


def _probe(q, k, v, n):
    """``[B, n, Hkv, D]`` stand-ins for a shard of ``n`` keys and values (expanded views of
    one element, no memory; v's head dim equals k's, checked before)."""
    b, _, hkv, d = k.shape
    src = q[:, :1, :1] if k.shape[1] == 0 else k[:, :1, :1]
    kp = src.expand(b, n, hkv, d)
    return kp, kp


def _triton_reason(q, k, v):
    try:
        from longattn.tree import triton_decode
    except ImportError as e:  # pragma: no cover - the module imports without triton
        return f"longattn.tree.triton_decode failed to import: {e}"
    return triton_decode.supports(q, k, v)


def local_attention(q, k, v, *, softmax_scale: float, right: int = -1, backend: str = "auto"):
    """``(out, lse)`` of ``q [B, Lq, Hq, D]`` against ``k, v [B, n, Hkv, D]`` with the window
    ``(-1, right)``; ``out`` in the accumulation dtype (``common.dtypes.acc_dtype``: float32,
    float64 for float64), ``lse [B, Hq, Lq]`` in ``common.dtypes.lse_dtype`` (float32 for
    fp16 / bf16, float64 for float32 and float64). An empty shard gives ``out = 0``,
    ``lse = -inf``.

    ``backend``: ``"auto"`` uses the split-K Triton decode kernel
    (:mod:`longattn.tree.triton_decode`) on CUDA where it applies, else the shared kernels'
    ``auto``; ``"triton_decode"`` forces that kernel; any other name is a backend of
    :mod:`longattn.common.kernels`. A backend that cannot serve the call raises ``ValueError``.
    """
    acc, stat = acc_dtype(q.dtype), lse_dtype(q.dtype)
    b, lq, hq, _ = q.shape
    if k.shape[1] == 0:
        out = torch.zeros(b, lq, hq, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((b, hq, lq), float("-inf"), dtype=stat, device=q.device)
        return out, lse
    if backend in ("auto", TRITON_DECODE):
        reason = _triton_reason(q, k, v)
        if reason is None and (backend == TRITON_DECODE or q.device.type == "cuda"):
            from longattn.tree import triton_decode

            return triton_decode.decode(q, k, v, softmax_scale=softmax_scale, right=right)
        if backend == TRITON_DECODE:
            raise ValueError(f"backend {TRITON_DECODE!r} cannot serve this call: {reason}")
    out, lse = attention_forward(q, k, v, softmax_scale=softmax_scale, window_size=(-1, right),
                                 backend=backend)
    return out.to(acc), lse.to(stat)
