"""longattn.dilated: exact LongNet dilated attention (arXiv 2307.02486), its multi-head module,
the LongNet models, and the distributed (sequence-parallel) version of section 3.1."""

from longattn.dilated.attention import DilatedAttention, check_schedule, dilated_attention

__all__ = ["DilatedAttention", "check_schedule", "dilated_attention"]
