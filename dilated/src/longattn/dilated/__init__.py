"""longattn.dilated: exact LongNet dilated attention (arXiv 2307.02486), its multi-head module,
the LongNet models, and the distributed (sequence-parallel) version of section 3.1."""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

try:
    __version__ = _version("longattn-dilated")
except _NotInstalled:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

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
