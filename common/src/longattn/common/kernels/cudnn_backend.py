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

Packed variable-length batches (THD, :mod:`longattn.common.kernels.varlen` with
``backend="cudnn"``): :func:`varlen_forward` / :func:`varlen_backward` run all sequences in one
SDPA graph with cuDNN's padding mask and *ragged offsets* (the layout of cudnn-frontend's own
THD tests, ``test/python/sdpa/fp16.py``):

* q / k / v / O / dO / dQ / dK / dV are declared ``[B, H, S, D]`` with the packed strides
  ``[S*H*D, D, H*D, 1]`` and each gets a ragged offset tensor, int64 ``[B + 1, 1, 1, 1]`` in
  elements: ``cu_seqlens * H * D`` (``set_ragged_offset``); the per-sequence lengths are
  ``seq_len_q`` / ``seq_len_kv``, int32 ``[B, 1, 1, 1]``, with ``use_padding_mask=True``;
* the softmax stats are ragged too: a ``[Tq, Hq]`` float32 buffer declared ``[B, Hq, S, 1]``
  with strides ``[S*Hq, 1, Hq, 1]`` and offsets ``cu_seqlens_q * Hq``; our ``lse [Hq, Tq]`` is
  its transpose (one copy each way, no padded ``[B, H, S]`` tensor);
* a band is bottom-right aligned when some sequence's q and k lengths differ (with the padding
  mask cuDNN aligns each sequence on its own lengths; cuDNN allows ``Sq > Sk`` there), else
  top-left (the same mask where the lengths agree);
* the backward passes ``max_total_seq_len_q/kv``, so cuDNN sizes its fp32 dQ accumulator by
  the token total, not by ``B * S``. (torch 2.11's ``aten._cudnn_attention_backward`` varlen
  path sizes it with ``s_q = head_dim``, pytorch PR #186142, and writes out of bounds for any
  sequence longer than the head dim: that op is not used.)

Graph reuse, the bucket rule: a ragged graph is keyed on (direction, dtype, device, scale,
window, Hq, Hkv, D, Dv -- the contiguous THD strides follow from them --, alignment) and the
bucketed sizes, never on the exact lengths, which travel as tensors at run time:

* sequences ``B``: the next power of two (the extra ones have length 0, offsets at the end);
* longest sequence ``S_q`` / ``S_k``: the next power of two, at least 128 (tiles past a
  sequence's length exit at once);
* backward only, tokens ``T_q`` / ``T_k`` (``max_total_seq_len``, the workspace size): rounded
  up to a multiple of 1/8 of the next power of two, at least 128 (less than 25% or 128
  tokens more).

So training batches of one size with new document layouts reuse one graph per direction
(262,144 tokens in 9 to 16 documents of 1k to 32k tokens: ``B = 16``, ``S = 32768``,
``T = 262144``).
Not served (:func:`varlen_supports`, the caller goes elsewhere): what the dense graphs refuse
(not CUDA fp16 / bf16, ``dlse``, head dims not equal multiples of 8 up to 128) and a query row
that sees none of its sequence's keys (``Sq > Sk`` causal: cuDNN does not document its output
there). Sequences without keys are served: cuDNN gets them with no queries and their rows are
set here (out 0, lse -inf, dq 0), as hamilton's steps have them (segments of a row range that
see none of the step's keys). A graph cuDNN has no engine for raises :class:`GraphRefused`
(warned once per key); ``varlen`` then runs the call as ``backend="auto"`` would.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, replace

import torch

from longattn.common.kernels import (
    Backend,
    Request,
    cuda_limits,
    host_to_device,
    may_have_empty_rows,
    seq_lengths,
)

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


def _cached(key, build, fallback=f"the first of {_FALLBACK} that serves it"):
    """The built graph for ``key``, or None if cuDNN refused it (remembered: no retries; the
    refusal is reported once, as a warning with cuDNN's message and where the call goes,
    unless ``fallback`` is None)."""
    if key not in _graphs:
        if len(_graphs) >= _MAX_GRAPHS:
            _graphs.pop(next(iter(_graphs)))
        try:
            _graphs[key] = build()
        except (cudnn.cudnnGraphNotSupportedError, RuntimeError) as e:  # no engine for it
            _graphs[key] = None
            if fallback is None:  # the caller has another way and says nothing
                return None
            warnings.warn(f"cudnn backend: cuDNN has no engine for this {key[0]} graph "
                          f"({type(e).__name__}: {e}); running it on {fallback}",
                          RuntimeWarning, stacklevel=3)
    return _graphs[key]


def graph_count(kind=None):
    """How many built graphs are cached (refused ones not counted), of one kind (``"fwd"``,
    ``"bwd"``, ``"varlen fwd"``, ``"varlen bwd"``) or of all."""
    return sum(1 for key, g in _graphs.items() if g is not None and kind in (None, key[0]))


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
    return _band_kwargs(*band_bounds(window, sq, sk))


def _band_kwargs(bottom_right, lb, rb):
    kw = {"diagonal_alignment": (cudnn.diagonal_alignment.BOTTOM_RIGHT if bottom_right
                                 else cudnn.diagonal_alignment.TOP_LEFT)}
    if lb is not None:
        kw["diagonal_band_left_bound"] = lb
    if rb is not None:
        kw["diagonal_band_right_bound"] = rb
    return kw


def _workspace(size, device):
    return torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)


def forward(q, k, v, *, softmax_scale, window_size, out=None):
    """``out``: where the graph writes its output (None: a new tensor); any strides."""
    scale, window = softmax_scale, window_size
    b, sq, hq, _ = q.shape
    sk, dv = k.shape[1], v.shape[-1]
    if out is None:
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


def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None, dq_out=None):
    """dq, dk, dv. A causal call with ``Sq < Sk`` (a bottom-right band) runs as two graphs,
    the queries against the keys before their diagonal block (no mask) and against that block
    (square: top-left), written into one dK / dV, dq summed: cuDNN's backward runs a
    bottom-right band at half the speed of the same work top-left aligned
    (``common/bench/results/h200/profile_packed/log.txt``, 82.96 against 41.76 ms). With
    ``split=False`` (:func:`backward_single`) it is one graph. ``dq_out``: where dq is
    written (None: a new tensor)."""
    return _backward(dout, q, k, v, out, lse, softmax_scale, window_size, dlse, split=True,
                     dq_out=dq_out)


def backward_single(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None):
    """:func:`backward` as one graph whatever the band (the profile's comparison)."""
    return _backward(dout, q, k, v, out, lse, softmax_scale, window_size, dlse, split=False)


def _backward(dout, q, k, v, out, lse, scale, window, dlse, split, dq_out=None):
    if dlse is not None:
        raise ValueError("the cudnn backend cannot take dlse")
    sq, sk = q.shape[1], k.shape[1]
    out = out.to(q.dtype)
    dout = dout.to(q.dtype)
    if out.stride(-1) != 1:
        out = out.contiguous()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    lse_in = lse.float().contiguous().unsqueeze(-1)  # [B, H, Sq, 1]
    dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (k, v))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq_out is None else dq_out
    args = (dout, q, out, lse_in, scale)
    p = sk - sq
    if split and tuple(window) == (-1, 0) and 0 < p:
        dq2 = torch.empty_like(dq)
        if _bwd_graph(*args, k[:, :p], v[:, :p], (-1, -1), dq2, dk[:, :p], dv[:, :p], True) \
                and _bwd_graph(*args, k[:, p:], v[:, p:], window, dq, dk[:, p:], dv[:, p:],
                               True):
            return dq.add_(dq2), dk, dv
    if _bwd_graph(*args, k, v, window, dq, dk, dv, False):
        return dq, dk, dv
    return _fallback(q, k, v, window).backward(dout, q, k, v, out, lse, softmax_scale=scale,
                                               window_size=window)


def _bwd_graph(dout, q, out, lse_in, scale, k, v, window, dq, dk, dv, probe):
    """Run the backward graph of these operands into ``dq`` / ``dk`` / ``dv`` (any strides);
    False where cuDNN builds none (``probe``: without the fallback's warning)."""
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
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

    built = _cached(key, build, fallback=None) if probe else _cached(key, build)
    if built is None:
        return False
    g, ts = built
    g.execute(dict(zip(ts, (q, k, v, out, dout, lse_in, dq, dk, dv))),
              _workspace(g.get_workspace_size(), q.device), handle=handle)
    return True


# --------------------------------------------------------------------------------------------
# packed variable-length batches (THD): one ragged graph per bucket, the lengths at run time

_MIN_SEQ_BUCKET = 128  # smallest bucketed length (also keeps out cuDNN's refused s_q = s_kv = 1)
_VARLEN_FALLBACK = "the flash varlen op, or the loop over sequences where that cannot serve it"


class GraphRefused(RuntimeError):
    """cuDNN has no engine for a ragged graph (warned once per graph key, with cuDNN's reason)."""


def _pow2(n):
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def bucket_batch(n):
    """Sequences a ragged graph is built for: the next power of two (the extra ones are
    zero-length sequences)."""
    return _pow2(max(n, 1))


def bucket_seqlen(n):
    """Max sequence length a ragged graph is built for: the next power of two, at least 128."""
    return max(_MIN_SEQ_BUCKET, _pow2(n))


def bucket_total(n):
    """Token total a ragged backward graph is built for (cuDNN sizes its workspace by it): ``n``
    rounded up to a multiple of 1/8 of the next power of two (at least 128), so less than
    ``max(n / 4, 128)`` more than ``n`` and at most 8 buckets per doubling."""
    step = max(_MIN_SEQ_BUCKET, _pow2(n) // 8)
    return max(step, -(-int(n) // step) * step)


@dataclass(frozen=True)
class RaggedLayout:
    """What a ragged graph is built for: bucketed sizes, never the exact lengths (those travel
    as tensors when it runs)."""

    batch: int  # number of sequences, bucket_batch
    seq_q: int  # longest query sequence, bucket_seqlen
    seq_k: int  # longest key sequence, bucket_seqlen
    total_q: int  # query tokens, bucket_total (the backward's max_total_seq_len_q)
    total_k: int  # key tokens, bucket_total (the backward's max_total_seq_len_kv)
    bottom_right: bool  # a band mask and some sequence with different q and k lengths


def ragged_layout(num_seqs, max_q, max_k, total_q, total_k, bottom_right):
    """The bucketed :class:`RaggedLayout` of a call."""
    return RaggedLayout(bucket_batch(num_seqs), bucket_seqlen(max_q), bucket_seqlen(max_k),
                        bucket_total(total_q), bucket_total(total_k), bool(bottom_right))


def _call_layout(q, k, cu_q, cu_k, window, max_q, max_k):
    """``(layout, keys_alone, keyless)`` of a call. ``keys_alone``: some sequence has keys but
    no query (cuDNN may leave its dK / dV rows unwritten: they start at zero); ``keyless``: some
    sequence has queries but no key (cuDNN gets its query length as 0; its rows start at out 0,
    lse -inf, dq 0). With tensors and both max lengths given nothing is read back to the host:
    then the band is bottom-right aligned unless ``cu_k is cu_q`` (the same mask where lengths
    agree) and both flags are set."""
    band = any(x is not None for x in band_bounds(window, 1, 1)[1:])
    if isinstance(cu_q, torch.Tensor) and max_q is not None and max_k is not None:
        same, keys_alone, keyless = cu_k is cu_q, True, True
    else:
        lq, lk = seq_lengths(cu_q), seq_lengths(cu_k)
        max_q = max(lq) if max_q is None else max_q
        max_k = max(lk) if max_k is None else max_k
        same = lq == lk
        keys_alone = any(a == 0 < b for a, b in zip(lq, lk))
        keyless = any(b == 0 < a for a, b in zip(lq, lk))
    lay = ragged_layout(len(cu_q) - 1, max_q, max_k, q.shape[0], k.shape[0], band and not same)
    return lay, keys_alone, keyless


def _elems(hq, hkv, d, dv):
    """Elements of one token of each ragged operand, query side (q / dQ, O / dO, stats) and key
    side (K / dK, V / dV): a ragged offset is ``cu_seqlens * elems``."""
    return (hq * d, hq * dv, hq), (hkv * d, hkv * dv)


def ragged_metadata(cu, batch, elems):
    """The run-time tensors of one side (queries or keys) of a ragged graph, from the cumulative
    lengths ``cu`` (int tensor ``[n + 1]``, ``n <= batch``): the sequence lengths (int32
    ``[batch, 1, 1, 1]``, 0 for the padding sequences ``n..batch-1``) and, for each ``e`` in
    ``elems``, the ragged offsets in elements ``cu * e`` (int64 ``[batch + 1, 1, 1, 1]``, the
    padding sequences starting at the end)."""
    n = cu.numel() - 1
    if not 1 <= n <= batch:
        raise ValueError(f"cu_seqlens describes {n} sequences, the graph 1 to {batch}")
    pad = torch.cat([cu.to(torch.int64), cu[-1:].to(torch.int64).expand(batch - n)])
    lens = (pad[1:] - pad[:-1]).to(torch.int32).view(batch, 1, 1, 1)
    return lens, {e: (pad * e).view(batch + 1, 1, 1, 1) for e in elems}


def _host_cu(cu, device):
    """``cu`` as an int64 tensor: on the host when it is there (a list, or a CPU tensor), else
    on ``device`` (already there: nothing is read back)."""
    if isinstance(cu, torch.Tensor):
        return cu.to(torch.int64) if cu.device.type == "cpu" else cu.to(device, torch.int64)
    return torch.tensor(list(cu), dtype=torch.int64)


def _run_tensors(device, cu_q, cu_k, lay, heads):
    """Sequence lengths and ragged offsets of one call, named as in :func:`_ragged_graph`. A
    sequence without keys is given to cuDNN without queries (its rows are the caller's).
    Computed where ``cu_seqlens`` are; from the host they travel in one copy from pinned memory
    that does not wait for the GPU (a copy from pageable memory would make the host wait for
    the stream before every call)."""
    eq, ek = _elems(*heads)
    cq, ck = _host_cu(cu_q, device), _host_cu(cu_k, device)
    lq, oq = ragged_metadata(cq, lay.batch, eq)
    lk, ok = ragged_metadata(ck, lay.batch, ek)
    data = {"seq_q": lq.masked_fill(lk == 0, 0), "seq_k": lk}
    data.update({f"off_q{e}": t for e, t in oq.items()})
    data.update({f"off_k{e}": t for e, t in ok.items()})
    if cq.device.type == "cpu" and ck.device.type == "cpu" and device.type != "cpu":
        data = _to_device(data, device)
    return data


def _to_device(data, device):
    """The host tensors of ``data`` on ``device`` in one non-blocking copy (int64 on the way,
    each back to its dtype there)."""
    names = list(data)
    flat = host_to_device(torch.cat([data[n].reshape(-1).to(torch.int64) for n in names]),
                          device)
    out, at = {}, 0
    for n in names:
        t = data[n]
        out[n] = flat[at:at + t.numel()].view(t.shape).to(t.dtype)
        at += t.numel()
    return out


def _thd(b, s, h, d):
    """cuDNN dims / strides ``[B, H, S, D]`` of a packed contiguous THD tensor ``[T, H, D]``
    (the batch stride is unused: the ragged offsets place each sequence)."""
    return [b, h, s, d], [s * h * d, d, h * d, 1]


def _ragged_graph(dt, handle, lay, heads):
    """A new graph with the run-time tensors: lengths (``seq_q`` / ``seq_k``) and ragged offsets
    (``off_q<elems>`` / ``off_k<elems>``)."""
    g = _new_graph(dt, handle)
    i32, i64, one = cudnn.data_type.INT32, cudnn.data_type.INT64, [1, 1, 1, 1]
    ts = {n: g.tensor(name=n, dim=[lay.batch, 1, 1, 1], stride=one, data_type=i32)
          for n in ("seq_q", "seq_k")}
    for side, es in zip("qk", _elems(*heads)):
        for e in es:
            ts[f"off_{side}{e}"] = g.tensor(name=f"off_{side}{e}", dim=[lay.batch + 1, 1, 1, 1],
                                            stride=one, data_type=i64)
    return g, ts


def _ragged_io(g, ts, lay, name, side, h, d, dt, t=None):
    """Declare ragged operand ``name`` (``[T, h, d]`` on the ``side`` "q" or "k"): an input, or
    the output ``t`` of a node."""
    dim, stride = _thd(lay.batch, lay.seq_q if side == "q" else lay.seq_k, h, d)
    if t is None:
        t = g.tensor(name=name, dim=dim, stride=stride, data_type=dt)
    else:
        t.set_output(True).set_dim(dim).set_stride(stride).set_data_type(dt)
    t.set_ragged_offset(ts[f"off_{side}{h * d}"])
    ts[name] = t
    return t


def _varlen_mask(window, lay):
    _, lb, rb = band_bounds(window, 1, 1)
    return dict(_band_kwargs(lay.bottom_right, lb, rb), use_padding_mask=True)


def _build_varlen_fwd(dt, handle, lay, heads, scale, window):
    hq, hkv, d, dv = heads
    g, ts = _ragged_graph(dt, handle, lay, heads)
    q, k, v = (_ragged_io(g, ts, lay, n, side, h, dd, dt) for n, side, h, dd in (
        ("q", "q", hq, d), ("k", "k", hkv, d), ("v", "k", hkv, dv)))
    o, st = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, attn_scale=scale,
                   seq_len_q=ts["seq_q"], seq_len_kv=ts["seq_k"], **_varlen_mask(window, lay))
    _ragged_io(g, ts, lay, "o", "q", hq, dv, dt, o)
    _ragged_io(g, ts, lay, "stats", "q", hq, 1, cudnn.data_type.FLOAT, st)
    return _finish(g), ts


def _build_varlen_bwd(dt, handle, lay, heads, scale, window):
    hq, hkv, d, dv = heads
    g, ts = _ragged_graph(dt, handle, lay, heads)
    ins = [_ragged_io(g, ts, lay, n, side, h, dd, dt) for n, side, h, dd in (
        ("q", "q", hq, d), ("k", "k", hkv, d), ("v", "k", hkv, dv), ("o", "q", hq, dv),
        ("dO", "q", hq, dv))]
    st = _ragged_io(g, ts, lay, "stats", "q", hq, 1, cudnn.data_type.FLOAT)
    grads = g.sdpa_backward(name="sdpa_backward", q=ins[0], k=ins[1], v=ins[2], o=ins[3],
                            dO=ins[4], stats=st, attn_scale=scale, seq_len_q=ts["seq_q"],
                            seq_len_kv=ts["seq_k"], max_total_seq_len_q=lay.total_q,
                            max_total_seq_len_kv=lay.total_k, **_varlen_mask(window, lay))
    for t, (n, side, h, dd) in zip(grads, (("dq", "q", hq, d), ("dk", "k", hkv, d),
                                           ("dv", "k", hkv, dv))):
        _ragged_io(g, ts, lay, n, side, h, dd, dt, t)
    return _finish(g), ts


def varlen_key(kind, dtype, device, scale, window, heads, lay):
    """The cache key of a ragged graph: no exact length in it, only the bucketed layout (the
    forward's without the token totals, which only the backward's workspace depends on). The
    strides are those of contiguous THD tensors, fixed by ``heads = (Hq, Hkv, D, Dv)``."""
    if kind == "varlen fwd":
        lay = replace(lay, total_q=0, total_k=0)
    return (kind, dtype, device.index, float(scale), tuple(window), tuple(heads), lay)


def varlen_supports(q, k, v, lens_q, lens_k, window, needs_dlse=False):
    """Why the ragged graphs cannot serve a varlen call (None: they can). ``lens_q`` / ``lens_k``
    are the sequence lengths. A query row that sees none of its sequence's keys (``Sq > Sk``
    causal) is not served: cuDNN does not document its output there. Sequences without any key
    are (cuDNN skips them, their rows are set here)."""
    if cudnn is None:
        return MISSING
    reason = cuda_limits(Request(q, k, v, window[1] == 0, tuple(window), needs_dlse),
                         (torch.float16, torch.bfloat16), max_head_dim=128)
    if reason is not None:
        return reason
    if any(a and b and may_have_empty_rows(a, b, window) for a, b in zip(lens_q, lens_k)):
        return "a query row sees no key of its sequence"
    return None


def _check_varlen(q, k, v, cu_q, cu_k):
    if cudnn is None:
        raise ValueError(f"the cudnn backend is not available: {MISSING}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f"{name} must be a packed [T, H, D] tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float16 or bfloat16 for cuDNN, got {q.dtype}")
    if len(cu_q) != len(cu_k) or len(cu_q) < 2:
        raise ValueError(f"cu_seqlens_q ({len(cu_q)} entries) and cu_seqlens_k ({len(cu_k)}) "
                         "must describe the same sequences, at least one")


def _run(kind, build, q, cu_q, cu_k, lay, heads, scale, window, tensors):
    """Build (or take from the cache) and execute one ragged graph on ``tensors``."""
    handle = _handle(q.device)
    key = varlen_key(kind, q.dtype, q.device, scale, window, heads, lay)
    built = _cached(key, lambda: build(_DTYPES[q.dtype], handle, lay, heads, float(scale),
                                       tuple(window)), fallback=_VARLEN_FALLBACK)
    if built is None:
        raise GraphRefused(f"cuDNN has no engine for this {kind} graph (see the warning)")
    g, ts = built
    data = dict(_run_tensors(q.device, cu_q, cu_k, lay, heads), **tensors)
    g.execute({ts[n]: data[n] for n in ts}, _workspace(g.get_workspace_size(), q.device),
              handle=handle)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale, window_size,
                   max_seqlen_q=None, max_seqlen_k=None):
    """Packed varlen forward on one ragged cuDNN graph: ``(out [Tq, Hq, Dv], lse [Hq, Tq]
    float32)``. ``cu_seqlens_*``: int tensors or lists ``[num_seqs + 1]``; ``window_size``
    with ``causal`` folded in. Raises :class:`GraphRefused` when cuDNN has no engine for it."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
    q, k, v = (x.contiguous() for x in (q, k, v))
    lay, _, keyless = _call_layout(q, k, cu_seqlens_q, cu_seqlens_k, window_size, max_seqlen_q,
                                   max_seqlen_k)
    heads = (q.shape[1], k.shape[1], q.shape[2], v.shape[2])
    out = q.new_empty(q.shape[0], heads[0], heads[3])
    stats = torch.empty(q.shape[0], heads[0], dtype=torch.float32, device=q.device)
    if keyless:  # rows of sequences without keys: cuDNN does not write them
        out.zero_()
        stats.fill_(float("-inf"))
    _run("varlen fwd", _build_varlen_fwd, q, cu_seqlens_q, cu_seqlens_k, lay, heads,
         softmax_scale, window_size, {"q": q, "k": k, "v": v, "o": out, "stats": stats})
    return out, stats.t().contiguous()


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, softmax_scale,
                    window_size, max_seqlen_q=None, max_seqlen_k=None):
    """Gradients ``(dq, dk, dv)`` of :func:`varlen_forward` given the final ``out`` and ``lse``
    (``[Hq, Tq]``), on one ragged cuDNN graph. Raises :class:`GraphRefused` as the forward."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if tuple(lse.shape) != (q.shape[1], q.shape[0]):
        raise ValueError(f"lse must be [Hq, Tq] = {(q.shape[1], q.shape[0])}, "
                         f"got {tuple(lse.shape)}")
    q, k, v = (x.contiguous() for x in (q, k, v))
    out, dout = (x.to(q.dtype).contiguous() for x in (out, dout))
    lay, keys_alone, keyless = _call_layout(q, k, cu_seqlens_q, cu_seqlens_k, window_size,
                                            max_seqlen_q, max_seqlen_k)
    heads = (q.shape[1], k.shape[1], q.shape[2], v.shape[2])
    dq = (torch.zeros_like if keyless else torch.empty_like)(q)
    dk, dv = ((torch.zeros_like if keys_alone else torch.empty_like)(x) for x in (k, v))
    _run("varlen bwd", _build_varlen_bwd, q, cu_seqlens_q, cu_seqlens_k, lay, heads,
         softmax_scale, window_size, {"q": q, "k": k, "v": v, "o": out, "dO": dout,
                                      "stats": lse.float().t().contiguous(), "dq": dq,
                                      "dk": dk, "dv": dv})
    return dq, dk, dv


BACKEND = Backend(forward=forward, backward=backward, supports=supports, writes_out=True)
