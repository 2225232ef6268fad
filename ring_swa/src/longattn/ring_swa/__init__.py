"""longattn.ring_swa: ring sliding-window attention, streaming-LLM sinks, varlen; fwd and bwd.

Drop-in for the seed's API (``ring_swa`` by XunhaoLai): the same functions and argument names.

    ring_sliding_window_attn(q, k, v, window_size, cp_group=None, cp_size=None,
                             cp_local_rank=None, cp_prev_global_rank=None,
                             cp_next_global_rank=None, softmax_scale=None)
    ring_sliding_window_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None, ...)
    ring_streaming_llm_attn(q, k, v, window_size, cp_group=None, ..., num_sink_tokens=1)
    ring_streaming_llm_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None, ...,
                                   num_sink_tokens=1)

``window_size = w`` means flash-attn's ``window=(w, 0)`` with ``causal=True``: query i sees keys
``[i - w, i]`` (w + 1 keys). q is this rank's contiguous chunk ``[B, S_local, Hq, D]`` (varlen:
``[T_local, Hq, D]`` with the global ``cu_seqlens``), k / v ``[..., Hkv, D]`` (GQA). The output
has q's shape and dtype and is differentiable. ``cp_group=None`` runs on this process alone (as
the seed does). See the package README for the exact semantics and the per-rank token rule.
"""

from longattn.ring_swa.api import (
    ring_sliding_window_attn,
    ring_sliding_window_attn_varlen,
    ring_streaming_llm_attn,
    ring_streaming_llm_attn_varlen,
)

__all__ = [
    "ring_sliding_window_attn",
    "ring_sliding_window_attn_varlen",
    "ring_streaming_llm_attn",
    "ring_streaming_llm_attn_varlen",
]
