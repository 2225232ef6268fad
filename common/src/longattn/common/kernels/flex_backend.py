"""FlexAttention backend ("flex"): windows as block-sparse masks, on CUDA.

The window ``(left, right)`` (bottom-right aligned, -1 unbounded) becomes a ``mask_mod``; its
:class:`BlockMask` is built once per ``(Sq, Sk, window, device)`` with ``_compile=True`` (the
eager builder materialises the whole Sq x Sk mask) and cached. The
kernel is ``torch.compile(flex_attention)``, compiled once per process.

Backward (ring rule): FlexAttention only differentiates its own forward, so the backward
recomputes this step's ``(o_s, lse_s)`` under autograd and back-propagates the gradient that
the *final* ``(out, lse)`` sends into this step: with ``w = exp(lse_s - lse)``,
``d o_s = w * dout`` and ``d lse_s = w * (rowsum(dout * (o_s - out)) + dlse)``. When the step is
the whole attention, ``w = 1`` and this is FlexAttention's own backward. So ``dlse`` is
supported, at the price of one extra forward.

``lse`` is float32 for fp16 / bf16 and also for float32 inputs (FlexAttention's own lse, not
:func:`~longattn.common.dtypes.lse_dtype`'s float64): merging float32-input partials of this
backend keeps float32 ``lse`` precision (~1e-3 absolute near logits of 1e4). The backend is
opt-in (only by name, never chosen by ``backend="auto"``).

Imports cleanly on a CPU-only torch; ``supports`` refuses non-CUDA tensors. On a torch without
FlexAttention the backend is listed in ``kernels.UNAVAILABLE`` with the import error.
``forward`` / ``backward`` take ``compile=False`` to run FlexAttention's eager reference path
(forward only on the CPU; the CPU tests use it, and test :func:`reweighted_backward` with a
differentiable torch step).
"""

from __future__ import annotations

import torch

from longattn.common.dtypes import acc_dtype
from longattn.common.kernels import Backend, cuda_limits, fix_empty_rows, may_have_empty_rows

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError as _e:  # torch without FlexAttention
    _flex = None
    MISSING = (f"this torch ({torch.__version__}) has no FlexAttention "
               f"(torch.nn.attention.flex_attention: {_e})")
else:
    MISSING = None
    if not hasattr(_flex, "create_block_mask"):
        MISSING = f"this torch ({torch.__version__}) has no flex_attention.create_block_mask"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASKS: dict = {}  # caches (block masks, the compiled kernel), not settings
_COMPILED: list = []


def flex_available() -> bool:
    return MISSING is None


def _kernel(compile: bool):
    if not compile:
        return _flex.flex_attention
    if not _COMPILED:
        _COMPILED.append(torch.compile(_flex.flex_attention, dynamic=False))
    return _COMPILED[0]


def window_mask_mod(sq: int, sk: int, window):
    """``mask_mod(b, h, q_idx, kv_idx)`` for a bottom-right aligned ``(left, right)`` window."""
    left, right = window
    off = sk - sq

    def mask_mod(b, h, q_idx, kv_idx):
        qa = q_idx + off
        ok = kv_idx >= 0
        if left >= 0:
            ok = ok & (kv_idx >= qa - left)
        if right >= 0:
            ok = ok & (kv_idx <= qa + right)
        return ok

    return mask_mod


def block_mask(sq: int, sk: int, window, device, *, compile: bool = True):
    """Cached :class:`BlockMask` of the window (None when the window is unbounded)."""
    window = tuple(window)
    if window == (-1, -1):
        return None
    key = (sq, sk, window, str(device), compile)
    bm = _MASKS.get(key)
    if bm is None:
        bm = _flex.create_block_mask(window_mask_mod(sq, sk, window), None, None, sq, sk,
                                     device=device, _compile=compile)
        _MASKS[key] = bm
    return bm


def _call(q, k, v, scale, window, compile):
    """FlexAttention on BSHD tensors -> (out BSHD, lse [B, H, Sq]) (autograd-capable)."""
    bm = block_mask(q.shape[1], k.shape[1], window, q.device, compile=compile)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kw = dict(block_mask=bm, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    if hasattr(_flex, "AuxRequest"):
        out, aux = _kernel(compile)(qt, kt, vt, return_aux=_flex.AuxRequest(lse=True), **kw)
        lse = aux.lse
    else:  # torch < 2.9
        out, lse = _kernel(compile)(qt, kt, vt, return_lse=True, **kw)
    return out.transpose(1, 2), lse


def forward(q, k, v, *, softmax_scale, window_size, compile: bool = True):
    window = window_size
    out, lse = _call(q, k, v, softmax_scale, window, compile)
    lse = lse.to(acc_dtype(q.dtype))
    if may_have_empty_rows(q.shape[1], k.shape[1], window):
        out, lse = fix_empty_rows(out, lse)
    return out.to(q.dtype), lse


def reweighted_backward(step, dout, q, k, v, out, lse, dlse=None):
    """Ring-rule gradients of one step from a differentiable ``step(q, k, v) -> (o_s, lse_s)``
    and the *final* ``out`` / ``lse`` (see the module docstring)."""
    acc = acc_dtype(q.dtype)
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        o_s, l_s = step(qd, kd, vd)
        lse_f, ls = lse.to(acc), l_s.detach().to(acc)
        live = torch.isfinite(lse_f) & torch.isfinite(ls)
        w = torch.where(live, torch.exp(ls - lse_f), torch.zeros_like(lse_f))
        dacc = dout.to(acc)
        g_o = dacc * w.transpose(1, 2).unsqueeze(-1)
        corr = (dacc * (o_s.detach().to(acc) - out.to(acc))).sum(-1).transpose(1, 2)
        if dlse is not None:
            corr = corr + dlse.to(acc)
        g_l = torch.where(live, w * corr, torch.zeros_like(corr))
        dq, dk, dv = torch.autograd.grad([o_s, l_s], [qd, kd, vd],
                                         [g_o.to(o_s.dtype), g_l.to(l_s.dtype)])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None,
             compile: bool = True):
    return reweighted_backward(lambda a, b, c: _call(a, b, c, softmax_scale, window_size, compile),
                               dout, q, k, v, out, lse, dlse)


def supports(req):
    q, v = req.q, req.v
    if MISSING is not None:
        return MISSING
    reason = cuda_limits(req, _DTYPES)
    if reason is not None:
        return reason
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256) or v.shape[-1] != d:
        return f"head_dim {d} (v {v.shape[-1]}) must be a power of two in 16..256 and equal"
    return None


BACKEND = Backend(forward=forward, backward=backward, supports=supports)
