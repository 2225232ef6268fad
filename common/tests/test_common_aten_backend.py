"""longattn.common.kernels.aten_backend: the parts that can be checked on a CPU (what it
accepts, the empty-row rule, the empty-row fix-up), and, where CUDA exists, forward and
backward against the float64 oracle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from longattn import reference as ref
from longattn.common import kernels as K
from longattn.common.kernels import aten_backend as A
from longattn.common.testing import rel_error


def _req(q, k, v, causal=False, window=(-1, -1), dlse=False):
    return K.Request(q, k, v, causal, K.normalize_window(causal, window), dlse)


def _qkv(b, sq, sk, hq, hkv, d, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d)


def test_registered_and_refuses_cpu():
    assert K.BACKENDS["aten"].supports is A.supports
    q, k, v = _qkv(1, 8, 8, 2, 1, 64)
    reason = A.supports(_req(q, k, v, causal=True))
    assert reason is not None and "CUDA" in reason
    assert K.pick_backend(q, k, v, causal=True) != "aten"


@pytest.mark.parametrize("sq,sk", [(1, 1), (4, 4), (3, 7), (7, 3), (5, 0), (0, 5), (9, 2)])
def test_empty_row_rule_matches_the_masks(sq, sk):
    """``kernels.may_have_empty_rows`` decides from shapes alone whether some row sees no key;
    it must agree with the oracle's masks for every window (it skips a fix-up pass)."""
    for left, right in itertools.product(range(-1, 6), range(-1, 6)):
        m = ref.window_mask(sq, sk, (left, right)) if sq and sk else np.zeros((sq, sk), bool)
        truth = sq > 0 and (sk == 0 or not m.any(axis=1).all())
        got = K.may_have_empty_rows(sq, sk, (left, right))
        if sq == 0:
            continue  # no rows: either answer is harmless
        assert got == truth, (sq, sk, left, right)


def test_fix_empty_rows():
    out = torch.randn(1, 3, 2, 4)
    lse = torch.tensor([[[0.5, float("inf"), float("-inf")], [1.0, 2.0, float("inf")]]])
    o, l_ = K.fix_empty_rows(out, lse)
    assert torch.isneginf(l_[0, 0, 1]) and torch.isneginf(l_[0, 0, 2])
    assert torch.isneginf(l_[0, 1, 2]) and l_[0, 0, 0] == 0.5 and l_[0, 1, 1] == 2.0
    assert (o[0, 1, 0] == 0).all() and (o[0, 2, 0] == 0).all() and (o[0, 2, 1] == 0).all()
    assert torch.equal(o[0, 0], out[0, 0]) and torch.equal(o[0, 1, 1], out[0, 1, 1])


def test_supports_on_the_request_fields():
    """Everything but the device, checked with meta tensors standing in for CUDA ones."""
    q, k, v = _qkv(1, 8, 8, 2, 1, 64)

    class Dev:  # a Request whose tensors claim to be on CUDA
        def __init__(self, t):
            self.t = t

        def __getattr__(self, name):
            return getattr(self.t, name)

        @property
        def device(self):
            return torch.device("cuda", 0)

    def req(q, k, v, **kw):
        return _req(Dev(q), Dev(k), Dev(v), **kw)

    assert A.supports(req(q, k, v, causal=True)) is None
    assert "dlse" in A.supports(req(q, k, v, dlse=True))
    assert "fp16/bf16" in A.supports(req(q.float(), k.float(), v.float()))
    q2, k2, v2 = _qkv(1, 8, 8, 2, 1, 12)
    assert "head_dim" in A.supports(req(q2, k2, v2))
    q3, k3, v3 = _qkv(1, 8, 8, 2, 1, 512)
    assert "head_dim" in A.supports(req(q3, k3, v3))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_CASES = [
    # b, sq, sk, hq, hkv, d, causal, window
    (1, 128, 128, 4, 4, 64, False, (-1, -1)),
    (2, 128, 128, 8, 2, 128, True, (-1, -1)),  # cuDNN, GQA
    (1, 64, 192, 4, 1, 64, True, (-1, -1)),  # causal Sq < Sk: flash, bottom-right
    (1, 192, 64, 4, 2, 64, True, (-1, -1)),  # Sq > Sk: empty leading rows
    (1, 256, 256, 4, 2, 64, False, (32, 0)),  # sliding window
    (1, 128, 128, 2, 2, 128, False, (16, 16)),
]


@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES)
def test_aten_matches_oracle_on_cuda(case):
    b, sq, sk, hq, hkv, d, causal, window = case
    q, k, v = _qkv(b, sq, sk, hq, hkv, d, device="cuda", seed=1)
    out, lse = K.attention_forward(q, k, v, causal=causal, window_size=window, backend="aten")
    dout = torch.randn_like(out)
    dq, dk, dv = K.attention_backward(dout, q, k, v, out, lse, causal=causal, window_size=window,
                                      backend="aten")
    m = ref.window_mask(sq, sk, window)
    if causal:
        m = m & ref.causal_mask(sq, sk)
    qn, kn, vn = (t.double().cpu().numpy() for t in (q, k, v))
    ro, rl = ref.attention(qn, kn, vn, mask=m)
    rdq, rdk, rdv = ref.attention_backward(dout.double().cpu().numpy(), qn, kn, vn, mask=m)
    assert rel_error(out, ro) <= 2e-2 and rel_error(lse, rl) <= 1e-3
    assert rel_error(dq, rdq) <= 2e-2 and rel_error(dk, rdk) <= 2e-2 and rel_error(dv, rdv) <= 2e-2
