"""The NaN rule of the local kernels and the merges: a row whose scores hold a NaN (a NaN in its
query, or in a key it sees) gets ``out`` and ``lse`` NaN, in the torch backend, varlen (window
and sink parts) and the band decomposition; rows that do not see the NaN stay exact; fully
masked rows keep ``out = 0``, ``lse = -inf``. The merges propagate a NaN ``lse`` (and still drop
a ``-inf`` side whatever its ``out`` holds). And the backward's dtype rules."""

from __future__ import annotations

import math

import pytest
import torch

from longattn.common import kernels as K
from longattn.common.kernels import BandConfig, TorchConfig
from longattn.common.kernels import band_backend as band
from longattn.common.kernels.varlen import (
    attention_backward_varlen,
    attention_forward_varlen,
    attention_varlen,
)
from longattn.common.merge import merge_partials, merge_partials_
from longattn.common.testing import random_qkv

NAN = float("nan")


def _rows_nan(out, lse):
    """out [B, S, H, D], lse [B, H, S] -> ([B, H, S] rows whose out is all NaN, whose lse is)."""
    return torch.isnan(out).all(-1).transpose(1, 2), torch.isnan(lse)


@pytest.mark.parametrize("blk", [1 << 22, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_backend_nan_rows(blk, dtype):
    q, k, v = random_qkv(2, 9, 12, 4, 2, 8, dtype=dtype, seed=1)
    q[1, 6, 3, 2] = NAN  # query row (b=1, h=3, i=6)
    k[0, 5, 0, 1] = NAN  # key 5 of KV head 0 (query heads 0, 1) in batch 0
    cfg = TorchConfig(score_block_elems=blk)
    out, lse = K.attention_forward(q, k, v, causal=True, backend="torch", config=cfg)
    want = torch.zeros(2, 4, 9, dtype=torch.bool)
    want[1, 3, 6] = True
    # causal with Sq=9 < Sk=12: query i sees keys <= i + 3, so key 5 reaches queries 2..8
    want[0, :2, 2:] = True
    on, ln = _rows_nan(out, lse)
    assert torch.equal(on, want) and torch.equal(ln, want)
    assert torch.isfinite(out[~want.transpose(1, 2)]).all()
    ref, ref_lse = K.attention_forward(*random_qkv(2, 9, 12, 4, 2, 8, dtype=dtype, seed=1),
                                       causal=True, backend="torch", config=cfg)
    keep = ~want
    assert torch.equal(lse[keep], ref_lse[keep])
    assert torch.equal(out[keep.transpose(1, 2)], ref[keep.transpose(1, 2)])


def test_fully_masked_rows_stay_empty_with_nan_queries():
    q, k, v = random_qkv(1, 6, 3, 2, 1, 4, dtype=torch.float64, seed=2)
    q[0, 1, 0, 0] = NAN  # row 1 sees no key (causal, Sq=6 > Sk=3: rows 0..2 are empty)
    q[0, 4, 1, 0] = NAN  # row 4 sees keys
    out, lse = K.attention_forward(q, k, v, causal=True, backend="torch")
    assert (out[0, 1, 0] == 0).all() and torch.isneginf(lse[0, 0, 1])
    assert torch.isnan(out[0, 4, 1]).all() and torch.isnan(lse[0, 1, 4])
    assert torch.isneginf(lse[0, :, :3]).all() and (out[0, :3] == 0).all()


def test_fix_empty_rows_keeps_nan():
    out = torch.ones(1, 3, 1, 2)
    lse = torch.tensor([[[NAN, math.inf, -math.inf]]])
    o, l_ = K.fix_empty_rows(out, lse)
    assert torch.isnan(l_[0, 0, 0]) and (o[0, 0] == 1).all()
    assert torch.isneginf(l_[0, 0, 1:]).all() and (o[0, 1:] == 0).all()


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("sinks", [0, 2])
def test_varlen_nan_rows(sinks):
    lens = [5, 7, 4]
    cu = _cu(lens)
    q, k, v = (t[0] for t in random_qkv(1, 16, 16, 2, 1, 8, dtype=torch.float64, seed=3))
    q[6, 1, 0] = NAN  # sequence 1, its query 1 (head 1)
    k[12, 0, 3] = NAN  # sequence 2, its key 0: a sink when sinks > 0, else in the window
    out, lse = attention_forward_varlen(q, k, v, cu, cu, causal=True, window_size=(1, 0),
                                        num_sink_tokens=sinks)
    want = torch.zeros(2, 16, dtype=torch.bool)
    want[1, 6] = True
    # key 12 (position 0 of sequence 2) is seen by queries 12, 13 through the window (1, 0),
    # by every query 12..15 of that sequence when it is a sink
    want[:, 12:16 if sinks else 14] = True
    assert torch.equal(torch.isnan(lse), want)
    assert torch.equal(torch.isnan(out).all(-1).t(), want)
    assert torch.isfinite(out[~want.t()]).all()


def test_band_nan_rows():
    cfg = BandConfig(split=2, anti="flip", min_chunk=1, piece_backend="torch", merge="torch")
    q, k, v = random_qkv(1, 24, 24, 2, 1, 4, dtype=torch.float64, seed=4)
    q[0, 3, 1, 0] = NAN
    k[0, 10, 0, 2] = NAN  # seen by queries 10..16 through the window (6, 0)
    out, lse = band.forward(q, k, v, softmax_scale=0.5, window_size=(6, 0), config=cfg)
    want = torch.zeros(1, 2, 24, dtype=torch.bool)
    want[0, 1, 3] = True
    want[0, :, 10:17] = True
    on, ln = _rows_nan(out, lse)
    assert torch.equal(ln, want) and torch.equal(on, want)
    assert torch.isfinite(lse[~want]).all()


# --------------------------------------------------------------------------------------------
# merges


def _sides(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    oa, ob = (torch.randn(1, 4, 2, 3, generator=g, dtype=dtype) for _ in range(2))
    la, lb = (torch.randn(1, 2, 4, generator=g, dtype=dtype) for _ in range(2))
    la[0, 0, 0] = NAN  # NaN against a live side
    la[0, 1, 1] = NAN
    lb[0, 1, 1] = -math.inf  # NaN against a dead side
    lb[0, 0, 2] = NAN
    la[0, 0, 3] = -math.inf  # a dead side holding NaN in its out: still dropped
    oa[0, 3, 0] = NAN
    return oa, la, ob, lb


def _check_merged(out, lse, oa, la, ob, lb):
    nan = torch.zeros(1, 2, 4, dtype=torch.bool)
    nan[0, 0, 0] = nan[0, 1, 1] = nan[0, 0, 2] = True
    assert torch.equal(torch.isnan(lse), nan)
    assert torch.equal(torch.isnan(out).all(-1).transpose(1, 2), nan)
    assert not torch.isnan(out).any(-1).transpose(1, 2)[~nan].any()
    assert lse[0, 0, 3] == lb[0, 0, 3] and torch.equal(out[0, 3, 0], ob[0, 3, 0])


def test_merge_partials_propagates_nan_lse():
    oa, la, ob, lb = _sides()
    _check_merged(*merge_partials(oa, la, ob, lb), oa, la, ob, lb)


def test_merge_partials_in_place_propagates_nan_lse():
    oa, la, ob, lb = _sides()
    out, lse = oa.clone(), la.clone()
    merge_partials_(out, lse, ob, lb, backend="torch")
    _check_merged(out, lse, oa, la, ob, lb)


def test_merge_triton_propagates_nan_lse():
    pytest.importorskip("triton")
    oa, la, ob, lb = _sides(torch.float32)
    out, lse = oa.clone(), la.clone()
    merge_partials_(out, lse, ob, lb, backend="triton")
    _check_merged(out, lse, oa, la, ob, lb)


def test_band_fused_merge_propagates_nan_like_its_twin():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(6)
    b, nc, c, h, dv = 1, 3, 4, 2, 16
    parts = [(torch.randn(b * nc, c, h, dv, generator=g).half(),
              torch.randn(b * nc, h, c, generator=g), 0, False),
             (torch.randn(b * (nc - 1), c, h, dv, generator=g).half(),
              torch.randn(b * (nc - 1), h, c, generator=g), 1, True)]
    parts[0][1][1, 0, 2] = NAN
    parts[1][1][0, 1, 0] = NAN  # flipped: row c - 1 of chunk 1
    o_t, l_t = band._merge_triton(parts, b, nc, c, h, dv, torch.float16)
    o_r, l_r = band._merge_torch(parts, b, nc, c, h, dv, torch.float16)
    assert torch.equal(torch.isnan(l_t), torch.isnan(l_r)) and torch.isnan(l_t).sum() == 2
    assert torch.equal(torch.isnan(o_t), torch.isnan(o_r))
    assert torch.isnan(l_t[0, 0, c + 2]) and torch.isnan(l_t[0, 1, 2 * c - 1])


# --------------------------------------------------------------------------------------------
# the backward's dtype rules, return_lse


def test_backward_rejects_low_precision_lse_and_mismatched_dout():
    q, k, v = random_qkv(1, 4, 4, 2, 1, 8, dtype=torch.bfloat16, seed=7)
    out, lse = K.attention_forward(q, k, v, backend="torch")
    dout = torch.ones_like(out)
    for bad in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match="lse must be float32 or float64"):
            K.attention_backward(dout, q, k, v, out, lse.to(bad), backend="torch")
    with pytest.raises(TypeError, match="dout dtype torch.float32 must be out's"):
        K.attention_backward(dout.float(), q, k, v, out, lse, backend="torch")
    with pytest.raises(TypeError, match="dlse must be float32"):
        K.attention_backward(dout, q, k, v, out, lse, dlse=lse.bfloat16(), backend="torch")
    K.attention_backward(dout, q, k, v, out, lse.double(), backend="torch")  # float64: fine


def test_varlen_backward_rejects_low_precision_lse_and_mismatched_dout():
    cu = _cu([3, 5])
    q, k, v = (t[0] for t in random_qkv(1, 8, 8, 2, 1, 4, dtype=torch.float32, seed=8))
    out, lse = attention_forward_varlen(q, k, v, cu, cu, causal=True)
    with pytest.raises(TypeError, match="lse"):
        attention_backward_varlen(out, q, k, v, out, lse.half(), cu, cu, causal=True)
    with pytest.raises(TypeError, match="dout"):
        attention_backward_varlen(out.double(), q, k, v, out, lse, cu, cu, causal=True)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_return_lse_must_be_a_bool(bad):
    q, k, v = random_qkv(1, 4, 4, 2, 1, 8, dtype=torch.float32, seed=9)
    with pytest.raises(TypeError, match="return_lse"):
        K.attention(q, k, v, return_lse=bad)
    cu = _cu([4])
    with pytest.raises(TypeError, match="return_lse"):
        attention_varlen(q[0], k[0], v[0], cu, return_lse=bad)
