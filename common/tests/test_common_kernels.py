"""longattn.common.kernels, ``torch`` backend: forward and backward against the float64
oracle (causal / window / GQA / Sq != Sk / fully-masked rows / dlse), row blocking, the
autograd wrapper (gradcheck), the backend registry, memory, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longattn import reference as ref
from longattn.common import kernels as K
from longattn.common.dtypes import lse_dtype
from longattn.common.kernels import TorchConfig, torch_backend
from longattn.common.testing import assert_errors, oracle_errors, random_qkv, rel_error

HYP = settings(max_examples=40, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# helpers


def oracle_mask(sq, sk, causal, window):
    m = ref.window_mask(sq, sk, window)
    if causal:
        m = m & ref.causal_mask(sq, sk)
    return m


def oracle(q, k, v, causal, window, scale=None, dout=None, dlse=None):
    """Forward (and backward if dout is given) of the numpy oracle on torch tensors."""
    m = oracle_mask(q.shape[1], k.shape[1], causal, window)
    qn, kn, vn = (t.detach().double().numpy() for t in (q, k, v))
    out, lse = ref.attention(qn, kn, vn, mask=m, scale=scale)
    if dout is None:
        return out, lse
    grads = ref.attention_backward(
        dout.double().numpy(), qn, kn, vn, mask=m, scale=scale,
        dlse=None if dlse is None else dlse.double().numpy())
    return out, lse, grads


def make(seed, b, sq, sk, hq, hkv, d, dv=None, dtype=torch.float64):
    return random_qkv(b, sq, sk, hq, hkv, d, dtype=dtype, seed=seed, dv=dv)


def block_elems(n):
    """A torch backend config with a small score block, so small tests exercise many row
    blocks and the per-block key ranges of windows."""
    return TorchConfig(score_block_elems=n)


def check_case(seed, b, sq, sk, hq, hkv, d, dv, causal, window, dtype, use_dlse, blk,
               scale=None):
    q, k, v = make(seed, b, sq, sk, hq, hkv, d, dv, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(b, sq, hq, v.shape[-1], generator=g, dtype=torch.float64).to(dtype)
    ldt = lse_dtype(dtype)
    dlse = torch.randn(b, hq, sq, generator=g, dtype=torch.float64).to(ldt) if use_dlse else None
    cfg = block_elems(blk)
    out, lse = K.attention_forward(q, k, v, softmax_scale=scale, causal=causal,
                                   window_size=window, backend="torch", config=cfg)
    dq, dk, dv_ = K.attention_backward(dout, q, k, v, out, lse, softmax_scale=scale,
                                       causal=causal, window_size=window, dlse=dlse,
                                       backend="torch", config=cfg)
    ro, rl, (rdq, rdk, rdv) = oracle(q, k, v, causal, window, scale, dout, dlse)
    assert out.dtype == dtype and out.shape == ro.shape
    assert lse.dtype == ldt and lse.shape == rl.shape
    assert (dq.dtype, dk.dtype, dv_.dtype) == (dtype, dtype, dtype)
    assert_errors(oracle_errors({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv_},
                                {"out": ro, "lse": rl, "dq": rdq, "dk": rdk, "dv": rdv}), dtype)
    # rows without a visible key: exactly 0 / -inf / zero gradient
    dead = torch.from_numpy(np.isneginf(rl))  # [B, H, Sq]
    assert torch.equal(torch.isneginf(lse), dead)
    dead_bshd = dead.transpose(1, 2)
    assert (out[dead_bshd] == 0).all() and (dq[dead_bshd] == 0).all()
    return out, lse


windows = st.one_of(st.just((-1, -1)), st.tuples(st.integers(-1, 6), st.integers(-1, 6)))


@st.composite
def cases(draw, min_len=0):
    hkv = draw(st.integers(1, 2))
    return dict(
        seed=draw(st.integers(0, 2**20)), b=draw(st.integers(1, 2)),
        sq=draw(st.integers(min_len, 19)), sk=draw(st.integers(min_len, 19)),
        hq=hkv * draw(st.integers(1, 3)), hkv=hkv, d=draw(st.sampled_from([1, 4, 8])),
        dv=draw(st.sampled_from([None, 3])), causal=draw(st.booleans()), window=draw(windows),
        use_dlse=draw(st.booleans()), blk=draw(st.sampled_from([1, 5, 48, 1 << 24])),
    )


# --------------------------------------------------------------------------------------------
# against the oracle


@HYP
@given(cases())
def test_float64_matches_oracle(c):
    check_case(**c, dtype=torch.float64)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(cases(min_len=4))
def test_bfloat16_matches_oracle(c):
    check_case(**c, dtype=torch.bfloat16)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(cases(min_len=1), st.sampled_from([torch.float32, torch.float16]))
def test_float32_and_float16_match_oracle(c, dtype):
    check_case(**c, dtype=dtype)


# explicit named cases so each acceptance category is visibly covered, whatever hypothesis draws
NAMED = {
    "dense": (1, 9, 9, 2, 2, 8, None, False, (-1, -1)),
    "causal": (2, 11, 11, 4, 4, 8, None, True, (-1, -1)),
    "causal-sq<sk": (1, 5, 13, 2, 1, 8, None, True, (-1, -1)),
    "causal-sq>sk": (1, 13, 5, 2, 1, 8, None, True, (-1, -1)),  # leading rows fully masked
    "window": (1, 16, 16, 2, 2, 4, None, False, (3, 2)),
    "window-causal": (2, 16, 16, 4, 2, 4, None, True, (4, -1)),
    "sliding-sq!=sk": (1, 7, 15, 3, 1, 4, None, False, (2, 0)),
    "gqa": (2, 12, 12, 6, 2, 8, None, True, (-1, -1)),
    "mqa": (1, 10, 14, 4, 1, 8, 3, False, (-1, -1)),
    "window-dead-rows": (1, 12, 4, 2, 1, 4, None, False, (0, 0)),  # rows aligned before key 0
    "right-only": (1, 9, 9, 2, 1, 4, None, False, (-1, 2)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("name", list(NAMED))
def test_named_cases(name, dtype):
    b, sq, sk, hq, hkv, d, dv, causal, window = NAMED[name]
    for blk, use_dlse in ((1 << 24, False), (7, True)):
        check_case(3, b, sq, sk, hq, hkv, d, dv, causal, window, dtype, use_dlse, blk)


def test_custom_scale():
    check_case(5, 1, 6, 7, 2, 1, 4, None, True, (-1, -1), torch.float64, True, 1 << 24,
               scale=0.37)
    check_case(5, 1, 6, 7, 2, 1, 4, None, False, (2, 1), torch.float64, True, 9, scale=-1.5)


def test_fully_masked_rows_have_no_nan_anywhere():
    q, k, v = make(0, 2, 10, 3, 4, 2, 8)
    out, lse = K.attention_forward(q, k, v, causal=True, backend="torch")
    dead = torch.isneginf(lse)
    assert dead[:, :, :7].all() and not dead[:, :, 7:].any()
    assert (out[:, :7] == 0).all()
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv = K.attention_backward(dout, q, k, v, out, lse, causal=True, dlse=dlse,
                                      backend="torch")
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()
    assert (dq[:, :7] == 0).all()


def test_no_keys_at_all():
    q, k, v = make(1, 1, 4, 0, 2, 1, 4)
    out, lse = K.attention_forward(q, k, v, backend="torch")
    assert out.shape == (1, 4, 2, 4) and (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = K.attention_backward(torch.ones_like(out), q, k, v, out, lse, backend="torch")
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


def test_no_queries():
    q, k, v = make(1, 1, 0, 5, 2, 1, 4)
    out, lse = K.attention_forward(q, k, v, causal=True, backend="torch")
    assert out.shape == (1, 0, 2, 4) and lse.shape == (1, 2, 0)
    dq, dk, dv = K.attention_backward(out, q, k, v, out, lse, causal=True, backend="torch")
    assert (dk == 0).all() and (dv == 0).all()


def test_large_logits_are_stable():
    q, k, v = make(2, 1, 16, 16, 2, 2, 8, dtype=torch.float32)
    q = q * 40
    k = k * 40
    out, lse = K.attention_forward(q, k, v, causal=True, backend="torch")
    ro, rl = oracle(q, k, v, True, (-1, -1))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_error(out, ro) <= 1e-5 and rel_error(lse, rl) <= 1e-5


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    qb = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64)  # BHSD, viewed as BSHD
    kb = torch.randn(2, 1, 7, 4, generator=g, dtype=torch.float64)
    vb = torch.randn(2, 1, 7, 4, generator=g, dtype=torch.float64)
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
    assert not q.is_contiguous()
    out, lse = K.attention_forward(q, k, v, causal=True, backend="torch")
    out2, lse2 = K.attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                                     backend="torch")
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dout = torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64).transpose(1, 2)
    a = K.attention_backward(dout, q, k, v, out, lse, causal=True, backend="torch")
    b = K.attention_backward(dout, q.contiguous(), k.contiguous(), v.contiguous(), out, lse,
                             causal=True, backend="torch")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_row_blocking_does_not_change_results():
    """Every block size gives the same float64 answer (up to summation order)."""
    q, k, v = make(6, 1, 23, 31, 4, 2, 8)
    dout = torch.randn(1, 23, 4, 8, dtype=torch.float64)
    outs = []
    for blk in (1, 3, 64, 1000, 1 << 24):
        cfg = block_elems(blk)
        out, lse = K.attention_forward(q, k, v, window_size=(5, 2), config=cfg)  # auto: torch
        grads = K.attention_backward(dout, q, k, v, out, lse, window_size=(5, 2), config=cfg)
        outs.append((out, lse, *grads))
    with_grad = [t.clone().requires_grad_() for t in (q, k, v)]
    o = K.attention(*with_grad, window_size=(5, 2), config=block_elems(3))
    o.backward(dout)
    outs.append((o.detach(), outs[0][1], *(t.grad for t in with_grad)))
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert rel_error(x, y) <= 1e-13


def test_causal_and_window_combine_like_flash_attn():
    assert K.normalize_window(True, (-1, -1)) == (-1, 0)
    assert K.normalize_window(True, (3, 5)) == (3, 0)
    assert K.normalize_window(True, (3, -1)) == (3, 0)
    assert K.normalize_window(False, (3, 5)) == (3, 5)
    assert K.normalize_window(False, None) == (-1, -1)
    q, k, v = make(7, 1, 8, 8, 1, 1, 4)
    a = K.attention_forward(q, k, v, causal=True, window_size=(2, 4), backend="torch")
    b = K.attention_forward(q, k, v, window_size=(2, 0), backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------
# dlse and the autograd wrapper


def test_dlse_none_equals_zero_dlse():
    q, k, v = make(8, 1, 6, 9, 4, 2, 4)
    out, lse = K.attention_forward(q, k, v, causal=True, backend="torch")
    dout = torch.randn_like(out)
    a = K.attention_backward(dout, q, k, v, out, lse, causal=True, backend="torch")
    b = K.attention_backward(dout, q, k, v, out, lse, causal=True, dlse=torch.zeros_like(lse),
                             backend="torch")
    for x, y in zip(a, b):
        assert rel_error(x, y) <= 1e-15


def test_grad_lse_or_none_is_the_one_zero_dlse_rule():
    assert K.grad_lse_or_none(None) is None
    assert K.grad_lse_or_none(torch.zeros(2, 3)) is None
    d = torch.zeros(2, 3)
    d[1, 2] = -0.5
    assert K.grad_lse_or_none(d) is d
    # the autograd wrapper: a loss of out only hands a zero dlse, the same as none
    q, k, v = (t.requires_grad_() for t in make(18, 1, 5, 7, 2, 1, 4))
    out, lse = K.attention(q, k, v, causal=True, return_lse=True, backend="torch")
    (out.sum() + 0 * lse.sum()).backward()
    ref = K.attention_backward(torch.ones_like(out), q.detach(), k.detach(), v.detach(),
                               out.detach(), lse.detach(), causal=True, backend="torch")
    for got, want in zip((q.grad, k.grad, v.grad), ref):
        assert torch.equal(got, want)


def test_backward_uses_the_final_out_and_lse():
    """The ring rule: gradients of a key split, each computed with the FINAL out/lse, sum to
    the gradients of the whole attention (dq) and give each split's own dk/dv exactly."""
    q, k, v = make(9, 1, 8, 12, 2, 1, 4)
    dout = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    dlse = torch.randn(1, 2, 8, dtype=torch.float64)
    out, lse = K.attention_forward(q, k, v, backend="torch")
    full = K.attention_backward(dout, q, k, v, out, lse, dlse=dlse, backend="torch")
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for a, z in ((0, 5), (5, 12)):
        g = K.attention_backward(dout, q, k[:, a:z], v[:, a:z], out, lse, dlse=dlse,
                                 backend="torch")
        dq += g[0]
        dks.append(g[1])
        dvs.append(g[2])
    assert rel_error(dq, full[0]) <= 1e-12
    assert rel_error(torch.cat(dks, 1), full[1]) <= 1e-12
    assert rel_error(torch.cat(dvs, 1), full[2]) <= 1e-12


GRADCHECK_CASES = [
    (1, 4, 4, 2, 1, 3, True, (-1, -1)),
    (2, 3, 5, 4, 2, 2, False, (1, 1)),
    (1, 5, 3, 2, 2, 3, True, (2, -1)),  # Sq > Sk: two dead rows
    (1, 4, 6, 3, 1, 2, False, (-1, -1)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_autograd_wrapper_gradcheck(case):
    b, sq, sk, hq, hkv, d, causal, window = case
    q, k, v = (t.requires_grad_() for t in make(10, b, sq, sk, hq, hkv, d))

    def f(q, k, v):
        out, lse = K.attention(q, k, v, causal=causal, window_size=window, return_lse=True,
                               backend="torch")
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)  # finite for the differences

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_autograd_wrapper_matches_oracle_with_lse_in_the_loss():
    q, k, v = (t.requires_grad_() for t in make(11, 2, 7, 9, 4, 2, 4))
    out, lse = K.attention(q, k, v, causal=True, return_lse=True, backend="torch")
    assert K.attention(q, k, v, causal=True, backend="torch").shape == out.shape
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    _, _, (rdq, rdk, rdv) = oracle(q, k, v, True, (-1, -1), None, dout, dlse)
    assert rel_error(q.grad, rdq) <= 1e-10
    assert rel_error(k.grad, rdk) <= 1e-10
    assert rel_error(v.grad, rdv) <= 1e-10


def test_autograd_wrapper_bf16_gradients_keep_dtype():
    q, k, v = (t.requires_grad_() for t in make(12, 1, 8, 8, 2, 1, 8, dtype=torch.bfloat16))
    out = K.attention(q, k, v, causal=True, backend="torch")
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------------------------
# backend registry


def test_auto_on_cpu_picks_a_backend_that_serves_cpu():
    q, k, v = make(13, 1, 4, 4, 2, 1, 8, dtype=torch.float32)
    name = K.pick_backend(q, k, v, causal=True)
    assert name in K.BACKENDS
    assert K.BACKENDS[name].supports(K.Request(q, k, v, True, (-1, 0))) is None
    assert "torch" in K.BACKENDS
    if "aten" in K.BACKENDS:  # CUDA only
        assert K.BACKENDS["aten"].supports(K.Request(q, k, v, True, (-1, 0))) is not None
    a = K.attention_forward(q, k, v, causal=True)
    b = K.attention_forward(q, k, v, causal=True, backend="torch")
    assert rel_error(a[0], b[0]) <= 1e-6


def test_register_backend_and_dispatch():
    calls = []

    def fwd(q, k, v, *, softmax_scale, window_size):
        calls.append(("fwd", softmax_scale, window_size))
        return torch_backend.forward(q, k, v, softmax_scale=softmax_scale,
                                     window_size=window_size)

    def bwd(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None):
        calls.append(("bwd", softmax_scale, window_size, dlse is not None))
        return torch_backend.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale,
                                      window_size=window_size, dlse=dlse)

    def supports(req):
        return "no dlse here" if req.needs_dlse else None

    K.register_backend("test_fake", K.Backend(forward=fwd, backward=bwd, supports=supports))
    try:
        q, k, v = make(14, 1, 4, 6, 2, 1, 4)
        out, lse = K.attention_forward(q, k, v, causal=True, window_size=(2, 3),
                                       backend="test_fake")
        assert calls[-1] == ("fwd", 0.5, (2, 0))
        K.attention_backward(out, q, k, v, out, lse, causal=True, backend="test_fake")
        assert calls[-1] == ("bwd", 0.5, (-1, 0), False)
        with pytest.raises(ValueError, match="test_fake"):
            K.attention_backward(out, q, k, v, out, lse, dlse=lse, backend="test_fake")
        assert K.pick_backend(q, k, v, backend="test_fake") == "test_fake"
    finally:
        K.BACKENDS.pop("test_fake", None)


def test_forward_out_is_written_in_place_by_every_kind_of_backend():
    """``attention_forward(out=)``: a slot of a larger buffer comes back holding the output (the
    same values as without ``out``, NaN-free neighbours untouched); a ``writes_out`` backend
    gets the slot itself, the others' result is copied in; a wrong ``out`` raises naming it."""
    seen = []

    def fwd(q, k, v, *, softmax_scale, window_size, out=None):
        seen.append(out)
        o, lse = torch_backend.forward(q, k, v, softmax_scale=softmax_scale,
                                       window_size=window_size)
        return (o, lse) if out is None else (out.copy_(o), lse)

    K.register_backend("test_writes_out", K.Backend(
        forward=fwd, backward=K.BACKENDS["torch"].backward, supports=lambda req: None,
        writes_out=True))
    try:
        for seed in range(3):
            q, k, v = make(seed, 2, 9 + seed, 11, 4, 2, 4)
            want, want_lse = K.attention_forward(q, k, v, causal=True, backend="torch")
            for name in ("torch", "test_writes_out"):
                buf = torch.randn(3, 2, 9 + seed, 4, 4, dtype=q.dtype)
                keep = buf.clone()
                slot = buf[1]
                got, lse = K.attention_forward(q, k, v, causal=True, backend=name, out=slot)
                assert got.data_ptr() == slot.data_ptr() and torch.equal(got, want)
                assert torch.equal(lse, want_lse)
                assert torch.equal(buf[0], keep[0]) and torch.equal(buf[2], keep[2])
        assert seen and all(o is not None for o in seen)
        q, k, v = make(0, 2, 9, 11, 4, 2, 4)
        for bad in (torch.zeros(2, 9, 4, 5, dtype=q.dtype), torch.zeros(2, 9, 4, 4).half(),
                    torch.zeros(2, 9, 4, 8, dtype=q.dtype)[..., ::2]):
            with pytest.raises(ValueError, match="out"):
                K.attention_forward(q, k, v, out=bad)
        with pytest.raises(TypeError, match="out"):
            K.attention_forward(q, k, v, out=[1])
    finally:
        K.BACKENDS.pop("test_writes_out", None)


def test_backward_dq_out_is_written_in_place_by_every_kind_of_backend():
    """``attention_backward(dq_out=)``: dq lands in the given slot (same values as without it,
    the neighbours untouched), handed to a ``writes_out`` backend, copied for the others; dk /
    dv as without it; a wrong ``dq_out`` raises naming it."""
    seen = []

    def bwd(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None, dq_out=None):
        seen.append(dq_out)
        dq, dk, dv = torch_backend.backward(dout, q, k, v, out, lse,
                                            softmax_scale=softmax_scale,
                                            window_size=window_size, dlse=dlse)
        return (dq if dq_out is None else dq_out.copy_(dq)), dk, dv

    K.register_backend("test_writes_dq", K.Backend(
        forward=K.BACKENDS["torch"].forward, backward=bwd, supports=lambda req: None,
        writes_out=True))
    try:
        for seed in range(3):
            q, k, v = make(seed, 2, 7 + seed, 10, 4, 2, 4)
            out, lse = K.attention_forward(q, k, v, causal=True, backend="torch")
            do = torch.randn_like(out)
            want = K.attention_backward(do, q, k, v, out, lse, causal=True, backend="torch")
            for name in ("torch", "test_writes_dq"):
                buf = torch.randn(3, *q.shape, dtype=q.dtype)
                keep = buf.clone()
                got = K.attention_backward(do, q, k, v, out, lse, causal=True, backend=name,
                                           dq_out=buf[2])
                assert got[0].data_ptr() == buf[2].data_ptr()
                assert all(torch.equal(a, b) for a, b in zip(got, want))
                assert torch.equal(buf[:2], keep[:2])
        assert seen and all(o is not None for o in seen)
        with pytest.raises(ValueError, match="dq_out"):
            K.attention_backward(do, q, k, v, out, lse, dq_out=torch.zeros(2, 9, 4, 4).half())
    finally:
        K.BACKENDS.pop("test_writes_dq", None)


def test_registry_is_the_backends_that_exist():
    """Every name auto tries exists (loaded, or unavailable with a reason); nothing else hides."""
    assert set(K.AUTO_ORDER) <= set(K.BACKENDS) | set(K.UNAVAILABLE)
    assert "flash_attn" not in K.AUTO_ORDER and "triton" not in K.AUTO_ORDER
    assert {"torch", "aten", "band"} <= set(K.BACKENDS)
    assert set(K.BACKENDS) | set(K.UNAVAILABLE) >= {"cudnn", "flex"}
    assert not set(K.BACKENDS) & set(K.UNAVAILABLE)
    for name, why in K.UNAVAILABLE.items():
        assert isinstance(why, str) and why
        q, k, v = _ok()
        with pytest.raises(ValueError, match=f"{name}.*not available"):
            K.attention_forward(q, k, v, backend=name)
        with pytest.raises(ValueError, match="not available"):
            K.pick_backend(q, k, v, backend=name)


def test_built_in_backends_cannot_be_replaced():
    b = K.BACKENDS["torch"]
    for name in ("torch", "cudnn", "auto", ""):
        with pytest.raises(ValueError, match="name|built in"):
            K.register_backend(name, b)
    with pytest.raises(TypeError, match="Backend"):
        K.register_backend("test_not_a_backend", object())
    assert K.BACKENDS["torch"] is b


def test_config_goes_to_the_backend_it_belongs_to():
    seen = []

    def fwd(q, k, v, *, softmax_scale, window_size, config=None):
        seen.append(("fwd", config))
        return torch_backend.forward(q, k, v, softmax_scale=softmax_scale,
                                     window_size=window_size, config=config)

    def bwd(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None, config=None):
        seen.append(("bwd", config))
        return torch_backend.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale,
                                      window_size=window_size, dlse=dlse, config=config)

    K.register_backend("test_cfg", K.Backend(fwd, bwd, lambda req: None,
                                             config_type=TorchConfig))
    try:
        q, k, v = (t.requires_grad_() for t in make(17, 1, 6, 6, 2, 1, 4))
        cfg = TorchConfig(score_block_elems=5)
        out = K.attention(q, k, v, causal=True, backend="test_cfg", config=cfg)
        out.sum().backward()
        assert seen == [("fwd", cfg), ("bwd", cfg)]
        K.attention_forward(q, k, v, backend="test_cfg")
        assert seen[-1] == ("fwd", None)
    finally:
        K.BACKENDS.pop("test_cfg", None)


def test_config_of_another_backend_or_of_no_backend_raises():
    q, k, v = _ok()
    with pytest.raises(ValueError, match="BandConfig.*'band'.*'torch'"):
        K.attention_forward(q, k, v, backend="torch", config=K.BandConfig())
    with pytest.raises(TypeError, match="config"):
        K.attention_forward(q, k, v, config=object())
    with pytest.raises(TypeError, match="config"):
        K.attention_forward(q, k, v, config={"split": 2})
    # auto: a band record is simply not used when band does not serve the call (CPU here)
    a = K.attention_forward(q, k, v, causal=True, config=K.BandConfig(split=2))
    b = K.attention_forward(q, k, v, causal=True, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_torch_config_rejects_bad_block_sizes(bad):
    with pytest.raises(ValueError, match="score_block_elems"):
        TorchConfig(score_block_elems=bad)


def test_no_module_level_knobs_left():
    from longattn.common.kernels import band_backend

    for mod, names in ((torch_backend, ("SCORE_BLOCK_ELEMS",)),
                       (band_backend, ("SPLIT", "ANTI", "PIECE_BACKEND", "MERGE"))):
        for name in names:
            assert not hasattr(mod, name), f"{mod.__name__}.{name}"


# --------------------------------------------------------------------------------------------
# memory: O(S * block), measured in a subprocess


def test_peak_memory_of_a_long_causal_forward():
    """Measured at S = 16,384, H = 1 (a dense fp32 score matrix alone would be 1 GiB) and
    projected to the acceptance case S = 65,536, B = 1, H = 8, D = 64 (too slow for CI on two
    cores; common/bench/cpu_memory.py runs it): the chunked backend's own working memory does
    not grow with S (one score block), so the full-size peak is the measured interpreter +
    torch baseline, plus the full-size q, k, v, out and lse, plus the measured block memory.
    Both the measured peak and the projection must stay under 1 GB."""
    script = Path(__file__).resolve().parents[1] / "bench" / "cpu_memory.py"
    s, h, d = 16384, 1, 64
    proc = subprocess.run([sys.executable, str(script), "--seq", str(s), "--heads", str(h),
                           "--dim", str(d), "--threads", "2", "--json"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["finite"]
    assert r["dense_scores_bytes"] >= 2**30
    f32 = 4
    interp = r["baseline_rss_bytes"] - 3 * s * h * d * f32
    block = r["attention_bytes"] - (s * h * d + h * s) * f32
    S, H = 65536, 8
    projected = interp + (4 * S * H * d + H * S) * f32 + block
    print(f"\nS={s} H={h}: peak {r['peak_rss_bytes'] / 2**20:.0f} MiB, baseline "
          f"{r['baseline_rss_bytes'] / 2**20:.0f} MiB, block memory {block / 2**20:.0f} MiB, "
          f"forward {r['forward_s']:.1f} s; projected peak at S={S} H={H}: "
          f"{projected / 2**20:.0f} MiB")
    assert r["peak_rss_bytes"] < 1e9
    assert projected < 1e9


# --------------------------------------------------------------------------------------------
# bad input


def _ok():
    return make(15, 1, 4, 4, 4, 2, 8)


@pytest.mark.parametrize("which,bad,exc,word", [
    ("q", "notatensor", TypeError, "q"),
    ("k", np.zeros((1, 4, 2, 8)), TypeError, "k"),
    ("q", torch.zeros(4, 4, 8, dtype=torch.float64), ValueError, "q"),
    ("v", torch.zeros(1, 4, 2, dtype=torch.float64), ValueError, "v"),
    ("q", torch.zeros(1, 4, 4, 8, dtype=torch.int64), TypeError, "q"),
    ("k", torch.zeros(1, 4, 2, 8, dtype=torch.float32), TypeError, "dtype"),
    ("q", torch.zeros(2, 4, 4, 8, dtype=torch.float64), ValueError, "batch"),
    ("q", torch.zeros(1, 4, 3, 8, dtype=torch.float64), ValueError, "heads"),
    ("k", torch.zeros(1, 4, 2, 4, dtype=torch.float64), ValueError, "head_dim"),
    ("v", torch.zeros(1, 5, 2, 8, dtype=torch.float64), ValueError, "v"),
])
def test_bad_tensors_raise(which, bad, exc, word):
    args = dict(zip("qkv", _ok()))
    args[which] = bad
    with pytest.raises(exc, match=word):
        K.attention_forward(args["q"], args["k"], args["v"], backend="torch")
    with pytest.raises(exc, match=word):
        K.attention(args["q"], args["k"], args["v"], backend="torch")


@pytest.mark.parametrize("window,exc", [
    ((-2, 0), ValueError), ((0, -5), ValueError), (3, TypeError), ((1, 2, 3), TypeError),
    ((1.0, 2), TypeError), ((True, 0), TypeError), ("ab", TypeError),
])
def test_bad_window_raises(window, exc):
    q, k, v = _ok()
    with pytest.raises(exc, match="window_size"):
        K.attention_forward(q, k, v, window_size=window, backend="torch")


@pytest.mark.parametrize("scale,exc", [
    (float("nan"), ValueError), (float("inf"), ValueError), ("0.1", TypeError),
    (True, TypeError), (torch.tensor(0.5), TypeError),
])
def test_bad_scale_raises(scale, exc):
    q, k, v = _ok()
    with pytest.raises(exc, match="softmax_scale"):
        K.attention_forward(q, k, v, softmax_scale=scale, backend="torch")


def test_bad_backend_raises():
    q, k, v = _ok()
    with pytest.raises(ValueError, match="backend"):
        K.attention_forward(q, k, v, backend="nope")
    with pytest.raises((ValueError, TypeError), match="backend"):
        K.attention_forward(q, k, v, backend=["torch"])
    if "aten" in K.BACKENDS:  # aten exists but cannot serve CPU tensors
        with pytest.raises(ValueError, match="aten"):
            K.attention_forward(q, k, v, backend="aten")


def test_bad_backward_arguments_raise():
    q, k, v = _ok()
    out, lse = K.attention_forward(q, k, v, backend="torch")
    dout = torch.ones_like(out)
    with pytest.raises(ValueError, match="dout"):
        K.attention_backward(dout[:, :3], q, k, v, out, lse, backend="torch")
    with pytest.raises(ValueError, match="lse"):
        K.attention_backward(dout, q, k, v, out, lse[:, :, :3], backend="torch")
    with pytest.raises(TypeError, match="dout"):
        K.attention_backward(None, q, k, v, out, lse, backend="torch")
    with pytest.raises(ValueError, match="dlse"):  # would broadcast silently
        K.attention_backward(dout, q, k, v, out, lse, dlse=torch.ones(4, dtype=torch.float64),
                             backend="torch")
    with pytest.raises(ValueError, match="dlse"):
        K.attention_backward(dout, q, k, v, out, lse, dlse=lse[:, :1], backend="torch")
    with pytest.raises(TypeError, match="dout"):
        K.attention_backward(dout.int(), q, k, v, out, lse, backend="torch")
    # a head dim that is not v's failed inside the backend, naming nothing
    wrong = torch.ones(*out.shape[:-1], out.shape[-1] + 1, dtype=out.dtype)
    with pytest.raises(ValueError, match="v's head dim"):
        K.attention_backward(wrong, q, k, v, wrong, lse, backend="torch")
    # an expanded slot: every copy would land on the same memory (after the whole computation)
    flat = torch.empty(out.shape[0], 1, *out.shape[2:], dtype=out.dtype).expand_as(out)
    with pytest.raises(ValueError, match="out must not be an expanded view"):
        K.attention_forward(q, k, v, backend="torch", out=flat)
    flat_q = torch.empty(q.shape[0], 1, *q.shape[2:], dtype=q.dtype).expand_as(q)
    with pytest.raises(ValueError, match="dq_out must not be an expanded view"):
        K.attention_backward(dout, q, k, v, out, lse, backend="torch", dq_out=flat_q)


def test_bad_causal_raises():
    q, k, v = _ok()
    with pytest.raises(TypeError, match="causal"):
        K.attention_forward(q, k, v, causal="no", backend="torch")


