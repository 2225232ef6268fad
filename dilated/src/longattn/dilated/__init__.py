"""longattn.dilated: exact LongNet dilated attention (arXiv 2307.02486), its multi-head module,
the LongNet models, and the distributed (sequence-parallel) version of section 3.1."""

from longattn.common import version_of as _version_of

__version__ = _version_of("longattn-dilated")

from longattn.dilated.attention import DilatedAttention, check_schedule, dilated_attention
from longattn.dilated.config import FusedConfig
from longattn.dilated.model import (
    DilatedTransformerDecoderLayer,
    DilatedTransformerEncoderLayer,
    LongNet,
    LongNetLM,
    MultiheadDilatedAttention,
)
from longattn.dilated.position import apply_rotary, apply_xpos

__all__ = [
    "DilatedAttention",
    "DilatedTransformerDecoderLayer",
    "DilatedTransformerEncoderLayer",
    "FusedConfig",
    "LongNet",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "apply_rotary",
    "apply_xpos",
    "check_schedule",
    "dilated_attention",
]
