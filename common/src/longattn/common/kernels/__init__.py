"""The local attention step every longattn method is built from.

    attention_forward(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                      backend="auto", config=None) -> (out, lse)
    attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False,
                       window_size=(-1, -1), dlse=None, backend="auto", config=None)
        -> (dq, dk, dv)
    attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
              return_lse=False, backend="auto", config=None)               # autograd

Tensors are BSHD: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA
without replicating KV). ``lse`` is ``[B, Hq, Sq]`` natural log in
:func:`~longattn.common.dtypes.lse_dtype`: float32 for fp16 / bf16 inputs, float64 for float32
and float64 inputs (the ``flex`` backend, only by name, returns float32 for float32 inputs).
``causal`` with ``Sq != Sk`` is bottom-right aligned; ``window_size=(left,
right)``, -1 unbounded, in the same aligned coordinates; ``causal`` caps ``right`` at 0.
A row that sees no key gives ``out = 0``, ``lse = -inf`` and zero gradients, never NaN; a row
whose scores hold a NaN (a NaN in q, or in a key it sees) gives ``out`` and ``lse`` NaN.

``attention_backward`` takes the *final* ``out``/``lse`` of the whole attention (after all
merges), not this step's: then the per-step gradients are exact (the ring-attention rule).
``dlse`` (the gradient of the final lse) is optional and only some backends take it; an
all-zero ``dlse`` is treated as absent (:func:`grad_lse_or_none`).

Backends: :data:`BACKENDS` is the literal list of the backends there are (name ->
:class:`Backend`); the optional ones whose import failed here are in :data:`UNAVAILABLE` (name
-> why), and asking for one by name raises a ``ValueError`` with that reason. ``"auto"`` tries
:data:`AUTO_ORDER` and takes the first whose ``supports`` accepts the request; a backend asked
for by name that cannot serve the call raises a ``ValueError`` with its ``supports`` reason.

``config``: the knob record of one backend (:class:`BandConfig` for ``band``,
:class:`TorchConfig` for ``torch``); None means that backend's defaults. It goes to the backend
it belongs to when that backend runs the call; naming another backend with it is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.common.checks import (
    check_bool,
    check_qkv,
    check_scale,
    check_tensor,
    check_window,
)


@dataclass(frozen=True)
class Backend:
    """One way to run the local step. ``supports(req)`` returns None if it can serve the
    :class:`Request`, otherwise a short reason string. ``config_type`` is the class of the
    knob record the backend takes as ``config=`` (None: it has no knobs).

    ``forward(q, k, v, *, softmax_scale, window_size[, config]) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse[, config])`` get
    checked arguments: a float scale and the window with ``causal`` folded in. A backend with
    ``writes_out`` takes ``out=`` in ``forward`` (a checked ``[B, Sq, Hq, Dv]`` tensor in
    q's dtype with a contiguous head dim, or None) and ``dq_out=`` in ``backward`` (likewise
    q's shape) and writes its output / dq there."""

    forward: Callable
    backward: Callable
    supports: Callable
    config_type: type | None = None
    writes_out: bool = False


@dataclass(frozen=True)
class Request:
    """What a call asks of a backend (used by ``supports``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    window_size: tuple
    needs_dlse: bool = False
    config: object = None


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


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """The host tensor ``t`` (small kernel metadata: lengths, offsets) on ``device`` without
    making the host wait for the GPU: copied from pinned memory, non-blocking. A copy from
    pageable memory synchronises the host with the stream, so a call that makes one before
    each launch leaves the GPU idle while the host launches the rest."""
    device = torch.device(device)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def seq_lengths(cu) -> list:
    """The sequence lengths of ``cu_seqlens`` (host ints or a tensor; a device tensor is read
    once, which waits for the GPU: varlen passes host lists)."""
    cu = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
    return [b - a for a, b in zip(cu, cu[1:])]


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
    FlexAttention -inf). A NaN lse stays NaN (its row's scores held a NaN). out BSHD, lse
    [B, H, S]; no host sync."""
    dead = torch.isinf(lse)
    lse = lse.masked_fill(dead, float("-inf"))
    out = out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), 0.0)
    return out, lse


def check_backward_tensors(q, dout, out, lse, dlse=None):
    """The dtype / device rules of a backward's ``dout``, ``out``, ``lse``, ``dlse`` (shapes are
    the caller's): tensors on q's device, ``dout`` in ``out``'s dtype, ``lse`` (and ``dlse``) in
    float32 or float64 (``lse_dtype`` of q, what the forwards return, or float32)."""
    for name, t in (("dout", dout), ("out", out), ("lse", lse)) + (
            (("dlse", dlse),) if dlse is not None else ()):
        check_tensor(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if dout.dtype != out.dtype:
        raise TypeError(f"dout dtype {dout.dtype} must be out's dtype {out.dtype}")
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64 (lse_dtype of q: float32 for "
                            f"fp16 / bf16, float64 for float32 / float64), got {t.dtype}")
    if dlse is not None and tuple(dlse.shape) != tuple(lse.shape):
        raise ValueError(f"dlse must have the shape of lse {tuple(lse.shape)}, "
                         f"got {tuple(dlse.shape)}")


def grad_lse_or_none(dlse):
    """``None`` for an absent or all-zero ``dlse`` (autograd hands a zero gradient for an
    unused lse), else ``dlse``: the one rule for "no gradient through lse"."""
    if dlse is None or not torch.any(dlse):
        return None
    return dlse


def _check_config(config, backend: str):
    """``config`` must be None or the record of a backend; with a backend named, of that one."""
    if config is None:
        return
    owners = [n for n, b in BACKENDS.items()
              if b.config_type is not None and isinstance(config, b.config_type)]
    if not owners:
        kinds = sorted(b.config_type.__name__ for b in BACKENDS.values() if b.config_type)
        raise TypeError(f"config must be None or a backend's config record ({', '.join(kinds)}), "
                        f"got {type(config).__name__}")
    if backend != "auto" and backend not in owners:
        raise ValueError(f"config {type(config).__name__} is for backend {owners[0]!r}, but "
                         f"backend={backend!r} was asked for")


def _pick(req: Request, backend: str) -> tuple[str, Backend]:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str (a name in BACKENDS or 'auto'), got {backend!r}")
    if backend != "auto":
        if backend in UNAVAILABLE:
            raise ValueError(f"backend {backend!r} is not available here: {UNAVAILABLE[backend]}")
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {sorted(BACKENDS)} or 'auto', got {backend!r}")
        _check_config(req.config, backend)
        reason = BACKENDS[backend].supports(req)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {reason}")
        return backend, BACKENDS[backend]
    _check_config(req.config, backend)
    reasons = []
    for name in AUTO_ORDER:
        if name in UNAVAILABLE:
            continue
        reason = BACKENDS[name].supports(req)
        if reason is None:
            return name, BACKENDS[name]
        reasons.append(f"{name}: {reason}")
    raise ValueError("no backend of backend='auto' serves this call: " + "; ".join(reasons))


def _config_kw(b: Backend, config) -> dict:
    """``config=`` for the backend it belongs to, nothing for the others."""
    if b.config_type is not None and isinstance(config, b.config_type):
        return {"config": config}
    return {}


def pick_backend(q, k, v, *, causal=False, window_size=(-1, -1), needs_dlse=False,
                 backend="auto", config=None):
    """The name of the backend that would run these inputs (raises if ``backend`` is named and
    cannot serve them)."""
    check_qkv(q, k, v)
    req = Request(q, k, v, causal, normalize_window(causal, window_size), needs_dlse, config)
    return _pick(req, backend)[0]


def _check_out(out, q, v, name="out"):
    want = (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != want or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"{name} must be {want} in q's dtype {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous head dim (stride 1 in the last dim)")
    # an expanded (stride 0) view would have every copy write the same memory
    if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):
        raise ValueError(f"{name} must not be an expanded view (a stride of 0 in "
                         f"{tuple(out.stride())}): its elements must be distinct")


def attention_forward(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                      backend="auto", config=None, out=None):
    """Local attention forward. Returns ``(out [B,Sq,Hq,Dv] in q.dtype, lse [B,Hq,Sq])``.
    ``out``: a tensor of that shape and dtype (any strides with a contiguous head dim, e.g. a
    slot of a larger buffer) the output is written into and returned as; a backend with
    ``writes_out`` (cudnn) writes it there directly, the others copy their result."""
    check_qkv(q, k, v)
    if out is not None:
        _check_out(out, q, v)
    scale = check_scale(softmax_scale, q.shape[-1])
    win = normalize_window(causal, window_size)
    _, b = _pick(Request(q, k, v, causal, win, False, config), backend)
    kw = _config_kw(b, config)
    if out is not None and b.writes_out:
        kw["out"] = out
    res, lse = b.forward(q, k, v, softmax_scale=scale, window_size=win, **kw)
    if out is not None and res is not out:
        out.copy_(res)
        res = out
    return res, lse


def attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False,
                       window_size=(-1, -1), dlse=None, backend="auto", config=None,
                       dq_out=None):
    """Gradients of this step given the final ``out``/``lse``. Returns ``(dq, dk, dv)`` in the
    dtypes of q, k, v. ``dq_out``: a tensor of q's shape and dtype (any strides with a
    contiguous head dim) dq is written into and returned as (``writes_out`` backends write it
    there directly, the others copy)."""
    check_qkv(q, k, v)
    if dq_out is not None:
        _check_out(dq_out, q, q, "dq_out")
    check_backward_tensors(q, dout, out, lse, dlse)
    if (dout.shape != out.shape or out.shape[:-1] != q.shape[:-1]
            or out.shape[-1] != v.shape[-1]):
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be [B, Sq, Hq, Dv] "
            f"matching q {tuple(q.shape)} and v's head dim Dv = {v.shape[-1]}"
        )
    want = (q.shape[0], q.shape[2], q.shape[1])
    if tuple(lse.shape) != want:
        raise ValueError(f"lse must be [B, Hq, Sq] = {want}, got {tuple(lse.shape)}")
    scale = check_scale(softmax_scale, q.shape[-1])
    win = normalize_window(causal, window_size)
    _, b = _pick(Request(q, k, v, causal, win, dlse is not None, config), backend)
    kw = _config_kw(b, config)
    if dq_out is not None and b.writes_out:
        kw["dq_out"] = dq_out
    dq, dk, dv = b.backward(dout, q, k, v, out, lse, softmax_scale=scale, window_size=win,
                            dlse=dlse, **kw)
    if dq_out is not None and dq is not dq_out:
        dq = dq_out.copy_(dq)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, window, backend, config):
        out, lse = attention_forward(q, k, v, softmax_scale=scale, causal=causal,
                                     window_size=window, backend=backend, config=config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, window, backend, config)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, window, backend, config = ctx.args
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse,
                                        softmax_scale=scale, causal=causal, window_size=window,
                                        dlse=grad_lse_or_none(dlse), backend=backend,
                                        config=config)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
              return_lse=False, backend="auto", config=None):
    """Differentiable local attention (gradients flow into q, k, v, also through ``lse``)."""
    check_bool("return_lse", return_lse)
    out, lse = _Attention.apply(q, k, v, softmax_scale, causal, window_size, backend, config)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# the registry (the backend modules import the definitions above)

from longattn.common.kernels import (  # noqa: E402
    aten_backend,
    band_backend,
    cudnn_backend,
    fa4_backend,
    flex_backend,
    torch_backend,
)
from longattn.common.kernels.band_backend import BandConfig  # noqa: E402
from longattn.common.kernels.torch_backend import TorchConfig  # noqa: E402

# Every backend there is. cudnn, fa4 and flex are optional: where their import failed (fa4:
# where flash_attn.cute is not installed) they are in UNAVAILABLE with the reason instead.
_ALL = {
    "cudnn": cudnn_backend,  # cuDNN graphs (optional nvidia-cudnn-frontend)
    "band": band_backend,  # causal windows as dense cuDNN pieces
    "aten": aten_backend,  # PyTorch's cuDNN and flash attention ops
    "torch": torch_backend,  # plain PyTorch: every device, dtype, window and dlse
    "flex": flex_backend,  # FlexAttention, only by name
    "fa4": fa4_backend,  # FlashAttention-4 (optional flash-attn-4), only by name
}
BACKENDS: dict[str, Backend] = {n: m.BACKEND for n, m in _ALL.items()
                                if getattr(m, "MISSING", None) is None}
UNAVAILABLE: dict[str, str] = {n: m.MISSING for n, m in _ALL.items()
                               if getattr(m, "MISSING", None) is not None}

# The order auto tries. cudnn first: on an H100 (ring_swa/bench/results/bench_ring_swa.json,
# S = 131072, W = 4096, bf16) its native window ran the forward in 16.42 ms and forward+backward
# in 64.47 ms, band 21.20 / 82.45 ms, the flash window of aten 30.60 / 106.9 ms. Without
# cudnn-frontend, band serves the causal windows it can split and aten the rest of fp16 / bf16
# on CUDA; torch takes everything else (CPU, fp32, dlse). flex is not in auto: in the same run
# it was no faster than band (21.39 / 83.15 ms), and it compiles per shape. fa4 is not in auto
# either, though it is faster than cudnn (H100, common/bench/results/h100/check_fa4_slots/
# check_fa4.json: 0.80-0.91x cudnn's time forward+backward on every shape timed there): it is
# a beta (flash-attn-4 4.0.0b40) that compiles each new configuration on first use (1.4 to
# 6.2 s in common/bench/results/h100/check_fa4/check_fa4.json), which a varying-shape
# training run would meet in its steps; name it to use it.
AUTO_ORDER = ("cudnn", "band", "aten", "torch")
_BUILTIN = frozenset(_ALL)


def backend_names() -> tuple:
    """Every name ``backend=`` may take: ``"auto"``, then the backends there are, those whose
    optional package is missing here included (naming one of those raises with the reason)."""
    return ("auto", *sorted({*BACKENDS, *UNAVAILABLE}))


def register_backend(name: str, backend: Backend) -> None:
    """Add a backend under a new name (tests, experiments); built-in names cannot be replaced."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty str other than 'auto', got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"backend {name!r} is built in and cannot be replaced")
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend, got {type(backend).__name__}")
    BACKENDS[name] = backend


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "UNAVAILABLE",
    "Backend",
    "BandConfig",
    "Request",
    "TorchConfig",
    "attention",
    "attention_backward",
    "attention_forward",
    "check_backward_tensors",
    "cuda_limits",
    "fix_empty_rows",
    "grad_lse_or_none",
    "may_have_empty_rows",
    "normalize_window",
    "pick_backend",
    "register_backend",
]
