"""Causal sliding window from dense cuDNN calls on chunk pairs: the ``"band"`` backend (CUDA).

Window ``(W, 0)`` with ``Sq == Sk == S`` (query i sees keys ``[i - W, i]``). Cut the sequence
into ``S / c`` chunks of ``c = W / split`` tokens; query chunk t then sees

* ``diag``: its own chunk, causally                          -> cuDNN causal;
* ``full``: chunks ``t - 1 .. t - split + 1`` entirely         -> cuDNN without mask;
* ``anti``: chunk ``t - split`` where key b >= query a          -> the "anti-causal" triangle:
  ``anti="flip"`` runs cuDNN causal on both chunks reversed in time (b >= a becomes
  b' <= a'), ``anti="flash"`` runs FlashAttention-2 with the window ``(0, -1)``.

That is exactly the band (4 S W H D useful flops, half-tiles skipped by the causal kernels).
Every piece is ONE call with the chunks as the batch dimension (views of q/k/v, no copies for
B = 1; "flip" copies q/k/v once). cuDNN only has an upper-bound (causal) mask, and the lower
edge of a band always needs a lower bound: hence the flip or the flash call for that triangle.

The partials are merged by one fused Triton kernel
(:func:`longattn.common.kernels.band_merge_triton.merge`: one read of each partial, one write;
it reads the reversed ``anti`` partial in place) on CUDA, else by its slow twin
:func:`_merge_torch` (:func:`longattn.common.merge.merge_partials_` per partial). Backward: the
same pieces with the final ``out`` / ``lse`` (the cuDNN / flash backward ops), gradients summed
in the input dtype.

The knobs are one :class:`BandConfig`, passed as ``config=`` to the kernels' entry points
(``attention_forward(..., config=BandConfig(split=2))``). Its ``piece_backend`` / ``merge``
fields let the CPU tests run the same decomposition with the torch backend.

Backend ``"band"``; ``auto`` tries it after ``cudnn`` and before ``aten`` for the requests it
supports (CUDA, half precision, causal windows that split into chunks of at least
``min_chunk`` tokens). Measured on an H100 at S = 131072, W = 4096, H = 32, D = 128, bf16
(``ring_swa/bench/results/bench_ring_swa.json``, 2026-11-23): forward 415 TFLOP/s against 288
for the FlashAttention-2 window, 411 for FlexAttention and 536 for cuDNN's native window.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from longattn.common.checks import config_or_default
from longattn.common.dtypes import acc_dtype
from longattn.common.kernels import Backend, attention_backward, attention_forward
from longattn.common.merge import merge_partials_

_HALF = (torch.float16, torch.bfloat16)
_ANTI = ("flip", "flash")
_MERGE = ("auto", "torch", "triton")


@dataclass(frozen=True)
class BandConfig:
    """The band backend's knobs (``config=`` of the kernels' entry points).

    * ``split``: chunks per window, 1 (diag + anti pieces) or more (diag + ``split - 1`` full
      + anti). Default 1: on the H100 (``ring_swa/bench/results/bench_ring_swa.json``) split 1
      with ``anti="flip"`` ran the forward in 21.20 ms and forward+backward in 82.45 ms, split
      2 with ``"flash"`` in 22.47 / 86.75 ms.
    * ``anti``: the anti-causal triangle as cuDNN causal on reversed chunks (``"flip"``) or as
      FlashAttention-2 with the window ``(0, -1)`` (``"flash"``). Default ``"flip"`` (above).
    * ``min_chunk``: the smallest chunk (``W / split`` tokens) the backend takes; shorter
      chunks make many small kernel calls. Not measured: a floor, not a tuned value.
    * ``piece_backend``: the backend that runs the pieces (``"aten"``: PyTorch's cuDNN and flash
      ops; ``"torch"`` for the CPU tests).
    * ``merge``: ``"auto"`` (the fused Triton merge on CUDA for fp16 / bf16 with a power-of-two
      head dim, else the torch merge), ``"torch"`` or ``"triton"``.
    """

    split: int = 1
    anti: str = "flip"
    min_chunk: int = 128
    piece_backend: str = "aten"
    merge: str = "auto"

    def __post_init__(self):
        for name in ("split", "min_chunk"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"BandConfig.{name} must be an int >= 1, got {x!r}")
        if self.anti not in _ANTI:
            raise ValueError(f"BandConfig.anti must be one of {_ANTI}, got {self.anti!r}")
        if not isinstance(self.piece_backend, str) or self.piece_backend in ("auto", "band"):
            raise ValueError("BandConfig.piece_backend must name a backend other than 'auto' "
                             f"and 'band', got {self.piece_backend!r}")
        if self.merge not in _MERGE:
            raise ValueError(f"BandConfig.merge must be one of {_MERGE}, got {self.merge!r}")


_DEFAULT = BandConfig()


def _config(config) -> BandConfig:
    return config_or_default(config, BandConfig, _DEFAULT,
                             expected="the band backend takes config=BandConfig(...)")


def geometry(s_q, s_k, window_size, split=None, *, min_chunk=None):
    """``(chunk, num_chunks)`` for this call, or None when the decomposition does not apply.
    ``split`` / ``min_chunk`` default to :class:`BandConfig`'s."""
    split = _DEFAULT.split if split is None else split
    min_chunk = _DEFAULT.min_chunk if min_chunk is None else min_chunk
    left, right = window_size
    if right != 0 or left < 1 or s_q != s_k or left % split:
        return None
    c = left // split
    if c < min_chunk or s_q % c or s_q // c <= split:
        return None
    return c, s_q // c


def supports(req):
    from longattn.common.kernels import BACKENDS, UNAVAILABLE

    cfg = req.config if isinstance(req.config, BandConfig) else _DEFAULT
    q = req.q
    if q.device.type != "cuda":
        return "needs CUDA tensors"
    piece = BACKENDS.get(cfg.piece_backend)
    if piece is None:
        why = UNAVAILABLE.get(cfg.piece_backend, "no such backend")
        return f"its piece backend {cfg.piece_backend!r} is not available: {why}"
    reason = piece.supports(req)  # dtype, dlse and head_dim rules of the kernels it calls
    if reason is not None:
        return f"its {cfg.piece_backend!r} pieces: {reason}"
    if q.shape[-1] > 128:
        return f"head_dim {q.shape[-1]} must be <= 128 (cuDNN pieces)"
    if geometry(q.shape[1], req.k.shape[1], req.window_size, cfg.split,
                min_chunk=cfg.min_chunk) is None:
        return (f"window_size {req.window_size} with S={q.shape[1]} does not split into chunks "
                f"of W/{cfg.split} >= {cfg.min_chunk} tokens")
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
    else:  # "flash" (BandConfig checked it)
        out.append(("anti", m, qa, ka, va, False, (0, -1), False))
    return out


def _prep(x, flipped):
    return _flat(x.flip(2) if flipped else x).contiguous()


def forward(q, k, v, *, softmax_scale, window_size, config=None):
    cfg = _config(config)
    c, nc = _geometry_or_raise(q, k, window_size, cfg)
    b, s, h, d = q.shape
    qc, kc, vc = (x.reshape(b, nc, c, *x.shape[2:]) for x in (q, k, v))
    parts = []
    for _, j, qp, kp, vp, causal, win, flipped in _pieces(qc, kc, vc, cfg.split, cfg.anti):
        o, lse = attention_forward(_prep(qp, flipped), _prep(kp, flipped), _prep(vp, flipped),
                                   softmax_scale=softmax_scale, causal=causal, window_size=win,
                                   backend=cfg.piece_backend)
        parts.append((o, lse, j, flipped))
    refusal = _fused_merge_refusal(q, v)
    if cfg.merge == "triton" and refusal is not None:
        raise ValueError(f"BandConfig.merge='triton' cannot serve this call: {refusal}")
    if cfg.merge == "triton" or (cfg.merge == "auto" and q.is_cuda and refusal is None):
        return _merge_triton(parts, b, nc, c, h, v.shape[-1], q.dtype)
    return _merge_torch(parts, b, nc, c, h, v.shape[-1], q.dtype)


def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None, config=None):
    if dlse is not None:
        raise ValueError("the band backend cannot take dlse")
    cfg = _config(config)
    c, nc = _geometry_or_raise(q, k, window_size, cfg)
    b, s, h, d = q.shape
    qc, kc, vc, doc, oc = (x.reshape(b, nc, c, *x.shape[2:]) for x in (q, k, v, dout, out))
    lc = lse.reshape(b, h, nc, c).permute(0, 2, 1, 3)  # [B, nc, H, c]
    grads = None
    for _, j, qp, kp, vp, causal, win, flipped in _pieces(qc, kc, vc, cfg.split, cfg.anti):
        lp = lc[:, j:]
        if flipped:
            lp = lp.flip(3)
        g = attention_backward(_prep(doc[:, j:], flipped), _prep(qp, flipped),
                               _prep(kp, flipped), _prep(vp, flipped), _prep(oc[:, j:], flipped),
                               _flat(lp).contiguous(), softmax_scale=softmax_scale,
                               causal=causal, window_size=win, backend=cfg.piece_backend)
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


def _geometry_or_raise(q, k, window_size, cfg):
    geo = geometry(q.shape[1], k.shape[1], window_size, cfg.split, min_chunk=cfg.min_chunk)
    if geo is None:
        raise ValueError(f"the band backend cannot serve window_size {tuple(window_size)} with "
                         f"Sq={q.shape[1]}, Sk={k.shape[1]}: it needs a causal window (W, 0), "
                         f"Sq == Sk, and chunks of W/{cfg.split} >= {cfg.min_chunk} tokens "
                         "that divide S")
    return geo


# --------------------------------------------------------------------------------------------
# merging the partials


def _merge_torch(parts, b, nc, c, h, dv, dtype):
    """The slow twin of :func:`longattn.common.kernels.band_merge_triton.merge`: the same
    ``parts`` (``(out, lse, first query chunk j, flipped)`` per piece), merged one partial at a
    time with :func:`longattn.common.merge.merge_partials_`."""
    acc = acc_dtype(dtype)
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


def _fused_merge_refusal(q, v):
    """Why the fused Triton merge cannot serve this call, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if q.dtype not in _HALF:
        return f"it merges fp16 / bf16 partials, got {q.dtype}"
    if v.shape[-1] not in (16, 32, 64, 128, 256):
        return f"head_dim {v.shape[-1]} of v must be a power of two in 16..256"
    return None


def _merge_triton(parts, b, nc, c, h, dv, dtype, block=64):
    from longattn.common.kernels.band_merge_triton import merge

    return merge(parts, b, nc, c, h, dv, dtype, block=block)


BACKEND = Backend(forward=forward, backward=backward, supports=supports, config_type=BandConfig)
