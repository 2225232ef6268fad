"""The torch path of hyper_attention against the float64 oracle's replay, gradients by finite
differences, exact cases, injectable randomness, each known fault of the public code, bad
input."""

import math

import pytest
import torch
from hyper_helpers import inputs, n_calls, oracle, randomness
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.common.kernels import attention
from longattn.common.testing import rel_error
from longattn.hyper import (
    HyperAttention,
    draw_projections,
    draw_sample_indices,
    gray_rank,
    hyper_attention,
    lsh_rank,
    make_plan,
)

TOL32 = 1e-5


def _run(q, k, v, p, s, *, backend="torch", **kw):
    return hyper_attention(q, k, v, projections=p, sample_indices=s, return_lse=True,
                           backend=backend, **kw)


def _check_vs_oracle(q, k, v, p, s, tol, *, dlse_on=True, **kw):
    """Forward and backward (with d(lse)) against the oracle's replay."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = _run(q, k, v, p, s, **kw)
    g = torch.Generator().manual_seed(99)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype) \
        if dlse_on else None
    torch.autograd.backward([out, lse] if dlse_on else [out],
                            [dout, dlse] if dlse_on else [dout])
    want = oracle(q, k, v, p, s, dout=dout, dlse=dlse, **kw)
    errs = [rel_error(a, e) for a, e in zip((out, lse, q.grad, k.grad, v.grad), want)]
    assert max(errs) <= tol, f"rel errors out, lse, dq, dk, dv = {errs}"
    return errs


CASES = [
    # b, s, hq, hkv, d, block, msl, m
    (2, 37, 4, 2, 8, 4, 5, 6),
    (1, 64, 2, 2, 16, 8, 8, 12),
    (1, 50, 3, 1, 4, 16, 7, 9),
    (2, 29, 2, 1, 8, 5, 3, 0),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_fp32_vs_oracle(case, causal, smooth):
    b, s, hq, hkv, d, bs, msl, m = case
    q, k, v = inputs(sum(case) + causal + 2 * smooth, b, s, s, hq, hkv, d)
    p, samp = randomness(s, q, k, causal=causal, m=m, min_seq_len=msl)
    assert n_calls(q, k, causal, msl) >= 1
    _check_vs_oracle(q, k, v, p, samp, TOL32, causal=causal, block_size=bs, min_seq_len=msl,
                     smooth_block=smooth)


def test_fp64_vs_oracle_tight():
    q, k, v = inputs(5, 2, 45, 45, 4, 2, 8, dtype=torch.float64)
    for causal in (False, True):
        p, s = randomness(3, q, k, causal=causal, m=7, min_seq_len=6)
        _check_vs_oracle(q, k, v, p, s, 1e-10, causal=causal, block_size=4, min_seq_len=6,
                         smooth_block=causal)


def test_noncausal_sq_ne_sk_and_dv():
    q, k, v = inputs(6, 1, 19, 41, 4, 2, 8, dv=5)
    p, s = randomness(4, q, k, causal=False, m=5, min_seq_len=8)
    _check_vs_oracle(q, k, v, p, s, TOL32, causal=False, block_size=4, min_seq_len=8)


@settings(max_examples=12, deadline=None)
@given(s=st.integers(2, 40), bs=st.integers(1, 12), msl=st.integers(1, 12),
       m=st.integers(0, 10), g=st.sampled_from([1, 2]), causal=st.booleans(),
       smooth=st.booleans(), seed=st.integers(0, 1000))
def test_random_configs_vs_oracle(s, bs, msl, m, g, causal, smooth, seed):
    q, k, v = inputs(seed, 1, s, s, 2 * g, 2, 4)
    p, samp = randomness(seed, q, k, causal=causal, m=m, min_seq_len=msl, r=3)
    _check_vs_oracle(q, k, v, p, samp, TOL32, causal=causal, block_size=bs, min_seq_len=msl,
                     smooth_block=smooth)


@pytest.mark.parametrize("causal,smooth", [(False, False), (True, False), (True, True),
                                           (False, True)])
def test_gradcheck_fp64(causal, smooth):
    q, k, v = inputs(11, 1, 14, 14, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    p, s = randomness(12, q, k, causal=causal, m=4, min_seq_len=3)

    def f(q, k, v):
        return _run(q, k, v, p, s, causal=causal, block_size=3, min_seq_len=3,
                    smooth_block=smooth)

    # fast mode checks v^T J u for random u, v (all inputs at once) against finite differences
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


def test_gradcheck_fp64_full_jacobian():
    # every entry of the Jacobian, on a tiny causal smooth-band case with samples
    q, k, v = inputs(12, 1, 7, 7, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    p, s = randomness(13, q, k, causal=True, m=3, min_seq_len=2, r=2)

    def f(q, k, v):
        return _run(q, k, v, p, s, causal=True, block_size=2, min_seq_len=2, smooth_block=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [9, 40])
def test_no_samples_one_block_equals_exact(causal, s):
    q, k, v = inputs(s, 2, s, s, 4, 2, 8, dtype=torch.float64)
    out, lse = hyper_attention(q, k, v, causal=causal, block_size=s, sample_size=0,
                               min_seq_len=2, return_lse=True, backend="torch")
    ref, ref_lse = attention(q, k, v, causal=causal, return_lse=True)
    assert rel_error(out, ref) < 1e-12 and rel_error(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_short_sequence_equals_exact(causal):
    q, k, v = inputs(1, 1, 30, 30, 2, 2, 8, dtype=torch.float64)
    out = hyper_attention(q, k, v, causal=causal, block_size=4, sample_size=5, min_seq_len=30,
                          backend="torch")
    assert rel_error(out, attention(q, k, v, causal=causal)) < 1e-12


# ------------------------------------------------------------------------------- randomness


def test_generator_replay_and_explicit_randomness():
    q, k, v = inputs(2, 1, 33, 33, 2, 1, 8)
    kw = dict(causal=True, block_size=4, sample_size=6, min_seq_len=4, lsh_num_projs=5,
              backend="torch")
    a = hyper_attention(q, k, v, generator=torch.Generator().manual_seed(7), **kw)
    b = hyper_attention(q, k, v, generator=torch.Generator().manual_seed(7), **kw)
    c = hyper_attention(q, k, v, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    p = draw_projections(8, 5, generator=g)
    s = draw_sample_indices(33, 33, 1, 1, 6, causal=True, min_seq_len=4, generator=g)
    d = hyper_attention(q, k, v, projections=p, sample_indices=s, **kw)
    assert torch.equal(a, d)
    assert s.shape == (len(make_plan(33, 33, True, 4).calls), 1, 1, 6)


def test_module_replays_with_oracle():
    torch.manual_seed(0)
    mod = HyperAttention(8, lsh_num_projs=6, block_size=4, sample_size=5, min_seq_len=6,
                         generator=torch.Generator().manual_seed(1))
    assert mod.projections.shape == (8, 6)
    assert "block_size=4" in repr(mod)
    q, k, v = inputs(3, 2, 27, 27, 4, 2, 8)
    s = draw_sample_indices(27, 27, 2, 2, 5, causal=True, min_seq_len=6,
                            generator=torch.Generator().manual_seed(2))
    out, lse = mod(q, k, v, causal=True, return_lse=True, sample_indices=s, backend="torch")
    want = oracle(q, k, v, mod.projections, s, block_size=4, min_seq_len=6, causal=True)
    assert rel_error(out, want[0]) < TOL32 and rel_error(lse, want[1]) < TOL32
    out2 = mod(q, k, v, causal=True, generator=torch.Generator().manual_seed(2),
               backend="torch")
    assert torch.equal(out, out2)


def test_samples_are_uniform_per_call():
    s = draw_sample_indices(4096, 4096, 2, 2, 512, causal=True, min_seq_len=1024,
                            generator=torch.Generator().manual_seed(0))
    plan = make_plan(4096, 4096, True, 1024)
    for c, (_, _, _, nk) in enumerate(plan.calls):
        x = s[c].double() / nk
        assert s[c].min() >= 0 and s[c].max() < nk
        assert abs(x.mean().item() - 0.5) < 0.03 and abs(x.var().item() - 1 / 12) < 0.01


# ------------------------------------------------------------------------ known public faults


def test_fault_gray_order_is_true_gray():
    # public code sorts by g(code); ours by g^-1(code): neighbours differ in one hyperplane
    n = torch.arange(256)
    assert torch.equal(gray_rank(n ^ (n >> 1)), n)
    codes = torch.empty(256, dtype=torch.int64)
    codes[gray_rank(n)] = n
    diff = codes ^ torch.roll(codes, -1)
    assert all(bin(int(x)).count("1") == 1 for x in diff)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]).view(1, 4, 1, 2)
    assert lsh_rank(x, torch.eye(2)).view(-1).tolist() == [1, 3, 0, 2]


def test_fault_padded_tail_keys_are_masked():
    # S = 9, block 4: the last sorted block holds one query and one key. With very negative
    # scores a zero-padded key (score 0) would dominate; ours sees exactly its one key.
    q, k, v = inputs(4, 1, 9, 9, 1, 1, 4, dtype=torch.float64)
    p = torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    q = q.abs() * 3
    k = -k.abs() * 3  # all scores < 0
    out, lse = hyper_attention(q, k, v, block_size=4, sample_size=0, min_seq_len=1,
                               projections=p, return_lse=True, backend="torch")
    # every query ranks 1, every key ranks 0: sorted order is the identity
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2
    assert abs(lse[0, 0, 8] - s[0, 0, 8, 8]) < 1e-12
    assert torch.allclose(out[0, 8, 0], v[0, 8, 0], atol=1e-12)
    want = torch.logsumexp(s[0, 0, :4, :4], -1)
    assert torch.allclose(lse[0, 0, :4], want, atol=1e-12)


def test_fault_in_block_samples_not_double_counted():
    # all samples fall in sorted block 0: rows of block 0 must be unchanged by them, other rows
    # get them with weight n/m
    q, k, v = inputs(8, 1, 16, 16, 2, 1, 8, dtype=torch.float64)
    p = draw_projections(8, 3, generator=torch.Generator().manual_seed(0)).double()
    kw = dict(block_size=4, min_seq_len=2, projections=p, return_lse=True, backend="torch")
    s_in = torch.tensor([0, 1, 3, 3]).view(1, 1, 1, 4)
    o0, l0 = hyper_attention(q, k, v, sample_indices=s_in[..., :0], **kw)
    o1, l1 = hyper_attention(q, k, v, sample_indices=s_in, **kw)
    ranks = lsh_rank(q, p)[0]  # [H, S]
    for h in range(2):
        first = torch.sort(ranks[h], stable=True).indices[:4]  # sorted block 0 of head h
        assert torch.allclose(l0[0, h, first], l1[0, h, first], atol=1e-13)
        rest = torch.ones(16, dtype=torch.bool)
        rest[first] = False
        assert (l1[0, h, rest] > l0[0, h, rest]).all()
    want = oracle(q, k, v, p, s_in, block_size=4, min_seq_len=2, causal=False)
    assert rel_error(o1, want[0]) < 1e-12 and rel_error(l1, want[1]) < 1e-12


def test_fault_backward_uses_dlse():
    q, k, v = inputs(9, 1, 24, 24, 2, 2, 8)
    p, s = randomness(1, q, k, causal=True, m=4, min_seq_len=4)
    # loss on lse only: a backward ignoring d(lse) would give zero gradients
    q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, k, v))
    _, lse = _run(q_, k_, v_, p, s, causal=True, block_size=4, min_seq_len=4)
    lse.sum().backward()
    assert q_.grad.abs().sum() > 0 and k_.grad.abs().sum() > 0
    want = oracle(q, k, v, p, s, dout=torch.zeros(1, 24, 2, 8), dlse=torch.ones(1, 2, 24),
                  block_size=4, min_seq_len=4, causal=True)
    for a, e in zip((q_.grad, k_.grad, v_.grad), want[2:]):
        assert rel_error(a, e) < TOL32
    assert v_.grad.abs().max() < 1e-6  # lse does not depend on v


def test_fault_more_than_128_samples():
    q, k, v = inputs(10, 1, 300, 300, 2, 1, 8)
    p, s = randomness(2, q, k, causal=False, m=300, min_seq_len=64)
    _check_vs_oracle(q, k, v, p, s, TOL32, causal=False, block_size=32, min_seq_len=64)


def test_fault_smooth_block_backward_matches_forward():
    # the gradient of the smoothed band is the transpose of its forward: against the oracle
    # (its backward is the analytic one of its forward) and against finite differences above
    q, k, v = inputs(13, 1, 40, 40, 2, 1, 8)
    p, s = randomness(3, q, k, causal=False, m=5, min_seq_len=8)
    _check_vs_oracle(q, k, v, p, s, TOL32, causal=False, block_size=8, min_seq_len=8,
                     smooth_block=True)


def test_fallback_rule_is_on_key_length():
    # public code: non-causal falls back on n_query < min_seq_len; ours on Sk <= min_seq_len
    q, k, v = inputs(14, 1, 4, 40, 2, 1, 8, dtype=torch.float64)
    out = hyper_attention(q, k, v, block_size=4, sample_size=0, min_seq_len=16,
                          backend="torch")
    assert rel_error(out, attention(q, k, v)) > 1e-3  # approximated, though Sq < min_seq_len
    out = hyper_attention(q, k[:, :16], v[:, :16], block_size=4, min_seq_len=16,
                          backend="torch")
    assert rel_error(out, attention(q, k[:, :16], v[:, :16])) < 1e-12


def test_empty_rows_are_zero_not_nan():
    # more query blocks than key blocks and no samples: those rows see nothing
    q, k, v = inputs(15, 1, 20, 8, 1, 1, 4, requires_grad=True)
    out, lse = hyper_attention(q, k, v, block_size=4, sample_size=0, min_seq_len=2,
                               return_lse=True, backend="torch")
    dead = torch.isneginf(lse[0, 0])
    assert dead.sum() == 12 and (out[0, dead] == 0).all()
    (out.sum() + torch.where(dead, 0.0, lse).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_bf16_runs_close_to_fp32():
    q, k, v = inputs(16, 1, 64, 64, 2, 2, 16)
    kw = dict(causal=True, block_size=8, sample_size=8, min_seq_len=16, backend="torch",
              generator=torch.Generator().manual_seed(0))
    a = hyper_attention(q, k, v, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    b = hyper_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
    assert b.dtype == torch.bfloat16 and rel_error(b, a) < 2e-2


# ------------------------------------------------------------------------------- bad input


def test_bad_input_raises():
    q, k, v = inputs(0, 1, 16, 16, 2, 1, 8)
    ok = dict(block_size=4, sample_size=2, min_seq_len=4)
    bad = [
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=2.0), TypeError, "block_size"),
        (dict(sample_size=-1), ValueError, "sample_size"),
        (dict(min_seq_len=0), ValueError, "min_seq_len"),
        (dict(lsh_num_projs=17), ValueError, "lsh_num_projs"),
        (dict(causal=1), TypeError, "causal"),
        (dict(smooth_block="yes"), TypeError, "smooth_block"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        (dict(generator=0), TypeError, "generator"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(projections=torch.randn(4, 3)), ValueError, "projections"),
        (dict(projections=torch.randn(8, 20)), ValueError, "projections"),
        (dict(projections=[[1.0]]), TypeError, "projections"),
        (dict(sample_indices=torch.zeros(2, 1, 1, 3, dtype=torch.int64)), ValueError,
         "sample_indices"),
        (dict(sample_indices=torch.full((1, 1, 1, 3), 16)), ValueError, "sample_indices"),
        (dict(sample_indices=torch.zeros(1, 1, 1, 3)), ValueError, "sample_indices"),
    ]
    for kw, exc, word in bad:
        with pytest.raises(exc, match=word):
            hyper_attention(q, k, v, **{**ok, **kw})
    with pytest.raises(ValueError, match="Sq"):
        hyper_attention(q, k[:, :8], v[:, :8], causal=True, **ok)
    with pytest.raises(ValueError, match="heads"):
        hyper_attention(q[:, :, :1], k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1), **ok)
    with pytest.raises(TypeError, match="dtype"):
        hyper_attention(q.int(), k.int(), v.int(), **ok)
    with pytest.raises(ValueError, match="input_dim"):
        HyperAttention(4)(q, k, v)
    with pytest.raises(ValueError, match="block_size"):
        HyperAttention(8, block_size=0)


def test_lse_weight_is_log_n_over_m():
    # one query, block of one key, samples outside the block: lse = logaddexp(s0, log(n/m)+...)
    q, k, v = inputs(17, 1, 2, 8, 1, 1, 4, dtype=torch.float64)
    p = torch.zeros(4, 1, dtype=torch.float64)  # every row ranks 0: identity order
    s = torch.tensor([5, 7, 7]).view(1, 1, 1, 3)
    _, lse = hyper_attention(q, k, v, block_size=1, min_seq_len=2, projections=p,
                             sample_indices=s, return_lse=True, backend="torch")
    sc = torch.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / 2
    w = math.log(8 / 3)
    want0 = torch.logsumexp(torch.stack([sc[0, 0], sc[0, 5] + w, sc[0, 7] + w,
                                         sc[0, 7] + w]), 0)
    assert abs(lse[0, 0, 0] - want0) < 1e-12


@pytest.mark.parametrize("logit", [100.0, 10000.0])
def test_large_logits_fp32_merges_keep_float32_accuracy(logit):
    # fp32 scores near 1e2 / 1e4, exact in float32 (common.testing.large_logit_qkv). Causal
    # with blocks over everything and no samples is exact attention assembled from 4 leaves and
    # 3 levels of merges: with lse in lse_dtype (float64 for fp32) the merged result stays at
    # float32 accuracy; a float32 lse would be off by ~ulp(1e4) in every merge weight
    from longattn.common.testing import large_logit_qkv

    q, k, v = large_logit_qkv(1, 64, 64, 2, 1, 16, logit=logit, seed=3)
    out, lse = hyper_attention(q, k, v, causal=True, softmax_scale=1.0, block_size=64,
                               sample_size=0, min_seq_len=16, return_lse=True,
                               backend="torch")
    assert len(make_plan(64, 64, True, 16).calls) == 3 and lse.dtype == torch.float64
    ref, ref_lse = attention(q.double(), k.double(), v.double(), causal=True,
                             softmax_scale=1.0, return_lse=True)
    assert rel_error(out, ref) < TOL32 and rel_error(lse, ref_lse) < TOL32
    assert (lse - ref_lse).abs().max() < 1e-3 * (logit / 1e4)  # absolute: well below ulp(1e4)
    # with sampled columns (the approximation): the float64 oracle's replay, fp32 accurate
    p, s = randomness(4, q, k, causal=True, m=6, min_seq_len=16)
    _check_vs_oracle(q, k, v, p, s, TOL32, causal=True, softmax_scale=1.0, block_size=8,
                     min_seq_len=16)
