"""CUDA backend on cuDNN's SDPA graphs through cudnn-frontend (optional package
``nvidia-cudnn-frontend``, extra ``longattn-common[cudnn]``). Without it the backend is listed
in ``kernels.UNAVAILABLE`` with the import error, and asking for ``backend="cudnn"`` raises a
``ValueError`` saying so.

PyTorch's own cuDNN op (the ``aten`` backend) has no window and only a top-left causal mask.
The cuDNN graph API has both: a *diagonal band* ``(left_bound, right_bound)`` in top-left or
bottom-right alignment, native GQA (K/V with fewer heads), and any strides. So one cuDNN call
serves every request shape of :mod:`longattn.common.kernels` except ``dlse``, float32 and
bottom-right masks with ``Sq > Sk``:

* window ``(left, right)`` (``-1`` unbounded) -> band ``left_bound = left + 1`` (cuDNN counts
  the diagonal itself: bound 1 keeps only it), ``right_bound = right``, bottom-right aligned
  when ``Sq != Sk`` (our convention; equal to top-left when ``Sq == Sk``);
* BSHD tensors are passed with their strides (``[B, H, S, D]`` dims over the BSHD memory):
  no transposes, no copies, also for strided views (dilated attention's sparsified segments).

Graphs are built once per (shapes, strides, dtype, scale, mask) and cached. A request cuDNN
has no engine for (refused while the graph is built, so ``supports`` cannot know it) goes to
the first of ``aten`` / ``torch`` that serves it, with a warning carrying cuDNN's reason (once
per graph key). The backward takes
the final ``out``/``lse`` (ring rule). No served request has a row that sees no key (``right >=
0`` with ``Sq <= Sk`` bottom-right, or ``Sq == Sk``), so there is no empty-row case to patch.
"""

from __future__ import annotations

import threading
import warnings

import torch

from longattn.common.kernels import Backend, cuda_limits

try:
    import cudnn
except (ImportError, OSError) as _e:  # not installed, or no libcudnn to load
    cudnn = None
    MISSING = ("needs the optional package nvidia-cudnn-frontend (pip install "
               f"'longattn-common[cudnn]'); import cudnn failed: {type(_e).__name__}: {_e}")
else:
    MISSING = None

_DTYPES = ({} if cudnn is None else
           {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16})
_MAX_GRAPHS = 512
_local = threading.local()  # cuDNN handles are not thread-safe: one per thread and device


def band_bounds(window, sq, sk):
    """cuDNN band arguments ``(alignment_is_bottom_right, left_bound, right_bound)`` for our
    ``window=(left, right)`` (``None`` = unbounded). cuDNN keeps key ``j`` of query ``i`` iff
    ``i' - left_bound < j <= i' + right_bound`` with ``i' = i + Sk - Sq`` when bottom-right
    aligned, else ``i' = i``."""
    left, right = window
    lb = None if left < 0 else left + 1
    rb = None if right < 0 else right
    return sq != sk and (lb is not None or rb is not None), lb, rb


def supports(req):
    reason = cuda_limits(req, (torch.float16, torch.bfloat16), max_head_dim=128)
    if reason is not None:
        return reason
    q, k, v = req.q, req.k, req.v
    if min(x.stride(-1) for x in (q, k, v)) != 1:
        return "needs unit stride in the last dim"
    if q.shape[1] == 0 or k.shape[1] == 0:
        return "empty sequence"
    bottom_right, _, _ = band_bounds(req.window_size, q.shape[1], k.shape[1])
    if bottom_right and q.shape[1] > k.shape[1]:
        # cuDNN: "Bottom right causal mask does not support max_s_q > max_s_kv"
        return "bottom-right masks need Sq <= Sk"
    return None


def _handle(device):
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    h = handles.get(device.index)
    if h is None:
        with torch.cuda.device(device):
            h = handles[device.index] = cudnn.create_handle()
    cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(device).cuda_stream)
    return h


def _dims(t):
    """cuDNN dims / strides ``[B, H, S, D]`` of a BSHD tensor (any strides)."""
    b, s, h, d = t.shape
    st = t.stride()
    return [b, h, s, d], [st[0], st[2], st[1], st[3]]


_graphs: dict = {}  # a cache of built graphs (None: cuDNN refused that key), not a setting
_FALLBACK = ("aten", "torch")  # where a request goes when cuDNN refuses to build its graph


def _cached(key, build):
    """The built graph for ``key``, or None if cuDNN refused it (remembered: no retries; the
    refusal is reported once, as a warning with cuDNN's message)."""
    if key not in _graphs:
        if len(_graphs) >= _MAX_GRAPHS:
            _graphs.pop(next(iter(_graphs)))
        try:
            _graphs[key] = build()
        except (cudnn.cudnnGraphNotSupportedError, RuntimeError) as e:  # no engine for it
            _graphs[key] = None
            warnings.warn(f"cudnn backend: cuDNN has no engine for this {key[0]} graph "
                          f"({type(e).__name__}: {e}); running it on the first of "
                          f"{_FALLBACK} that serves it", RuntimeWarning, stacklevel=3)
    return _graphs[key]


def _fallback(q, k, v, window):
    """The first backend of ``_FALLBACK`` that serves a request cuDNN has no engine for."""
    from longattn.common.kernels import BACKENDS, Request

    reasons = []
    for name in _FALLBACK:
        reason = BACKENDS[name].supports(Request(q, k, v, window[1] == 0, window))
        if reason is None:
            return BACKENDS[name]
        reasons.append(f"{name}: {reason}")
    raise ValueError("cuDNN has no engine for this call and no fallback serves it: "
                     + "; ".join(reasons))


def _finish(g):
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _new_graph(dt, handle):
    return cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT, handle=handle)


def _mask_kwargs(window, sq, sk):
    bottom_right, lb, rb = band_bounds(window, sq, sk)
    kw = {"diagonal_alignment": (cudnn.diagonal_alignment.BOTTOM_RIGHT if bottom_right
                                 else cudnn.diagonal_alignment.TOP_LEFT)}
    if lb is not None:
        kw["diagonal_band_left_bound"] = lb
    if rb is not None:
        kw["diagonal_band_right_bound"] = rb
    return kw


def _workspace(size, device):
    return torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)


def forward(q, k, v, *, softmax_scale, window_size):
    scale, window = softmax_scale, window_size
    b, sq, hq, _ = q.shape
    sk, dv = k.shape[1], v.shape[-1]
    out = torch.empty(b, sq, hq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, 1, dtype=torch.float32, device=q.device)
    handle = _handle(q.device)
    ops = (q, k, v, out)
    key = ("fwd", q.dtype, q.device.index, float(scale), tuple(window),
           tuple((tuple(x.shape), tuple(x.stride())) for x in ops))

    def build():
        g = _new_graph(_DTYPES[q.dtype], handle)
        ts = [g.tensor(name=n, dim=_dims(x)[0], stride=_dims(x)[1], data_type=_DTYPES[q.dtype])
              for n, x in zip("qkv", (q, k, v))]
        o, st = g.sdpa(name="sdpa", q=ts[0], k=ts[1], v=ts[2], generate_stats=True,
                       attn_scale=float(scale), **_mask_kwargs(window, sq, sk))
        od, os_ = _dims(out)
        o.set_output(True).set_dim(od).set_stride(os_).set_data_type(_DTYPES[q.dtype])
        st.set_output(True).set_dim([b, hq, sq, 1]).set_stride([hq * sq, sq, 1, 1]) \
            .set_data_type(cudnn.data_type.FLOAT)
        return _finish(g), ts + [o, st]

    built = _cached(key, build)
    if built is None:
        return _fallback(q, k, v, window).forward(q, k, v, softmax_scale=scale,
                                                  window_size=window)
    g, ts = built
    g.execute(dict(zip(ts, (q, k, v, out, lse))), _workspace(g.get_workspace_size(), q.device),
              handle=handle)
    lse = lse.squeeze(-1)
    return out, lse


def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None):
    scale, window = softmax_scale, window_size
    if dlse is not None:
        raise ValueError("the cudnn backend cannot take dlse")
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    out = out.to(q.dtype)
    dout = dout.to(q.dtype)
    if out.stride(-1) != 1:
        out = out.contiguous()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    lse_in = lse.float().contiguous().unsqueeze(-1)  # [B, H, Sq, 1]
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    handle = _handle(q.device)
    ops = (q, k, v, out, dout, dq, dk, dv)
    key = ("bwd", q.dtype, q.device.index, float(scale), tuple(window),
           tuple((tuple(x.shape), tuple(x.stride())) for x in ops))

    def build():
        dt = _DTYPES[q.dtype]
        g = _new_graph(dt, handle)
        ts = [g.tensor(name=n, dim=_dims(x)[0], stride=_dims(x)[1], data_type=dt)
              for n, x in zip(("q", "k", "v", "o", "dO"), (q, k, v, out, dout))]
        st = g.tensor(name="stats", dim=[b, hq, sq, 1], stride=[hq * sq, sq, 1, 1],
                      data_type=cudnn.data_type.FLOAT)
        grads = g.sdpa_backward(name="sdpa_backward", q=ts[0], k=ts[1], v=ts[2], o=ts[3],
                                dO=ts[4], stats=st, attn_scale=float(scale),
                                **_mask_kwargs(window, sq, sk))
        for t, x in zip(grads, (dq, dk, dv)):
            d_, s_ = _dims(x)
            t.set_output(True).set_dim(d_).set_stride(s_).set_data_type(dt)
        return _finish(g), ts + [st] + list(grads)

    built = _cached(key, build)
    if built is None:
        return _fallback(q, k, v, window).backward(dout, q, k, v, out, lse, softmax_scale=scale,
                                                   window_size=window)
    g, ts = built
    g.execute(dict(zip(ts, (q, k, v, out, dout, lse_in, dq, dk, dv))),
              _workspace(g.get_workspace_size(), q.device), handle=handle)
    return dq, dk, dv


BACKEND = Backend(forward=forward, backward=backward, supports=supports)
