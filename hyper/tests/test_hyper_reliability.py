"""Reliability: sizes checked against the input before anything is allocated, devices, the
Triton interpreter's bf16, NaN rows."""

import pytest
import torch
from hyper_helpers import inputs, randomness

from longattn.common.testing import rel_error
from longattn.hyper import HyperAttention, HyperConfig, hyper_attention, make_plan

pytest.importorskip("triton")

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("causal", [False, True])
def test_huge_sizes_raise_before_drawing(causal):
    q, k, v = inputs(0, 1, 64, 64, 2, 1, 8)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    for kw, word in ((dict(block_size=10 ** 12), "block_size"),
                     (dict(sample_size=10 ** 9), "sample_size"),
                     (dict(sample_size=65), "sample_size"),
                     (dict(sample_size=10 ** 12, min_seq_len=4096), "sample_size"),
                     (dict(lsh_num_projs=10 ** 6), "lsh_num_projs"),
                     (dict(min_seq_len=0), "min_seq_len")):
        with pytest.raises(ValueError, match=word):
            hyper_attention(q, k, v, causal=causal, **{"min_seq_len": 8, **kw}, generator=g)
    assert torch.equal(g.get_state(), state)  # nothing was drawn
    for kw, word in ((dict(block_size=10 ** 12), "block_size"),
                     (dict(sample_size=10 ** 12), "sample_size"),
                     (dict(lsh_num_projs=17), "lsh_num_projs")):
        with pytest.raises(ValueError, match=word):
            HyperAttention(8, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,smooth", [(False, False), (True, True)])
def test_block_past_the_input_is_one_block(backend, causal, smooth):
    # a block of >= max(Sq, Sk) rows is one block over everything: 2**30 computes what 40 does
    q, k, v = inputs(1, 1, 40, 40, 2, 1, 16)
    p, s = randomness(2, q, k, causal=causal, m=5, min_seq_len=8)
    kw = dict(causal=causal, min_seq_len=8, smooth_block=smooth, projections=p,
              sample_indices=s, return_lse=True, backend=backend)
    a = hyper_attention(q, k, v, block_size=2 ** 30, **kw)
    b = hyper_attention(q, k, v, block_size=40, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_large_sample_size_is_fine_when_exact():
    # Sk <= min_seq_len: exact attention, nothing sampled, sample_size not bounded by Sk
    q, k, v = inputs(2, 1, 64, 64, 2, 1, 8)
    out = hyper_attention(q, k, v, sample_size=10 ** 9, block_size=10 ** 9)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_projections_on_another_device():
    q, k, v = inputs(3, 1, 32, 32, 2, 1, 8)
    mod = HyperAttention(8, block_size=4, sample_size=2, min_seq_len=8, device="meta")
    with pytest.raises(ValueError, match="projections are on meta, q on cpu"):
        mod(q, k, v)
    with pytest.raises(ValueError, match="projections are on meta"):
        hyper_attention(q, k, v, block_size=4, sample_size=2, min_seq_len=8,
                        projections=torch.randn(8, 4, device="meta"))


def test_config_is_checked():
    with pytest.raises(ValueError, match="fwd_tile"):
        HyperConfig(fwd_tile=100)
    q, k, v = inputs(4, 1, 32, 32, 2, 1, 8)
    with pytest.raises(TypeError, match="config"):
        hyper_attention(q, k, v, config={"fwd_tile": 128})
    with pytest.raises(ValueError, match="float64"):
        hyper_attention(q.double(), k.double(), v.double(), backend="triton")


def test_triton_interpreter_bf16_is_not_garbage():
    # the interpreter multiplies bf16 dot operands as raw bits; the kernels widen them to
    # fp32 under TRITON_INTERPRET=1, so bf16 matches the fp32 torch path on the same inputs
    q, k, v = (t.bfloat16() for t in inputs(5, 1, 48, 48, 2, 1, 16))
    p, s = randomness(6, q, k, causal=True, m=6, min_seq_len=8)
    kw = dict(causal=True, block_size=16, min_seq_len=8, projections=p, sample_indices=s)
    got = hyper_attention(q, k, v, backend="triton", **kw)
    want = hyper_attention(q.float(), k.float(), v.float(), backend="torch", **kw)
    assert got.dtype == torch.bfloat16 and rel_error(got.float(), want) < 1e-2


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, interpreted
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_gives_nan_rows(backend, causal):
    # the rows of the approximate path: the queries of some core call (causal: every row but
    # the first exact leaf, whose rows are plain exact attention)
    q, k, v = inputs(7, 1, 40, 40, 2, 1, 16)
    p, s = randomness(8, q, k, causal=causal, m=5, min_seq_len=8)
    approx = torch.zeros(40, dtype=torch.bool)
    for q0, nq, _, _ in make_plan(40, 40, causal, 8).calls:
        approx[q0:q0 + nq] = True
    assert approx.sum() == (35 if causal else 40)
    kw = dict(causal=causal, block_size=16, min_seq_len=8, projections=p, sample_indices=s,
              return_lse=True, backend=backend)
    for row in (12, 37):
        qn = q.clone()
        qn[0, row, 1] = float("nan")
        out, lse = hyper_attention(qn, k, v, **kw)
        assert out[0, row, 1].isnan().all() and lse[0, 1, row].isnan()
        ok = torch.ones(40, dtype=torch.bool)
        ok[row] = False
        assert torch.isfinite(out[0, ok]).all() and torch.isfinite(out[0, :, 0]).all()
    # every key NaN: every approximated row NaN, none finite
    for name in ("k", "v"):
        x = {"k": k.clone(), "v": v.clone()}
        x[name].fill_(float("nan"))
        out, lse = hyper_attention(q, x["k"], x["v"], **kw)
        assert out[:, approx].isnan().all(), name
        if name == "k":
            assert lse[:, :, approx].isnan().all()
