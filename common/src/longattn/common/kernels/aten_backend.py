"""CUDA backend on PyTorch's lse-returning attention ops (no extra packages).

* Dense, no window (causal only with ``Sq == Sk``): cuDNN,
  ``aten::_scaled_dot_product_cudnn_attention`` and its backward (on an H100 with torch 2.11,
  as fast as ``F.scaled_dot_product_attention`` with the cuDNN backend:
  ``common/bench/results/bench_kernels.json``). GQA: cuDNN is called with the
  KV heads expanded locally (after any communication, which always moves ``Hkv`` heads); the
  KV-head gradients are summed back over each group.
* Windows, and causal with ``Sq != Sk`` (bottom-right): FlashAttention-2,
  ``aten::_flash_attention_forward`` / ``_flash_attention_backward`` with
  ``window_size_left/right``; native GQA.

The backward takes the final merged ``out``/``lse`` (ring rule): both ops recompute P from the
given lse and use ``out`` only through ``rowsum(dout * out)``. Neither takes ``dlse``, so
requests that need it go to another backend. Rows with no visible key: these kernels return an
lse of ``-inf`` (cuDNN) or ``+inf`` (flash); both are normalised to ``-inf`` with ``out = 0``.
"""

from __future__ import annotations

import torch

from longattn.common.kernels import Backend, cuda_limits, fix_empty_rows, may_have_empty_rows

_HALF = (torch.float16, torch.bfloat16)


def _uses_cudnn(req_q, req_k, window) -> bool:
    left, right = window
    sq, sk = req_q.shape[1], req_k.shape[1]
    if left != -1:
        return False
    if right == -1:
        return req_q.shape[-1] <= 128
    return right == 0 and sq == sk and req_q.shape[-1] <= 128


def supports(req):
    reason = cuda_limits(req, _HALF, max_head_dim=256)
    if reason is not None:
        return reason
    q = req.q
    if not _uses_cudnn(q, req.k, req.window_size) and not hasattr(torch.ops.aten,
                                                              "_flash_attention_forward"):
        return "windows need aten._flash_attention_forward"
    return None


def _bhsd(t):
    return t.transpose(1, 2)


def _expand_heads(t, g):
    return t if g == 1 else t.repeat_interleave(g, dim=2)


def forward(q, k, v, *, softmax_scale, window_size):
    scale, window = softmax_scale, window_size
    g = q.shape[2] // k.shape[2]
    if k.shape[1] == 0:
        b, sq, h, _ = q.shape
        return (q.new_zeros(b, sq, h, v.shape[-1]),
                torch.full((b, h, sq), float("-inf"), device=q.device))
    left, right = window
    if _uses_cudnn(q, k, window):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            _bhsd(q), _bhsd(_expand_heads(k, g)), _bhsd(_expand_heads(v, g)), None, True, 0.0,
            right == 0, False, scale=scale)
        out, lse = res[0].transpose(1, 2), res[1]
        return out, (lse.squeeze(-1) if lse.dim() == 4 else lse).float()
    sq, sk = q.shape[1], k.shape[1]
    res = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, sq, sk, 0.0, False, False, scale=scale,
        window_size_left=left, window_size_right=right)
    out, lse = res[0], res[1][:, :, :sq].float()
    return fix_empty_rows(out, lse) if may_have_empty_rows(sq, sk, window) else (out, lse)


def _cudnn_backward(dout, q, k, v, out, lse, scale, causal):
    sq, sk = q.shape[1], k.shape[1]
    empty = torch.empty(0, device=q.device)  # philox seed/offset: unused without dropout
    res = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.unsqueeze(-1).contiguous(),
        empty, empty, None, None, None, sq, sk, 0.0, causal, scale=scale)
    return [t.transpose(1, 2) for t in res]


def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None):
    scale, window = softmax_scale, window_size
    if dlse is not None:
        raise ValueError("the aten backend cannot take dlse")
    g = q.shape[2] // k.shape[2]
    left, right = window
    if k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lse_in = lse.float()
    if may_have_empty_rows(q.shape[1], k.shape[1], window):
        # An lse of +inf gives p = exp(s - lse) = 0 for rows that saw nothing: zero gradient.
        lse_in = lse_in.masked_fill(torch.isneginf(lse_in), float("inf"))
    out = out.to(q.dtype)
    dout = dout.to(q.dtype)
    if _uses_cudnn(q, k, window):
        ke, ve = _expand_heads(k, g), _expand_heads(v, g)
        dq, dk, dv = _cudnn_backward(dout, q, ke, ve, out, lse_in, scale, right == 0)
        if g > 1:
            b, sk, _, d = k.shape
            dk = dk.reshape(b, sk, k.shape[2], g, d).sum(3)
            dv = dv.reshape(b, sk, k.shape[2], g, v.shape[-1]).sum(3)
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    sq, sk = q.shape[1], k.shape[1]
    rng = torch.zeros(2, dtype=torch.int64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse_in.contiguous(), None, None, sq, sk, 0.0, False, rng, unused,
        scale=scale, window_size_left=left, window_size_right=right)
    return dq, dk, dv


BACKEND = Backend(forward=forward, backward=backward, supports=supports)
