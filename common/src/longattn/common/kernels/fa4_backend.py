"""CUDA backend on FlashAttention-4, the CuTe-DSL kernels of the optional package
``flash-attn-4`` (``import flash_attn.cute``; it brings ``nvidia-cutlass-dsl``, whose
``[cu13]`` extra carries the CUDA 13 compiler library). Only by name (``backend="fa4"``):
``common/bench/check_fa4.py`` measures it beside ``cudnn``, and though it is the faster of
the two on an H100 it stays out of ``AUTO_ORDER`` (a beta that compiles each new shape on
first use; see the comment there). Without the
package the backend is listed in ``kernels.UNAVAILABLE`` with the reason, and naming it
raises a ``ValueError`` saying so.

FA4's conventions, as its ``flash_attn/cute/interface.py`` (flash-attn-4 4.0.0b40) has them,
and what this module does with each:

* **Entry points.** ``flash_attn_func`` / ``flash_attn_varlen_func`` wrap the forward in an
  autograd function that returns ``(out, lse)`` and differentiates only its own forward. The
  ring rule needs a backward that takes the *final* merged ``out`` / ``lse``, so this module
  calls the two functions under them: ``_flash_attn_fwd(q, k, v, ..., softmax_scale, causal,
  window_size_left, window_size_right, return_lse=True) -> (out, lse, ...)`` and
  ``_flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=, causal=, softcap=,
  window_size_left=, window_size_right=, dlse=) -> (dq, dk, dv)`` (the backward recomputes P
  from the given lse).
* **Layouts.** BSHD in and out, ``out`` in q's dtype; ``lse`` float32 ``[B, Hq, Sq]``, packed
  varlen ``[Hq, Tq]``, natural log (its kernels keep base-2 exponents and multiply by ln 2 at
  the end): ours, nothing is converted. GQA / MQA natively (``Hq % Hkv == 0``), K/V heads are
  not repeated.
* **Masks.** Bottom-right aligned like ours (query i sees key j iff ``i + Sk - Sq - left <= j
  <= i + Sk - Sq + right``), but an unbounded side is ``None``: a negative side next to a
  non-negative one is used as a number (``left = -1`` would hide the diagonal itself), only
  both negative mean ``(None, None)``; ``causal=True`` sets ``right = 0``. So each ``-1`` of
  our window (``causal`` already folded in) becomes ``None``, and ``causal=False`` is passed
  (:func:`fa4_window`).
* **dlse.** The backward takes it (float32, lse's shape; ``delta = rowsum(out * dout) -
  dlse``), so requests that need it are served.
* **Rows.** A row that sees no key gets ``lse = -inf`` and ``out = 0``; the backward treats
  ``lse = -inf`` as "no key" (every score masked, p = 0): zero gradients. A row whose scores
  hold a NaN gets ``out`` NaN but ``lse = -inf`` (a NaN row sum is mapped to ``-inf``); such
  rows get ``lse = NaN`` here (a row with lse ``-inf`` and a NaN ``out`` saw a NaN), and where
  a shape can have rows without keys their ``out`` is set to 0 as for the other kernels.
* **What it serves.** fp16 / bf16 (fp8 is forward-only there, not used); head dims ``8..256``
  in multiples of 8 on sm90, ``8..128`` or 256 on sm100 / sm110, ``8..128`` here on sm120;
  q and v head dims equal (its sm90 GQA backward needs that). The forward has sm80 kernels, the
  backward none below sm90: sm90 or newer here. Inputs of any strides (it copies what its TMA
  cannot read). ``out=`` / ``dq_out=`` (``writes_out``): FA4 writes into them when their
  layout is one its kernels take (:func:`writable`), else the caller copies.
* **Varlen** (:mod:`longattn.common.kernels.varlen` with ``backend="fa4"``): ``cu_seqlens_q /
  _k`` int32 on the device, ``max_seqlen_q / _k`` host ints, out ``[Tq, Hq, Dv]``, lse
  ``[Hq, Tq]``; the mask aligned per sequence on its own lengths (ours); sequences without
  keys or without queries allowed. Everything the varlen contract needs of its window part:
  sinks are merged by ``varlen`` around it.
* **Compilation.** Kernels are compiled by the CuTe DSL on the first call of each
  configuration (dtype, head dims, causal / local, GQA packing, varlen, ...) and cached
  (in memory and on disk); a first call can take seconds to a minute. Benchmarks warm up first.

The import of ``flash_attn.cute`` (about 1.7 s: the DSL's MLIR libraries) happens on first use,
not when ``longattn.common.kernels`` is imported: whether the package is installed is decided
at import (``MISSING``); an installed package whose import fails later (no CUDA 13 driver, a
broken wheel) is the ``supports`` reason, so naming the backend raises with it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.common.kernels import (
    Backend,
    Request,
    host_to_device,
    may_have_empty_rows,
    seq_lengths,
)

_HALF = (torch.float16, torch.bfloat16)


_NEEDS = ("needs the optional package flash-attn-4 (pip install flash-attn-4 "
          "'nvidia-cutlass-dsl[cu13]')")


def _find() -> str | None:
    """None when ``flash_attn.cute`` can be found (without importing it), else why not."""
    try:
        spec = importlib.util.find_spec("flash_attn.cute")
    except ModuleNotFoundError:
        spec = None
    except Exception as e:  # noqa: BLE001 - a parent flash_attn that fails to import (FA2's)
        return f"{_NEEDS}; looking for flash_attn.cute failed: {type(e).__name__}: {e}"
    if spec is None:
        return f"{_NEEDS}; flash_attn.cute is not installed"
    return None


MISSING = _find()


@dataclass(frozen=True)
class Runtime:
    """Where the kernels come from: ``interface`` has FA4's ``_flash_attn_fwd`` /
    ``_flash_attn_bwd`` (the module ``flash_attn.cute.interface``, or a stand-in such as
    :class:`longattn.common.testing.Fa4Standin`), ``arch(device)`` is a device's compute
    capability as an int (90 for sm90), ``device_type`` the device type of the tensors it
    takes."""

    interface: object
    arch: Callable
    device_type: str = "cuda"


@functools.cache
def _cuda_arch(index) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _device_arch(device) -> int:
    index = torch.device(device).index
    return _cuda_arch(torch.cuda.current_device() if index is None else index)


_loaded: list = []  # the imported runtime or the import error (a cache, not a setting)
_lock = threading.Lock()
_stack: list[Runtime] = []  # runtimes installed by use() (tests, the probe's --smoke)


def _load():
    """The real :class:`Runtime`, or the reason it cannot load (imported once)."""
    with _lock:
        if not _loaded:
            try:
                from flash_attn.cute import interface
            except Exception as e:  # noqa: BLE001 - ImportError, OSError, cutlass RuntimeError
                _loaded.append(f"import flash_attn.cute failed: {type(e).__name__}: {e}")
            else:
                _loaded.append(Runtime(interface, _device_arch, "cuda"))
        return _loaded[0]


def runtime():
    """The :class:`Runtime` in use, or the reason there is none (a string)."""
    if _stack:
        return _stack[-1]
    if MISSING is not None:
        return MISSING
    return _load()


@contextlib.contextmanager
def use(interface, *, arch: int = 90, device_type: str = "cpu"):
    """Run the backend on ``interface`` (e.g. :class:`longattn.common.testing.Fa4Standin`)
    for tensors of ``device_type`` as if on an sm``arch`` GPU, inside the block; ``"fa4"`` is
    registered in ``kernels.BACKENDS`` meanwhile (and out of ``UNAVAILABLE``). For the CPU tests
    and the probe's ``--smoke`` run."""
    from longattn.common import kernels as K

    rt = Runtime(interface, lambda device: arch, device_type)
    had, why = K.BACKENDS.get("fa4"), K.UNAVAILABLE.pop("fa4", None)
    K.BACKENDS["fa4"] = BACKEND
    _stack.append(rt)
    try:
        yield rt
    finally:
        _stack.remove(rt)
        if had is None:
            K.BACKENDS.pop("fa4", None)
        if why is not None:
            K.UNAVAILABLE["fa4"] = why


def _need_runtime() -> Runtime:
    rt = runtime()
    if isinstance(rt, str):
        raise ValueError(f"the fa4 backend is not available: {rt}")
    return rt


def head_dim_ok(d: int, arch: int) -> bool:
    """Whether FA4 has kernels for head dim ``d`` (q, k and v alike) on sm``arch``."""
    if d % 8 or d < 8:
        return False
    if arch // 10 == 9:
        return d <= 256
    if arch // 10 in (10, 11):
        return d <= 128 or d == 256
    return d <= 128


def supports(req: Request):
    rt = runtime()
    if isinstance(rt, str):
        return rt
    q, v = req.q, req.v
    if q.device.type != rt.device_type:
        kind = "CUDA" if rt.device_type == "cuda" else rt.device_type
        return f"needs {kind} tensors, q is on {q.device}"
    if q.dtype not in _HALF:
        return f"needs fp16/bf16, q is {q.dtype}"
    arch = rt.arch(q.device)
    if arch < 90:
        return (f"needs sm90 or newer (FA4 has no backward kernels below sm90), q's device is "
                f"sm{arch}")
    d = q.shape[-1]
    if v.shape[-1] != d or not head_dim_ok(d, arch):
        top = {9: "<= 256", 10: "<= 128 or 256", 11: "<= 128 or 256"}.get(arch // 10, "<= 128")
        return (f"head_dim {d} (v {v.shape[-1]}) not supported on sm{arch} (equal, multiples "
                f"of 8, {top})")
    return None


def fa4_window(window):
    """FA4's ``(window_size_left, window_size_right)`` for our ``(left, right)`` (``causal``
    folded in): ``-1`` (unbounded) becomes ``None``, each side on its own."""
    left, right = window
    return (None if left < 0 else int(left)), (None if right < 0 else int(right))


def _fix_rows(out, lse, empty_possible):
    """FA4's row conventions to ours. ``out [..., S, H, D]``, ``lse [..., H, S]`` (dense
    ``[B, S, H, D]`` / ``[B, H, S]``, packed ``[T, H, D]`` / ``[H, T]``): a row with
    lse ``-inf`` and a NaN ``out`` saw a NaN (lse NaN); with ``empty_possible`` the other
    infinite rows saw no key (out 0, lse -inf). No host sync.

    Without ``empty_possible`` every row has a key, so finite scores give a finite lse and an
    lse of ``-inf`` means the row's scores were not finite (a NaN, or an infinite input, which
    float64 attention turns into NaN too): such rows get lse NaN without reading ``out``. That
    read of ``out[..., 0]`` (one 32-byte sector per row) cost 0.7 ms of dilated's 70.6 ms
    forward+backward on an H100 (common/bench/results/h100/profile_fa4, ``aten::ne``)."""
    if not empty_possible:
        return out, lse.masked_fill(torch.isneginf(lse), float("nan"))
    dead = torch.isinf(lse)
    nan_row = out[..., 0].isnan().transpose(-1, -2)
    lse = lse.masked_fill(dead & nan_row, float("nan"))
    empty = dead & ~nan_row
    lse = lse.masked_fill(empty, float("-inf"))
    return out.masked_fill_(empty.transpose(-1, -2).unsqueeze(-1), 0.0), lse  # FA4's or out=


def _empty(q, v, lse_shape):
    return (q.new_zeros(*q.shape[:-1], v.shape[-1]),
            torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device))


def writable(t) -> bool:
    """Whether FA4's kernels can write into ``t`` (an ``out=`` / ``dq_out=`` tensor): their
    output layouts are compiled with dynamic strides that are multiples of 16 bytes, a 16-byte
    aligned pointer and a unit stride in the head dim (``validate_output_layout`` and
    ``make_fake_tensor(divisibility=16 bytes)`` in flash-attn-4 / quack-kernels). Another
    layout gets FA4's own tensor, which ``attention_forward`` / ``attention_backward`` copy."""
    per = 16 // t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s > 0 and s % per == 0 for s in t.stride()[:-1]))


def forward(q, k, v, *, softmax_scale, window_size, out=None):
    rt = _need_runtime()
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    if sq == 0 or sk == 0:
        return _empty(q, v, (b, hq, sq))
    left, right = fa4_window(window_size)
    # out= spares the copy of a step's output into the caller's slot (hamilton's deferred
    # merge): FA4 writes there itself
    kw = {"out": out} if out is not None and writable(out) else {}
    res = rt.interface._flash_attn_fwd(q, k, v, softmax_scale=float(softmax_scale), causal=False,
                                       window_size_left=left, window_size_right=right,
                                       return_lse=True, **kw)
    return _fix_rows(res[0], res[1], may_have_empty_rows(sq, sk, window_size))


def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None, dq_out=None):
    rt = _need_runtime()
    if q.shape[1] == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    left, right = fa4_window(window_size)
    kw = {"dq": dq_out} if dq_out is not None and writable(dq_out) else {}
    res = rt.interface._flash_attn_bwd(
        q, k, v, out.to(q.dtype), dout.to(q.dtype), lse.float().contiguous(),
        softmax_scale=float(softmax_scale), causal=False, softcap=0.0, window_size_left=left,
        window_size_right=right, dlse=None if dlse is None else dlse.float().contiguous(), **kw)
    return res[0], res[1], res[2]


# --------------------------------------------------------------------------------------------
# packed variable-length batches (THD), for longattn.common.kernels.varlen


def varlen_supports(q, k, v, window, needs_dlse=False):
    """Why FA4's varlen kernels cannot serve this packed call (None: they can): the dense rules
    (:func:`supports`) on ``[T, H, D]`` tensors."""
    return supports(Request(q[None], k[None], v[None], window[1] == 0, tuple(window),
                            needs_dlse))


def _cu_tensors(cu_q, cu_k, device):
    """Both ``cu_seqlens`` (host lists) as int32 tensors on ``device``, in one copy that does not
    make the host wait for the GPU."""
    both = host_to_device(torch.tensor(list(cu_q) + list(cu_k), dtype=torch.int32), device)
    return both[:len(cu_q)], both[len(cu_q):]


def _varlen_args(q, cu_seqlens_q, cu_seqlens_k):
    cu_q, cu_k = (c.tolist() if isinstance(c, torch.Tensor) else list(c)
                  for c in (cu_seqlens_q, cu_seqlens_k))
    cq, ck = _cu_tensors(cu_q, cu_k, q.device)
    lq, lk = seq_lengths(cu_q), seq_lengths(cu_k)
    return cq, ck, lq, lk


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale, window_size):
    """Packed varlen forward in one FA4 call: ``(out [Tq, Hq, Dv], lse [Hq, Tq] float32)``.
    ``cu_seqlens_*``: host lists or tensors ``[num_seqs + 1]``; ``window_size`` with ``causal``
    folded in."""
    rt = _need_runtime()
    if q.shape[0] == 0 or k.shape[0] == 0:
        return _empty(q, v, (q.shape[1], q.shape[0]))
    cq, ck, lq, lk = _varlen_args(q, cu_seqlens_q, cu_seqlens_k)
    left, right = fa4_window(window_size)
    res = rt.interface._flash_attn_fwd(
        q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lq), max_seqlen_k=max(lk),
        softmax_scale=float(softmax_scale), causal=False, window_size_left=left,
        window_size_right=right, return_lse=True)
    empty = any(a and may_have_empty_rows(a, b, window_size) for a, b in zip(lq, lk))
    return _fix_rows(res[0], res[1], empty)


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, softmax_scale,
                    window_size, dlse=None):
    """Gradients ``(dq, dk, dv)`` of :func:`varlen_forward` given the final ``out`` and ``lse``
    (``[Hq, Tq]``) and optionally ``dlse`` (the same shape), in one FA4 call."""
    rt = _need_runtime()
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck, lq, lk = _varlen_args(q, cu_seqlens_q, cu_seqlens_k)
    left, right = fa4_window(window_size)
    res = rt.interface._flash_attn_bwd(
        q, k, v, out.to(q.dtype), dout.to(q.dtype), lse.float().contiguous(),
        softmax_scale=float(softmax_scale), causal=False, softcap=0.0, window_size_left=left,
        window_size_right=right, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max(lq),
        max_seqlen_k=max(lk), dlse=None if dlse is None else dlse.float().contiguous())
    return res[0], res[1], res[2]


BACKEND = Backend(forward=forward, backward=backward, supports=supports, writes_out=True)
