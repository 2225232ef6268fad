"""The knob record of dilated attention: :class:`FusedConfig`, passed as ``config=``.

One frozen record per call (``dilated_attention(..., config=FusedConfig(...))``, or the
``config=`` of the modules), never a module-level setting. The launch defaults (``rows``,
``chunk``, ``num_warps``, ``programs_per_sm``) are the choice ``dilated/bench/tune_fused.py``
timed fastest of 18 on an NVIDIA H100, merge + the three gradient sums (log
``dilated/bench/results/tune_fused_log.txt``, where 32 persistent programs per SM and 8-column
loads were slower); ``dilated/bench/results/bench_dilated.json`` and
``bench_dilated_h200.json`` are benchmark runs with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from longattn.common.checks import config_or_default

_MODES = ("auto", "on", "off")


def _positive_int(name, x, *, power_of_two=False):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"FusedConfig.{name} must be a positive int, got {x!r}")
    if power_of_two and x & (x - 1):
        raise ValueError(f"FusedConfig.{name} must be a power of two, got {x}")


@dataclass(frozen=True)
class FusedConfig:
    """How dilated attention merges its calls (forward) and sums their gradients (backward).

    ``fused``: ``"auto"`` runs the fused Triton merge / gradient sums
    (:mod:`longattn.dilated.fused`) on CUDA fp16/bf16 when every call of the plan is a strided
    view and nothing is exchanged between ranks; ``"on"`` wherever the plan allows it (fp16
    or bf16, also on the CPU under ``TRITON_INTERPRET=1``; float32 and float64 inputs always
    merge eagerly, with float64 statistics: the kernels' float32 lse would cost float32 inputs
    their accuracy at large logits); ``"off"`` always the eager
    torch code (:func:`longattn.dilated.attention.merge_calls`).

    The launch of the fused kernels: ``rows`` positions a tile, ``chunk`` head-dim columns a
    load reads of each row (16 bf16 columns = one 32-byte memory sector), ``num_warps``,
    ``programs_per_sm`` (None: one program per tile; else persistent programs, that many per
    SM, striding over the tiles of their (head, batch row)), ``fast_index`` (the
    division-free index arithmetic where the host finds it exact; False: integer divisions
    always).
    """

    fused: str = "auto"
    rows: int = 128
    chunk: int = 16
    num_warps: int = 4
    programs_per_sm: int | None = None
    fast_index: bool = True

    def __post_init__(self):
        if self.fused not in _MODES:
            raise ValueError(f"FusedConfig.fused must be one of {_MODES}, got {self.fused!r}")
        _positive_int("rows", self.rows, power_of_two=True)
        _positive_int("chunk", self.chunk, power_of_two=True)
        _positive_int("num_warps", self.num_warps, power_of_two=True)
        if self.programs_per_sm is not None:
            _positive_int("programs_per_sm", self.programs_per_sm)
        if not isinstance(self.fast_index, bool):
            raise TypeError(f"FusedConfig.fast_index must be a bool, got {self.fast_index!r}")


DEFAULT = FusedConfig()


def check_config(config) -> FusedConfig:
    """``None`` -> the defaults; a :class:`FusedConfig` as is; anything else a ``TypeError``."""
    return config_or_default(config, FusedConfig, DEFAULT,
                             expected="config must be a longattn.dilated.FusedConfig or None")
