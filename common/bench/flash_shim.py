"""flash-attn 2.7's interface on longattn's local kernels, for published peers that import it.

    import flash_shim
    flash_shim.install()   # then: from flash_attn.flash_attn_interface import _flash_attn_forward

Peers such as ring-flash-attention (``ring_flash_attn``) and torchscale's LongNet
``DilatedAttention`` call ``flash_attn.flash_attn_interface`` directly. Where flash-attn cannot be
installed (no wheel for the GPU machine's torch and CUDA), :func:`install` puts this module's
functions into ``sys.modules["flash_attn.flash_attn_interface"]``, so those peers run unchanged
on ``longattn.common.kernels``: torch's own flash / cuDNN attention on CUDA (``backend="auto"``,
what our packages use), our CPU kernels elsewhere. Both sides of a benchmark then use the
same kernels, and what differs is the method.

:func:`install` does nothing when ``flash_attn.flash_attn_interface`` imports (a real
flash-attn is used as it is). An importable ``flash_attn`` package or namespace without that
module (FlashAttention-4's ``flash_attn.cute``) is kept: only the submodule is added. Otherwise
a ``flash_attn`` module is created whose ``__path__`` is wherever a ``flash_attn`` folder lies
on ``sys.path`` (none: empty), so submodules on disk still import.

The functions keep flash-attn 2.7's names, argument names, defaults and layouts:

* ``_flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
  window_size_right, softcap, alibi_slopes, return_softmax) -> (out, softmax_lse, S_dmask,
  rng_state)``: q ``[B, Sq, Hq, D]``, k / v ``[B, Sk, Hkv, D]`` (GQA: ``Hq % Hkv == 0``),
  ``out`` in q's dtype, ``softmax_lse [B, Hq, Sq]`` float32.
* ``_flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
  causal, window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
  rng_state=None) -> softmax_d``: writes the gradients **into** ``dq``, ``dk``, ``dv`` (any
  of them None: not returned, as in flash-attn) and returns ``softmax_d = rowsum(dout * out)``
  ``[B, Hq, Sq]`` float32.
* ``_flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward``: packed THD tensors with
  ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32), ``softmax_lse [Hq, total_q]``.
* ``flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
  return_attn_probs=False)``: autograd; with ``return_attn_probs=True`` it returns
  ``(out, softmax_lse, None)`` and the lse carries no gradient (flash-attn 2's ``FlashAttnFunc``
  drops it too).

Differences from flash-attn, all outside what the peers use: ``dropout_p > 0``, ``softcap``,
``alibi_slopes``, ``return_softmax`` / probabilities and the paged / left-padded varlen
arguments raise ``NotImplementedError`` naming the argument; ``softmax_d`` is not padded to a
multiple of 128 rows; ``max_seqlen_q`` / ``max_seqlen_k`` are not needed (the lengths come from
``cu_seqlens``); a query row that sees no key gets ``lse = -inf`` (longattn's rule; flash-attn 2
returns +inf) and out 0; ``softmax_lse`` is float32 also for float32 / float64 inputs (the
peers merge in float32 whatever the input, so their float64 results are float32-accurate).
What the shim adds to a peer's time: the backward's copy of the three gradients into
``dq / dk / dv`` (torch's ops return new tensors) and the ``softmax_d`` row sums.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

import torch

from longattn.common.kernels import attention_backward, attention_forward
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen

MODULE = "flash_attn.flash_attn_interface"
PACKAGE = "flash_attn"
# The names the shim module exports (flash-attn 2.7's, used by ring-flash-attention and
# torchscale).
NAMES = ("_flash_attn_forward", "_flash_attn_backward", "_flash_attn_varlen_forward",
         "_flash_attn_varlen_backward", "flash_attn_func", "maybe_contiguous")


def maybe_contiguous(x):
    """flash-attn's rule: a copy only where the last dim is not contiguous."""
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _unsupported(dropout_p=0.0, softcap=0.0, alibi_slopes=None, return_softmax=False, **extra):
    if dropout_p:
        raise NotImplementedError(f"dropout_p={dropout_p}: the shim has no attention dropout "
                                  "(longattn's kernels return lse, not probabilities)")
    if softcap:
        raise NotImplementedError(f"softcap={softcap}: not supported by the shim")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: not supported by the shim")
    if return_softmax:
        raise NotImplementedError("return_softmax=True: the shim returns no probabilities")
    for name, val in extra.items():
        if val is not None:
            raise NotImplementedError(f"{name}: not supported by the shim (must be None)")


def _empties(q):
    """``S_dmask`` and ``rng_state`` as flash-attn returns them without dropout."""
    return (torch.empty((0,), dtype=q.dtype, device=q.device),
            torch.zeros((2,), dtype=torch.int64, device=q.device))


def _write(buf, grad):
    """flash-attn writes the gradient into the caller's buffer (None: not kept)."""
    if buf is None:
        return
    if buf.shape != grad.shape:
        raise ValueError(f"gradient buffer of shape {tuple(buf.shape)}, expected "
                         f"{tuple(grad.shape)}")
    buf.copy_(grad)


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                        window_size_right, softcap, alibi_slopes, return_softmax):
    _unsupported(dropout_p, softcap, alibi_slopes, return_softmax)
    q, k, v = (maybe_contiguous(x) for x in (q, k, v))
    out, lse = attention_forward(q, k, v, softmax_scale=softmax_scale, causal=bool(causal),
                                 window_size=(window_size_left, window_size_right))
    return (out, lse.float(), *_empties(q))


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                         causal, window_size_left, window_size_right, softcap, alibi_slopes,
                         deterministic, rng_state=None):
    _unsupported(dropout_p, softcap, alibi_slopes)
    dout, q, k, v, out = (maybe_contiguous(x) for x in (dout, q, k, v, out))
    gq, gk, gv = attention_backward(dout, q, k, v, out, softmax_lse,
                                    softmax_scale=softmax_scale, causal=bool(causal),
                                    window_size=(window_size_left, window_size_right))
    for buf, grad in ((dq, gq), (dk, gk), (dv, gv)):
        _write(buf, grad)
    return (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size_left=-1,
                               window_size_right=-1, softcap=0.0, alibi_slopes=None,
                               return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None):
    _unsupported(dropout_p, softcap, alibi_slopes, return_softmax, block_table=block_table,
                 leftpad_k=leftpad_k, seqused_k=seqused_k)
    q, k, v = (maybe_contiguous(x) for x in (q, k, v))
    out, lse = attention_forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                        softmax_scale=softmax_scale, causal=bool(causal),
                                        window_size=(window_size_left, window_size_right))
    return (out, lse.float(), *_empties(q))


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, deterministic, rng_state=None):
    _unsupported(dropout_p, softcap, alibi_slopes)
    dout, q, k, v, out = (maybe_contiguous(x) for x in (dout, q, k, v, out))
    gq, gk, gv = attention_backward_varlen(dout, q, k, v, out, softmax_lse, cu_seqlens_q,
                                           cu_seqlens_k, softmax_scale=softmax_scale,
                                           causal=bool(causal),
                                           window_size=(window_size_left, window_size_right))
    for buf, grad in ((dq, gq), (dk, gk), (dv, gv)):
        _write(buf, grad)
    return (dout.float() * out.float()).sum(-1).t().contiguous()


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                alibi_slopes, deterministic, return_softmax):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        out, lse, _, _ = _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal,
                                             window_size[0], window_size[1], softcap,
                                             alibi_slopes, False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (softmax_scale, bool(causal), tuple(window_size))
        if not return_softmax:
            return out
        ctx.mark_non_differentiable(lse)
        return out, lse, None

    @staticmethod
    def backward(ctx, dout, *unused):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, window = ctx.args
        dq, dk, dv = attention_backward(maybe_contiguous(dout), maybe_contiguous(q),
                                        maybe_contiguous(k), maybe_contiguous(v), out, lse,
                                        softmax_scale=scale, causal=causal, window_size=window)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """flash-attn's ``flash_attn_func`` (BSHD, autograd). ``return_attn_probs=True`` returns
    ``(out, softmax_lse, None)``: the lse ``[B, Hq, Sq]`` float32, without a gradient."""
    return _FlashAttnFunc.apply(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                alibi_slopes, deterministic, bool(return_attn_probs))


# --------------------------------------------------------------------------------------------
# installation


def _importable(name):
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def is_shim(module) -> bool:
    """Whether ``module`` is the interface this file installed (not a real flash-attn)."""
    return bool(getattr(module, "__longattn_shim__", False))


def install():
    """Make ``flash_attn.flash_attn_interface`` importable; returns that module (the real one
    where it imports, else this shim's, see :func:`is_shim`). Idempotent."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    if _importable(MODULE):
        return sys.modules[MODULE]
    parent = sys.modules.get(PACKAGE)
    if parent is None and _importable(PACKAGE):  # a package or namespace without our module
        parent = sys.modules[PACKAGE]
    if parent is None:
        try:
            spec = importlib.util.find_spec(PACKAGE)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        parent = types.ModuleType(PACKAGE, "flash_attn's package, created by the longattn shim")
        parent.__spec__ = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        parent.__spec__.submodule_search_locations = locations
        parent.__path__ = locations
        parent.__longattn_shim__ = True
        sys.modules[PACKAGE] = parent
    mod = types.ModuleType(MODULE, "flash-attn 2.7's interface on longattn.common.kernels "
                                   f"(the shim in {__file__})")
    mod.__spec__ = importlib.machinery.ModuleSpec(MODULE, None)
    mod.__file__ = __file__
    mod.__longattn_shim__ = True
    for name in NAMES:
        setattr(mod, name, globals()[name])
    sys.modules[MODULE] = mod
    parent.flash_attn_interface = mod
    return mod


def uninstall():
    """Remove what :func:`install` added (tests); a real flash-attn is left alone."""
    mod = sys.modules.get(MODULE)
    if mod is None or not is_shim(mod):
        return
    del sys.modules[MODULE]
    parent = sys.modules.get(PACKAGE)
    if parent is not None:
        if getattr(parent, "flash_attn_interface", None) is mod:
            del parent.flash_attn_interface
        if is_shim(parent):
            del sys.modules[PACKAGE]
