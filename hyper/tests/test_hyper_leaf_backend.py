"""``HyperConfig.leaf_backend``: the local-kernel backend of the exact parts (causal leaves, the
whole call where it is exact) on both paths. On the CPU with FlashAttention-4's stand-in
(:class:`longattn.common.testing.Fa4Standin`: FA4's interface, float64 inside, bf16 out) the
torch path and the Triton path (interpreter) give the default path's results, and the stand-in
is what ran the exact parts."""

import pytest
import torch
from hyper_helpers import inputs, oracle, randomness

from longattn.common.kernels import fa4_backend as fb
from longattn.common.testing import Fa4Standin, rel_error
from longattn.hyper import HyperConfig, hyper_attention

# (causal, min_seq_len): causal leaves of 5 rows (S = 40); one exact call (Sk <= min_seq_len)
CASES = [(True, 8), (False, 64)]


def test_default_and_validation():
    assert HyperConfig().leaf_backend == "auto"
    assert HyperConfig(leaf_backend="fa4").leaf_backend == "fa4"  # known even where missing
    with pytest.raises(TypeError, match="HyperConfig.leaf_backend"):
        HyperConfig(leaf_backend=None)
    for bad in ("", "cudnnn", "AUTO"):
        with pytest.raises(ValueError, match="HyperConfig.leaf_backend must be 'auto' or"):
            HyperConfig(leaf_backend=bad)
        with pytest.raises(ValueError, match="HyperConfig.leaf_backend_bwd must be 'auto' or"):
            HyperConfig(leaf_backend_bwd=bad)
    with pytest.raises(TypeError, match="HyperConfig.leaf_backend_bwd"):
        HyperConfig(leaf_backend_bwd=4)
    assert HyperConfig(leaf_backend="fa4").leaf_backward == "fa4"
    assert HyperConfig(leaf_backend_bwd="fa4").leaf_backward == "fa4"
    assert HyperConfig(leaf_backend="fa4", leaf_backend_bwd="auto").leaf_backward == "auto"


def _run(backend, config, causal, msl, dtype=torch.bfloat16):
    q, k, v = inputs(3, 1, 40, 40, 2, 1, 16, dtype=dtype, requires_grad=True)
    p, s = randomness(4, q, k, causal=causal, m=5, min_seq_len=msl)
    out, lse = hyper_attention(q, k, v, causal=causal, block_size=16, min_seq_len=msl,
                               projections=p, sample_indices=s, return_lse=True,
                               backend=backend, config=config)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(out.shape, generator=g).to(out.dtype)
    dlse = torch.randn(lse.shape, generator=g)
    torch.autograd.backward([out, lse], [dout, dlse])
    return (q, k, v, p, s, dout, dlse), [out, lse, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal,msl", CASES)
def test_fa4_leaves_give_the_default_results(backend, causal, msl):
    if backend == "triton":
        pytest.importorskip("triton")
    _, want = _run(backend, None, causal, msl)
    standin = Fa4Standin(arch=90)
    with fb.use(standin, arch=90, device_type="cpu"):
        args, got = _run(backend, HyperConfig(leaf_backend="fa4"), causal, msl)
    # the exact parts ran on FA4 (forward and backward, with the leaves' causal mask)
    calls = {(name, c["window_size_right"]) for name, c in standin.calls}
    assert calls == ({("fwd", 0), ("bwd", 0)} if causal else {("fwd", None), ("bwd", None)})
    # the stand-in computes in float64 like the default CPU kernels' float32: the same results
    # up to the last bf16 rounding of a few elements
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= 1e-3, errs
    q, k, v, p, s, dout, dlse = args
    ref = oracle(q, k, v, p, s, dout=dout, dlse=dlse, block_size=16, min_seq_len=msl,
                 causal=causal)
    errs = [rel_error(a, e) for a, e in zip(got, ref)]
    assert max(errs) <= 2e-2, errs  # bf16 inputs against the float64 oracle


def test_a_leaf_backend_that_cannot_serve_raises():
    with fb.use(Fa4Standin(arch=90), arch=90, device_type="cpu"):
        with pytest.raises(ValueError, match="'fa4' cannot serve.*fp16/bf16"):
            _run("torch", HyperConfig(leaf_backend="fa4"), True, 8, dtype=torch.float32)


@pytest.mark.parametrize("fwd,bwd", [("auto", "fa4"), ("fa4", "auto")])
def test_leaf_backward_on_its_own_backend(fwd, bwd):
    # HyperConfig.leaf_backend_bwd: the Triton path's causal leaves run forward on one backend
    # and backward on the other (the stand-in sees only its direction), with the default
    # results
    pytest.importorskip("triton")
    _, want = _run("triton", None, True, 8)
    standin = Fa4Standin(arch=90)
    with fb.use(standin, arch=90, device_type="cpu"):
        _, got = _run("triton", HyperConfig(leaf_backend=fwd, leaf_backend_bwd=bwd), True, 8)
    assert {name for name, _ in standin.calls} == {"fwd" if fwd == "fa4" else "bwd"}
    errs = [rel_error(a, b) for a, b in zip(got, want)]
    assert max(errs) <= 1e-3, errs
