"""longattn.hamilton: TASP (Hamilton Attention) context-parallel attention.

``hamilton_attn(q, k, v, *, group=None, causal=False, softmax_scale=None, schedule="auto",
return_lse=False, backend="auto", config=None, cu_seqlens=None)`` runs any communication
schedule -- TASP's multi-ring all-to-all, Ring Attention (zigzag ring when causal), the
two-level multi-node schedule -- through one step loop, forward and backward. ``config`` takes a
:class:`HamiltonConfig`. ``shard`` / ``unshard`` produce the matching sequence layout;
``longattn.hamilton.schedules`` builds and validates schedules. Packed documents
(``cu_seqlens``): :mod:`longattn.hamilton.packing` (layout, plans, ``pad_packed``), with the
step schedules or ``schedule="allgather"`` (:mod:`longattn.hamilton.packed_allgather`).
"""

from longattn.common import version_of as _version_of

__version__ = _version_of("longattn-hamilton")

from longattn.hamilton.attn import hamilton_attn
from longattn.hamilton.config import HamiltonConfig
from longattn.hamilton.packing import (
    make_allgather_plan,
    make_packed_plan,
    packed_layout,
    pad_packed,
    unpad_packed,
)
from longattn.hamilton.schedules import (
    Schedule,
    hamiltonian_cycles,
    multi_ring_schedule,
    ring_schedule,
    two_level_schedule,
    validate_schedule,
)
from longattn.hamilton.sharding import layout_name, shard, unshard
from longattn.hamilton.strategy import Explanation, Prediction, explain
from longattn.hamilton.usp import usp_attn, usp_shard, usp_unshard

__all__ = [
    "Explanation",
    "HamiltonConfig",
    "Prediction",
    "Schedule",
    "explain",
    "hamilton_attn",
    "hamiltonian_cycles",
    "layout_name",
    "make_allgather_plan",
    "make_packed_plan",
    "multi_ring_schedule",
    "packed_layout",
    "pad_packed",
    "ring_schedule",
    "shard",
    "two_level_schedule",
    "unpad_packed",
    "unshard",
    "usp_attn",
    "usp_shard",
    "usp_unshard",
    "validate_schedule",
]
