"""The local attention step every longattn method is built from.

    attention_forward(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                      backend="auto") -> (out, lse)
    attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False,
                       window_size=(-1, -1), dlse=None, backend="auto") -> (dq, dk, dv)
    attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
              return_lse=False, backend="auto")                            # autograd

Tensors are BSHD: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA
without replicating KV). ``lse`` is ``[B, Hq, Sq]`` natural log in float32 (float64 for
float64 inputs). ``causal`` with ``Sq != Sk`` is bottom-right aligned; ``window_size=(left,
right)``, -1 unbounded, in the same aligned coordinates; ``causal`` caps ``right`` at 0.
A row that sees no key gives ``out = 0``, ``lse = -inf`` and zero gradients, never NaN.

``attention_backward`` takes the *final* ``out``/``lse`` of the whole attention (after all
merges), not this step's: then the per-step gradients are exact (the ring-attention rule).
``dlse`` (the gradient of the final lse) is optional and only some backends take it.

Backends live in the plain dict :data:`BACKENDS` (name -> :class:`Backend`); ``"auto"`` tries
:data:`AUTO_ORDER` and takes the first whose ``supports`` accepts the request. Optional backends
are separate modules that register themselves on import (aten, flex, flash_attn, triton).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.common import _transition
from longattn.common.checks import check_qkv, check_scale, check_window


@dataclass(frozen=True)
class Backend:
    """One way to run the local step. ``supports(req)`` returns None if it can serve the
    :class:`Request`, otherwise a short reason string."""

    forward: Callable
    backward: Callable
    supports: Callable


@dataclass(frozen=True)
class Request:
    """What a call asks of a backend (used by ``supports``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    window_size: tuple
    needs_dlse: bool = False


BACKENDS: dict[str, Backend] = {}
# "cudnn" (cuDNN graphs through the optional cudnn-frontend package: native windows, bottom-right
# masks, GQA, strided views) measured fastest on the H100 for windows (1.28x "band" forward,
# 1.33x forward+backward) and equal to "aten" for dense attention (ring_swa/README.md). Without
# the package, "band" (causal windows as dense cuDNN pieces) serves windows, "aten" the rest.
# "flex" is opt-in (backend="flex"), not in auto: on the H100 with torch 2.11 its compile failed
# for some shapes (fp32 odd lengths in hyper's check, the decode shape in tree's benchmark), and
# where it compiled it was slower than band / cuDNN. fp32 on CUDA therefore goes to "torch".
AUTO_ORDER = ["flash_attn", "cudnn", "band", "aten", "triton", "torch"]


def register_backend(name: str, backend: Backend) -> None:
    BACKENDS[name] = backend


def cuda_limits(req: Request, dtypes, max_head_dim=None):
    """The first reason a CUDA kernel cannot serve ``req``, or None: not on CUDA, a dtype not in
    ``dtypes``, a needed ``dlse`` when ``max_head_dim`` is given (the fused cuDNN / flash
    kernels take none), a head dim that is not a multiple of 8 up to ``max_head_dim`` or differs
    between q and v. Backends add their own rules after it."""
    q, v = req.q, req.v
    if q.device.type != "cuda":
        return "needs CUDA tensors"
    if q.dtype not in dtypes:
        short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
        names = "/".join(short.get(t, str(t)) for t in dtypes)
        return f"needs {names}, got {q.dtype}"
    if max_head_dim is None:
        return None
    if req.needs_dlse:
        return "cannot take dlse"
    d = q.shape[-1]
    if d % 8 or d > max_head_dim or v.shape[-1] != d:
        return (f"head_dim {d} (v {v.shape[-1]}) not supported (multiple of 8, "
                f"<= {max_head_dim}, equal)")
    return None


def normalize_window(causal: bool, window_size) -> tuple[int, int]:
    """Fold ``causal`` into the window: causal means ``right = min(right, 0)``."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    left, right = check_window(window_size, "window_size")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def may_have_empty_rows(sq, sk, window) -> bool:
    """Whether some query row sees no key (decided from shapes alone: no device sync).

    Row i sees keys [i' - left, i' + right] with i' = i + sk - sq; with left >= 0 the lower end
    never passes sk - 1, so rows are empty only when sk == 0 or the first row's upper end,
    sk - sq + right, is negative."""
    right = window[1]
    return sk == 0 or (right >= 0 and sk - sq + right < 0)


def fix_empty_rows(out, lse):
    """Rows that saw no key: lse -> -inf, out -> 0 (kernels differ: flash returns lse = +inf,
    FlexAttention -inf). out BSHD, lse [B, H, S]; no host sync."""
    dead = ~torch.isfinite(lse)
    lse = lse.masked_fill(dead, float("-inf"))
    out = out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), 0.0)
    return out, lse


def _pick(req: Request, backend: str) -> Backend:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str (a name in BACKENDS or 'auto'), got {backend!r}")
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {sorted(BACKENDS)} or 'auto', got {backend!r}")
        reason = BACKENDS[backend].supports(req)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {reason}")
        return BACKENDS[backend]
    for name in AUTO_ORDER:
        b = BACKENDS.get(name)
        if b is not None and b.supports(req) is None:
            return b
    raise ValueError("no attention backend supports this call")  # torch supports everything


@_transition.renamed(**_transition.ATTENTION)  # TRANSITION
def pick_backend(q, k, v, *, causal=False, window_size=(-1, -1), needs_dlse=False,
                 backend="auto"):
    """The name of the backend ``backend='auto'`` would choose for these inputs."""
    req = Request(q, k, v, bool(causal), normalize_window(causal, window_size), needs_dlse)
    b = _pick(req, backend)
    return next(n for n, x in BACKENDS.items() if x is b)


@_transition.renamed(**_transition.ATTENTION)  # TRANSITION
def attention_forward(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                      backend="auto"):
    """Local attention forward. Returns ``(out [B,Sq,Hq,Dv] in q.dtype, lse [B,Hq,Sq])``."""
    check_qkv(q, k, v)
    scale = check_scale(softmax_scale, q.shape[-1])
    win = normalize_window(causal, window_size)
    b = _pick(Request(q, k, v, bool(causal), win), backend)
    return b.forward(q, k, v, softmax_scale=scale, window_size=win)


@_transition.renamed(**_transition.ATTENTION)  # TRANSITION
def attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False,
                       window_size=(-1, -1), dlse=None, backend="auto"):
    """Gradients of this step given the final ``out``/``lse``. Returns ``(dq, dk, dv)`` in the
    dtypes of q, k, v."""
    check_qkv(q, k, v)
    from longattn.common.checks import check_tensor

    for name, t in (("dout", dout), ("out", out), ("lse", lse)):
        check_tensor(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if dlse is not None:
        check_tensor("dlse", dlse)
        if tuple(dlse.shape) != tuple(lse.shape):
            raise ValueError(f"dlse must have the shape of lse {tuple(lse.shape)}, "
                             f"got {tuple(dlse.shape)}")
    if dout.shape != out.shape or out.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be [B, Sq, Hq, Dv] "
            f"matching q {tuple(q.shape)}"
        )
    want = (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse.shape) != want:
        raise ValueError(f"lse must be [B, Hq, Sq] = {want}, got {tuple(lse.shape)}")
    scale = check_scale(softmax_scale, q.shape[-1])
    win = normalize_window(causal, window_size)
    b = _pick(Request(q, k, v, bool(causal), win, dlse is not None), backend)
    return b.backward(dout, q, k, v, out, lse, softmax_scale=scale, window_size=win, dlse=dlse)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window, backend):
        out, lse = attention_forward(q, k, v, softmax_scale=scale, causal=causal,
                                     window_size=window, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, window, backend)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, window, backend = ctx.args
        if dlse is not None and not torch.any(dlse):
            dlse = None
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse,
                                        softmax_scale=scale, causal=causal, window_size=window,
                                        dlse=dlse, backend=backend)
        return dq, dk, dv, None, None, None, None


@_transition.renamed(**_transition.ATTENTION)  # TRANSITION
def attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
              return_lse=False, backend="auto"):
    """Differentiable local attention (gradients flow into q, k, v, also through ``lse``)."""
    out, lse = _Attention.apply(q, k, v, softmax_scale, causal, window_size, backend)
    return (out, lse) if return_lse else out


from longattn.common.kernels import torch_backend  # noqa: E402,F401  (always available)

for _mod in ("aten_backend", "cudnn_backend", "band_backend", "flex_backend", "flash_attn_backend",
             "triton_backend"):
    try:
        importlib.import_module(f"longattn.common.kernels.{_mod}")
    except ImportError:
        pass

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "Request",
    "attention",
    "attention_backward",
    "attention_forward",
    "cuda_limits",
    "fix_empty_rows",
    "may_have_empty_rows",
    "normalize_window",
    "pick_backend",
    "register_backend",
]
