"""The cudnn backend's translation of our windows into cuDNN's band mask (runs anywhere; the
kernels themselves are checked against the oracle on a GPU by ``common/bench/check_cudnn.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.common.kernels import Request
from longattn.common.kernels import cudnn_backend as cb
from longattn.reference import window_mask


def cudnn_band_mask(sq, sk, bottom_right, lb, rb):
    """cuDNN's documented band rule: key j kept iff i' - lb < j <= i' + rb."""
    i = np.arange(sq)[:, None] + (sk - sq if bottom_right else 0)
    j = np.arange(sk)[None, :]
    m = np.ones((sq, sk), dtype=bool)
    if lb is not None:
        m &= j > i - lb
    if rb is not None:
        m &= j <= i + rb
    return m


@settings(max_examples=300, deadline=None)
@given(sq=st.integers(1, 40), sk=st.integers(1, 40), left=st.integers(-1, 45),
       right=st.integers(-1, 45))
def test_band_bounds_reproduce_our_window(sq, sk, left, right):
    bottom_right, lb, rb = cb.band_bounds((left, right), sq, sk)
    assert lb is None or lb >= 1  # cuDNN's lower limit
    assert rb is None or rb >= 0
    assert np.array_equal(cudnn_band_mask(sq, sk, bottom_right, lb, rb),
                          window_mask(sq, sk, (left, right)))


def test_band_bounds_examples():
    assert cb.band_bounds((-1, -1), 8, 8) == (False, None, None)  # dense
    assert cb.band_bounds((-1, 0), 8, 8) == (False, None, 0)  # causal
    assert cb.band_bounds((4096, 0), 16, 16) == (False, 4097, 0)  # sliding window
    assert cb.band_bounds((-1, 0), 4, 8) == (True, None, 0)  # bottom-right causal


def test_refuses_cpu_and_float32():
    x = torch.zeros(1, 4, 1, 8)
    assert cb.supports(Request(x, x, x, False, (-1, -1))) == "needs CUDA tensors"


def test_without_cudnn_frontend_it_is_unavailable_and_says_why():
    from longattn.common import kernels as K

    if cb.cudnn is not None:  # installed: registered like any other backend
        assert "cudnn" in K.BACKENDS and "cudnn" not in K.UNAVAILABLE
        return
    assert "cudnn" not in K.BACKENDS
    assert "nvidia-cudnn-frontend" in K.UNAVAILABLE["cudnn"]
    x = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="'cudnn' is not available.*nvidia-cudnn-frontend"):
        K.attention_forward(x, x, x, backend="cudnn")
    assert K.pick_backend(x, x, x) == "torch"  # auto skips it


def test_cudnn_varlen_probe_reference_is_the_oracle():
    """``common/bench/check_cudnn_varlen.py`` computes its float64 reference with torch on the
    GPU (the oracle's numpy functions are too slow there); on the CPU it equals the oracle,
    forward and backward, with the document mask, causal and full, GQA."""
    import importlib.util
    from pathlib import Path

    from longattn.reference import attention, attention_backward, document_mask

    path = Path(__file__).resolve().parents[1] / "bench" / "check_cudnn_varlen.py"
    spec = importlib.util.spec_from_file_location("check_cudnn_varlen", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    lq, lk = [5, 9, 1], [7, 9, 3]
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(n, h, 8, generator=g) for n, h in ((15, 4), (19, 2), (19, 2),
                                                                    (15, 4)))
    cq, ck = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    for causal in (True, False):
        mask = document_mask(cq, ck, causal=causal)
        out, lse, grads = probe._dense64(q, k, v, dout, mask, 8 ** -0.5)
        args = [t.double().numpy()[None] for t in (q, k, v)]
        ro, rl = attention(*args, mask=mask)
        rg = attention_backward(dout.double().numpy()[None], *args, mask=mask)
        for got, ref in zip((out, lse, *grads), (ro[0], rl[0], *(x[0] for x in rg))):
            assert np.abs(got - ref).max() <= 1e-12 * max(1.0, np.abs(ref).max())


def _graph_stand_in(calls, refuse=()):
    """A stand-in for one backward graph (``cb._bwd_graph``): the torch backend's backward of
    the same operands, written into the given (view) buffers, as cuDNN writes its outputs;
    records each call's (Sq, Sk, window); refuses the windows in ``refuse``."""
    from longattn.common.kernels import torch_backend

    def run(dout, q, out, lse_in, scale, k, v, window, dq, dk, dv, probe):
        calls.append((q.shape[1], k.shape[1], tuple(window)))
        if tuple(window) in refuse:
            return False
        g = torch_backend.backward(dout, q, k, v, out, lse_in.squeeze(-1), softmax_scale=scale,
                                   window_size=window)
        for dst, src in zip((dq, dk, dv), g):
            dst.copy_(src)
        return True

    return run


@pytest.mark.parametrize("sq,sk", [(5, 13), (7, 8), (9, 9), (1, 4)])
def test_bottom_right_causal_backward_splits_and_equals_the_oracle(monkeypatch, sq, sk):
    """A causal backward with Sq < Sk runs as two graphs (the keys before the diagonal block
    unmasked, the block as a square, top-left) written into one dK / dV, dq summed; it equals
    the float64 oracle, as the one graph of ``backward_single`` does; where cuDNN refuses a
    part, the one graph runs instead."""
    from longattn.common.kernels import torch_backend
    from longattn.reference import attention_backward as ref_backward

    g = torch.Generator().manual_seed(sq * 100 + sk)
    q, do = (torch.randn(2, sq, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, sk, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = torch_backend.forward(q, k, v, softmax_scale=8 ** -0.5, window_size=(-1, 0))
    mask = window_mask(sq, sk, (-1, 0))
    want = ref_backward(*(t.numpy() for t in (do, q, k, v)), mask=mask)
    kw = {"softmax_scale": 8 ** -0.5, "window_size": (-1, 0)}
    results = []
    for fn, refuse, expect in (
            (cb.backward, (), [(sq, sk - sq, (-1, -1)), (sq, sq, (-1, 0))] if sq < sk
             else [(sq, sk, (-1, 0))]),
            (cb.backward_single, (), [(sq, sk, (-1, 0))]),
            (cb.backward, ((-1, -1),), [(sq, sk - sq, (-1, -1)), (sq, sk, (-1, 0))]
             if sq < sk else [(sq, sk, (-1, 0))])):
        calls = []
        monkeypatch.setattr(cb, "_bwd_graph", _graph_stand_in(calls, refuse))
        got = fn(do, q, k, v, out, lse, **kw)
        assert calls == expect
        results.append(got)
        for x, y in zip(got, want):  # the backend hands cuDNN the lse in float32
            assert float((x - torch.from_numpy(y)).abs().max()) <= 1e-6 * float(np.abs(y).max())
    for a, b in zip(results[0], results[1]):  # split against one graph: the same sums
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
