"""``HamiltonConfig``: the knobs of :func:`longattn.hamilton.hamilton_attn` (``config=``)."""

from __future__ import annotations

from dataclasses import dataclass

MERGE_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class HamiltonConfig:
    """Knobs of :func:`~longattn.hamilton.hamilton_attn` (``config=None`` means these defaults).

    ``merge_backend``: how each step's partial result is merged into the accumulators, the
    ``backend`` of :func:`longattn.common.merge.merge_partials_`: ``"auto"`` (the one-pass
    Triton kernel for CUDA float32 ``out`` and ``lse`` accumulators, i.e. fp16 / bf16 inputs;
    eager torch otherwise, e.g. float32 inputs, whose ``lse`` is float64), ``"torch"`` or
    ``"triton"`` (an error where it cannot run). Default ``"auto"``: in
    ``hamilton/bench/results/h200/bench_hamilton.json`` (H200) the forward with this merge
    ("+merge", efficiency 0.893-0.934 over the timed ranks) beat the same merge under
    ``torch.compile`` ("+fused", 0.876-0.916); forward+backward: 0.851-0.857 against
    0.847-0.864.

    ``contiguous_kv``: the step kernels get K/V as strided views of the KV buffer
    (``False``, no copy) or as contiguous copies of those views (``True``, one copy per kernel
    call). Whether a backend takes strided views is its ``supports`` rule
    (``longattn.common.kernels``), asked before any communication: with ``False``,
    ``backend="auto"`` skips a backend that refuses the views, and a backend named in
    ``backend=`` that refuses them raises a ``ValueError`` that says so; ``True`` serves it.

    ``overlap_merges`` (the step loop of ``"ring"``, ``"tasp"``, ``"two_level"`` and of
    :func:`~longattn.hamilton.usp_attn`; not with ``cu_seqlens``): each step's merge
    (forward) and its dq and dK/dV accumulation (backward) are queued on a CUDA side stream
    (:class:`longattn.hamilton.attn.SideStream`), so that they run while the next step's
    kernels compute; the travelling dK/dV buffer is sent from that stream. The same operations
    in the same order: the results are bitwise those of ``False``. Without CUDA the same code
    runs the work inline. Default ``False``: on an H100 (8 ranks x 8,192 tokens,
    ``hamilton/bench/results/h100/variants/``) it gained little, forward+backward 0.846-0.866
    of dense cuDNN / 8 against 0.837-0.850, and lost in the forward on one rank (0.860
    against 0.867).

    ``defer_dq`` (the same step loops): the backward keeps each step's dq partial in the
    kernel's dtype and sums them once, in the accumulation dtype, at the end
    (:class:`longattn.hamilton.attn.DeferredDq`), instead of a read-modify-write of the
    float32 dq per kernel call. Another order of the same additions. Memory: one partial per
    kernel call of steps ``1..n-1``, about ``n - 1`` tensors ``[B, L, Hq, D]`` in q's dtype
    (at most 1.5x that where causal steps make both of their calls: TASP, two-level).
    Default ``False``: in the same H100 run, with ``overlap_merges``, forward+backward
    0.858-0.865. The kernels write each partial into its slot (``attention_backward(dq_out=)``).

    ``defer_merge`` (the same step loops): the forward writes each kernel call's output
    straight into a slot of one buffer (``attention_forward(out=)``) and merges all slots
    once at the end, writing ``out`` in q's dtype (:class:`longattn.hamilton.attn.DeferredOut`,
    :func:`longattn.common.merge.merge_slots`), instead of a read-modify-write of a float32
    accumulator per call plus a conversion of the first and of the final result. The same
    weights, summed in another order. Memory: ``1 + `` (the kernel calls of steps ``1..n-1``)
    tensors ``[B, L, Hq, Dv]`` in q's dtype and their ``lse``. Default ``False`` (memory
    that grows with the ranks). On an H200 ``defer_merge`` with ``defer_dq`` took the forward
    with its merges to 0.953-0.965 of dense cuDNN / 8 (none: 0.902-0.947) and forward+backward
    to 0.900-0.911 (0.876-0.887; ``hamilton/bench/results/h200/variants_after/``); on an H100
    the three options together were the fastest, forward 0.897-0.957 and forward+backward
    0.886-0.899 (``hamilton/bench/results/h100/variants_after/``), and with the local kernel
    on FlashAttention-4 (``backend="fa4"``, which writes the slots itself) forward 0.987-1.022
    and forward+backward 0.984-0.992 (``hamilton/bench/results/h100/fa4_inplace/``).

    None of them changes a message, so the ranks need not agree on them (they are not among the
    values a call agrees).
    """

    merge_backend: str = "auto"
    contiguous_kv: bool = False
    target: str | None = None
    overlap_merges: bool = False
    defer_dq: bool = False
    defer_merge: bool = False

    # ``target``: the hardware model ``schedule="auto"`` chooses by (a name in
    # ``longattn.common.topology.ALL_TARGETS``, e.g. "H200-1"): it predicts every strategy's
    # time (``longattn.hamilton.explain``) and runs the fastest. None: no model, the rule of
    # ``schedule="auto"`` without a target (TASP when the local length divides into its
    # sub-chunks, else ring).

    def __post_init__(self):
        if not isinstance(self.merge_backend, str) or self.merge_backend not in MERGE_BACKENDS:
            raise ValueError(f"merge_backend must be one of {MERGE_BACKENDS}, got "
                             f"{self.merge_backend!r}")
        for name in ("contiguous_kv", "overlap_merges", "defer_dq", "defer_merge"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.target is not None:
            from longattn.common.topology import ALL_TARGETS

            if not isinstance(self.target, str) or self.target not in ALL_TARGETS:
                raise ValueError(f"target must be None or one of {sorted(ALL_TARGETS)}, got "
                                 f"{self.target!r}")


DEFAULT = HamiltonConfig()
