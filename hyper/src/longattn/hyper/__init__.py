"""longattn.hyper: HyperAttention (Han et al., ICLR 2024) with Triton kernels.

Sorted-LSH block-diagonal attention plus uniformly sampled columns, merged by the exact
log-sum-exp rule, causal by recursion; gradients are those of the approximation computed.
"""

from longattn.common import version_of as _version_of

__version__ = _version_of("longattn-hyper")

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
