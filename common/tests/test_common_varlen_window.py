"""Packed varlen attention (windows, per-sequence sinks) and the flex backend's CPU-safe parts,
against the float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longattn.common.kernels import BACKENDS, Request, pick_backend
from longattn.common.kernels.varlen import (
    attention_backward_varlen,
    attention_forward_varlen,
    attention_varlen,
)
from longattn.common.testing import rel_error
from longattn.reference import attention, attention_backward, document_mask

TOL64 = 1e-10


def _cu(lengths):
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


def _oracle(q, k, v, cu_q, cu_k, causal, window, ns, dout, dlse=None):
    """Dense oracle on the packed tensors as one batch with a document mask."""
    if isinstance(ns, (list, tuple)):  # per-sequence sinks: OR the per-count masks row-wise
        m = np.zeros((int(cu_q[-1]), int(cu_k[-1])), dtype=bool)
        for i, n in enumerate(ns):
            mi = document_mask(cu_q.numpy(), cu_k.numpy(), causal=causal, window=window,
                               num_sink_tokens=n)
            a, b = int(cu_q[i]), int(cu_q[i + 1])
            m[a:b] = mi[a:b]
    else:
        m = document_mask(cu_q.numpy(), cu_k.numpy(), causal=causal, window=window,
                          num_sink_tokens=ns)
    args = [t.double().numpy()[None] for t in (q, k, v)]
    out, lse = attention(*args, mask=m[None, None])
    dl = None if dlse is None else dlse.double().numpy()[None]
    grads = attention_backward(dout.double().numpy()[None], *args, mask=m[None, None], dlse=dl)
    return out[0], lse[0], [g[0] for g in grads]


CASES = [
    # (q lengths, k lengths, hq, hkv, causal, window, sinks)
    ([5, 1, 0, 9, 3], None, 4, 2, True, (3, 0), 0),
    ([5, 1, 0, 9, 3], None, 4, 2, True, (3, 0), 2),
    ([7, 1, 4, 12, 2, 6], None, 2, 1, True, (2, 0), [1, 0, 3, 4, 1, 2]),
    ([6, 2, 8], [9, 2, 5], 4, 4, True, (-1, -1), 1),       # Sq != Sk, bottom-right
    ([6, 2, 8], [9, 2, 5], 4, 1, False, (2, 1), 2),        # non-causal window + sinks
    ([1, 1, 1], None, 2, 2, True, (0, 0), 1),
    ([10, 3], [0, 3], 2, 1, False, (-1, -1), 0),           # a sequence without keys
    ([11, 4, 1], None, 3, 1, True, (100, 0), 4),           # window > every sequence
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_varlen_forward_backward_fp64(case):
    lq, lk, hq, hkv, causal, window, ns = CASES[case]
    lk = lq if lk is None else lk
    g = torch.Generator().manual_seed(case)
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = torch.randn(sum(lq), hq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lk), hkv, 8, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), hkv, 8, generator=g, dtype=torch.float64)
    dout = torch.randn(sum(lq), hq, 8, generator=g, dtype=torch.float64)
    dlse = torch.randn(hq, sum(lq), generator=g, dtype=torch.float64)
    out, lse = attention_forward_varlen(q, k, v, cu_q, cu_k, causal=causal, window_size=window,
                                        num_sink_tokens=ns)
    ref_out, ref_lse, ref_g = _oracle(q, k, v, cu_q, cu_k, causal, window, ns, dout, dlse)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_error(out, ref_out) <= TOL64
    assert rel_error(lse, ref_lse) <= TOL64
    grads = attention_backward_varlen(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal,
                                      window_size=window, num_sink_tokens=ns, dlse=dlse)
    for name, got, ref in zip("qkv", grads, ref_g):
        err = rel_error(got, ref)
        assert err <= TOL64, f"d{name}: {err:.2e}"


def test_varlen_autograd_bf16_and_lse_grad():
    g = torch.Generator().manual_seed(7)
    lq = [17, 1, 30, 4, 9]
    cu = _cu(lq)
    q, k, v = (torch.randn(sum(lq), 4, 16, generator=g) for _ in range(3))
    dout = torch.randn(sum(lq), 4, 16, generator=g)
    ref_out, _, ref_g = _oracle(q, k, v, cu, cu, True, (5, 0), 2, dout)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = attention_varlen(qb, kb, vb, cu, causal=True, window_size=(5, 0), num_sink_tokens=2)
    out.backward(dout.bfloat16())
    assert rel_error(out, ref_out) <= 2e-2
    for got, ref in zip((qb.grad, kb.grad, vb.grad), ref_g):
        assert rel_error(got, ref) <= 2e-2
    # gradient through lse as well (float64 autograd vs oracle with dlse)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    dlse = torch.randn(4, sum(lq), generator=g, dtype=torch.float64)
    out, lse = attention_varlen(q64, k64, v64, cu, causal=True, window_size=(5, 0),
                                num_sink_tokens=[1, 0, 3, 1, 2], return_lse=True)
    torch.autograd.backward([out, lse], [dout.double(), dlse])
    _, _, ref_g = _oracle(q, k, v, cu, cu, True, (5, 0), [1, 0, 3, 1, 2], dout, dlse)
    for got, ref in zip((q64.grad, k64.grad, v64.grad), ref_g):
        assert rel_error(got, ref) <= TOL64


def test_varlen_random_seeds_fp64():
    for seed in range(6):
        rng = np.random.default_rng(seed)
        lq = list(rng.integers(0, 13, size=rng.integers(5, 9)))
        lq[rng.integers(len(lq))] = 1
        hkv = int(rng.choice([1, 2]))
        hq = hkv * int(rng.choice([1, 3]))
        w = int(rng.integers(0, 15))
        ns = int(rng.integers(0, 5))
        g = torch.Generator().manual_seed(seed)
        cu = _cu(lq)
        q = torch.randn(sum(lq), hq, 4, generator=g, dtype=torch.float64)
        k, v = (torch.randn(sum(lq), hkv, 4, generator=g, dtype=torch.float64) for _ in "kv")
        dout = torch.randn_like(q)
        out, lse = attention_forward_varlen(q, k, v, cu, cu, causal=True, window_size=(w, 0),
                                            num_sink_tokens=ns)
        ref_out, ref_lse, ref_g = _oracle(q, k, v, cu, cu, True, (w, 0), ns, dout)
        assert rel_error(out, ref_out) <= TOL64
        assert rel_error(lse, ref_lse) <= TOL64
        grads = attention_backward_varlen(dout, q, k, v, out, lse, cu, cu, causal=True,
                                          window_size=(w, 0), num_sink_tokens=ns)
        for got, ref in zip(grads, ref_g):
            assert rel_error(got, ref) <= TOL64


def test_varlen_empty_rows_no_nan():
    # window (0, 0) non-causal with Sq > Sk: early queries of a sequence see no key
    cu_q, cu_k = _cu([5, 3]), _cu([2, 3])
    q = torch.randn(8, 2, 4, dtype=torch.float64)
    k = torch.randn(5, 2, 4, dtype=torch.float64)
    v = torch.randn(5, 2, 4, dtype=torch.float64)
    out, lse = attention_forward_varlen(q, k, v, cu_q, cu_k, window_size=(0, 0))
    assert torch.isneginf(lse[:, :3]).all() and (out[:3] == 0).all()
    grads = attention_backward_varlen(torch.ones_like(out), q, k, v, out, lse, cu_q, cu_k,
                                      window_size=(0, 0))
    assert all(torch.isfinite(t).all() for t in grads)
    assert (grads[0][:3] == 0).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 9], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32)), "end at"),
        (dict(cu_seqlens_q=torch.tensor([0, 4.0, 9])), "int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), "same sequences"),
        (dict(num_sink_tokens=-1), "num_sink_tokens"),
        (dict(num_sink_tokens=[1, 2]), "one entry per sequence"),
        (dict(window_size=(-2, 0)), "window_size"),
    ],
)
def test_varlen_bad_input(bad, match):
    q = torch.randn(9, 2, 4)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, window_size=(2, 0), num_sink_tokens=1)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        attention_forward_varlen(q, q, q, **kw)


def test_flex_backend_refuses_cpu_and_auto_skips_it():
    """The flex backend imports on a CPU-only torch, registers itself, and refuses CPU tensors;
    ``auto`` therefore never picks it here."""
    import longattn.common.kernels.flex_backend as fb

    assert BACKENDS.get("flex") is not None
    q = torch.randn(1, 8, 2, 16)
    assert fb.supports(Request(q, q, q, True, (3, 0))) is not None
    assert pick_backend(q, q, q, causal=True, window_size=(3, 0)) != "flex"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_eager_cpu_matches_oracle():
    """The flex backend's forward runs eagerly on the CPU through FlexAttention's reference
    path: checks the window mask_mod and the lse against the oracle in fp64. The compiled CUDA
    kernels are exercised by the GPU benchmark's correctness check."""
    fb = pytest.importorskip("longattn.common.kernels.flex_backend")
    if not fb.flex_available():
        pytest.skip("this torch has no FlexAttention")
    from longattn.reference import causal_mask, window_mask

    g = torch.Generator().manual_seed(3)
    for sq, sk, hq, hkv, window in [(16, 16, 4, 2, (5, 0)), (8, 24, 2, 1, (3, 2)),
                                     (20, 12, 2, 2, (-1, 0)), (12, 12, 2, 1, (-1, -1))]:
        q = torch.randn(2, sq, hq, 8, generator=g, dtype=torch.float64)
        k = torch.randn(2, sk, hkv, 8, generator=g, dtype=torch.float64)
        v = torch.randn(2, sk, hkv, 8, generator=g, dtype=torch.float64)
        out, lse = fb.forward(q, k, v, softmax_scale=0.3, window_size=window,
                              compile=False)
        m = window_mask(sq, sk, window)
        if window[1] == 0:
            m &= causal_mask(sq, sk)
        ro, rl = attention(*(t.numpy() for t in (q, k, v)), mask=m, scale=0.3)
        assert rel_error(out, ro) <= TOL64 and rel_error(lse, rl) <= TOL64


def test_flex_reweighted_backward_ring_rule():
    """The flex backward recomputes the step under autograd and re-weights the gradient by
    exp(lse_step - lse_final). Check that rule with a differentiable torch step on a key set
    split in two steps (so the weights are not 1), with dlse, against the oracle."""
    from longattn.common.kernels import attention as dense_attention
    from longattn.common.kernels.flex_backend import reweighted_backward
    from longattn.common.merge import merge_partials

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 10, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 14, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 14, 2, 8, generator=g, dtype=torch.float64)
    dout = torch.randn_like(q)
    dlse = torch.randn(2, 4, 10, generator=g, dtype=torch.float64)
    parts = [(slice(0, 6), (-1, -1)), (slice(6, 14), (2, 0))]  # second part: causal window

    def step(sl, win):
        return lambda a, b, c: dense_attention(a, b[:, sl], c[:, sl], window_size=win,
                                               return_lse=True, backend="torch")

    (o1, l1), (o2, l2) = (step(sl, w)(q, k, v) for sl, w in parts)
    out, lse = merge_partials(o1, l1, o2, l2)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for sl, win in parts:
        a, b, c = reweighted_backward(step(sl, win), dout, q, k, v, out, lse, dlse)
        dq += a
        dk += b
        dv += c
    from longattn.reference import window_mask

    m = np.concatenate([np.ones((10, 6), bool), window_mask(10, 8, (2, 0))], axis=1)
    args = [t.numpy() for t in (q, k, v)]
    ro, _ = attention(*args, mask=m)
    assert rel_error(out, ro) <= TOL64
    rg = attention_backward(dout.numpy(), *args, mask=m, dlse=dlse.numpy())
    for got, ref in zip((dq, dk, dv), rg):
        assert rel_error(got, ref) <= TOL64
