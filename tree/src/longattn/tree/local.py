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

Per-row lengths (``cache_seqlens``, as in flash-attn's ``flash_attn_with_kvcache``): row ``b``
of rank ``r``'s shard holds its first ``n_r[b]`` slots; the same rule then holds row by row
(``N[b]``, ``off_r[b]``, ``right[b]``). A row may be empty on a rank (out 0, lse -inf there).

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


def row_rights(seqlens, index: int, lq: int, causal: bool) -> list[int]:
    """Per-row window ``right`` of the shard ``index`` of ``seqlens[rank][row]``."""
    return [shard_right([rank_rows[b] for rank_rows in seqlens], index, lq, causal)
            for b in range(len(seqlens[index]))]


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


def check_backend_geometry(q, k, v, lens, *, causal: bool, backend: str, shards,
                           seqlens=None) -> None:
    """Raise ``ValueError`` if the named shared-kernel ``backend`` cannot serve the window of
    one of ``shards`` (indices into ``lens``; with ``seqlens[rank][row]``, each row of them).
    Decided from shapes alone, so every rank that passes the agreed ``lens`` / ``seqlens``
    raises the same error. ``"auto"`` / ``"triton_decode"`` serve every shard."""
    if backend in ("auto", TRITON_DECODE):
        return
    lq = q.shape[1]
    pieces = {}  # (keys, right) -> where, each geometry probed once
    for i in shards:
        if seqlens is None:
            pieces.setdefault((lens[i], shard_right(lens, i, lq, causal)), f"rank {i}")
        else:
            for b, (n, r) in enumerate(zip(seqlens[i], row_rights(seqlens, i, lq, causal))):
                pieces.setdefault((n, r), f"rank {i}, row {b}")
    qp = q if seqlens is None else q[:1]  # per-row calls attend one row at a time
    for (n, right), where in pieces.items():
        if n:
            kp, vp = _probe(qp, k[:qp.shape[0]], v, n)
            try:
                pick_backend(qp, kp, vp, causal=False, window_size=(-1, right), backend=backend)
            except ValueError as e:
                raise ValueError(f"{e} (the shard of {where}: {n} keys, window "
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


def _empty(q, v):
    acc, stat = acc_dtype(q.dtype), lse_dtype(q.dtype)
    b, lq, hq, _ = q.shape
    out = torch.zeros(b, lq, hq, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((b, hq, lq), float("-inf"), dtype=stat, device=q.device)
    return out, lse


def _triton_serves(q, k, v, backend) -> bool:
    """Whether the split-K Triton kernel runs this call (raises if it was named and cannot)."""
    if backend not in ("auto", TRITON_DECODE):
        return False
    reason = _triton_reason(q, k, v)
    if backend == TRITON_DECODE and reason is not None:
        raise ValueError(f"backend {TRITON_DECODE!r} cannot serve this call: {reason}")
    return reason is None and (backend == TRITON_DECODE or q.device.type == "cuda")


def local_attention(q, k, v, *, softmax_scale: float, right=-1, backend: str = "auto",
                    seqlens=None):
    """``(out, lse)`` of ``q [B, Lq, Hq, D]`` against ``k, v [B, n, Hkv, D]`` with the window
    ``(-1, right)``; ``out`` in the accumulation dtype (``common.dtypes.acc_dtype``: float32,
    float64 for float64), ``lse [B, Hq, Lq]`` in ``common.dtypes.lse_dtype`` (float32 for
    fp16 / bf16, float64 for float32 and float64). An empty shard gives ``out = 0``,
    ``lse = -inf``.

    ``seqlens``: None (every row holds all ``n`` keys) or ``B`` ints, row ``b`` holding its
    first ``seqlens[b]`` keys; ``right`` is then an int or ``B`` ints (each row's window). An
    empty row gives ``out = 0``, ``lse = -inf``.

    ``backend``: ``"auto"`` uses the split-K Triton decode kernel
    (:mod:`longattn.tree.triton_decode`) on CUDA where it applies, else the shared kernels'
    ``auto``; ``"triton_decode"`` forces that kernel; any other name is a backend of
    :mod:`longattn.common.kernels`. A backend that cannot serve the call raises ``ValueError``.
    """
    if seqlens is not None:
        seqlens = [int(n) for n in seqlens]
        rights = [int(r) for r in right] if isinstance(right, (list, tuple)) else (
            [int(right)] * len(seqlens))
        if len(set(zip(seqlens, rights))) == 1:  # every row alike: one call on the prefix
            n, right, seqlens = seqlens[0], rights[0], None
            k, v = k[:, :n], v[:, :n]
        elif not any(seqlens):
            return _empty(q, v)
    if k.shape[1] == 0:
        return _empty(q, v)
    if seqlens is not None:
        return _per_row(q, k, v, softmax_scale, seqlens, rights, backend)
    if _triton_serves(q, k, v, backend):
        from longattn.tree import triton_decode

        return triton_decode.decode(q, k, v, softmax_scale=softmax_scale, right=right)
    out, lse = attention_forward(q, k, v, softmax_scale=softmax_scale, window_size=(-1, right),
                                 backend=backend)
    return out.to(acc_dtype(q.dtype)), lse.to(lse_dtype(q.dtype))


def _per_row(q, k, v, softmax_scale, seqlens, rights, backend):
    """Rows of different lengths / windows: the Triton kernel takes them in one launch (each
    program reads its row's length and window); the shared kernels run one call per non-empty
    row on the views ``k[b:b+1, :n_b]`` (no copies), which is their slow twin."""
    if _triton_serves(q, k, v, backend):
        from longattn.tree import triton_decode

        return triton_decode.decode(q, k, v, softmax_scale=softmax_scale, seqlens=seqlens,
                                    rights=rights)
    out, lse = _empty(q, v)
    for b, (n, right) in enumerate(zip(seqlens, rights)):
        if n:
            o_b, lse_b = attention_forward(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n],
                                           softmax_scale=softmax_scale,
                                           window_size=(-1, right), backend=backend)
            out[b] = o_b[0]
            lse[b] = lse_b[0]
    return out, lse
