"""Single-process dilated attention against the float64 oracle, forward and backward."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longattn.common.dtypes import lse_dtype
from longattn.common.merge import merge_partials
from longattn.common.testing import TOLERANCES, rel_error
from longattn.dilated import DilatedAttention, dilated_attention
from longattn.dilated.plan import make_plan
from longattn.reference.dilated import dilated_attention as ref_forward
from longattn.reference.dilated import dilated_attention_backward as ref_backward

# (segment_lengths, dilation_rates): >= 10 schedules, the paper's first (scaled by 1/512 and
# at full size below), then geometric, non-geometric, non-dividing, no-r=1 and r > w ones.
SCHEDULES = [
    ([4, 8, 16, 32, 64], [1, 2, 4, 6, 12]),   # LongNet's (2048..32768)/512, rates 1,2,4,6,12
    ([8], [1]),
    ([4, 8], [1, 2]),
    ([3, 9, 27], [1, 3, 9]),
    ([5, 10, 20], [1, 2, 4]),
    ([6, 12, 24], [1, 2, 3]),
    ([7, 16], [2, 3]),          # no dense branch: some rows are kept by no branch
    ([2, 3, 5, 11], [1, 1, 2, 5]),
    ([4, 4], [1, 2]),            # two branches with the same segments
    ([16, 4], [4, 1]),           # unsorted
    ([3, 6], [5, 2]),            # r > w: high offsets keep nothing in that branch
    ([1, 6, 40], [1, 3, 4]),     # w = 1: each row alone; 40 > S: one segment
]
SHAPES = [  # (S, Hq, Hkv): lengths divisible by none of the segments, GQA, MQA
    (37, 4, 4),
    (23, 6, 2),     # GQA 3: offsets of r = 2, 4 split some kv groups unevenly
    (45, 12, 3),
]


def _inputs(seed, b, s, hq, hkv, d, dv, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = mk(b, s, hq, d), mk(b, s, hkv, d), mk(b, s, hkv, dv)
    dout, dlse = mk(b, s, hq, dv), mk(b, hq, s)
    return [t.to(dtype=dtype, device=device) for t in (q, k, v, dout, dlse)]


def _check_against_oracle(seg, rates, causal, s, hq, hkv, seed, *, with_dlse, b=2, d=8, dv=6):
    q, k, v, dout, dlse = _inputs(seed, b, s, hq, hkv, d, dv)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = dilated_attention(qq, kk, vv, seg, rates, causal=causal, return_lse=True)
    ro, rl = ref_forward(q.numpy(), k.numpy(), v.numpy(), seg, rates, causal=causal)
    dl = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse)) if with_dlse else None
    loss = (out * dout).sum() + ((lse.masked_fill(~torch.isfinite(lse), 0) * dl).sum()
                                 if with_dlse else 0)
    loss.backward()
    grads = ref_backward(dout.numpy(), q.numpy(), k.numpy(), v.numpy(), seg, rates,
                         causal=causal, dlse=None if dl is None else dl.numpy())
    errs = [rel_error(out, ro), rel_error(lse, rl)]
    for t, g in zip((qq, kk, vv), grads):
        # a gradient that is zero in exact arithmetic (every row sees only itself) is rounding
        # noise on both sides: compare it absolutely
        small = np.linalg.norm(g) < 1e-9
        errs.append(float((t.grad - torch.from_numpy(g)).abs().max()) if small
                    else rel_error(t.grad, g))
    assert not torch.isnan(out).any()
    return errs


@pytest.mark.parametrize("si", range(len(SCHEDULES)))
@pytest.mark.parametrize("causal", [False, True])
def test_matches_oracle(si, causal):
    seg, rates = SCHEDULES[si]
    worst = 0.0
    for j, (s, hq, hkv) in enumerate(SHAPES):
        errs = _check_against_oracle(seg, rates, causal, s, hq, hkv, seed=si * 10 + j,
                                     with_dlse=(j == 1))
        worst = max(worst, *errs)
    assert worst <= 1e-10, worst


def test_paper_schedule_full_size_structure():
    """The paper's schedule at full size: the plan's calls are the expected dense problems,
    read as strided views (no gathers) with MHA, gathered with GQA."""
    seg, rates = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
    plan = make_plan(65536, 65536, 0, 1, 12, 12, seg, rates, True)
    assert all(c.strided is not None for c in plan.calls)
    shapes = sorted((c.branch, c.shape) for c in plan.calls)
    want = [(0, (32, 2048, 2048, 12, 12))]                     # r = 1: all heads at once
    want += [(1, (16, 2048, 2048, 6, 6))] * 2                   # one call per offset
    want += [(2, (8, 2048, 2048, 3, 3))] * 4
    want += [(3, (4, 2731, 2731, 2, 2))] * 4 + [(3, (4, 2730, 2730, 2, 2))] * 2  # 16384 = 6*2730+4
    want += [(4, (2, 2731, 2731, 1, 1))] * 8 + [(4, (2, 2730, 2730, 1, 1))] * 4  # 32768 = 12*2730+8
    assert shapes == sorted(want)
    gqa = make_plan(65536, 65536, 0, 1, 12, 4, seg, rates, True)
    assert sorted((c.branch, c.shape) for c in gqa.calls) == [
        (0, (32, 2048, 2048, 12, 4)),
        (1, (16, 2048, 2048, 12, 12)),    # kv head u serves offsets 0 and 1: 12 virtual heads
        (2, (8, 2048, 2048, 12, 12)),
        (3, (4, 2730, 2730, 4, 4)),
        (3, (4, 2731, 2731, 8, 8)),
        (4, (2, 2730, 2730, 4, 4)),
        (4, (2, 2731, 2731, 8, 8)),
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    branches=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 6)), min_size=1, max_size=4),
    s=st.integers(1, 40),
    heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2), (6, 2), (5, 5)]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_schedules_match_oracle(branches, s, heads, causal, seed):
    seg, rates = [w for w, _ in branches], [r for _, r in branches]
    errs = _check_against_oracle(seg, rates, causal, s, heads[0], heads[1], seed,
                                 with_dlse=bool(seed % 2), b=1, d=4, dv=4)
    assert max(errs) <= 1e-10, errs


def test_many_branches_match_oracle():
    """24 branches (any number is a schedule; more than 20 overflowed the argument agreement's
    64 values, even in one process)."""
    seg, rates = [2 + i for i in range(24)], [1 + i % 3 for i in range(24)]
    errs = _check_against_oracle(seg, rates, True, 30, 2, 1, seed=5, with_dlse=True, b=1, d=4,
                                 dv=4)
    assert max(errs) <= 1e-10, errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    seg, rates = SCHEDULES[0]
    q, k, v, dout, _ = _inputs(7, 2, 50, 6, 3, 16, 16, dtype=dtype)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = dilated_attention(qq, kk, vv, seg, rates, causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == lse_dtype(dtype)  # float64 for float32
    (out.float() * dout.float()).sum().backward()
    c = lambda t: t.double().numpy()  # noqa: E731
    ro, rl = ref_forward(c(q), c(k), c(v), seg, rates, causal=True)
    grads = ref_backward(c(dout), c(q), c(k), c(v), seg, rates, causal=True)
    tol = TOLERANCES[dtype]
    assert rel_error(out, ro) <= tol and rel_error(lse, rl) <= tol
    for t, g in zip((qq, kk, vv), grads):
        assert t.grad.dtype == dtype
        assert rel_error(t.grad, g) <= tol


def test_merge_equals_pairwise_shared_merge():
    """The multi-way merge equals folding the branches with common.merge.merge_partials."""
    q, k, v, _, _ = _inputs(3, 1, 30, 4, 2, 8, 8)
    seg, rates = [4, 8, 16], [1, 2, 4]
    out, lse = dilated_attention(q, k, v, seg, rates, causal=True, return_lse=True)
    acc_o = torch.zeros_like(out)
    acc_l = torch.full_like(lse, float("-inf"))
    for w, r in zip(seg, rates):
        o, l = dilated_attention(q, k, v, [w], [r], causal=True, return_lse=True)
        acc_o, acc_l = merge_partials(acc_o, acc_l, o, l)
    assert rel_error(out, acc_o) <= 1e-13 and rel_error(lse, acc_l) <= 1e-13


def test_module_and_scale():
    q, k, v, _, _ = _inputs(4, 2, 33, 4, 4, 8, 8)
    m = DilatedAttention([4, 8, 16], [1, 2, 4], softmax_scale=0.3)
    out = m(q, k, v, is_causal=True)  # the seed's name of causal
    # softmax_scale=0.3 is the default scale 8 ** -0.5 on q * 0.3 * 8 ** 0.5
    ro, _ = ref_forward((q * 0.3 * 8 ** 0.5).numpy(), k.numpy(), v.numpy(), [4, 8, 16],
                        [1, 2, 4], causal=True)
    assert rel_error(out, ro) <= 1e-10
    assert rel_error(dilated_attention(q, k, v, [4, 8, 16], [1, 2, 4], causal=True,
                                       softmax_scale=0.3), ro) <= 1e-10
    assert rel_error(m(q, k, v), dilated_attention(q, k, v, [4, 8, 16], [1, 2, 4],
                                                   softmax_scale=0.3)) == 0
    assert "segment_lengths=[4, 8, 16]" in repr(m)
    with pytest.raises(TypeError, match="is_causal"):  # the function takes causal only
        dilated_attention(q, k, v, [4], [1], is_causal=True)


def test_uncovered_rows_zero_and_no_nan_grads():
    q, k, v, dout, _ = _inputs(5, 1, 12, 2, 2, 4, 4)
    qq = q.clone().requires_grad_()
    out, lse = dilated_attention(qq, k, v, [6], [3], return_lse=True)  # heads 0,1 keep 1/3 rows
    assert torch.all(out[0, 2::3] == 0) and torch.isneginf(lse[0, :, 2::3]).all()
    (out * dout).sum().backward()
    assert torch.isfinite(qq.grad).all() and torch.all(qq.grad[0, 2::3] == 0)


@pytest.mark.parametrize("hkv", [6, 2])
def test_plan_covers_each_row_once_per_branch(hkv):
    """Every (position, head) a branch keeps is written by exactly one call of that branch."""
    from longattn.reference.dilated import dilated_masks

    s, hq, seg, rates = 100, 6, (7, 12, 30), (1, 2, 5)
    plan = make_plan(s, s, 0, 1, hq, hkv, seg, rates, False)
    masks = dilated_masks(s, hq, seg, rates)
    for bi in range(len(seg)):
        count = np.zeros((s, hq), dtype=int)
        for c in plan.calls:
            if c.branch != bi:
                continue
            if c.strided is not None:
                s0, nseg, length, r, o = c.strided
                for i in range(nseg):
                    for p in range(s0 + i * length + o, s0 + (i + 1) * length, r):
                        count[p, o::r] += 1
            else:
                np.add.at(count.reshape(-1), c.qrows.ravel(), 1)
        kept = np.einsum("hii->ih", masks[bi])
        assert np.array_equal(count, kept.astype(int))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(segment_lengths=[4, 8], dilation_rates=[1]), ValueError, "equal length"),
        (dict(segment_lengths=[], dilation_rates=[]), ValueError, "non-empty"),
        (dict(segment_lengths=[0], dilation_rates=[1]), ValueError, "segment_lengths"),
        (dict(segment_lengths=[4], dilation_rates=[-2]), ValueError, "dilation_rates"),
        (dict(segment_lengths=[4.0], dilation_rates=[1]), ValueError, "segment_lengths"),
        (dict(segment_lengths=4, dilation_rates=[1]), TypeError, "segment_lengths"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(causal=None), TypeError, "causal"),
        (dict(softmax_scale="big"), TypeError, "softmax_scale"),
        (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        (dict(backend="no_such_kernel"), ValueError, "backend"),
        (dict(backend=3), TypeError, "backend"),
        (dict(config="fast"), TypeError, "config"),
        (dict(group="world"), (TypeError, ValueError), "group"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q = torch.zeros(1, 8, 2, 4)
    args = dict(segment_lengths=[4], dilation_rates=[1])
    args.update(kwargs)
    seg, rates = args.pop("segment_lengths"), args.pop("dilation_rates")
    with pytest.raises(exc, match=match):
        dilated_attention(q, q, q, seg, rates, **args)


def test_bad_tensors():
    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match="length"):
        dilated_attention(q, q[:, :4], q[:, :4], [4], [1])
    with pytest.raises(ValueError, match="heads"):
        dilated_attention(q, torch.zeros(1, 8, 3, 4), torch.zeros(1, 8, 3, 4), [4], [1])
    with pytest.raises(TypeError, match="dtype"):
        dilated_attention(q, q.double(), q.double(), [4], [1])
    with pytest.raises(ValueError, match="non-empty"):
        dilated_attention(q[:, :0], q[:, :0], q[:, :0], [4], [1])
    with pytest.raises(ValueError, match="attention_dropout"):
        DilatedAttention([4], [1], attention_dropout=0.1)


def test_kernel_outputs_with_any_strides():
    """GPU kernels return outputs / gradients in their own layouts (cuDNN's dq is BHSD-dense):
    the merge and the in-place accumulation must not assume contiguous kernel results."""
    from longattn.common.kernels import Backend, register_backend, torch_backend

    def relayout(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    def fwd(q, k, v, **kw):
        o, lse = torch_backend.forward(q, k, v, **kw)
        return relayout(o), lse

    def bwd(*args, **kw):
        return tuple(relayout(g) for g in torch_backend.backward(*args, **kw))

    register_backend("dilated_test_bhsd", Backend(fwd, bwd, lambda req: None))
    for b, s in ((1, 64), (3, 64), (2, 70)):
        q, k, v, dout, _ = _inputs(b, b, s, 6, 6, 8, 8)
        got, want = [], []
        for backend, res in (("dilated_test_bhsd", got), ("torch", want)):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            o = dilated_attention(qq, kk, vv, [8, 16, 32], [1, 2, 4], causal=True,
                                  backend=backend)
            o.backward(dout)
            res += [o, qq.grad, kk.grad, vv.grad]
        assert all(rel_error(a, w) == 0 for a, w in zip(got, want))


@pytest.mark.parametrize("causal", [False, True])
def test_gradient_through_lse_only(causal):
    """A loss of lse alone (out unused: its gradient arrives as None, not zeros) matches the
    oracle's backward with d(out) = 0."""
    seg, rates = SCHEDULES[0]
    q, k, v, _, dlse = _inputs(11, 2, 37, 4, 4, 8, 6)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    _, lse = dilated_attention(qq, kk, vv, seg, rates, causal=causal, return_lse=True)
    dl = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
    (lse.masked_fill(~torch.isfinite(lse), 0) * dl).sum().backward()
    grads = ref_backward(np.zeros((2, 37, 4, 6)), q.numpy(), k.numpy(), v.numpy(), seg, rates,
                         causal=causal, dlse=dl.numpy())
    for t, g in zip((qq, kk, vv), grads):
        assert rel_error(t.grad, g) <= TOLERANCES[torch.float64]
