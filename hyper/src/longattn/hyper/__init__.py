"""longattn.hyper: HyperAttention (Han et al., ICLR 2024) with Triton kernels.

Sorted-LSH block-diagonal attention plus uniformly sampled columns, merged by the exact
log-sum-exp rule, causal by recursion; gradients are those of the approximation computed.
"""

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

try:
    __version__ = _version("longattn-hyper")
except _NotInstalled:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

from longattn.hyper.api import HyperAttention, choose_backend, hyper_attention
from longattn.hyper.config import HyperConfig
from longattn.hyper.lsh import gray_rank, lsh_rank
from longattn.hyper.plan import Plan, make_plan
from longattn.hyper.randomness import draw_projections, draw_sample_indices

__all__ = [
    "HyperAttention",
    "HyperConfig",
    "Plan",
    "choose_backend",
    "draw_projections",
    "draw_sample_indices",
    "gray_rank",
    "hyper_attention",
    "lsh_rank",
    "make_plan",
]
