"""The knobs of the Triton path, passed per call: ``hyper_attention(..., config=HyperConfig())``.

The torch path has no knobs; it ignores ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass

_FWD_TILES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class HyperConfig:
    """Settings of the Triton kernels (speed only: every setting computes the same function).

    ``fwd_tile``: sorted query rows per forward program when ``block_size >= fwd_tile``
    (smaller blocks take the dq tile: 128 rows, 64 for blocks under 128). 128 is the tile of
    the committed H100 runs (``hyper/bench/results/bench_hyper.json``,
    ``bench_hyper_retime_no_sweep.json``). 256 halves the gathered K/V and sample loads per
    query (``bench/compile_sm90.py`` reports its registers and spills); no committed run
    measures its speed (``bench_hyper.py --fwd-tile 256`` does). Under ``TRITON_INTERPRET=1``
    every tile is 16.
    """

    fwd_tile: int = 128

    def __post_init__(self):
        t = self.fwd_tile
        if isinstance(t, bool) or not isinstance(t, int) or t not in _FWD_TILES:
            raise ValueError(f"HyperConfig.fwd_tile must be one of {_FWD_TILES}, got {t!r}")
