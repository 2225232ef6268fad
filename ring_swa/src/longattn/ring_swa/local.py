"""The local (diagonal) step of one rank: sliding window plus sinks on the rank's own tokens.

Dense BSHD: one sequence per batch row whose first ``num_sink_tokens`` local keys are sinks.
Varlen THD: the local sequence pieces, each with its own sink count (the first piece may be the
tail of a sequence that started on an earlier rank: then it has fewer or no local sinks).

``window_size`` is flash-attn's causal pair ``(left, 0)`` (``left = -1``: unbounded). Sinks are
split off the keys: the window part runs on ``k[ns:]`` (dropping leading keys keeps the
bottom-right alignment, so the window is unchanged), the sink part on ``k[:ns]`` with the causal
rule ``key j <= query i`` written as the window ``(-1, S - ns)``; the two partials are merged
with :func:`longattn.common.merge.merge_partials_` into an ``out`` accumulator in
:func:`~longattn.common.dtypes.acc_dtype` and an ``lse`` in
:func:`~longattn.common.dtypes.lse_dtype` (float64 for float32 inputs: a float32 ``lse`` near
1e4 would cost the merge ~1e-4 of relative accuracy). Every ``lse`` returned here is in
``lse_dtype``. Window calls go through
:mod:`longattn.common.kernels` (``backend`` picks the kernel; ``"auto"`` takes cuDNN's native
window through cudnn-frontend when it is installed, else the ``"band"`` decomposition into
dense cuDNN calls, on CUDA).
"""

from __future__ import annotations

import torch

from longattn.common.dtypes import acc_dtype, lse_dtype
from longattn.common.kernels import attention_backward, attention_forward
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
from longattn.common.merge import merge_partials_


def dense_forward(q, k, v, *, softmax_scale, window_size, num_sink_tokens=0, backend="auto"):
    """Causal window ``window_size = (left, 0)`` plus the first ``num_sink_tokens`` keys,
    Sq == Sk. Returns ``(out in q.dtype, lse in lse_dtype)``."""
    s = k.shape[1]
    ns = min(num_sink_tokens, s)
    kw = dict(softmax_scale=softmax_scale, backend=backend)
    ldt = lse_dtype(q.dtype)
    if ns == 0:
        out, lse = attention_forward(q, k, v, causal=True, window_size=window_size, **kw)
        return out, lse.to(ldt)
    o_s, l_s = attention_forward(q, k[:, :ns].contiguous(), v[:, :ns].contiguous(),
                                 window_size=(-1, s - ns), **kw)
    if ns == s:
        return o_s, l_s.to(ldt)
    kw_, vw = k[:, ns:].contiguous(), v[:, ns:].contiguous()
    o_w, l_w = attention_forward(q, kw_, vw, causal=True, window_size=window_size, **kw)
    # the kernel's fresh tensors, merged in place; eager torch as before for every dtype
    out, lse = o_w.to(acc_dtype(q.dtype)), l_w.to(ldt)
    merge_partials_(out, lse, o_s, l_s, backend="torch")
    return out.to(q.dtype), lse


def dense_backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, num_sink_tokens=0,
                   backend="auto"):
    """Gradients of :func:`dense_forward` given the final ``out`` / ``lse``."""
    s = k.shape[1]
    ns = min(num_sink_tokens, s)
    kw = dict(softmax_scale=softmax_scale, backend=backend)
    if ns == 0:
        return attention_backward(dout, q, k, v, out, lse, causal=True, window_size=window_size,
                                  **kw)
    dq, dk_s, dv_s = attention_backward(dout, q, k[:, :ns].contiguous(), v[:, :ns].contiguous(),
                                        out, lse, window_size=(-1, s - ns), **kw)
    if ns == s:
        return dq, dk_s, dv_s
    kw_, vw = k[:, ns:].contiguous(), v[:, ns:].contiguous()
    dq_w, dk_w, dv_w = attention_backward(dout, q, kw_, vw, out, lse, causal=True,
                                          window_size=window_size, **kw)
    acc = acc_dtype(q.dtype)
    dq = (dq.to(acc) + dq_w.to(acc)).to(q.dtype)
    return dq, torch.cat([dk_s, dk_w], dim=1), torch.cat([dv_s, dv_w], dim=1)


def varlen_forward(q, k, v, local_cu, local_sinks, *, softmax_scale, window_size,
                   backend="auto"):
    """q/k/v ``[1, T, H, D]`` (the packed local tokens) -> ``[1, T, H, Dv]``, ``[1, H, T]``
    (``lse`` in lse_dtype)."""
    cu = torch.tensor(local_cu, dtype=torch.int32)
    out, lse = attention_forward_varlen(q[0], k[0], v[0], cu, cu, softmax_scale=softmax_scale,
                                        causal=True, window_size=window_size,
                                        num_sink_tokens=list(local_sinks), backend=backend)
    return out[None], lse.to(lse_dtype(q.dtype))[None]


def varlen_backward(dout, q, k, v, out, lse, local_cu, local_sinks, *, softmax_scale,
                    window_size, backend="auto"):
    """Gradients of :func:`varlen_forward` given the final ``out`` / ``lse``."""
    cu = torch.tensor(local_cu, dtype=torch.int32)
    g = attention_backward_varlen(dout[0], q[0], k[0], v[0], out[0], lse[0], cu, cu,
                                  softmax_scale=softmax_scale, causal=True,
                                  window_size=window_size, num_sink_tokens=list(local_sinks),
                                  backend=backend)
    return tuple(t[None] for t in g)
