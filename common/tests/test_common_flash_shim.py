"""common/bench/flash_shim.py: flash-attn 2.7's interface on longattn's kernels, checked against
the float64 oracle (forward, in-place backward, causal, windows, GQA, Sq != Sk, varlen, the
autograd ``flash_attn_func``), flash-attn's signatures (what peers introspect), and that
installing it never shadows a real ``flash_attn`` package or namespace."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longattn.common.testing import dense_reference64, load_script, rel_error
from longattn.reference import attention, attention_backward, causal_mask, window_mask
from longattn.reference.masks import document_mask

SHIM = Path(__file__).resolve().parents[1] / "bench" / "flash_shim.py"
TOL = 1e-6  # the shim's lse is float32 (flash-attn's contract) whatever the input dtype


@pytest.fixture
def shim():
    """The shim module, installed, with ``flash_attn*`` entries of ``sys.modules`` and
    ``sys.path`` restored afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "flash_attn"}
    path = list(sys.path)
    for k in saved:
        del sys.modules[k]
    mod = load_script(SHIM, "flash_shim_under_test")
    yield mod
    mod.uninstall()
    for k in [k for k in sys.modules if k.split(".")[0] == "flash_attn"]:
        del sys.modules[k]
    sys.modules.update(saved)
    sys.path[:] = path


def _qkv(b, sq, sk, hq, hkv, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype)
            for shape in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d), (b, sq, hq, d))]


def _mask(sq, sk, causal, window):
    m = window_mask(sq, sk, window)
    return m & causal_mask(sq, sk) if causal else m


CASES = [  # (b, sq, sk, hq, hkv, d, causal, window)
    (2, 16, 16, 4, 4, 8, True, (-1, -1)),
    (1, 24, 24, 4, 2, 16, False, (-1, -1)),
    (2, 12, 20, 6, 2, 8, True, (-1, -1)),   # bottom-right causal, GQA 3
    (1, 20, 20, 2, 1, 8, False, (5, 3)),    # a two-sided window, MQA
    (1, 20, 12, 2, 2, 8, True, (4, -1)),    # causal window, Sq > Sk: rows that see no key
]


@pytest.mark.parametrize("case", CASES)
def test_forward_backward_against_oracle(shim, case):
    b, sq, sk, hq, hkv, d, causal, window = case
    fa = shim.install()
    assert shim.is_shim(fa)
    q, k, v, do = _qkv(b, sq, sk, hq, hkv, d)
    scale = 0.3
    out, lse, dmask, rng = fa._flash_attn_forward(q, k, v, 0.0, scale, causal, window[0],
                                                  window[1], 0.0, None, False)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert dmask.numel() == 0 and rng.shape == (2,)
    mask = _mask(sq, sk, causal, window)
    n = [t.numpy() for t in (q, k, v)]
    ro, rl = attention(*n, mask=mask, scale=scale)
    assert rel_error(out, ro) < 1e-10
    dead = np.isneginf(rl)
    assert np.array_equal(torch.isneginf(lse).numpy(), dead)  # no key: -inf, out 0
    assert rel_error(lse.double().numpy()[~dead], rl[~dead]) < TOL
    assert not torch.isnan(out).any()
    # backward writes into the caller's buffers (flash-attn's mutates_args) and returns D
    dq, dk, dv = (torch.full_like(t, 7.0) for t in (q, k, v))
    ptrs = [t.data_ptr() for t in (dq, dk, dv)]
    d_sum = fa._flash_attn_backward(do, q, k, v, out, lse, dq, dk, dv, 0.0, scale, causal,
                                    window[0], window[1], 0.0, None, False, None)
    assert [t.data_ptr() for t in (dq, dk, dv)] == ptrs
    refs = attention_backward(do.numpy(), *n, mask=mask, scale=scale)
    for got, ref in zip((dq, dk, dv), refs):
        assert rel_error(got, ref) < TOL
    assert d_sum.dtype == torch.float32 and d_sum.shape == (b, hq, sq)
    assert rel_error(d_sum, (do * out).sum(-1).transpose(1, 2)) < 1e-6
    # None buffers: flash-attn allocates and drops them; the shim must not fail
    fa._flash_attn_backward(do, q, k, v, out, lse, None, None, None, 0.0, scale, causal,
                            window[0], window[1], 0.0, None, False)


def test_a_wrong_kernel_fails_the_oracle_check(shim):
    """The comparison above can fail: a non-causal call is far from the causal oracle."""
    fa = shim.install()
    q, k, v, _ = _qkv(1, 16, 16, 2, 2, 8)
    out = fa._flash_attn_forward(q, k, v, 0.0, None, False, -1, -1, 0.0, None, False)[0]
    ro, _ = attention(*(t.numpy() for t in (q, k, v)), mask=causal_mask(16, 16))
    assert rel_error(out, ro) > 1e-2


def test_strided_inputs_and_bf16(shim):
    fa = shim.install()
    q, k, v, do = _qkv(1, 16, 16, 4, 4, 8, dtype=torch.bfloat16)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)  # BSHD view of a BHSD tensor
    out, lse, _, _ = fa._flash_attn_forward(qs, k, v, 0.0, None, True, -1, -1, 0.0, None, False)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ro, _ = attention(*(t.double().numpy() for t in (q, k, v)), mask=causal_mask(16, 16))
    assert rel_error(out, ro) < 2e-2
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    fa._flash_attn_backward(do, qs, k, v, out, lse, dq, dk, dv, 0.0, None, True, -1, -1, 0.0,
                            None, False)
    refs = attention_backward(do.double().numpy(), *(t.double().numpy() for t in (q, k, v)),
                              mask=causal_mask(16, 16))
    for got, ref in zip((dq, dk, dv), refs):
        assert got.dtype == torch.bfloat16 and rel_error(got, ref) < 2e-2


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (3, -1))])
def test_varlen_against_oracle(shim, causal, window):
    fa = shim.install()
    cu_q = torch.tensor([0, 5, 6, 17, 24], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 17, 30], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(24, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(30, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(24, 4, 8, generator=g, dtype=torch.float64)
    out, lse, _, _ = fa._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, 11, 13, 0.0, None,
                                                   causal, window[0], window[1])
    assert lse.shape == (4, 24) and lse.dtype == torch.float32
    mask = document_mask(cu_q.tolist(), cu_k.tolist(), causal=causal, window=window)
    ro, rl, rg = dense_reference64(q, k, v, do, mask, 8 ** -0.5)
    assert rel_error(out, ro) < 1e-10
    finite = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_error(lse.double()[finite], rl[finite]) < TOL
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
    d_sum = fa._flash_attn_varlen_backward(do, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, 11, 13,
                                           0.0, None, causal, window[0], window[1], 0.0, None,
                                           False)
    for got, ref in zip((dq, dk, dv), rg):
        assert rel_error(got, ref) < TOL
    assert d_sum.shape == (4, 24)


def test_flash_attn_func_autograd(shim):
    fa = shim.install()
    q, k, v, do = _qkv(2, 12, 12, 4, 2, 8, seed=5)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = fa.flash_attn_func(qg, kg, vg, causal=True)
    assert isinstance(out, torch.Tensor)
    out.backward(do)
    n = [t.numpy() for t in (q, k, v)]
    ro, rl = attention(*n, mask=causal_mask(12, 12))
    refs = attention_backward(do.numpy(), *n, mask=causal_mask(12, 12))
    assert rel_error(out.detach(), ro) < 1e-10
    for t, ref in zip((qg, kg, vg), refs):
        assert rel_error(t.grad, ref) < TOL
    # return_attn_probs: (out, lse, None); the lse has no gradient (flash-attn 2 drops it)
    qg2, kg2, vg2 = (t.clone().requires_grad_() for t in (q, k, v))
    out2, lse2, probs = fa.flash_attn_func(qg2, kg2, vg2, causal=True, return_attn_probs=True)
    assert probs is None and not lse2.requires_grad and lse2.dtype == torch.float32
    assert rel_error(lse2.double(), rl) < TOL
    (out2 * do).sum().backward()
    assert torch.equal(qg2.grad, qg.grad)


def test_signatures_are_flash_attn_27s(shim):
    """Peers read these signatures (ring-flash-attention's get_default_args)."""
    fa = shim.install()
    args = {name: inspect.getfullargspec(getattr(fa, name)) for name in (
        "_flash_attn_forward", "_flash_attn_backward", "_flash_attn_varlen_forward",
        "_flash_attn_varlen_backward", "flash_attn_func")}
    assert args["_flash_attn_forward"].args == [
        "q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left",
        "window_size_right", "softcap", "alibi_slopes", "return_softmax"]
    assert args["_flash_attn_forward"].defaults is None
    assert args["_flash_attn_backward"].args == [
        "dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
        "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
        "alibi_slopes", "deterministic", "rng_state"]
    assert args["_flash_attn_backward"].defaults == (None,)
    assert args["_flash_attn_varlen_forward"].args == [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
        "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right",
        "softcap", "alibi_slopes", "return_softmax", "block_table", "leftpad_k", "seqused_k"]
    assert args["_flash_attn_varlen_forward"].defaults == (-1, -1, 0.0, None, False, None, None,
                                                          None)
    assert args["_flash_attn_varlen_backward"].args == [
        "dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "cu_seqlens_q",
        "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale", "causal",
        "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic",
        "rng_state"]
    assert args["flash_attn_func"].args == [
        "q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
        "alibi_slopes", "deterministic", "return_attn_probs"]
    assert args["flash_attn_func"].defaults == (0.0, None, False, (-1, -1), 0.0, None, False,
                                               False)


def test_unsupported_arguments_raise(shim):
    fa = shim.install()
    q, k, v, _ = _qkv(1, 8, 8, 2, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fa._flash_attn_forward(q, k, v, 0.1, None, True, -1, -1, 0.0, None, False)
    with pytest.raises(NotImplementedError, match="softcap"):
        fa._flash_attn_forward(q, k, v, 0.0, None, True, -1, -1, 30.0, None, False)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        fa.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2))
    with pytest.raises(NotImplementedError, match="return_softmax"):
        fa._flash_attn_forward(q, k, v, 0.0, None, True, -1, -1, 0.0, None, True)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="seqused_k"):
        fa._flash_attn_varlen_forward(q[0], k[0], v[0], cu, cu, 8, 8, 0.0, None, True,
                                      seqused_k=cu)


def test_install_is_idempotent_and_uninstalls(shim):
    fa = shim.install()
    assert shim.install() is fa
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    assert _flash_attn_forward is shim._flash_attn_forward
    assert _flash_attn_backward is shim._flash_attn_backward
    import flash_attn

    assert flash_attn.flash_attn_interface is fa
    shim.uninstall()
    assert "flash_attn" not in sys.modules and "flash_attn.flash_attn_interface" not in sys.modules
    with pytest.raises(ImportError):
        import flash_attn.flash_attn_interface  # noqa: F401


def test_install_keeps_a_flash_attn_namespace(shim, tmp_path):
    """FlashAttention-4 installs ``flash_attn.cute`` (a namespace without flash_attn_interface):
    the shim adds its module beside it and ``flash_attn.cute`` still imports."""
    cute = tmp_path / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text("WHO = 'fa4'\n")
    sys.path.insert(0, str(tmp_path))
    fa = shim.install()
    assert shim.is_shim(fa)
    import flash_attn
    import flash_attn.cute

    assert flash_attn.cute.WHO == "fa4"
    assert not shim.is_shim(flash_attn)  # the real namespace, not one of ours
    shim.uninstall()
    assert "flash_attn.flash_attn_interface" not in sys.modules
    assert sys.modules.get("flash_attn") is flash_attn  # still there


def test_install_leaves_a_real_flash_attn_alone(shim, tmp_path):
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "flash_attn_interface.py").write_text("REAL = True\n")
    sys.path.insert(0, str(tmp_path))
    fa = shim.install()
    assert getattr(fa, "REAL", False) and not shim.is_shim(fa)
    shim.uninstall()  # does not remove the real one
    assert sys.modules["flash_attn.flash_attn_interface"] is fa


def test_install_without_flash_attn_keeps_submodules_on_disk_importable(shim, tmp_path):
    """A ``flash_attn`` folder whose ``__init__`` fails (a broken flash-attn 2): the shim's
    parent module takes its place but keeps its path, so other submodules still import."""
    pkg = tmp_path / "flash_attn"
    (pkg / "cute").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('no flash_attn_2_cuda here')\n")
    (pkg / "cute" / "__init__.py").write_text("WHO = 'cute'\n")
    sys.path.insert(0, str(tmp_path))
    fa = shim.install()
    assert shim.is_shim(fa)
    import flash_attn.cute

    assert flash_attn.cute.WHO == "cute"
