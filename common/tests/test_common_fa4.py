"""The fa4 backend (FlashAttention-4 through ``flash_attn.cute``) on the CPU.

FA4 runs only on sm90+ GPUs, so the adapter runs here against
:class:`longattn.common.testing.Fa4Standin`: FA4's two interface functions with its argument
names, return values, lse layout, window convention (``None`` unbounded, a negative side taken
as a number) and row rules, computed in float64. Forward and backward through our entry points
are checked against the float64 oracle (``longattn.reference``) on odd lengths, GQA, Sq != Sk,
causal, windows, empty rows, dlse and packed varlen batches; a naive window conversion fails
the same checks. What FA4 itself computes is checked on a GPU by ``common/bench/check_fa4.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.common import kernels as K
from longattn.common.bench import cu_seqlens
from longattn.common.kernels import fa4_backend as fb
from longattn.common.kernels.varlen import (
    attention_backward_varlen,
    attention_forward_varlen,
    attention_varlen,
)
from longattn.common.testing import TOLERANCES, Fa4Standin, oracle_errors
from longattn.reference import attention as ref_attention
from longattn.reference import attention_backward as ref_backward
from longattn.reference import causal_mask, document_mask, window_mask


def _rand(*shape, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _qkv(b, sq, sk, hq, hkv, d, *, seed=0, dtype=torch.bfloat16):
    return (_rand(b, sq, hq, d, seed=seed, dtype=dtype), _rand(b, sk, hkv, d, seed=seed + 1,
                                                                 dtype=dtype),
            _rand(b, sk, hkv, d, seed=seed + 2, dtype=dtype))


def _np(*ts):
    return [t.double().numpy() for t in ts]


def _dense_mask(sq, sk, causal, window):
    m = window_mask(sq, sk, window)
    return m & causal_mask(sq, sk) if causal else m


@pytest.fixture
def standin():
    s = Fa4Standin(arch=90)
    with fb.use(s):
        yield s


# --------------------------------------------------------------------------------------------
# registry: optional, by name only, says why when missing


def test_unavailable_without_flash_attn_4_and_naming_it_says_why():
    q, k, v = _qkv(1, 8, 8, 2, 2, 64)
    if fb.MISSING is None:  # installed here: registered, refuses CPU tensors
        assert "fa4" in K.BACKENDS and "fa4" not in K.UNAVAILABLE
        with pytest.raises(ValueError, match="'fa4' cannot serve"):
            K.attention_forward(q, k, v, backend="fa4")
        return
    assert "fa4" not in K.BACKENDS
    assert "flash-attn-4" in K.UNAVAILABLE["fa4"]
    with pytest.raises(ValueError, match="'fa4' is not available here.*flash-attn-4"):
        K.attention_forward(q, k, v, backend="fa4")
    with pytest.raises(ValueError, match="'fa4' is not available here.*flash-attn-4"):
        K.pick_backend(q, k, v, backend="fa4")
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="'fa4' is not available here"):
        attention_forward_varlen(q[0], k[0], v[0], cu, cu, backend="fa4")
    with pytest.raises(ValueError, match="fa4 backend is not available"):
        fb.forward(q, k, v, softmax_scale=0.1, window_size=(-1, -1))


def test_not_in_auto(standin):
    assert "fa4" not in K.AUTO_ORDER
    q, k, v = _qkv(1, 16, 16, 2, 2, 64)
    # served by fa4 when named (the stand-in takes CPU tensors), never chosen by auto
    assert K.pick_backend(q, k, v, causal=True, backend="fa4") == "fa4"
    assert K.pick_backend(q, k, v, causal=True) == "torch"


def test_use_restores_the_registry():
    before = (dict(K.BACKENDS), dict(K.UNAVAILABLE))
    with fb.use(Fa4Standin()):
        assert K.BACKENDS["fa4"] is fb.BACKEND and "fa4" not in K.UNAVAILABLE
    assert (dict(K.BACKENDS), dict(K.UNAVAILABLE)) == before


def test_an_import_that_fails_is_the_reason(monkeypatch):
    """An installed flash_attn.cute whose import fails (no CUDA 13 driver, a broken wheel) is the
    reason the backend gives when named."""
    monkeypatch.setattr(fb, "MISSING", None)
    monkeypatch.setattr(fb, "_loaded", ["import flash_attn.cute failed: RuntimeError: no CTK"])
    monkeypatch.setitem(K.BACKENDS, "fa4", fb.BACKEND)
    monkeypatch.delitem(K.UNAVAILABLE, "fa4", raising=False)
    q, k, v = _qkv(1, 8, 8, 2, 2, 64)
    with pytest.raises(ValueError, match="'fa4' cannot serve.*import flash_attn.cute failed.*CTK"):
        K.attention_forward(q, k, v, backend="fa4")


@pytest.mark.parametrize("arch, dtype, d, dv, device_type, match", [
    (90, torch.float32, 64, 64, "cpu", r"needs fp16/bf16, q is torch.float32"),
    (90, torch.float64, 64, 64, "cpu", r"needs fp16/bf16, q is torch.float64"),
    (80, torch.bfloat16, 64, 64, "cpu", r"needs sm90 or newer.*sm80"),
    (90, torch.bfloat16, 12, 12, "cpu", r"head_dim 12 \(v 12\) not supported on sm90"),
    (90, torch.bfloat16, 264, 264, "cpu", r"head_dim 264.*<= 256"),
    (90, torch.bfloat16, 64, 128, "cpu", r"head_dim 64 \(v 128\)"),
    (100, torch.bfloat16, 192, 192, "cpu", r"head_dim 192.*sm100.*<= 128 or 256"),
    (90, torch.bfloat16, 64, 64, "cuda", r"needs CUDA tensors, q is on cpu"),
])
def test_refusals_name_what_is_wrong(arch, dtype, d, dv, device_type, match):
    q, k, _ = _qkv(1, 8, 8, 2, 2, d, dtype=dtype)
    v = _rand(1, 8, 2, dv, seed=5, dtype=dtype)
    with fb.use(Fa4Standin(arch=max(arch, 90)), arch=arch, device_type=device_type):
        with pytest.raises(ValueError, match="backend 'fa4' cannot serve this call: " + match):
            K.attention_forward(q, k, v, backend="fa4")


@pytest.mark.parametrize("arch, d", [(90, 8), (90, 96), (90, 256), (100, 128), (100, 256)])
def test_head_dims_it_has(arch, d):
    q, k, v = _qkv(1, 9, 9, 2, 1, d)
    with fb.use(Fa4Standin(arch=arch), arch=arch):
        out, lse = K.attention_forward(q, k, v, causal=True, backend="fa4")
    ro, rl = ref_attention(*_np(q, k, v), mask=causal_mask(9, 9))
    errs = oracle_errors({"out": out, "lse": lse}, {"out": ro, "lse": rl})
    assert max(errs.values()) <= TOLERANCES[torch.bfloat16], errs


def test_needs_dlse_is_served(standin):
    q, k, v = _qkv(1, 8, 8, 2, 2, 64)
    assert K.pick_backend(q, k, v, needs_dlse=True, backend="fa4") == "fa4"


# --------------------------------------------------------------------------------------------
# the window: ours (-1 unbounded) to FA4's (None unbounded, a negative side is a number)


def test_fa4_window_examples():
    assert fb.fa4_window((-1, -1)) == (None, None)
    assert fb.fa4_window((-1, 0)) == (None, 0)  # causal
    assert fb.fa4_window((4096, 0)) == (4096, 0)
    assert fb.fa4_window((3, -1)) == (3, None)
    assert fb.fa4_window((0, 0)) == (0, 0)


@settings(max_examples=300, deadline=None)
@given(sq=st.integers(1, 30), sk=st.integers(1, 30), left=st.integers(-1, 35),
       right=st.integers(-1, 35), causal=st.booleans())
def test_fa4_window_reproduces_our_mask(sq, sk, left, right, causal):
    """Our window with causal folded in, converted and read by FA4's rules, is our mask."""
    win = K.normalize_window(causal, (left, right))
    got = Fa4Standin.mask(sq, sk, False, *fb.fa4_window(win)).numpy()
    assert np.array_equal(got, _dense_mask(sq, sk, causal, (left, right)))


def test_fa4_reads_a_negative_side_as_a_number():
    """Why the conversion is needed: FA4 hides the diagonal for window_size_left=-1."""
    m = Fa4Standin.mask(4, 4, False, -1, 0).numpy()
    assert not m.any()
    assert np.array_equal(Fa4Standin.mask(4, 4, False, -1, -1).numpy(), np.ones((4, 4), bool))


# --------------------------------------------------------------------------------------------
# forward and backward against the oracle

# (name, b, sq, sk, hq, hkv, d, causal, window, scale)
CASES = [
    ("dense odd", 2, 37, 37, 4, 4, 64, False, (-1, -1), None),
    ("causal GQA 4:1", 1, 53, 53, 8, 2, 128, True, (-1, -1), None),
    ("causal Sq<Sk", 1, 19, 70, 4, 1, 64, True, (-1, -1), None),
    ("causal Sq>Sk empty rows", 1, 70, 19, 4, 2, 64, True, (-1, -1), None),
    ("window (7,0) causal", 2, 61, 61, 4, 2, 64, True, (7, -1), None),
    ("window (5,9)", 1, 40, 33, 2, 2, 128, False, (5, 9), None),
    ("window (-1,3)", 1, 29, 29, 4, 4, 64, False, (-1, 3), 0.3),
    ("window (0,0)", 1, 17, 17, 2, 1, 64, False, (0, 0), None),
    ("window (3,-1) Sq<Sk", 1, 11, 40, 2, 2, 64, False, (3, -1), None),
    ("window (2,0) Sq>Sk empty rows", 1, 30, 9, 2, 2, 64, False, (2, 0), None),
]


def _check_case(case, dtype=torch.bfloat16, dlse=False, seed=0):
    name, b, sq, sk, hq, hkv, d, causal, window, scale = case
    q, k, v = _qkv(b, sq, sk, hq, hkv, d, seed=seed, dtype=dtype)
    dout = _rand(b, sq, hq, d, seed=seed + 7, dtype=dtype)
    dl = _rand(b, hq, sq, seed=seed + 8, dtype=torch.float32) if dlse else None
    kw = dict(softmax_scale=scale, causal=causal, window_size=window, backend="fa4")
    out, lse = K.attention_forward(q, k, v, **kw)
    grads = K.attention_backward(dout, q, k, v, out, lse, dlse=dl, **kw)
    mask = _dense_mask(sq, sk, causal, window)
    ro, rl = ref_attention(*_np(q, k, v), mask=mask, scale=scale)
    rg = ref_backward(*_np(dout, q, k, v), mask=mask, scale=scale,
                      dlse=None if dl is None else dl.double().numpy())
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    assert [g.dtype for g in grads] == [dtype] * 3
    errs = oracle_errors({"out": out, "lse": lse, "dq": grads[0], "dk": grads[1],
                          "dv": grads[2]}, {"out": ro, "lse": rl, "dq": rg[0], "dk": rg[1],
                                            "dv": rg[2]})
    return errs, (out, lse, grads, mask)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_against_the_oracle(case, standin):
    errs, (out, lse, grads, mask) = _check_case(case)
    assert max(errs.values()) <= TOLERANCES[torch.bfloat16], errs
    dead = ~mask.any(-1)
    if dead.any():  # rows without keys: out 0, lse -inf, zero gradient
        rows = torch.from_numpy(dead)
        assert torch.all(out[:, rows] == 0) and torch.all(torch.isneginf(lse[..., rows]))
        assert torch.all(grads[0][:, rows] == 0)


def test_float16_and_dlse(standin):
    for case in (CASES[1], CASES[4], CASES[3]):
        errs, _ = _check_case(case, dtype=torch.float16, dlse=True, seed=3)
        assert max(errs.values()) <= TOLERANCES[torch.float16], (case[0], errs)
    assert standin.calls[-1][0] == "bwd" and standin.calls[-1][1]["dlse"] is not None


def test_the_call_fa4_gets(standin):
    q, k, v = _qkv(1, 16, 16, 4, 2, 64)
    out, lse = K.attention_forward(q, k, v, causal=True, window_size=(5, 3), backend="fa4")
    K.attention_backward(out, q, k, v, out, lse.double(), causal=True, window_size=(5, 3),
                         backend="fa4")
    (fwd, f), (bwd, g) = standin.calls
    assert (fwd, bwd) == ("fwd", "bwd")
    assert f["causal"] is False and (f["window_size_left"], f["window_size_right"]) == (5, 0)
    assert f["return_lse"] is True and f["softmax_scale"] == 64 ** -0.5
    assert g["causal"] is False and (g["window_size_left"], g["window_size_right"]) == (5, 0)
    assert g["dlse"] is None


def test_a_naive_window_conversion_fails_these_checks(monkeypatch, standin):
    """The checks above can fail: passing our -1 through as FA4's window (no None) hides the
    diagonal of a causal window and the errors leave every tolerance."""
    monkeypatch.setattr(fb, "fa4_window", lambda w: tuple(w))
    errs, _ = _check_case(CASES[1])  # causal: (-1, 0) read as "left = -1"
    assert errs["out"] > 0.5
    errs, _ = _check_case(CASES[4])  # window (7, 0) with causal is served right either way...
    assert max(errs.values()) <= TOLERANCES[torch.bfloat16]
    errs, _ = _check_case(CASES[6])  # ...(-1, 3) is not
    assert errs["out"] > 0.5


def test_a_wrong_alignment_fails_these_checks(monkeypatch, standin):
    """Top-left instead of bottom-right (e.g. converting with the lengths swapped) is caught."""
    orig = Fa4Standin.mask

    def top_left(sq, sk, causal, left, right, device="cpu"):
        m = orig(sk, sk, causal, left, right, device)
        return m[:sq]

    monkeypatch.setattr(Fa4Standin, "mask", staticmethod(top_left))
    errs, _ = _check_case(CASES[2])  # causal Sq < Sk
    assert errs["out"] > 0.1


@pytest.mark.parametrize("aligned", [True, False])
def test_out_and_dq_out_are_written_in_place(aligned, standin):
    """``out=`` / ``dq_out=`` slots FA4's kernels can write (strides in multiples of 16 bytes)
    go to FA4 as ``out`` / ``dq``; other layouts get FA4's own tensor, copied in. Either way
    the slot holds the oracle's result and is what the call returns."""
    b, s, hq, hkv, d = 2, 37, 4, 2, 64
    q, k, v = _qkv(b, s, s, hq, hkv, d, seed=21)
    dout = _rand(b, s, hq, d, seed=25)
    width = d + (8 if aligned else 4)  # rows of 144 bytes (a multiple of 16) or of 136
    buf = torch.full((2, b, s, hq, width), float("nan"), dtype=q.dtype)
    out_slot, dq_slot = buf[0, ..., :d], buf[1, ..., :d]
    assert fb.writable(out_slot) is aligned and not out_slot.is_contiguous()
    out, lse = K.attention_forward(q, k, v, causal=True, backend="fa4", out=out_slot)
    dq, dk, dv = K.attention_backward(dout, q, k, v, out, lse, causal=True, backend="fa4",
                                      dq_out=dq_slot)
    assert out is out_slot and dq is dq_slot
    (_, f), (_, g) = standin.calls
    assert (f["out"] is out_slot) is aligned and (f["out"] is None) is not aligned
    assert (g["dq"] is dq_slot) is aligned and (g["dq"] is None) is not aligned
    mask = _dense_mask(s, s, True, (-1, -1))
    ro, rl = ref_attention(*_np(q, k, v), mask=mask, scale=d ** -0.5)
    rg = ref_backward(*_np(dout, q, k, v), mask=mask, scale=d ** -0.5)
    errs = oracle_errors({"out": out_slot, "lse": lse, "dq": dq_slot, "dk": dk, "dv": dv},
                         {"out": ro, "lse": rl, "dq": rg[0], "dk": rg[1], "dv": rg[2]})
    assert max(errs.values()) <= TOLERANCES[torch.bfloat16], errs
    assert torch.isnan(buf[..., d:]).all()  # the padding is not written


def test_standin_refuses_an_out_fa4_would_refuse(standin):
    q, k, v = _qkv(1, 8, 8, 2, 2, 64)
    odd = torch.empty(1, 8, 2, 68, dtype=q.dtype)[..., :64]
    with pytest.raises(AssertionError, match="aligned strides"):
        standin._flash_attn_fwd(q, k, v, return_lse=True, out=odd)
    with pytest.raises(AssertionError, match="shape"):
        standin._flash_attn_fwd(q, k, v, return_lse=True, out=torch.empty(1, 8, 2, 32,
                                                                          dtype=q.dtype))


def test_nan_rows_give_nan_lse(standin):
    """FA4 gives a row that saw a NaN lse -inf and out NaN: the backend makes its lse NaN."""
    q, k, v = _qkv(1, 12, 12, 2, 2, 64)
    q[0, 3, 1, 5] = float("nan")
    out, lse = K.attention_forward(q, k, v, causal=True, backend="fa4")
    assert torch.isnan(lse[0, 1, 3]) and torch.isnan(out[0, 3, 1]).all()
    nan_rows = torch.isnan(lse)
    assert nan_rows.sum() == 1 and torch.isfinite(out[~nan_rows.transpose(1, 2)]).all()
    dq, _, _ = K.attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=True,
                                    backend="fa4")
    assert torch.isnan(dq[0, 3, 1]).all() and torch.isfinite(dq[0, :, 0]).all()


def test_empty_sequences(standin):
    q, k, v = _qkv(1, 5, 0, 2, 1, 64)
    out, lse = K.attention_forward(q, k, v, backend="fa4")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    grads = K.attention_backward(out, q, k, v, out, lse, backend="fa4")
    assert all(torch.all(g == 0) for g in grads) and not standin.calls


def test_autograd_with_lse_gradient(standin):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 33, 33, 4, 2, 64, seed=11))
    o, l = K.attention(q, k, v, causal=True, window_size=(9, 0), return_lse=True, backend="fa4")
    (o.float().sum() + (l * torch.linspace(-1, 1, 33)).sum()).backward()
    mask = _dense_mask(33, 33, True, (9, 0))
    dl = np.broadcast_to(np.linspace(-1, 1, 33), (1, 4, 33))
    rg = ref_backward(np.ones((1, 33, 4, 64)), *_np(q.detach(), k.detach(), v.detach()),
                      mask=mask, dlse=dl)
    errs = oracle_errors({"dq": q.grad, "dk": k.grad, "dv": v.grad},
                         {"dq": rg[0], "dk": rg[1], "dv": rg[2]})
    assert max(errs.values()) <= TOLERANCES[torch.bfloat16], errs
    assert standin.calls[-1][1]["dlse"] is not None


# --------------------------------------------------------------------------------------------
# packed varlen


# (name, q lengths, k lengths, hq, hkv, d, causal, window, sinks)
VARLEN = [
    ("causal docs", [17, 1, 40, 9], [17, 1, 40, 9], 4, 2, 64, True, (-1, -1), 0),
    ("Sq != Sk, GQA", [5, 30, 0, 12], [20, 30, 7, 3], 8, 2, 128, True, (-1, -1), 0),
    ("window, keyless doc", [9, 14, 6], [9, 0, 20], 2, 2, 64, False, (4, 2), 0),
    ("causal window + sinks", [25, 31], [25, 31], 4, 1, 64, True, (6, -1), 2),
]




@pytest.mark.parametrize("case", VARLEN, ids=[c[0] for c in VARLEN])
@pytest.mark.parametrize("dlse", [False, True])
def test_varlen_against_the_oracle(case, dlse, standin):
    name, lq, lk, hq, hkv, d, causal, window, sinks = case
    tq, tk = sum(lq), sum(lk)
    q, k, v = (_rand(t, h, d, seed=s) for t, h, s in ((tq, hq, 1), (tk, hkv, 2), (tk, hkv, 3)))
    dout = _rand(tq, hq, d, seed=4)
    dl = _rand(hq, tq, seed=5, dtype=torch.float32) if dlse else None
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    kw = dict(causal=causal, window_size=window, num_sink_tokens=sinks, backend="fa4")
    out, lse = attention_forward_varlen(q, k, v, cq, ck, **kw)
    grads = attention_backward_varlen(dout, q, k, v, out, lse, cq, ck, dlse=dl, **kw)
    mask = document_mask(cq.numpy(), ck.numpy(), causal=causal, window=window,
                         num_sink_tokens=sinks)
    args = [t.double().numpy()[None] for t in (q, k, v)]
    ro, rl = ref_attention(*args, mask=mask)
    rg = ref_backward(dout.double().numpy()[None], *args, mask=mask,
                      dlse=None if dl is None else dl.double().numpy()[None])
    errs = oracle_errors({"out": out, "lse": lse, "dq": grads[0], "dk": grads[1],
                          "dv": grads[2]},
                         {"out": ro[0], "lse": rl[0], "dq": rg[0][0], "dk": rg[1][0],
                          "dv": rg[2][0]})
    assert max(errs.values()) <= TOLERANCES[torch.bfloat16], errs
    # one packed call each way (not a loop over sequences), with FA4's metadata types
    fwd = [c for n, c in standin.calls if n == "fwd"]
    assert len(fwd) == 1 and fwd[0]["cu_seqlens_q"].dtype == torch.int32
    assert isinstance(fwd[0]["max_seqlen_q"], int) and isinstance(fwd[0]["max_seqlen_k"], int)
    assert len([c for n, c in standin.calls if n == "bwd"]) == 1


def test_varlen_autograd(standin):
    lens = [7, 20, 3]
    q, k, v = (_rand(30, h, 64, seed=s).requires_grad_() for h, s in ((4, 1), (2, 2), (2, 3)))
    cu = cu_seqlens(lens)
    out = attention_varlen(q, k, v, cu, causal=True, backend="fa4")
    out.float().sum().backward()
    mask = document_mask(cu.numpy(), causal=True)
    args = [t.detach().double().numpy()[None] for t in (q, k, v)]
    rg = ref_backward(np.ones((1, 30, 4, 64)), *args, mask=mask)
    errs = oracle_errors({"dq": q.grad, "dk": k.grad}, {"dq": rg[0][0], "dk": rg[1][0]})
    assert max(errs.values()) <= TOLERANCES[torch.bfloat16], errs


def test_varlen_refusal_names_the_reason(standin):
    q = _rand(10, 2, 64, seed=0, dtype=torch.float32)
    cu = cu_seqlens([4, 6])
    with pytest.raises(ValueError, match="'fa4' cannot serve this call: needs fp16/bf16"):
        attention_forward_varlen(q, q, q, cu, cu, backend="fa4")


def test_standin_keeps_fa4s_signatures():
    """Where flash-attn-4 imports: every argument the stand-in takes is FA4's, with FA4's
    default, and the forward / backward return what the stand-in returns."""
    import inspect

    from longattn.common import testing as T

    rt = fb.runtime()
    if isinstance(rt, str):
        pytest.skip(f"FA4 not usable here: {rt}")
    for name, other in (("_flash_attn_fwd", T._FA4_FWD_OTHER),
                        ("_flash_attn_bwd", T._FA4_BWD_OTHER)):
        real = inspect.signature(getattr(rt.interface, name)).parameters
        ours = inspect.signature(getattr(Fa4Standin(), name)).parameters
        taken = {n: p.default for n, p in ours.items() if p.kind != p.VAR_KEYWORD}
        taken.update(other)
        for n, default in taken.items():
            assert n in real, (name, n)
            if default is not inspect.Parameter.empty:
                assert real[n].default == default, (name, n, real[n].default, default)
        required = [n for n, p in real.items() if p.default is inspect.Parameter.empty]
        assert list(ours)[:len(required)] == required, (name, required)


def test_fix_rows_without_empty_rows_reads_only_lse():
    """Where every row has a key, an lse of -inf can only come from non-finite scores: that row
    gets lse NaN (whatever out holds); where rows may be empty, only a NaN out marks it."""
    out = torch.zeros(1, 3, 2, 8)
    lse = torch.tensor([[[0.5, float("-inf"), 1.0], [float("-inf"), 2.0, 3.0]]])
    o, lsef = fb._fix_rows(out, lse, empty_possible=False)
    assert o is out and torch.isnan(lsef[0, 0, 1]) and torch.isnan(lsef[0, 1, 0])
    assert torch.isnan(lsef).sum() == 2
    o, lsee = fb._fix_rows(out.clone(), lse, empty_possible=True)
    assert torch.isnan(lsee).sum() == 0 and torch.isneginf(lsee).sum() == 2
    out[0, 1, 0, 0] = float("nan")
    _, lsee = fb._fix_rows(out.clone(), lse, empty_possible=True)
    assert torch.isnan(lsee[0, 0, 1]) and torch.isneginf(lsee[0, 1, 0])
