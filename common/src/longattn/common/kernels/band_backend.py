"""Causal sliding window from dense cuDNN calls on chunk pairs: the ``"band"`` backend (CUDA).

Window ``(W, 0)`` with ``Sq == Sk == S`` (query i sees keys ``[i - W, i]``). Cut the sequence
into ``S / c`` chunks of ``c = W / SPLIT`` tokens; query chunk t then sees

* ``diag``: its own chunk, causally                          -> cuDNN causal;
* ``full``: chunks ``t - 1 .. t - SPLIT + 1`` entirely         -> cuDNN without mask;
* ``anti``: chunk ``t - SPLIT`` where key b >= query a          -> the "anti-causal" triangle:
  ``ANTI = "flip"`` runs cuDNN causal on both chunks reversed in time (b >= a becomes
  b' <= a'), ``ANTI = "flash"`` runs FlashAttention-2 with the window ``(0, -1)``.

That is exactly the band (4 S W H D useful flops, half-tiles skipped by the causal kernels).
Every piece is ONE call with the chunks as the batch dimension (views of q/k/v, no copies for
B = 1; "flip" copies q/k/v once). cuDNN only has an upper-bound (causal) mask, and the lower
edge of a band always needs a lower bound: hence the flip or the flash call for that triangle.

The partials are merged by one fused Triton kernel (one read of each partial, one write; it
reads the reversed ``anti`` partial in place) when Triton is available, else with
:func:`longattn.common.merge.merge_partials_`. Backward: the same pieces with the final
``out`` / ``lse`` (the cuDNN / flash backward ops), gradients summed in the input dtype.

Registered as backend ``"band"``; ``auto`` tries it after ``cudnn`` (cuDNN's native window,
when cudnn-frontend is installed: 536 TFLOP/s forward at S=131072, W=4096 on an H100) and
before ``aten`` for the requests it supports (CUDA, half precision, causal windows that split
into chunks of >= MIN_CHUNK tokens): 415 TFLOP/s there against 288 for the FlashAttention-2
window and 411 for FlexAttention (ring_swa/README.md).
``PIECE_BACKEND`` / ``MERGE`` let the CPU tests run the same
decomposition with the torch backend.
"""

from __future__ import annotations

import torch

from longattn.common import _transition
from longattn.common.kernels import (
    BACKENDS,
    Backend,
    attention_backward,
    attention_forward,
    register_backend,
)
from longattn.common.merge import merge_partials_

SPLIT = 1  # chunks per window: 1 (diag + anti) or 2 (diag + full + anti)
ANTI = "flip"  # "flip" (cuDNN causal on reversed chunks) or "flash" (FA2 window (0, -1))
MIN_CHUNK = 128
PIECE_BACKEND = "aten"
MERGE = "auto"  # "auto": Triton on CUDA, torch otherwise; "torch"; "triton"

_HALF = (torch.float16, torch.bfloat16)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def geometry(s_q, s_k, window, split=None):
    """``(chunk, num_chunks)`` for this call, or None when the decomposition does not apply."""
    split = SPLIT if split is None else split
    left, right = window
    if right != 0 or left < 1 or s_q != s_k or left % split:
        return None
    c = left // split
    if c < MIN_CHUNK or s_q % c or s_q // c <= split:
        return None
    return c, s_q // c


def supports(req):
    q = req.q
    if q.device.type != "cuda":
        return "needs CUDA tensors"
    piece = BACKENDS.get(PIECE_BACKEND)
    if piece is None:
        return f"needs the {PIECE_BACKEND!r} backend"
    reason = piece.supports(req)  # dtype, dlse and head_dim rules of the kernels it calls
    if reason is not None:
        return f"its {PIECE_BACKEND!r} pieces: {reason}"
    if q.shape[-1] > 128:
        return f"head_dim {q.shape[-1]} must be <= 128 (cuDNN pieces)"
    if geometry(q.shape[1], req.k.shape[1], req.window_size) is None:
        return (f"window_size {req.window_size} with S={q.shape[1]} does not split into chunks of "
                f"W/{SPLIT} >= {MIN_CHUNK} tokens")
    return None


def _flat(x):
    return x.reshape(-1, *x.shape[2:])


def _pieces(qc, kc, vc, split, anti):
    """(name, query chunk offset j, q, k, v, causal, window, flipped) of every piece."""
    nc = qc.shape[1]
    out = [("diag", 0, qc, kc, vc, True, (-1, -1), False)]
    for j in range(1, split):
        out.append(("full", j, qc[:, j:], kc[:, :nc - j], vc[:, :nc - j], False, (-1, -1),
                    False))
    m = split
    qa, ka, va = qc[:, m:], kc[:, :nc - m], vc[:, :nc - m]
    if anti == "flip":
        out.append(("anti", m, qa, ka, va, True, (-1, -1), True))
    elif anti == "flash":
        out.append(("anti", m, qa, ka, va, False, (0, -1), False))
    else:
        raise ValueError(f"anti must be 'flip' or 'flash', got {anti!r}")
    return out


def _prep(x, flipped):
    return _flat(x.flip(2) if flipped else x).contiguous()


@_transition.renamed(**_transition.ATTENTION)  # TRANSITION
def forward(q, k, v, *, softmax_scale, window_size, split=None, anti=None, merge=None,
            backend=None):
    scale, window = softmax_scale, window_size
    split = SPLIT if split is None else split
    anti = ANTI if anti is None else anti
    backend = PIECE_BACKEND if backend is None else backend
    c, nc = geometry(q.shape[1], k.shape[1], window, split)
    b, s, h, d = q.shape
    qc, kc, vc = (x.reshape(b, nc, c, *x.shape[2:]) for x in (q, k, v))
    parts = []
    for _, j, qp, kp, vp, causal, win, flipped in _pieces(qc, kc, vc, split, anti):
        o, lse = attention_forward(_prep(qp, flipped), _prep(kp, flipped), _prep(vp, flipped),
                                   softmax_scale=scale, causal=causal, window_size=win,
                                   backend=backend)
        parts.append((o, lse, j, flipped))
    merge = MERGE if merge is None else merge
    if merge == "triton" or (merge == "auto" and q.is_cuda and _triton_ok(q, v)):
        return _merge_triton(parts, b, nc, c, h, v.shape[-1], q.dtype)
    return _merge_torch(parts, b, nc, c, h, v.shape[-1], q.dtype)


@_transition.renamed(**_transition.ATTENTION)  # TRANSITION
def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None, split=None,
             anti=None, backend=None):
    scale, window = softmax_scale, window_size
    if dlse is not None:
        raise ValueError("the band backend cannot take dlse")
    split = SPLIT if split is None else split
    anti = ANTI if anti is None else anti
    backend = PIECE_BACKEND if backend is None else backend
    c, nc = geometry(q.shape[1], k.shape[1], window, split)
    b, s, h, d = q.shape
    qc, kc, vc, doc, oc = (x.reshape(b, nc, c, *x.shape[2:]) for x in (q, k, v, dout, out))
    lc = lse.reshape(b, h, nc, c).permute(0, 2, 1, 3)  # [B, nc, H, c]
    grads = None
    for _, j, qp, kp, vp, causal, win, flipped in _pieces(qc, kc, vc, split, anti):
        lp = lc[:, j:]
        if flipped:
            lp = lp.flip(3)
        g = attention_backward(_prep(doc[:, j:], flipped), _prep(qp, flipped),
                               _prep(kp, flipped), _prep(vp, flipped), _prep(oc[:, j:], flipped),
                               _flat(lp).contiguous(), softmax_scale=scale, causal=causal,
                               window_size=win, backend=backend)
        g = [x.view(b, -1, c, *x.shape[2:]) for x in g]
        if flipped:
            g = [x.flip(2) for x in g]
        if grads is None:  # diag: every chunk
            grads = g
            continue
        grads[0][:, j:] += g[0]
        grads[1][:, :nc - j] += g[1]
        grads[2][:, :nc - j] += g[2]
    dq, dk, dv = (x.reshape(b, s, *x.shape[3:]) for x in grads)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# merging the partials


def _merge_torch(parts, b, nc, c, h, dv, dtype):
    acc = _acc(dtype)
    o0, l0 = parts[0][:2]
    out = o0.to(acc).reshape(b, nc, c, h, dv).clone()
    lse = l0.to(acc).reshape(b, nc, h, c).clone()
    for o, lp, j, flipped in parts[1:]:
        o, lp = o.reshape(b, nc - j, c, h, dv), lp.reshape(b, nc - j, h, c)
        if flipped:
            o, lp = o.flip(2), lp.flip(3)
        for i in range(b):  # out[i, j:] is a [chunks, c, H, Dv] view: merge in place
            merge_partials_(out[i, j:], lse[i, j:], o[i], lp[i])
    return (out.reshape(b, nc * c, h, dv).to(dtype),
            lse.permute(0, 2, 1, 3).reshape(b, h, nc * c))


def _triton_ok(q, v):
    try:
        import triton  # noqa: F401
    except ImportError:  # CPU images without triton
        return False
    return q.dtype in _HALF and v.shape[-1] in (16, 32, 64, 128, 256)


def _merge_triton(parts, b, nc, c, h, dv, dtype, block=64):
    from longattn.common.kernels.band_merge_triton import _merge_triton as merge

    return merge(parts, b, nc, c, h, dv, dtype, block=block)


register_backend("band", Backend(forward=forward, backward=backward, supports=supports))
