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
                    seqlens=None, starts=None, skips=None):
    """``(out, lse)`` of ``q [B, Lq, Hq, D]`` against ``k, v [B, n, Hkv, D]`` with the window
    ``(-1, right)``; ``out`` in the accumulation dtype (``common.dtypes.acc_dtype``: float32,
    float64 for float64), ``lse [B, Hq, Lq]`` in ``common.dtypes.lse_dtype`` (float32 for
    fp16 / bf16, float64 for float32 and float64). An empty shard gives ``out = 0``,
    ``lse = -inf``.

    ``seqlens``: None (every row holds all ``n`` keys) or ``B`` ints, row ``b`` holding its
    first ``seqlens[b]`` keys; ``right`` is then an int or ``B`` ints (each row's window). An
    empty row gives ``out = 0``, ``lse = -inf``. With ``seqlens``, ``starts`` (``B`` ints:
    row ``b``'s keys begin at slot ``starts[b]``, flash-attn's ``cache_leftpad``) and ``skips``
    (``B`` pairs ``(lo, hi)``: row ``b`` does not see its slots ``lo <= j < hi``; ``lo == hi``
    skips none) drop keys without moving any: the window still counts in slots.

    ``backend``: ``"auto"`` uses the split-K Triton decode kernel
    (:mod:`longattn.tree.triton_decode`) on CUDA where it applies, else the shared kernels'
    ``auto``; ``"triton_decode"`` forces that kernel; any other name is a backend of
    :mod:`longattn.common.kernels`. A backend that cannot serve the call raises ``ValueError``.
    """
    if seqlens is None and (starts is not None or skips is not None):
        raise ValueError("starts and skips need seqlens (each row's end)")
    if seqlens is not None:
        seqlens = [int(n) for n in seqlens]
        rights = [int(r) for r in right] if isinstance(right, (list, tuple)) else (
            [int(right)] * len(seqlens))
        starts = [0] * len(seqlens) if starts is None else [int(x) for x in starts]
        skips = [(0, 0)] * len(seqlens) if skips is None else [
            (int(lo), int(hi)) for lo, hi in skips]
        # a skip outside [start, end) or empty is no skip
        skips = [(lo, hi) if max(lo, s0) < min(hi, n) else (0, 0)
                 for (lo, hi), s0, n in zip(skips, starts, seqlens)]
        if len(set(zip(seqlens, rights, starts, skips))) == 1 and skips[0] == (0, 0):
            n, right, s0, seqlens = seqlens[0], rights[0], starts[0], None  # one call, a view
            k, v = k[:, s0:max(n, s0)], v[:, s0:max(n, s0)]
        elif all(n <= s0 for n, s0 in zip(seqlens, starts)):
            return _empty(q, v)
    if k.shape[1] == 0:
        return _empty(q, v)
    if seqlens is not None:
        return _per_row(q, k, v, softmax_scale, seqlens, rights, backend, starts, skips)
    if _triton_serves(q, k, v, backend):
        from longattn.tree import triton_decode

        return triton_decode.decode(q, k, v, softmax_scale=softmax_scale, right=right)
    out, lse = attention_forward(q, k, v, softmax_scale=softmax_scale, window_size=(-1, right),
                                 backend=backend)
    return out.to(acc_dtype(q.dtype)), lse.to(lse_dtype(q.dtype))


def _row_ranges(n, start, skip):
    """The slot ranges ``[a, e)`` row keys ``start <= j < n`` outside ``skip`` fall in."""
    lo, hi = skip
    out = [(start, min(lo, n)), (max(hi, start), n)] if lo < hi else [(start, n)]
    return [(a, e) for a, e in out if a < e]


def _per_row(q, k, v, softmax_scale, seqlens, rights, backend, starts, skips):
    """Rows of different lengths / windows / starts / skips: the Triton kernel takes them in
    one launch (each program reads its row's bounds); the shared kernels run one call per
    range of a row on the views ``k[b:b+1, a:e]`` (no copies; a row with a skip has two
    ranges, merged exactly), which is their slow twin."""
    if _triton_serves(q, k, v, backend):
        from longattn.tree import triton_decode

        return triton_decode.decode(q, k, v, softmax_scale=softmax_scale, seqlens=seqlens,
                                    rights=rights, starts=starts, skips=skips)
    from longattn.common.merge import merge_partials

    out, lse = _empty(q, v)
    for b, (n, right) in enumerate(zip(seqlens, rights)):
        parts = []
        for a, e in _row_ranges(n, starts[b], skips[b]):
            # the window counts from the row's end n: a view ending at e keeps it by
            # widening ``right`` by the slots cut off after it
            r = right if right < 0 else right + (n - e)
            parts.append(attention_forward(q[b:b + 1], k[b:b + 1, a:e], v[b:b + 1, a:e],
                                           softmax_scale=softmax_scale,
                                           window_size=(-1, r), backend=backend))
        if not parts:
            continue
        o_b, lse_b = parts[0]
        if len(parts) == 2:
            o_b, lse_b = merge_partials(o_b, lse_b.to(lse.dtype), *parts[1])
        out[b] = o_b[0].to(out.dtype)
        lse[b] = lse_b[0].to(lse.dtype)
    return out, lse
