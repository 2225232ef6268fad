"""The four public functions (the seed's names and argument order; extra keywords at the end).

``backend`` (keyword only, default ``"auto"``) picks the local attention kernel of
:mod:`longattn.common.kernels` for every step.
"""

from __future__ import annotations

from longattn.ring_swa.ring import ring_attention


def ring_sliding_window_attn(q, k, v, window_size, cp_group=None, cp_size=None,
                             cp_local_rank=None, cp_prev_global_rank=None,
                             cp_next_global_rank=None, softmax_scale=None, *, backend="auto"):
    """Causal sliding-window attention over a sequence split contiguously over ``cp_group``.

    q ``[B, S_local, Hq, D]``, k / v ``[B, S_local, Hkv, D]``: rank r holds tokens
    ``[r S_local, (r + 1) S_local)`` (the same S_local on every rank). Query i sees keys
    ``[i - window_size, i]``. Returns ``[B, S_local, Hq, Dv]`` in q's dtype.
    """
    return ring_attention(q, k, v, window_size, None, cp_group, cp_size, cp_local_rank,
                          cp_prev_global_rank, cp_next_global_rank, softmax_scale, 0,
                          varlen=False, streaming=False, backend=backend)


def ring_sliding_window_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None,
                                    cp_size=None, cp_local_rank=None, cp_prev_global_rank=None,
                                    cp_next_global_rank=None, softmax_scale=None, *,
                                    backend="auto"):
    """Varlen version: q ``[T_local, Hq, D]``, k / v ``[T_local, Hkv, D]``; ``cu_seqlens`` the
    global int32 boundaries (the same tensor on every rank). Rank r holds packed tokens
    ``[sum_{j<r} T_j, sum_{j<=r} T_j)``: T_local may differ between ranks (even be 0), and
    ``cu_seqlens[-1]`` must equal the sum. Sequences may cross any number of ranks."""
    return ring_attention(q, k, v, window_size, cu_seqlens, cp_group, cp_size, cp_local_rank,
                          cp_prev_global_rank, cp_next_global_rank, softmax_scale, 0,
                          varlen=True, streaming=False, backend=backend)


def ring_streaming_llm_attn(q, k, v, window_size, cp_group=None, cp_size=None,
                            cp_local_rank=None, cp_prev_global_rank=None,
                            cp_next_global_rank=None, softmax_scale=None, num_sink_tokens=1, *,
                            backend="auto"):
    """Sliding window plus attention sinks: query i sees keys ``[i - window_size, i]`` and the
    sequence's first ``num_sink_tokens`` keys (those <= i), each key once."""
    return ring_attention(q, k, v, window_size, None, cp_group, cp_size, cp_local_rank,
                          cp_prev_global_rank, cp_next_global_rank, softmax_scale,
                          num_sink_tokens, varlen=False, streaming=True, backend=backend)


def ring_streaming_llm_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None,
                                   cp_size=None, cp_local_rank=None, cp_prev_global_rank=None,
                                   cp_next_global_rank=None, softmax_scale=None,
                                   num_sink_tokens=1, *, backend="auto"):
    """Varlen streaming attention: every sequence sinks to *its own* first
    ``num_sink_tokens`` tokens (no shared-BOS assumption)."""
    return ring_attention(q, k, v, window_size, cu_seqlens, cp_group, cp_size, cp_local_rank,
                          cp_prev_global_rank, cp_next_global_rank, softmax_scale,
                          num_sink_tokens, varlen=True, streaming=True, backend=backend)
