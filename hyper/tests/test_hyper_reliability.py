"""Reliability: sizes checked against the input before anything is allocated, devices, the
Triton interpreter's bf16, NaN rows."""

import pytest
import torch
from hyper_helpers import inputs, oracle, randomness

from longattn.common.testing import rel_error
from longattn.hyper import HyperAttention, HyperConfig, hyper_attention, make_plan
from longattn.reference.hyper import hyper_weights

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


@pytest.mark.parametrize("msl,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                     (True, TypeError)])
def test_public_helpers_check_min_seq_len(msl, exc):
    """make_plan and draw_sample_indices are public: min_seq_len 0 split a one-row causal
    segment into 1 + 0 rows for ever (a hang); they raise like hyper_attention."""
    from longattn.hyper import draw_sample_indices

    make_plan(10, 10, True, 1)  # cached: an equal key (True == 1) must not bypass the check
    with pytest.raises(exc, match="min_seq_len"):
        make_plan(10, 10, True, msl)
    with pytest.raises(exc, match="min_seq_len"):
        draw_sample_indices(10, 10, 1, 1, 4, causal=True, min_seq_len=msl)


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
    with pytest.raises(ValueError, match="grad_accum"):
        HyperConfig(grad_accum="bfloat16")
    for bad in (1000, 128, True, 1024.0):
        with pytest.raises(ValueError, match="samples_chunk"):
            HyperConfig(samples_chunk=bad)
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


# where the single NaN goes: (tensor, batch row, head, dim); q head 1 reads kv head 0 (GQA 2:1)
NAN_AT = {"q": (12, 1, 3), "k": (21, 0, 5), "v": (5, 0, 2)}


def _nan_oracle(q, k, v, p, s, name, at, **kw):
    """The float64 oracle's replay with one NaN: (rows that read it [Hq, S] for out, the same
    for lse, out, lse). A row reads a NaN key (k or v) where the oracle's multiplicity of that
    key is positive (and, for v, in its exact causal leaf), a NaN query only in its own row; a
    NaN in v leaves lse alone. Values of
    the other rows: the oracle on the NaN input (q, k), or on v with the NaN replaced by 0 (its
    dense sum multiplies the NaN by the zero weights of the rows that do not read it)."""
    w = hyper_weights(q.double().numpy(), k.double().numpy(), p.double().numpy(),
                      None if s is None else s.numpy(), num_kv_heads=k.shape[2],
                      **{x: kw[x] for x in ("block_size", "min_seq_len", "causal")})
    w = torch.from_numpy(w)[0]  # [Hq, Sq, Sk]
    row, head, _ = at
    g = q.shape[2] // k.shape[2]
    reads = torch.zeros(q.shape[2], q.shape[1], dtype=torch.bool)
    if name == "q":
        reads[head, row] = True
    else:
        reads[head * g:(head + 1) * g] = w[head * g:(head + 1) * g, :, row] > 0
    if name == "v":  # an exact causal leaf is dense attention with a causal mask, whose
        # masked product multiplies the NaN by 0 in the leaf's earlier rows: dense float64
        # attention (longattn.reference.attention) makes those rows NaN too
        for a, n in make_plan(q.shape[1], k.shape[1], kw["causal"], kw["min_seq_len"]).leaves:
            if a <= row < a + n:
                reads[head * g:(head + 1) * g, a:a + n] = True
    lse_reads = reads if name != "v" else torch.zeros_like(reads)
    x = dict(q=q, k=k, v=v)
    if name == "v":
        x["v"] = v.nan_to_num(0.0)
    out, lse = oracle(x["q"], x["k"], x["v"], p, s, **kw)
    return reads, lse_reads, out[0], lse[0]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, interpreted
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy: NaN in the oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("approx", [True, False], ids=["approx", "exact"])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_one_nan_gives_nan_rows_where_the_oracle_reads_it(name, approx, causal, backend):
    # one NaN in q, k or v; with the approximation (min_seq_len 8: core calls, causal also
    # exact leaves) and without (min_seq_len 64 >= S: exact attention). Every row that reads
    # the NaN (the oracle's replay with the same projections and sampled columns) is NaN in
    # out (and in lse for q / k), every other row equals the oracle; the loss of a training
    # step (forward + backward) is NaN
    q, k, v = inputs(7, 1, 40, 40, 2, 1, 16)
    msl = 8 if approx else 64
    p, s = randomness(8, q, k, causal=causal, m=5, min_seq_len=msl)
    assert bool(make_plan(40, 40, causal, msl).calls) == approx
    x = dict(q=q, k=k, v=v)
    row, head, dim = NAN_AT[name]
    x[name] = x[name].clone()
    x[name][0, row, head, dim] = float("nan")
    kw = dict(causal=causal, block_size=16, min_seq_len=msl)
    reads, lse_reads, want, want_lse = _nan_oracle(x["q"], x["k"], x["v"], p, s, name,
                                                   NAN_AT[name], **kw)
    assert reads.any()
    # NaN elements of out [Hq, S, Dv]: a NaN in q or k spoils the rows' scores (whole rows),
    # a NaN in v only the column it sits in
    bad = reads.unsqueeze(-1).expand(-1, -1, v.shape[-1]).clone()
    if name == "v":
        bad[..., torch.arange(v.shape[-1]) != dim] = False
    xs = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    out, lse = hyper_attention(xs["q"], xs["k"], xs["v"], projections=p, sample_indices=s,
                               return_lse=True, backend=backend, **kw)
    out, lse = out[0].transpose(0, 1), lse[0]  # [Hq, S, Dv], [Hq, S]
    assert torch.equal(out.isnan(), bad), f"NaN rows {out.isnan().any(-1)}, oracle {reads}"
    assert torch.equal(lse.isnan(), lse_reads)
    assert rel_error(out[~bad], want.transpose(0, 1)[~bad]) < 1e-5
    assert rel_error(lse[~lse_reads], want_lse[~lse_reads]) < 1e-5
    loss = out.square().mean() + lse.mean()  # through out and lse, like a training step
    loss.backward()
    assert loss.isnan()


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, interpreted
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_all_keys_nan_gives_nan_rows(backend, causal):
    # every key NaN: every row is NaN (those of the approximate path, the queries of some core
    # call, and causal also the first exact leaf's), in lse too for k
    q, k, v = inputs(7, 1, 40, 40, 2, 1, 16)
    p, s = randomness(8, q, k, causal=causal, m=5, min_seq_len=8)
    approx = torch.zeros(40, dtype=torch.bool)
    for q0, nq, _, _ in make_plan(40, 40, causal, 8).calls:
        approx[q0:q0 + nq] = True
    assert approx.sum() == (35 if causal else 40)
    kw = dict(causal=causal, block_size=16, min_seq_len=8, projections=p, sample_indices=s,
              return_lse=True, backend=backend)
    for name in ("k", "v"):
        x = {"k": k.clone(), "v": v.clone()}
        x[name].fill_(float("nan"))
        out, lse = hyper_attention(q, x["k"], x["v"], **kw)
        assert out.isnan().all(), name
        if name == "k":
            assert lse.isnan().all()
