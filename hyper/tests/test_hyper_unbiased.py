"""The sampled part is an unbiased estimate of the keys outside the row's window: averaged over
every possible draw, the softmax numerator ``exp(lse) * out`` and denominator ``exp(lse)`` equal
those of exact attention. Checked exactly (no Monte Carlo) with one sample per core call,
whose ``nk`` possible positions are equally likely, in float64. Keeping the samples that fall
in the window (the ``double_count`` ablation, what the seed's fp32 torch path does) adds the
window's sums once more on average: biased, by exactly that amount."""

import pytest
import torch
from hyper_helpers import inputs

from longattn.common.testing import rel_error
from longattn.hyper import draw_projections, hyper_attention, lsh_rank, make_plan
from longattn.hyper.torch_path import hyper_torch


def _sums(out, lse):
    """(numerator [B, Sq, Hq, Dv], denominator [B, Sq, Hq, 1]) of a softmax from out / lse."""
    den = lse.exp().transpose(1, 2).unsqueeze(-1)
    return out * den, den


def _mean_over_draws(q, k, v, p, **kw):
    """Mean of the sums over the nk equally likely single-sample draws (non-causal)."""
    b, nk, hkv = k.shape[0], k.shape[1], k.shape[2]
    num = den = 0
    for j in range(nk):
        s = torch.full((1, b, hkv, 1), j, dtype=torch.int64)
        out, lse = hyper_attention(q, k, v, projections=p, sample_indices=s, return_lse=True,
                                   backend="torch", min_seq_len=1, **kw)
        n_, d_ = _sums(out, lse)
        num, den = num + n_ / nk, den + d_ / nk
    return num, den


@pytest.mark.parametrize("shape", [(2, 24, 24, 2, 2, 5), (1, 17, 30, 4, 2, 7)])
@pytest.mark.parametrize("smooth", [False, True])
def test_sampled_part_is_unbiased(shape, smooth):
    b, sq, sk, hq, hkv, bs = shape
    q, k, v = inputs(sq + bs + smooth, b, sq, sk, hq, hkv, 8, dtype=torch.float64)
    p = draw_projections(8, 3, generator=torch.Generator().manual_seed(sk))
    num, den = _mean_over_draws(q, k, v, p.double(), block_size=bs, smooth_block=smooth)
    g = hq // hkv
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    e = torch.einsum("bihd,bjhd->bhij", q, kk).mul(8 ** -0.5).exp()
    want_num = torch.einsum("bhij,bjhd->bihd", e, vv)
    want_den = e.sum(-1).transpose(1, 2).unsqueeze(-1)
    assert rel_error(num, want_num) <= 1e-12 and rel_error(den, want_den) <= 1e-12


def test_double_count_ablation_is_biased_by_the_window():
    b, s, h, bs = 1, 20, 2, 6
    q, k, v = inputs(3, b, s, s, h, h, 8, dtype=torch.float64)
    p = draw_projections(8, 3, generator=torch.Generator().manual_seed(1)).double()
    rq, rk = lsh_rank(q, p), lsh_rank(k, p)
    plan = make_plan(s, s, False, 1)
    kw = dict(softmax_scale=8 ** -0.5, block_size=bs, smooth=False, causal=False)
    win_num, win_den = _sums(*hyper_torch(q, k, v, rq, rk, None, plan, **kw))
    num = den = 0
    for j in range(s):
        smp = torch.full((1, b, h, 1), j, dtype=torch.int64)
        n_, d_ = _sums(*hyper_torch(q, k, v, rq, rk, smp, plan, double_count=True, **kw))
        num, den = num + n_ / s, den + d_ / s
    e = torch.einsum("bihd,bjhd->bhij", q, k).mul(8 ** -0.5).exp()
    exact_num = torch.einsum("bhij,bjhd->bihd", e, v)
    exact_den = e.sum(-1).transpose(1, 2).unsqueeze(-1)
    assert rel_error(den, exact_den + win_den) <= 1e-12
    assert rel_error(num, exact_num + win_num) <= 1e-12
    assert rel_error(den, exact_den) > 1e-2  # the bias is visible


def test_equal_merge_ablation_averages_the_two_parts():
    b, s, h, bs, m = 1, 30, 2, 8, 5
    q, k, v = inputs(4, b, s, s, h, h, 8, dtype=torch.float64)
    p = draw_projections(8, 3, generator=torch.Generator().manual_seed(2)).double()
    rq, rk = lsh_rank(q, p), lsh_rank(k, p)
    plan = make_plan(s, s, False, 1)
    kw = dict(softmax_scale=8 ** -0.5, block_size=bs, smooth=False, causal=False)
    smp = torch.randint(0, s, (1, b, h, m), generator=torch.Generator().manual_seed(5))
    o_lse, _ = hyper_torch(q, k, v, rq, rk, smp, plan, **kw)
    o_w, l_w = hyper_torch(q, k, v, rq, rk, None, plan, **kw)
    o_eq, l_eq = hyper_torch(q, k, v, rq, rk, smp, plan, merge="equal", **kw)
    # the samples' own normalised output, recovered from the one-softmax merge
    nw, dw = _sums(o_w, l_w)
    n_all, d_all = _sums(o_lse, _)
    o_s = (n_all - nw) / (d_all - dw)
    has = (d_all - dw) > 0  # rows whose samples all fell in the window keep the window's out
    want = torch.where(has, 0.5 * (o_w + o_s), o_w)
    assert rel_error(o_eq, want) <= 1e-12
    with pytest.raises(ValueError, match="merge"):
        hyper_torch(q, k, v, rq, rk, smp, plan, merge="mean", **kw)
