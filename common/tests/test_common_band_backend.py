"""longattn.common.kernels.band_backend on the CPU (its pieces on the torch backend, the torch
merge, chosen through ``BandConfig``): the band decomposition against the float64 oracle over
random shapes, splits and both treatments of the anti-causal triangle; geometry; the config
record; what it refuses. The fused Triton merge against its slow twin: test_common_merge_triton.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn import reference as ref
from longattn.common import kernels as K
from longattn.common.kernels import BandConfig
from longattn.common.kernels import band_backend as band
from longattn.common.testing import rel_error


@st.composite
def band_cases(draw, min_chunk_len=1, dims=(2, 8)):
    split = draw(st.integers(1, 3))
    c = draw(st.integers(min_chunk_len, 5))  # chunk length
    nc = draw(st.integers(split + 1, split + 4))  # more chunks than one window
    hkv = draw(st.integers(1, 2))
    return dict(split=split, c=c, w=c * split, s=c * nc, b=draw(st.integers(1, 2)), hkv=hkv,
                hq=hkv * draw(st.integers(1, 2)), d=draw(st.sampled_from(dims)),
                anti=draw(st.sampled_from(["flip", "flash"])), seed=draw(st.integers(0, 999)),
                scale=draw(st.sampled_from([None, 0.3])))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(band_cases())
def test_band_decomposition_matches_oracle_fp64(c):
    check_band(c, torch.float64)


# bf16 gradients of 1-token chunks with head_dim 2 are dominated by the rounding of the bf16
# ``out`` in rowsum(dout * out) (the torch backend shows the same 0.1-0.9 errors there), so
# bf16 is compared on non-degenerate shapes
@settings(max_examples=15, deadline=None, derandomize=True)
@given(band_cases(min_chunk_len=2, dims=(8,)))
def test_band_decomposition_matches_oracle_bf16(c):
    check_band(c, torch.bfloat16)


def check_band(c, dtype):
    g = torch.Generator().manual_seed(c["seed"])
    b, s, hq, hkv, d, w = c["b"], c["s"], c["hq"], c["hkv"], c["d"], c["w"]
    q, k, v = (torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype)
               for h in (hq, hkv, hkv))
    dout = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64).to(dtype)
    scale = d ** -0.5 if c["scale"] is None else c["scale"]
    cfg = BandConfig(split=c["split"], anti=c["anti"], min_chunk=1, piece_backend="torch",
                     merge="torch")
    kw = dict(softmax_scale=scale, window_size=(w, 0), config=cfg)
    assert band.geometry(s, s, (w, 0), c["split"], min_chunk=1) == (w // c["split"],
                                                                      s * c["split"] // w)
    out, lse = band.forward(q, k, v, **kw)
    grads = band.backward(dout, q, k, v, out, lse, **kw)
    m = ref.window_mask(s, s, (w, 0)) & ref.causal_mask(s)
    qn, kn, vn = (t.double().numpy() for t in (q, k, v))
    ro, rl = ref.attention(qn, kn, vn, mask=m, scale=scale)
    rg = ref.attention_backward(dout.double().numpy(), qn, kn, vn, mask=m, scale=scale)
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(out, ro) <= tol and rel_error(lse, rl) <= max(tol, 1e-6)
    for name, got, want, t in zip(("dq", "dk", "dv"), grads, rg, (q, k, v)):
        assert got.shape == t.shape and got.dtype == dtype, name
        assert rel_error(got, want) <= tol, f"{name}: {rel_error(got, want):.2e}"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(-1, 20), st.integers(-1, 2),
       st.integers(1, 3), st.integers(1, 8))
def test_geometry_applies_exactly_when_the_band_splits(sq, sk, left, right, split, mc):
    got = band.geometry(sq, sk, (left, right), split, min_chunk=mc)
    ok = (right == 0 and left >= 1 and sq == sk and left % split == 0
          and left // split >= mc and sq % (left // split) == 0 and sq // (left // split) > split)
    if not ok:
        assert got is None
    else:
        c = left // split
        assert got == (c, sq // c)


def test_refuses_cpu_dlse_and_non_bands():
    q = torch.randn(1, 1024, 2, 64, dtype=torch.bfloat16)
    assert band.supports(K.Request(q, q, q, True, (256, 0))) is not None  # CPU
    assert K.pick_backend(q, q, q, causal=True, window_size=(256, 0)) != "band"
    out, lse = torch.zeros_like(q), torch.zeros(1, 2, 1024)
    with pytest.raises(ValueError, match="dlse"):
        band.backward(q, q, q, q, out, lse, softmax_scale=0.1, window_size=(256, 0), dlse=lse)
    with pytest.raises(ValueError, match="band.*window_size"):  # not a band: says why
        band.forward(q, q, q, softmax_scale=0.1, window_size=(100, 0))


class _Cuda:
    """A tensor that claims to be on CUDA (supports only reads shapes, dtype and device)."""

    def __init__(self, t):
        self.t = t

    def __getattr__(self, name):
        return getattr(self.t, name)

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_supports_reads_the_config():
    x = _Cuda(torch.zeros(1, 1024, 2, 64, dtype=torch.bfloat16))

    def why(cfg=None, window=(256, 0)):
        return band.supports(K.Request(x, x, x, True, window, False, cfg))

    assert why() is None  # chunks of 256 >= 128 tokens
    assert why(BandConfig(split=2)) is None  # 128
    assert "512" in why(BandConfig(min_chunk=512))
    assert "W/4" in why(BandConfig(split=4))  # chunks of 64 < 128
    if "cudnn" in K.UNAVAILABLE:
        assert "cudnn" in why(BandConfig(piece_backend="cudnn"))
    assert "no such backend" in why(BandConfig(piece_backend="nope"))
    assert "window_size" in why(window=(255, 0))


@pytest.mark.parametrize("field,bad", [
    ("split", 0), ("split", 1.0), ("split", True), ("min_chunk", 0), ("anti", "flop"),
    ("merge", "cuda"), ("piece_backend", "band"), ("piece_backend", "auto"),
])
def test_band_config_rejects_bad_fields(field, bad):
    with pytest.raises(ValueError, match=f"BandConfig.{field}"):
        BandConfig(**{field: bad})


def test_band_config_is_frozen():
    cfg = BandConfig()
    with pytest.raises(AttributeError):
        cfg.split = 2
