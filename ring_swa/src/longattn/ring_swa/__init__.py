"""longattn.ring_swa: ring sliding-window attention, streaming-LLM sinks, varlen; fwd and bwd.

    ring_swa_attn(q, k, v, *, window_size, group=None, causal=True, softmax_scale=None,
                  cu_seqlens=None, num_sink_tokens=0, return_lse=False, backend="auto")

``window_size = (left, right)`` is flash-attn's pair (causal windows: ``right`` 0, ``left = -1``
unbounded); q is this rank's contiguous chunk ``[B, S_local, Hq, D]`` (varlen: ``[T_local, Hq,
D]`` with the global ``cu_seqlens``), k / v ``[..., Hkv, D]`` (GQA). ``group=None`` is this
process alone, and an error in a torch.distributed world of more than one rank (pass the group).

The seed's API (``ring_swa`` by XunhaoLai) is kept as thin wrappers over it, with the seed's
names, argument order and integer ``window_size = w`` (= ``(w, 0)``, causal):

    ring_sliding_window_attn(q, k, v, window_size, cp_group=None, cp_size=None,
                             cp_local_rank=None, cp_prev_global_rank=None,
                             cp_next_global_rank=None, softmax_scale=None)
    ring_sliding_window_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None, ...)
    ring_streaming_llm_attn(q, k, v, window_size, cp_group=None, ..., num_sink_tokens=1)
    ring_streaming_llm_attn_varlen(q, k, v, window_size, cu_seqlens, cp_group=None, ...,
                                   num_sink_tokens=1)

See the package README for the exact semantics and the per-rank token rule.
"""

from longattn.common import version_of as _version_of

__version__ = _version_of("longattn-ring-swa")

from longattn.ring_swa.api import (
    ring_sliding_window_attn,
    ring_sliding_window_attn_varlen,
    ring_streaming_llm_attn,
    ring_streaming_llm_attn_varlen,
    ring_swa_attn,
)

__all__ = [
    "ring_sliding_window_attn",
    "ring_sliding_window_attn_varlen",
    "ring_streaming_llm_attn",
    "ring_streaming_llm_attn_varlen",
    "ring_swa_attn",
]
