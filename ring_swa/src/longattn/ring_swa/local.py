"""The local (diagonal) step of one rank: sliding window plus sinks on the rank's own tokens.

Dense BSHD: one sequence per batch row whose first ``num_sink_tokens`` local keys are sinks.
Varlen THD: the local sequence pieces, each with its own sink count (the first piece may be the
tail of a sequence that started on an earlier rank: then it has fewer or no local sinks).

Sinks are split off the keys: the window part runs on ``k[ns:]`` (dropping leading keys keeps
the bottom-right alignment, so the window is unchanged), the sink part on ``k[:ns]`` with the
causal rule ``key j <= query i`` written as the window ``(-1, S - ns)``; the two partials are
merged with ``merge_partials``. Window calls go through :mod:`longattn.common.kernels`
(``backend`` picks the kernel; ``"auto"`` takes cuDNN's native window through cudnn-frontend when
it is installed, else the ``"band"`` decomposition into dense cuDNN calls, on CUDA).
"""

from __future__ import annotations

import torch

from longattn.common.kernels import attention_backward, attention_forward
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
from longattn.common.merge import merge_partials


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_forward(q, k, v, *, scale, window_size, num_sink_tokens=0, backend="auto"):
    """Causal window ``(w, 0)`` plus the first ``num_sink_tokens`` keys, Sq == Sk."""
    s = k.shape[1]
    ns = min(num_sink_tokens, s)
    win = (window_size, 0)
    if ns == 0:
        return attention_forward(q, k, v, scale=scale, causal=True, window=win,
                                 backend=backend)
    o_s, l_s = attention_forward(q, k[:, :ns].contiguous(), v[:, :ns].contiguous(), scale=scale,
                                 window=(-1, s - ns), backend=backend)
    if ns == s:
        return o_s, l_s
    kw, vw = k[:, ns:].contiguous(), v[:, ns:].contiguous()
    o_w, l_w = attention_forward(q, kw, vw, scale=scale, causal=True, window=win,
                                 backend=backend)
    out, lse = merge_partials(o_w, l_w, o_s, l_s)
    return out.to(q.dtype), lse


def dense_backward(dout, q, k, v, out, lse, *, scale, window_size, num_sink_tokens=0,
                   backend="auto"):
    s = k.shape[1]
    ns = min(num_sink_tokens, s)
    win = (window_size, 0)
    if ns == 0:
        return attention_backward(dout, q, k, v, out, lse, scale=scale, causal=True, window=win,
                                  backend=backend)
    dq, dk_s, dv_s = attention_backward(dout, q, k[:, :ns].contiguous(), v[:, :ns].contiguous(),
                                        out, lse, scale=scale, window=(-1, s - ns),
                                        backend=backend)
    if ns == s:
        return dq, dk_s, dv_s
    kw, vw = k[:, ns:].contiguous(), v[:, ns:].contiguous()
    dq_w, dk_w, dv_w = attention_backward(dout, q, kw, vw, out, lse, scale=scale, causal=True,
                                          window=win,
                                          backend=backend)
    acc = _acc(q.dtype)
    dq = (dq.to(acc) + dq_w.to(acc)).to(q.dtype)
    return dq, torch.cat([dk_s, dk_w], dim=1), torch.cat([dv_s, dv_w], dim=1)


def varlen_forward(q, k, v, local_cu, local_sinks, *, scale, window_size, backend="auto"):
    """q/k/v ``[1, T, H, D]`` (the packed local tokens) -> ``[1, T, H, Dv]``, ``[1, H, T]``."""
    cu = torch.tensor(local_cu, dtype=torch.int32)
    out, lse = attention_forward_varlen(q[0], k[0], v[0], cu, cu, scale=scale, causal=True,
                                        window=(window_size, 0),
                                        num_sink_tokens=list(local_sinks), backend=backend)
    return out[None], lse[None]


def varlen_backward(dout, q, k, v, out, lse, local_cu, local_sinks, *, scale, window_size,
                    backend="auto"):
    cu = torch.tensor(local_cu, dtype=torch.int32)
    g = attention_backward_varlen(dout[0], q[0], k[0], v[0], out[0], lse[0], cu, cu,
                                  scale=scale, causal=True, window=(window_size, 0),
                                  num_sink_tokens=list(local_sinks), backend=backend)
    return tuple(t[None] for t in g)
