"""longattn.common.checks: every check raises ValueError / TypeError naming the argument.
(Agreement across ranks is ``longattn.common.dist.agree``: test_common_dist.)"""

from __future__ import annotations

import pytest
import torch

from longattn.common import checks as C


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# check_tensor


def test_check_tensor():
    C.check_tensor("x", _t(2, 3), ndim=2)
    C.check_tensor("x", _t(2, dtype=torch.int64), dtypes=None)
    with pytest.raises(TypeError, match="foo must be a torch.Tensor, got list"):
        C.check_tensor("foo", [1, 2])
    with pytest.raises(ValueError, match=r"foo must be 3-d, got shape \(2, 3\)"):
        C.check_tensor("foo", _t(2, 3), ndim=3)
    with pytest.raises(TypeError, match="foo dtype"):
        C.check_tensor("foo", _t(2, dtype=torch.int32))
    for dt in C.FLOAT_DTYPES:
        C.check_tensor("x", _t(1, dtype=dt))


# --------------------------------------------------------------------------------------------
# check_qkv


def test_check_qkv_accepts_and_returns_heads():
    assert C.check_qkv(_t(2, 5, 8, 16), _t(2, 7, 2, 16), _t(2, 7, 2, 16)) == (8, 2, 16)
    assert C.check_qkv(_t(5, 4, 8), _t(7, 1, 8), _t(7, 1, 8), varlen=True) == (4, 1, 8)
    assert C.check_qkv(_t(1, 3, 2, 4), _t(1, 3, 2, 4), _t(1, 3, 2, 6)) == (2, 2, 4)  # Dv != D


@pytest.mark.parametrize("args,exc,word", [
    ((None, _t(1, 2, 1, 4), _t(1, 2, 1, 4)), TypeError, "q must be a torch.Tensor"),
    ((_t(1, 2, 1, 4), "k", _t(1, 2, 1, 4)), TypeError, "k must be a torch.Tensor"),
    ((_t(1, 2, 1, 4), _t(1, 2, 1, 4), _t(2, 1, 4)), ValueError, "v must be"),
    ((_t(2, 1, 4), _t(1, 2, 1, 4), _t(1, 2, 1, 4)), ValueError, "q must be"),
    ((_t(1, 2, 1, 4, dtype=torch.int32), _t(1, 2, 1, 4), _t(1, 2, 1, 4)), TypeError, "q dtype"),
    ((_t(1, 2, 1, 4), _t(1, 2, 1, 4, dtype=torch.float64), _t(1, 2, 1, 4)), TypeError,
     "dtypes differ"),
    ((_t(1, 2, 1, 4), _t(1, 2, 1, 4, device="meta"), _t(1, 2, 1, 4)), ValueError,
     "devices differ"),
    ((_t(1, 2, 1, 4), _t(1, 3, 1, 4), _t(1, 2, 1, 4)), ValueError, "k .* and v"),
    ((_t(2, 2, 1, 4), _t(1, 2, 1, 4), _t(1, 2, 1, 4)), ValueError, "batch"),
    ((_t(1, 2, 1, 4), _t(1, 2, 1, 8), _t(1, 2, 1, 8)), ValueError, "head_dim"),
    ((_t(1, 2, 3, 4), _t(1, 2, 2, 4), _t(1, 2, 2, 4)), ValueError, "heads"),
    ((_t(1, 2, 3, 4), _t(1, 2, 0, 4), _t(1, 2, 0, 4)), ValueError, "heads"),
    ((_t(1, 2, 0, 4), _t(1, 2, 1, 4), _t(1, 2, 1, 4)), ValueError, r"q heads \(0\)"),
    ((_t(1, 2, 1, 0), _t(1, 2, 1, 0), _t(1, 2, 1, 4)), ValueError, "head_dim of q and v"),
    ((_t(1, 2, 1, 4), _t(1, 2, 1, 4), _t(1, 2, 1, 0)), ValueError, "head_dim of q and v"),
])
def test_check_qkv_rejects(args, exc, word):
    with pytest.raises(exc, match=word):
        C.check_qkv(*args)


def test_check_qkv_varlen_needs_3d():
    with pytest.raises(ValueError, match=r"q must be \[total_tokens, heads, head_dim\]"):
        C.check_qkv(_t(1, 5, 4, 8), _t(7, 1, 8), _t(7, 1, 8), varlen=True)


# --------------------------------------------------------------------------------------------
# check_window / check_scale


def test_check_window_accepts():
    assert C.check_window(None) == (-1, -1)
    assert C.check_window((-1, -1)) == (-1, -1)
    assert C.check_window([3, 0]) == (3, 0)
    assert C.check_window((0, 7)) == (0, 7)


@pytest.mark.parametrize("w,exc", [
    ((-2, 0), ValueError), ((0, -2), ValueError), (3, TypeError), ((1,), TypeError),
    ((1, 2, 3), TypeError), ((1.0, 0), TypeError), ((0, True), TypeError), ("ab", TypeError),
    ((None, 0), TypeError),
])
def test_check_window_rejects_and_names_the_argument(w, exc):
    with pytest.raises(exc, match="window"):
        C.check_window(w)
    with pytest.raises(exc, match="my_window"):
        C.check_window(w, name="my_window")


def test_check_scale():
    assert C.check_scale(None, 16) == 0.25
    assert C.check_scale(2, 16) == 2.0 and isinstance(C.check_scale(2, 16), float)
    assert C.check_scale(-0.5, 16) == -0.5
    for bad in (True, "0.1", [0.1], torch.tensor(0.1)):
        with pytest.raises(TypeError, match="scale"):
            C.check_scale(bad, 16)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="scale"):
            C.check_scale(bad, 16)


# --------------------------------------------------------------------------------------------
# check_cu_seqlens


def test_check_cu_seqlens_accepts():
    assert C.check_cu_seqlens(torch.tensor([0, 3, 3, 7], dtype=torch.int32), 7) == [0, 3, 3, 7]
    assert C.check_cu_seqlens(torch.tensor([0, 0], dtype=torch.int64), 0) == [0, 0]


@pytest.mark.parametrize("cu,total,exc,word", [
    ([0, 3, 7], 7, TypeError, "torch.Tensor"),
    (torch.tensor([0.0, 7.0]), 7, TypeError, "int32"),
    (torch.tensor([[0, 7]], dtype=torch.int32), 7, ValueError, "1-d"),
    (torch.tensor([0], dtype=torch.int32), 0, ValueError, "1-d"),
    (torch.tensor([1, 7], dtype=torch.int32), 7, ValueError, "start at 0"),
    (torch.tensor([0, 5, 3, 7], dtype=torch.int32), 7, ValueError, "non-decreasing"),
    (torch.tensor([0, 3, 6], dtype=torch.int32), 7, ValueError, "end at the token count 7"),
])
def test_check_cu_seqlens_rejects(cu, total, exc, word):
    with pytest.raises(exc, match=word):
        C.check_cu_seqlens(cu, total)
    with pytest.raises(exc, match="cu_seqlens_k"):
        C.check_cu_seqlens(cu, total, name="cu_seqlens_k")
