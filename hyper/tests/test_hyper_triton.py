"""Triton kernels (run by the interpreter on the CPU: TRITON_INTERPRET=1, set in conftest)
against the torch path and the oracle, forward and backward with d(lse). Shapes are tiny:
the interpreter runs every program in Python."""

import pytest
import torch
from hyper_helpers import inputs, oracle, randomness

from longattn.common.dtypes import lse_dtype
from longattn.common.testing import rel_error
from longattn.hyper import hyper_attention

pytest.importorskip("triton")
from longattn.hyper import triton_kernels  # noqa: E402

TOL = 1e-5


def _both(q, k, v, p, s, **kw):
    """(out, lse, dq, dk, dv) of the torch and the triton path, same loss with d(lse)."""
    res = []
    for backend in ("torch", "triton"):
        q_, k_, v_ = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, lse = hyper_attention(q_, k_, v_, projections=p, sample_indices=s,
                                   return_lse=True, backend=backend, **kw)
        g = torch.Generator().manual_seed(5)
        dout = torch.randn(out.shape, generator=g)
        dlse = torch.randn(lse.shape, generator=g)
        torch.autograd.backward([out, lse], [dout, dlse])
        res.append((out, lse, q_.grad, k_.grad, v_.grad, dout, dlse))
    return res


def _assert_same(res):
    errs = [rel_error(a, b) for a, b in zip(res[1][:5], res[0][:5])]
    assert max(errs) <= TOL, f"triton vs torch rel errors out, lse, dq, dk, dv = {errs}"


def test_interpreter_is_on():
    from longattn.hyper import HyperConfig
    from longattn.hyper.triton_path import _uniform

    assert triton_kernels.INTERPRET
    # the cases below run both mask paths: per-column (blocks of whole tiles) and per-element
    cfg = HyperConfig()
    assert _uniform(16, False, cfg) and not _uniform(8, False, cfg)
    assert not _uniform(16, True, cfg)


@pytest.mark.parametrize("causal,smooth,hkv", [(False, False, 1), (True, True, 2),
                                               (True, False, 2), (False, True, 1)])
def test_triton_vs_torch(causal, smooth, hkv):
    # S = 40 with blocks of 16: a short tail block; msl 8: leaves of 5 (uniform) rows
    q, k, v = inputs(21 + causal + 2 * smooth, 1, 40, 40, 2, hkv, 16)
    p, s = randomness(3, q, k, causal=causal, m=5, min_seq_len=8)
    _assert_same(_both(q, k, v, p, s, causal=causal, block_size=16, min_seq_len=8,
                       smooth_block=smooth))


def test_triton_gqa_odd_lengths_dv_vs_oracle():
    # Hq = 4 over Hkv = 2, head dims 8 (padded to 16) and 12, causal leaves of uneven length,
    # block 5 (query tiles straddle blocks), smooth band
    q, k, v = inputs(22, 2, 45, 45, 4, 2, 8, dv=12)
    p, s = randomness(4, q, k, causal=True, m=3, min_seq_len=7)
    res = _both(q, k, v, p, s, causal=True, block_size=5, min_seq_len=7, smooth_block=True)
    _assert_same(res)
    out, lse, dq, dk, dv, dout, dlse = res[1]
    want = oracle(q, k, v, p, s, dout=dout, dlse=dlse, block_size=5, min_seq_len=7,
                  causal=True, smooth_block=True)
    errs = [rel_error(a, e) for a, e in zip((out, lse, dq, dk, dv), want)]
    assert max(errs) <= TOL, errs


def test_triton_many_samples_and_chunks():
    # 40 samples span three sample tiles of the kernels (the public kernel's stride bug
    # appeared past its first tile) and the 40 query rows span two backward chunks;
    # duplicates and in-window samples included
    q, k, v = inputs(23, 1, 40, 40, 2, 1, 16)
    p, s = randomness(5, q, k, causal=False, m=40, min_seq_len=8)
    s[0, 0, 0, :4] = torch.tensor([0, 0, 1, 39])
    _assert_same(_both(q, k, v, p, s, causal=False, block_size=8, min_seq_len=8))


def test_triton_sq_ne_sk_and_empty_rows():
    # more query blocks than key blocks and no samples: rows that see nothing stay 0 / -inf
    q, k, v = inputs(24, 1, 40, 16, 1, 1, 16)
    p, s = randomness(6, q, k, causal=False, m=0, min_seq_len=8)
    assert s.shape[-1] == 0
    res = _both(q, k, v, p, s, causal=False, block_size=8, min_seq_len=8)
    _assert_same(res)
    lse = res[1][1]
    assert torch.isneginf(lse).sum() == 24 and torch.isfinite(res[1][2]).all()


def test_triton_exact_fallback():
    q, k, v = inputs(25, 1, 12, 12, 2, 1, 16)
    p, s = randomness(7, q, k, causal=True, m=3, min_seq_len=16)
    _assert_same(_both(q, k, v, p, s, causal=True, block_size=4, min_seq_len=16))
    p, s = randomness(7, q, k, causal=False, m=3, min_seq_len=16)
    _assert_same(_both(q, k, v, p, s, causal=False, block_size=4, min_seq_len=16))
    # a loss on lse only: out gets no gradient (dout = None inside the autograd.Function)
    grads = []
    for backend in ("torch", "triton"):
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        _, lse = hyper_attention(*x, causal=True, block_size=4, min_seq_len=16,
                                 return_lse=True, backend=backend, sample_size=0)
        grads.append(torch.autograd.grad(lse.sum(), x[:2]))
    assert max(rel_error(a, b) for a, b in zip(*grads)) <= TOL


def test_triton_no_samples_one_block_equals_exact():
    from longattn.common.kernels import attention

    q, k, v = inputs(27, 1, 20, 20, 2, 1, 16)
    for causal in (False, True):
        out = hyper_attention(q, k, v, causal=causal, block_size=32, sample_size=0,
                              min_seq_len=4, backend="triton")
        assert rel_error(out, attention(q, k, v, causal=causal)) <= TOL


def test_triton_empty_inputs():
    q, k, v = inputs(28, 1, 0, 50, 2, 1, 16, requires_grad=True)
    out = hyper_attention(q, k, v, block_size=16, sample_size=5, min_seq_len=4,
                          backend="triton")
    out.sum().backward()
    assert out.shape == (1, 0, 2, 16) and not k.grad.any()


def test_triton_rejects_float64():
    q, k, v = inputs(26, 1, 20, 20, 1, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        hyper_attention(q, k, v, block_size=4, sample_size=2, min_seq_len=4, backend="triton")


def test_autotune_declarations():
    # autotuning reruns a kernel per config: the accumulators it updates in place must be
    # restored between runs, and every key / restored name must be a real tensor argument
    # (this is only exercised on GPUs, where there is more than one config)
    for kern, restored in ((triton_kernels._fwd, {"O", "L"}),
                           (triton_kernels._bwd_dq, {"DQ"}),
                           (triton_kernels._bwd_dkdv, {"DKA", "DVA"}),
                           (triton_kernels._bwd_samples, set())):
        assert set(kern.restore_value or []) == restored
        assert set(kern.keys) <= set(kern.arg_names)
        assert restored <= set(kern.arg_names)
    # the tensor arguments named in restore_value are not also head-dim ints
    assert "DV" not in triton_kernels._bwd_dkdv.restore_value


@pytest.mark.parametrize("dtype,causal,s,msl,smooth", [
    (torch.bfloat16, True, 64, 8, False), (torch.float16, True, 45, 7, True),
    (torch.bfloat16, False, 40, 8, False)])
def test_triton_half_running_output(dtype, causal, s, msl, smooth):
    # fp16 / bf16 keep the running output O in the input dtype between levels (merged in fp32
    # registers, one rounding per level): against the fp32 torch path on the same rounded
    # inputs (so the same hashes), forward and backward with d(lse). S = 64 / msl 8: uniform
    # leaves (their output is O itself, 3 levels); S = 45 / msl 7: uneven leaves, copied
    from longattn.hyper.triton_path import _out_dtype

    q, k, v = (t.to(dtype) for t in inputs(29 + s, 1, s, s, 2, 1, 16))
    assert _out_dtype(q) == dtype
    p, smp = randomness(9, q, k, causal=causal, m=5, min_seq_len=msl)
    kw = dict(causal=causal, block_size=16, min_seq_len=msl, smooth_block=smooth,
              projections=p, sample_indices=smp, return_lse=True)
    res = []
    for backend, x in (("torch", [t.float() for t in (q, k, v)]), ("triton", [q, k, v])):
        x = [t.detach().clone().requires_grad_(True) for t in x]
        out, lse = hyper_attention(*x, backend=backend, **kw)
        # lse in lse_dtype: float32 for the half inputs, float64 for the fp32 torch twin
        assert out.dtype == x[0].dtype and lse.dtype == lse_dtype(x[0].dtype)
        g = torch.Generator().manual_seed(6)
        dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
        torch.autograd.backward([out, lse], [dout.to(out.dtype), dlse])
        res.append([out, lse] + [t.grad for t in x])
    errs = [rel_error(a.float(), b) for a, b in zip(res[1], res[0])]
    assert max(errs) <= 2e-2, f"{dtype} triton vs fp32 torch: out, lse, dq, dk, dv = {errs}"


@pytest.mark.parametrize("dtype,causal,s,msl", [
    (torch.bfloat16, True, 64, 8), (torch.float16, True, 45, 7), (torch.bfloat16, False, 40, 8)])
def test_triton_grad_accum_input(dtype, causal, s, msl):
    # HyperConfig(grad_accum="input"), the default: the running dq / dk / dv in the input
    # dtype (one rounding per level): against the fp32 torch path, and against
    # grad_accum="float32" at the size of those roundings (and not equal to it: the setting
    # takes effect)
    from longattn.hyper import HyperConfig
    from longattn.hyper.triton_path import _grad_dtype

    q, k, v = (t.to(dtype) for t in inputs(51 + s, 1, s, s, 2, 1, 16))
    assert _grad_dtype(q, HyperConfig(grad_accum="input")) == dtype
    assert _grad_dtype(q.float(), HyperConfig(grad_accum="input")) == torch.float32
    p, smp = randomness(10, q, k, causal=causal, m=5, min_seq_len=msl)
    kw = dict(causal=causal, block_size=16, min_seq_len=msl, projections=p, sample_indices=smp,
              return_lse=True)
    res = []
    for backend, x, cfg in (("torch", [t.float() for t in (q, k, v)], None),
                            ("triton", [q, k, v], HyperConfig(grad_accum="float32")),
                            ("triton", [q, k, v], HyperConfig())):
        x = [t.detach().clone().requires_grad_(True) for t in x]
        out, lse = hyper_attention(*x, backend=backend, config=cfg, **kw)
        g = torch.Generator().manual_seed(7)
        dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
        torch.autograd.backward([out, lse], [dout.to(out.dtype), dlse])
        assert all(t.grad.dtype == x[0].dtype for t in x)
        res.append([t.grad.float() for t in x])
    errs = [rel_error(a, b) for a, b in zip(res[2], res[0])]
    assert max(errs) <= 2e-2, f"{dtype} grad_accum=input vs fp32 torch: dq, dk, dv = {errs}"
    diffs = [rel_error(a, b) for a, b in zip(res[2], res[1])]
    assert max(diffs) <= 1e-2, f"grad_accum=input vs float32: dq, dk, dv = {diffs}"
    if causal:  # levels add onto the leaves' gradients: some rounding differs
        assert max(diffs) > 0


@pytest.mark.parametrize("causal,s,msl", [(True, 200, 16), (False, 150, 16)])
def test_triton_samples_chunk(causal, s, msl):
    # HyperConfig.samples_chunk: the sampled keys' dk / dv summed over chunks of 8 rows
    # (samples_chunk=256 under the interpreter) or of 128 rows (4096: one chunk per call
    # here) are the torch path's (fp32), and differ from each other by summation order only
    from longattn.hyper import HyperConfig

    q, k, v = inputs(60 + s, 1, s, s, 2, 1, 16)
    p, smp = randomness(11, q, k, causal=causal, m=6, min_seq_len=msl)
    kw = dict(causal=causal, block_size=16, min_seq_len=msl, projections=p, sample_indices=smp)
    res = []
    for backend, cfg in (("torch", None), ("triton", HyperConfig(samples_chunk=256)),
                         ("triton", HyperConfig(samples_chunk=4096))):
        x = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = hyper_attention(*x, backend=backend, config=cfg, **kw)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(8)))
        res.append([t.grad for t in x])
    for r in res[1:]:
        errs = [rel_error(a, b) for a, b in zip(r, res[0])]
        assert max(errs) <= 1e-4, f"samples chunks vs torch: dq, dk, dv = {errs}"
    assert not torch.equal(res[1][1], res[2][1])  # dk: the chunking took effect


def test_chunk_sums_equal_index_add_and_take_the_plan_count():
    """The sampled keys' chunk partials summed per problem: a reshape-sum where every problem
    has as many chunks (``_chunks_per_problem`` from the plan), ``index_add_`` otherwise; the
    same sums either way (float64 here, so any order agrees to rounding)."""
    from longattn.hyper import triton_path as tp
    from longattn.hyper.plan import make_plan

    g = torch.Generator().manual_seed(3)
    for counts in ([3, 3, 3], [2, 4, 1], [1]):
        cp = torch.tensor([p for p, c in enumerate(counts) for _ in range(c)], dtype=torch.int32)
        parts = torch.randn(len(cp), 2, 3, 5, generator=g, dtype=torch.float64)
        want = torch.zeros(len(counts), 2, 3, 5, dtype=torch.float64).index_add_(
            0, cp.long(), parts)
        per = counts[0] if len(set(counts)) == 1 else None
        got = tp._chunk_sums(parts, cp, len(counts), per)
        assert torch.allclose(got, want, rtol=1e-14, atol=1e-14)
        assert torch.allclose(tp._chunk_sums(parts, cp, len(counts), None), want, rtol=1e-14,
                              atol=1e-14)
    plan = make_plan(1024, 1024, True, 128)
    for li in range(len(plan.levels)):
        for chunk in (32, 100, 1024):
            cp = tp._tiles(plan, li, chunk, False, "cpu")[0]
            per = tp._chunks_per_problem(plan, li, chunk)
            counts = torch.bincount(cp.long(), minlength=len(plan.levels[li]))
            assert per == (int(counts[0]) if bool((counts == counts[0]).all()) else None)
