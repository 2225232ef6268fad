"""The public functions: the canonical :func:`ring_swa_attn` and the seed-compatible wrappers.

The four ``ring_*`` functions keep the seed's names, argument order and defaults (an integer
``window_size``, ``cp_group``, the explicit ``cp_*`` rank arguments); each is a thin wrapper
that calls the same core as :func:`ring_swa_attn`.
"""

from __future__ import annotations

from longattn.ring_swa.ring import SeedArgs, ring_swa


def ring_swa_attn(q, k, v, *, window_size, group=None, causal=True, softmax_scale=None,
                  cu_seqlens=None, num_sink_tokens=0, return_lse=False, backend="auto"):
    """Causal sliding-window attention (optionally with attention sinks) over a sequence split
    contiguously over the ranks of ``group``.

    * ``q [B, S_local, Hq, D]``, ``k`` / ``v [B, S_local, Hkv, D]`` (``Hq % Hkv == 0``): rank r
      holds tokens ``[r S_local, (r + 1) S_local)``, the same ``S_local`` on every rank. With
      ``cu_seqlens`` (varlen): packed ``q [T_local, Hq, D]``, ``k`` / ``v [T_local, Hkv, D]``
      and ``cu_seqlens`` the *global* int32 sequence boundaries (the same on every rank); rank
      r holds the packed tokens ``[sum_{j<r} T_j, sum_{j<=r} T_j)`` (``T_j`` may differ, even
      be 0) and ``cu_seqlens[-1]`` must equal ``sum_j T_j``.
    * ``window_size = (left, right)``: flash-attn's pair. Query i sees keys
      ``[i - left, i]``; ``left = -1`` is unbounded (causal attention). Only causal windows are
      computed: with ``causal=True`` ``right`` is capped at 0 (flash-attn's rule); with
      ``causal=False`` ``right`` must be 0. Anything else raises a ``ValueError`` naming
      ``window_size``.
    * ``num_sink_tokens``: every query also sees its sequence's first ``num_sink_tokens`` keys
      (those at or before it), each key once (streaming-LLM sinks; varlen: per sequence).
    * ``group``: a ``ProcessGroup``, a 1-D ``DeviceMesh``, ``longattn.common.dist.LOCAL`` or
      ``None``. ``None`` is this process alone without torch.distributed or in a world of one
      rank, and an error (``ValueError`` naming ``group``) in a world of more ranks: pass
      ``torch.distributed.group.WORLD`` to shard over the world, ``LOCAL`` for this process.
    * ``softmax_scale``: default ``D ** -0.5``; ``backend``: the local kernel of
      ``longattn.common.kernels`` (``"auto"`` or a backend name; an explicit one must serve
      every step of the call, or every rank raises).

    Returns ``out`` (q's shape and dtype, differentiable w.r.t. q, k, v), or ``(out, lse)`` with
    ``return_lse=True``: ``lse [B, Hq, S_local]`` (varlen ``[Hq, T_local]``) in
    ``longattn.common.dtypes.lse_dtype(q.dtype)`` (float64 for float32 and float64 inputs,
    float32 for fp16 / bf16), not differentiable. Every argument is checked on every rank before any
    K/V moves; a bad one on any rank raises the same error on every rank.
    """
    return ring_swa(q, k, v, op="ring_swa_attn", varlen=cu_seqlens is not None,
                    window_size=window_size, group=group, causal=causal,
                    softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                    num_sink_tokens=num_sink_tokens, return_lse=return_lse, backend=backend)


def _seed(op, q, k, v, window_size, cu_seqlens, cp_group, cp_size, cp_local_rank,
          cp_prev_global_rank, cp_next_global_rank, softmax_scale, num_sink_tokens, *, varlen,
          min_sinks):
    seed = SeedArgs(cp_size, cp_local_rank, cp_prev_global_rank, cp_next_global_rank,
                    min_sinks)
    return ring_swa(q, k, v, op=op, varlen=varlen, window_size=window_size, group=cp_group,
                    causal=True, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                    num_sink_tokens=num_sink_tokens, return_lse=False, backend="auto",
                    seed=seed)


def ring_sliding_window_attn(q, k, v, window_size, cp_group=None, cp_size=None,
                             cp_local_rank=None, cp_prev_global_rank=None,
                             cp_next_global_rank=None, softmax_scale=None):
    """Seed-compatible: ``ring_swa_attn(q, k, v, window_size=(window_size, 0),
    group=cp_group, softmax_scale=softmax_scale)``.

    ``window_size`` is an int ``w >= 0``: query i sees keys ``[i - w, i]``. ``cp_group``
    follows ``group``'s rule (``None`` raises in a world of more than one rank). ``cp_size``,
    ``cp_local_rank``, ``cp_prev_global_rank``, ``cp_next_global_rank`` are derived from
    ``cp_group``; when given they must match it (chunk i on group rank i), or every rank
    raises."""
    return _seed("ring_sliding_window_attn", q, k, v, window_size, None, cp_group, cp_size,
                 cp_local_rank, cp_prev_global_rank, cp_next_global_rank, softmax_scale, 0,
                 varlen=False, min_sinks=0)


def ring_sliding_window_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None,
                                    cp_size=None, cp_local_rank=None, cp_prev_global_rank=None,
                                    cp_next_global_rank=None, softmax_scale=None):
    """Seed-compatible: ``ring_swa_attn(q, k, v, window_size=(window_size, 0),
    cu_seqlens=cu_seqlens, group=cp_group, softmax_scale=softmax_scale)`` (packed
    ``[T_local, H, D]`` inputs; see :func:`ring_sliding_window_attn` for the rest)."""
    return _seed("ring_sliding_window_attn_varlen", q, k, v, window_size, cu_seqlens, cp_group,
                 cp_size, cp_local_rank, cp_prev_global_rank, cp_next_global_rank,
                 softmax_scale, 0, varlen=True, min_sinks=0)


def ring_streaming_llm_attn(q, k, v, window_size, cp_group=None, cp_size=None,
                            cp_local_rank=None, cp_prev_global_rank=None,
                            cp_next_global_rank=None, softmax_scale=None, num_sink_tokens=1):
    """Seed-compatible: ``ring_swa_attn(q, k, v, window_size=(window_size, 0),
    num_sink_tokens=num_sink_tokens, group=cp_group, softmax_scale=softmax_scale)`` with
    ``num_sink_tokens >= 1`` (see :func:`ring_sliding_window_attn` for the rest)."""
    return _seed("ring_streaming_llm_attn", q, k, v, window_size, None, cp_group, cp_size,
                 cp_local_rank, cp_prev_global_rank, cp_next_global_rank, softmax_scale,
                 num_sink_tokens, varlen=False, min_sinks=1)


def ring_streaming_llm_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None,
                                   cp_size=None, cp_local_rank=None, cp_prev_global_rank=None,
                                   cp_next_global_rank=None, softmax_scale=None,
                                   num_sink_tokens=1):
    """Seed-compatible: ``ring_swa_attn(q, k, v, window_size=(window_size, 0),
    cu_seqlens=cu_seqlens, num_sink_tokens=num_sink_tokens, group=cp_group,
    softmax_scale=softmax_scale)`` with ``num_sink_tokens >= 1``: every sequence sinks to its
    own first tokens."""
    return _seed("ring_streaming_llm_attn_varlen", q, k, v, window_size, cu_seqlens, cp_group,
                 cp_size, cp_local_rank, cp_prev_global_rank, cp_next_global_rank,
                 softmax_scale, num_sink_tokens, varlen=True, min_sinks=1)
