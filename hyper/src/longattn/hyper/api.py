"""Public API: :func:`hyper_attention` and :class:`HyperAttention`."""

from __future__ import annotations

import os

import torch

from longattn.common.checks import check_bool, check_qkv, check_scale
from longattn.hyper.config import HyperConfig
from longattn.hyper.lsh import MAX_PROJS, lsh_rank
from longattn.hyper.plan import make_plan
from longattn.hyper.randomness import draw_projections, draw_sample_indices
from longattn.hyper.torch_path import hyper_torch

BACKENDS = ("auto", "torch", "triton")


def _int(name, x, lo, hi=None):
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {x!r}")
    if x < lo or (hi is not None and x > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {x}")
    return x


def _check_projections(p, head_dim, device):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"projections must be a torch.Tensor, got {type(p).__name__}")
    if not p.is_floating_point() or p.ndim != 2 or p.shape[0] != head_dim:
        raise ValueError(f"projections must be a float [head_dim={head_dim}, r] tensor, got "
                         f"{p.dtype} {tuple(p.shape)}")
    if not 1 <= p.shape[1] <= MAX_PROJS:
        raise ValueError(f"projections must have 1..{MAX_PROJS} columns, got {p.shape[1]}")
    if p.device != device:
        raise ValueError(f"projections are on {p.device}, q on {device}: they must be on q's "
                         f"device")


def _check_samples(s, plan, batch, kv_heads):
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"sample_indices must be a torch.Tensor, got {type(s).__name__}")
    want = (len(plan.calls), batch, kv_heads)
    if s.dtype not in (torch.int32, torch.int64) or s.ndim != 4 or tuple(s.shape[:3]) != want:
        raise ValueError(f"sample_indices must be an int [n_calls, B, Hkv, m] = "
                         f"[{want[0]}, {want[1]}, {want[2]}, m] tensor, got {s.dtype} "
                         f"{tuple(s.shape)}")
    if s.shape[3] and len(plan.calls):
        nk = torch.tensor([c[3] for c in plan.calls], device=s.device).view(-1, 1, 1, 1)
        if bool((s < 0).any()) or bool((s >= nk).any()):
            raise ValueError("sample_indices[c] must lie in [0, nk) of core call c "
                             "(see longattn.hyper.plan.make_plan)")


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(q, backend="auto"):
    """``"torch"`` or ``"triton"`` for these inputs. ``"auto"``: Triton for CUDA fp16 / bf16 /
    fp32 when triton imports, torch otherwise. ``"triton"`` that cannot serve ``q`` raises
    ``ValueError`` saying why."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return backend
    if backend == "auto" and (q.device.type != "cuda" or q.dtype == torch.float64):
        return "torch"
    why = None
    if q.dtype == torch.float64:
        why = "the triton path takes fp16 / bf16 / fp32, got float64 (use backend='torch')"
    elif q.device.type != "cuda" and not _interpret():
        why = f"the triton path needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}"
    else:
        try:
            import longattn.hyper.triton_path  # noqa: F401
        except ImportError as e:
            why = f"triton does not import ({e})"
    if why is None:
        return "triton"
    if backend == "auto":
        return "torch"
    raise ValueError(f"backend='triton' cannot serve this call: {why}")


# kernel arguments (block and sample counts) are 32-bit integers
_INT32_MAX = 2 ** 31 - 1


def hyper_attention(q, k, v, *, causal=False, softmax_scale=None, lsh_num_projs=8,
                    block_size=256, sample_size=256, min_seq_len=2048, smooth_block=False,
                    generator=None, return_lse=False, projections=None, sample_indices=None,
                    backend="auto", config=None):
    """HyperAttention (Han et al., 2024): sorted-LSH block-diagonal attention plus uniformly
    sampled columns, merged exactly; causal by recursion.

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` (GQA: Hq % Hkv == 0);
    causal needs ``Sq == Sk``. Returns ``out [B, Sq, Hq, Dv]`` in q's dtype and, with
    ``return_lse``, ``lse [B, Hq, Sq]`` in ``longattn.common.dtypes.lse_dtype(q.dtype)``: float32
    for fp16 / bf16, float64 for float32 and float64 (the Triton path's values are its fp32
    statistics widened; the torch path merges in float64).
    ``softmax_scale`` defaults to ``D ** -0.5``.

    Sizes: ``block_size`` keys per sorted block (a block of at least ``max(Sq, Sk)`` rows is
    one block over everything, and is computed as that); ``sample_size`` sampled columns per
    core call, at most ``Sk`` when the approximation runs; exact attention when ``Sk <=
    min_seq_len`` (causal: segments of at most ``min_seq_len`` rows); ``lsh_num_projs`` in
    1..16 hyperplanes.

    Randomness: ``projections [D, r]`` on q's device (default: drawn with ``generator``, r =
    lsh_num_projs) and ``sample_indices [n_calls, B, Hkv, m]`` (default: drawn with
    ``generator``, m = sample_size); see :mod:`longattn.hyper.randomness`. Given both, the call
    is deterministic and the float64 oracle ``longattn.reference.hyper.hyper_attention``
    replays it.

    ``backend``: ``"auto"`` (Triton for CUDA fp16 / bf16 / fp32, torch otherwise), ``"torch"``
    or ``"triton"`` (on a CPU under ``TRITON_INTERPRET=1``; there the kernels widen bf16 / fp16
    dot operands to fp32, exactly, because the interpreter's bf16 dots are wrong).
    ``config``: a :class:`longattn.hyper.HyperConfig`: the Triton path's tiles, gradient
    dtype and leaf-backward backend and, on both paths, the local-kernel backend of the exact
    parts (``leaf_backend``). Gradients
    (autograd) are those of the approximation computed, ``d(lse)`` included. A NaN in q / k / v
    gives NaN rows wherever it is seen.
    """
    _, hkv, d = check_qkv(q, k, v)
    softmax_scale = check_scale(softmax_scale, d)
    for name, x in (("causal", causal), ("smooth_block", smooth_block),
                    ("return_lse", return_lse)):
        check_bool(name, x)
    _int("lsh_num_projs", lsh_num_projs, 1, MAX_PROJS)
    _int("block_size", block_size, 1, _INT32_MAX)
    _int("sample_size", sample_size, 0, _INT32_MAX)
    _int("min_seq_len", min_seq_len, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    if config is None:
        config = HyperConfig()
    elif not isinstance(config, HyperConfig):
        raise TypeError(f"config must be a longattn.hyper.HyperConfig or None, got "
                        f"{type(config).__name__}")
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if causal and sq != sk:
        raise ValueError(f"causal hyper attention needs equal q and k lengths, got Sq={sq}, "
                         f"Sk={sk}")
    backend = choose_backend(q, backend)
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch kernels for
        backend = "torch"
    plan = make_plan(sq, sk, causal, min_seq_len)
    if projections is not None:
        _check_projections(projections, d, q.device)
    if sample_indices is not None:
        _check_samples(sample_indices, plan, b, hkv)
    elif plan.calls and sample_size > sk:
        raise ValueError(f"sample_size must be <= the key length Sk={sk} when the "
                         f"approximation runs (Sk > min_seq_len={min_seq_len}), got "
                         f"{sample_size}")
    # a block of max(Sq, Sk) rows already holds every row and key of every core call
    block_size = min(block_size, max(sq, sk, 1))

    if projections is None:
        projections = draw_projections(d, lsh_num_projs, generator=generator, device=q.device)
    if sample_indices is None:
        if sample_size > 0 and plan.calls:
            sample_indices = draw_sample_indices(sq, sk, b, hkv, sample_size, causal=causal,
                                                 min_seq_len=min_seq_len, generator=generator,
                                                 device=q.device)
    else:
        sample_indices = sample_indices.to(device=q.device, dtype=torch.int64)
        if sample_indices.shape[-1] == 0:
            sample_indices = None

    rq = lsh_rank(q.detach(), projections, narrow=True)  # only sorted: any integer dtype
    rk = lsh_rank(k.detach(), projections, narrow=True)
    if backend == "triton":
        from longattn.hyper.triton_path import hyper_triton

        out, lse = hyper_triton(q, k, v, rq, rk, sample_indices, plan,
                                softmax_scale=softmax_scale, block_size=block_size,
                                smooth=smooth_block, causal=causal,
                                r_bits=projections.shape[1], config=config)
    else:
        out, lse = hyper_torch(q, k, v, rq, rk, sample_indices, plan,
                               softmax_scale=softmax_scale, block_size=block_size,
                               smooth=smooth_block, causal=causal,
                               leaf_backend=config.leaf_backend)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


class HyperAttention(torch.nn.Module):
    """HyperAttention with the seed's constructor (``input_dim`` = head_dim).

    The LSH hyperplanes are drawn once at construction (a buffer ``projections [input_dim,
    lsh_num_projs]``, from ``generator`` if given) and kept; the sampled columns are drawn per
    call from ``forward``'s ``generator`` (or passed as ``sample_indices``).
    """

    def __init__(self, input_dim, lsh_num_projs=8, block_size=256, sample_size=256,
                 min_seq_len=2048, smooth_block=False, *, generator=None, device=None):
        super().__init__()
        _int("input_dim", input_dim, 1)
        _int("lsh_num_projs", lsh_num_projs, 1, MAX_PROJS)
        _int("block_size", block_size, 1, _INT32_MAX)
        _int("sample_size", sample_size, 0, _INT32_MAX)
        _int("min_seq_len", min_seq_len, 1)
        check_bool("smooth_block", smooth_block)
        self.input_dim = input_dim
        self.lsh_num_projs = lsh_num_projs
        self.block_size = block_size
        self.sample_size = sample_size
        self.min_seq_len = min_seq_len
        self.smooth_block = smooth_block
        self.register_buffer("projections", draw_projections(
            input_dim, lsh_num_projs, generator=generator, device=device))

    def extra_repr(self):
        return (f"input_dim={self.input_dim}, lsh_num_projs={self.lsh_num_projs}, "
                f"block_size={self.block_size}, sample_size={self.sample_size}, "
                f"min_seq_len={self.min_seq_len}, smooth_block={self.smooth_block}")

    def forward(self, q, k, v, causal=False, softmax_scale=None, return_lse=False,
                generator=None, *, sample_indices=None, backend="auto", config=None):
        """q/k/v BSHD as in :func:`hyper_attention`; returns ``out`` or ``(out, lse)``."""
        if isinstance(q, torch.Tensor):
            if q.shape[-1] != self.input_dim:
                raise ValueError(f"q head_dim {q.shape[-1]} != input_dim {self.input_dim}")
            if self.projections.device != q.device:
                raise ValueError(f"HyperAttention's projections are on "
                                 f"{self.projections.device}, q on {q.device}: move the module "
                                 f"to q's device (module.to(q.device))")
        return hyper_attention(
            q, k, v, causal=causal, softmax_scale=softmax_scale, block_size=self.block_size,
            sample_size=self.sample_size, min_seq_len=self.min_seq_len,
            smooth_block=self.smooth_block, generator=generator, return_lse=return_lse,
            projections=self.projections, sample_indices=sample_indices, backend=backend,
            config=config)
