"""The knobs of HyperAttention, passed per call: ``hyper_attention(..., config=HyperConfig())``.

``fwd_tile``, ``grad_accum``, ``samples_chunk`` and ``leaf_backend_bwd`` are the Triton
path's; ``leaf_backend`` both paths'.
"""

from __future__ import annotations

from dataclasses import dataclass

_FWD_TILES = (16, 32, 64, 128, 256)
_GRAD_ACCUM = ("float32", "input")
_SAMPLES_CHUNKS = (256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class HyperConfig:
    """Settings of the kernels (speed only: every setting computes the same function, up to
    the rounding of the kernels it picks).

    ``fwd_tile``: sorted query rows per forward program when ``block_size >= fwd_tile``
    (smaller blocks take the dq tile: 128 rows, 64 for blocks under 128). 128 is the tile of
    the committed H100 runs (``hyper/bench/results/bench_hyper.json``,
    ``bench_hyper_retime_no_sweep.json``). 256 halves the gathered K/V and sample loads per
    query (``bench/compile_sm90.py`` reports its registers and spills) but ran slower on an
    H100 (causal forward 13.92 against 12.40 ms at S = 131,072:
    ``hyper/bench/results/h100/tune_hyper/run2/log.txt``). Under ``TRITON_INTERPRET=1``
    every tile is 16.

    ``grad_accum``: the dtype of the running dq / dk / dv of the backward for fp16 / bf16
    inputs: ``"input"`` (the default: the leaves' gradients, in the input dtype, are the
    running gradients; each level adds its part in fp32 registers and rounds once on the
    store, as the forward does with ``O``: one extra rounding per level a row takes part in,
    at most ``log2(S / min_seq_len)``, and no fp32 copies of the gradients) or ``"float32"``
    (each level adds its part to fp32 copies; one rounding to the input dtype at the end).
    fp32 inputs always accumulate in fp32. ``hyper/bench/results/h100/tune_hyper/`` has both
    timed and their gradients compared.

    ``samples_chunk``: sorted query rows per program of the backward's sampled-key kernel
    (``_bwd_samples``). Each program adds its rows' part of the sampled keys' dk / dv into fp32
    partials of ``samples x head_dim`` per chunk, which are then summed over the chunks of each
    call: a larger chunk writes and sums fewer partials and runs longer loops, over fewer
    programs (at S = 131,072 and the defaults every level has 65,536 queries: ``65536 /
    samples_chunk x 4 x heads`` programs). 4096 is the default: on an H100 the causal forward +
    backward at S = 131,072 took 47.90 ms against 48.40 ms with 1024 (in one run,
    ``hyper/bench/results/h100/samples_chunk/tune/log.txt``); 8192 and 16384 took 0.2 and 0.3 ms
    less again with FA4 leaves (``tune_chunks/log.txt`` there), over a quarter and an eighth as
    many programs, too few for shorter sequences or fewer heads. Under ``TRITON_INTERPRET=1``
    the chunk is ``samples_chunk / 32`` rows (32 for the default), so the tests' small problems
    still have several chunks.

    ``leaf_backend``: the local-kernel backend (:mod:`longattn.common.kernels`) of the exact
    parts, on both paths: the causal leaves and the whole call where it is exact (``Sk <=
    min_seq_len``). ``"auto"`` (the default) lets the kernels pick (cuDNN on GPUs, torch on a
    CPU); a name the kernels do not know raises here, a named backend that cannot serve a call
    raises at the call, saying why (e.g. ``"fa4"``, FlashAttention-4, serves fp16 / bf16 on
    sm90+ only, where ``flash_attn.cute`` imports).

    ``leaf_backend_bwd``: the backend of the causal leaves' backward on the Triton path (None,
    the default: ``leaf_backend``), checked the same way. The backward takes the final output
    and lse, never the leaves' own, so the two directions may run on different kernels: on an
    H100, FlashAttention-4's leaf backward is faster than cuDNN's, its forward slower
    (``hyper/bench/results/h100/samples_chunk/tune/log.txt``). The exact whole call
    (``Sk <= min_seq_len``) and the torch path run both directions on ``leaf_backend``.
    """

    fwd_tile: int = 128
    leaf_backend: str = "auto"
    grad_accum: str = "input"
    samples_chunk: int = 4096
    leaf_backend_bwd: str | None = None

    def __post_init__(self):
        t = self.fwd_tile
        if isinstance(t, bool) or not isinstance(t, int) or t not in _FWD_TILES:
            raise ValueError(f"HyperConfig.fwd_tile must be one of {_FWD_TILES}, got {t!r}")
        if self.grad_accum not in _GRAD_ACCUM:
            raise ValueError(f"HyperConfig.grad_accum must be one of {_GRAD_ACCUM}, got "
                             f"{self.grad_accum!r}")
        c = self.samples_chunk
        if isinstance(c, bool) or not isinstance(c, int) or c not in _SAMPLES_CHUNKS:
            raise ValueError(f"HyperConfig.samples_chunk must be one of {_SAMPLES_CHUNKS}, "
                             f"got {c!r}")
        _check_backend("leaf_backend", self.leaf_backend)
        if self.leaf_backend_bwd is not None:
            _check_backend("leaf_backend_bwd", self.leaf_backend_bwd)

    @property
    def leaf_backward(self) -> str:
        """The backend the causal leaves' backward runs on."""
        return self.leaf_backend if self.leaf_backend_bwd is None else self.leaf_backend_bwd


def _check_backend(field, b):
    if not isinstance(b, str):
        raise TypeError(f"HyperConfig.{field} must be a backend name (str), got "
                        f"{type(b).__name__}")
    from longattn.common.kernels import backend_names

    known = backend_names()
    if b not in known:
        raise ValueError(f"HyperConfig.{field} must be 'auto' or a backend of "
                         f"longattn.common.kernels ({', '.join(known[1:])}), got {b!r}")
