"""Merge precision at large logits: float32 inputs whose scores sit near 1e2 and 1e4
(``common.testing.large_logit_qkv``, exact float32 scores, ``softmax_scale=1.0``). With ``lse``
in ``lse_dtype`` (float64 for float32 inputs), two and three key-partials of the torch backend
merged by ``merge_partials`` / ``merge_partials_`` / ``merge_stacked``, the varlen functions
(with and without sinks, and their partials merged), and the backward of ``kernels.attention``
and ``attention_varlen`` are within 1e-5 (``rel_error``) of float64 dense attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longattn import reference as ref
from longattn.common import kernels as K
from longattn.common.dtypes import lse_dtype, split_lse
from longattn.common.kernels.varlen import (
    attention_forward_varlen,
    attention_varlen,
)
from longattn.common.merge import finish_rows, merge_partials, merge_partials_, merge_stacked
from longattn.common.testing import large_logit_qkv, rel_error

TOL = 1e-5
LOGITS = (1e2, 1e4)
SEEDS = (0, 1, 2)
B, SQ, SK, HQ, HKV, D = 2, 6, 24, 4, 2, 8
CUTS = {2: (0, 11, 24), 3: (0, 7, 15, 24)}


def _dense(q, k, v, mask=None):
    qn, kn, vn = (t.detach().double().numpy() for t in (q, k, v))
    return ref.attention(qn, kn, vn, mask=mask, scale=1.0)


def _partials(q, k, v, cuts):
    return [K.attention_forward(q, k[:, a:b], v[:, a:b], softmax_scale=1.0, backend="torch")
            for a, b in zip(cuts, cuts[1:])]


def _check(out, lse, ro, rl):
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    assert rel_error(out, ro) <= TOL, rel_error(out, ro)
    assert rel_error(lse, rl) <= TOL, rel_error(lse, rl)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("logit", LOGITS)
def test_torch_backend_lse_is_float64_for_float32_and_exact(logit, seed):
    q, k, v = large_logit_qkv(B, SQ, SK, HQ, HKV, D, logit=logit, seed=seed)
    out, lse = K.attention_forward(q, k, v, softmax_scale=1.0, backend="torch")
    ro, rl = _dense(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == lse_dtype(torch.float32) == torch.float64
    assert rel_error(out, ro) <= TOL
    # float32 row max (exact) + float64 log of a float32 row sum: ~1e-7 absolute, where a
    # float32 lse near 1e4 rounds in steps of ~1e-3
    assert np.abs(lse.numpy() - rl).max() <= 1e-6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("logit", LOGITS)
@pytest.mark.parametrize("n", (2, 3))
@pytest.mark.parametrize("merge", ("merge_partials", "merge_partials_", "merge_stacked"))
def test_merged_partials_match_float64_dense(merge, n, logit, seed):
    q, k, v = large_logit_qkv(B, SQ, SK, HQ, HKV, D, logit=logit, seed=seed)
    parts = _partials(q, k, v, CUTS[n])
    assert all(lp.dtype == torch.float64 for _, lp in parts)
    if merge == "merge_partials":
        out, lse = parts[0]
        for o, lp in parts[1:]:
            out, lse = merge_partials(out, lse, o, lp)
    elif merge == "merge_partials_":  # float32 out accumulator beside a float64 lse one
        out = torch.zeros(B, SQ, HQ, D, dtype=torch.float32)
        lse = torch.full((B, HQ, SQ), float("-inf"), dtype=torch.float64)
        for o, lp in parts:
            merge_partials_(out, lse, o, lp, backend="torch")
    else:
        outs = torch.stack([o for o, _ in parts])
        lses = torch.stack([lp.transpose(-1, -2) for _, lp in parts])
        out, lse = merge_stacked(outs, lses)
        lse = lse.transpose(-1, -2)
    _check(out, lse, *_dense(q, k, v))


@pytest.mark.parametrize("seed", SEEDS)
def test_float32_lse_loses_what_float64_keeps(seed):
    """The test above has teeth: the same merge through a float32 lse misses 1e-5 at 1e4."""
    q, k, v = large_logit_qkv(B, SQ, SK, HQ, HKV, D, logit=1e4, seed=seed)
    (oa, la), (ob, lb) = _partials(q, k, v, CUTS[2])
    ro, _ = _dense(q, k, v)
    out32, _ = merge_partials(oa, la.float(), ob, lb.float())
    out64, _ = merge_partials(oa, la, ob, lb)
    assert rel_error(out64, ro) <= TOL < rel_error(out32, ro)


def test_merges_keep_the_wider_lse_dtype_and_half_paths_unchanged():
    o = torch.randn(1, 3, 2, 4)
    l64, l32 = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 3)
    assert merge_partials(o, l32, o, l64)[1].dtype == torch.float64
    assert merge_partials(o, l32, o, l32)[1].dtype == torch.float32
    assert merge_partials(o.half(), l32, o.half(), l32)[1].dtype == torch.float32
    assert merge_partials(o.double(), l32, o.double(), l32)[1].dtype == torch.float64
    assert merge_stacked(torch.stack([o, o]), torch.stack([l32, l64]).transpose(-1, -2)
                         )[1].dtype == torch.float64
    assert merge_stacked(torch.stack([o, o]).bfloat16(), torch.stack([l32, l32]).transpose(
        -1, -2))[1].dtype == torch.float32
    num, den, m = torch.randn(3, 4), torch.rand(3) + 1, torch.randn(3)
    out, lse = finish_rows(num, den, m.double())
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    assert finish_rows(num, den, m)[1].dtype == torch.float32
    # fp16 / bf16 inputs keep float32 lse in the torch backend and the varlen functions
    for dt in (torch.float16, torch.bfloat16):
        q = torch.randn(1, 3, 2, 4).to(dt)
        assert K.attention_forward(q, q, q, backend="torch")[1].dtype == torch.float32
        cu = torch.tensor([0, 1, 3], dtype=torch.int32)
        assert attention_forward_varlen(q[0], q[0], q[0], cu, cu, num_sink_tokens=1,
                                        backend="torch")[1].dtype == torch.float32


def test_split_lse():
    lse = torch.tensor([1e4 + 1 / 3, float("-inf"), float("inf"), float("nan"), -2.5],
                       dtype=torch.float64)
    hi, lo = split_lse(lse, torch.float32)
    assert hi.dtype == lo.dtype == torch.float32
    assert abs(hi[0].double() + lo[0].double() - lse[0]) < 1e-10
    assert torch.isneginf(hi[1]) and torch.isposinf(hi[2]) and torch.isnan(hi[3])
    assert (lo[1:4] == 0).all() and hi[4] == -2.5 and lo[4] == 0
    l32 = lse.float()
    h, none = split_lse(l32, torch.float32)
    assert none is None and h is l32


def test_triton_merge_refuses_a_float64_lse_accumulator():
    pytest.importorskip("triton")
    out, lse = torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), float("-inf"), dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 accumulators"):
        merge_partials_(out, lse, torch.ones(1, 2, 1, 4), torch.zeros(1, 1, 2), backend="triton")


# --------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("logit", LOGITS)
@pytest.mark.parametrize("with_dlse", (False, True))
def test_attention_backward_matches_oracle(with_dlse, logit, seed):
    q, k, v = large_logit_qkv(B, SQ, SK, HQ, HKV, D, logit=logit, seed=seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.Generator().manual_seed(seed + 100)
    dout = torch.randn(B, SQ, HQ, D, generator=g)
    dlse = torch.randn(B, HQ, SQ, generator=g, dtype=torch.float64) if with_dlse else None
    out, lse = K.attention(q, k, v, softmax_scale=1.0, return_lse=True, backend="torch")
    assert lse.dtype == torch.float64
    loss = (out * dout).sum() + ((lse * dlse).sum() if with_dlse else 0)
    loss.backward()
    qn, kn, vn = (t.detach().double().numpy() for t in (q, k, v))
    grads = ref.attention_backward(dout.double().numpy(), qn, kn, vn, scale=1.0,
                                   dlse=None if dlse is None else dlse.numpy())
    for name, got, want in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), grads):
        assert rel_error(got, want) <= TOL, (name, rel_error(got, want))


# --------------------------------------------------------------------------------------------
# varlen

CU_Q, CU_K = (0, 5, 6, 13), (0, 9, 17, 30)


def _packed(logit, seed):
    tq, tk = CU_Q[-1], CU_K[-1]
    q, _, _ = large_logit_qkv(1, tq, 1, HQ, HKV, D, logit=logit, seed=seed)
    _, k, v = large_logit_qkv(1, 1, tk, HQ, HKV, D, logit=logit, seed=seed + 7)
    return q[0], k[0], v[0]


def _varlen_oracle(q, k, v, window, sinks, dout=None, dlse=None):
    """Per sequence float64 dense attention (window plus the sequence's first sinks keys)."""
    outs, lses, grads = [], [], [np.zeros(t.shape) for t in (q, k, v)]
    for a, b, c, d in zip(CU_Q, CU_Q[1:], CU_K, CU_K[1:]):
        m = ref.window_mask(b - a, d - c, window)
        m[:, :sinks] = True
        qn, kn, vn = (t.detach().double().numpy()[None] for t in (q[a:b], k[c:d], v[c:d]))
        o, lp = ref.attention(qn, kn, vn, mask=m, scale=1.0)
        outs.append(o[0])
        lses.append(lp[0])
        if dout is not None:
            gq, gk, gv = ref.attention_backward(
                dout[a:b].double().numpy()[None], qn, kn, vn, mask=m, scale=1.0,
                dlse=None if dlse is None else dlse[:, a:b].numpy()[None])
            grads[0][a:b], grads[1][c:d], grads[2][c:d] = gq[0], gk[0], gv[0]
    return np.concatenate(outs), np.concatenate(lses, axis=1), grads


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("logit", LOGITS)
@pytest.mark.parametrize("window,sinks", [((-1, -1), 0), ((3, 0), 2)])
def test_varlen_matches_float64_dense(window, sinks, logit, seed):
    q, k, v = _packed(logit, seed)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    out, lse = attention_forward_varlen(q, k, v, cu_q, cu_k, softmax_scale=1.0,
                                        window_size=window, num_sink_tokens=sinks,
                                        backend="torch")
    ro, rl, _ = _varlen_oracle(q, k, v, window, sinks)
    _check(out, lse, ro, rl)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("logit", LOGITS)
def test_varlen_key_partials_merged_match_float64_dense(logit, seed):
    """Each sequence's keys split in two; the two varlen partials merged by merge_partials."""
    q, k, v = _packed(logit, seed)
    cu_q = torch.tensor(CU_Q, dtype=torch.int32)
    idx = [[], []]
    cus = [[0], [0]]
    for c, d in zip(CU_K, CU_K[1:]):
        mid = (c + d) // 2
        for i, (lo, hi) in enumerate(((c, mid), (mid, d))):
            idx[i] += range(lo, hi)
            cus[i].append(cus[i][-1] + hi - lo)
    parts = [attention_forward_varlen(q, k[ix], v[ix], cu_q, torch.tensor(cu, dtype=torch.int32),
                                      softmax_scale=1.0, backend="torch")
             for ix, cu in zip(idx, cus)]
    (oa, la), (ob, lb) = parts
    out, lse = merge_partials(oa[None], la[None], ob[None], lb[None])
    ro, rl, _ = _varlen_oracle(q, k, v, (-1, -1), 0)
    _check(out[0], lse[0], ro, rl)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("logit", LOGITS)
@pytest.mark.parametrize("sinks", (0, 2))
def test_varlen_backward_matches_oracle(sinks, logit, seed):
    q, k, v = (t.requires_grad_() for t in _packed(logit, seed))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (CU_Q, CU_K))
    g = torch.Generator().manual_seed(seed + 200)
    dout = torch.randn(q.shape[0], HQ, D, generator=g)
    dlse = torch.randn(HQ, q.shape[0], generator=g, dtype=torch.float64)
    window = (3, 0)
    out, lse = attention_varlen(q, k, v, cu_q, cu_k, softmax_scale=1.0, window_size=window,
                                num_sink_tokens=sinks, return_lse=True, backend="torch")
    assert lse.dtype == torch.float64
    ((out * dout).sum() + (lse * dlse).sum()).backward()
    _, _, grads = _varlen_oracle(q, k, v, window, sinks, dout, dlse)
    for name, got, want in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), grads):
        assert rel_error(got, want) <= TOL, (name, rel_error(got, want))
