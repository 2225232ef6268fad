"""The fused Triton LSH-rank kernel (interpreted on the CPU) against ``lsh_rank``'s torch
implementation, computed in float64 from the same (dtype-rounded) projections."""

import pytest
import torch

from longattn.hyper import lsh_rank

pytest.importorskip("triton")
from longattn.hyper.lsh_triton import lsh_rank_fused, rank_dtype  # noqa: E402


def _check(x, p, narrow):
    got = lsh_rank_fused(x, p, narrow=narrow)
    r = p.shape[1]
    assert got.dtype == rank_dtype(r, narrow) and got.shape == (x.shape[0], x.shape[2],
                                                                x.shape[1])
    # the kernel projects with the projections rounded to x's dtype, as the GPU torch path
    pr = p.to(x.dtype)
    want = lsh_rank(x, pr)  # CPU: float64 from the rounded values, int32
    bad = got.to(torch.int32) != want
    if bad.any():  # only rows with a projection within rounding of 0 may differ
        proj = torch.einsum("bshd,dr->bhsr", x.double(), pr.double())
        tiny = proj.abs() <= 1e-4 * x.double().norm(dim=-1).transpose(1, 2)[..., None] \
            * pr.double().norm(dim=0)
        assert tiny.any(-1)[bad].all(), f"{int(bad.sum())} ranks differ away from 0"
        assert bad.float().mean() < 1e-2
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lsh_rank_fused_matches_torch(dtype):
    # S = 300: three row tiles, the last one short; r = 8 (uint8), 12 (int16), 16 (int32), 3
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 300, 3, 64, generator=g).to(dtype)
    for r in (8, 12, 16, 3):
        p = torch.randn(64, r, generator=g)
        for narrow in (True, False):
            _check(x, p, narrow)


def test_lsh_rank_fused_strides_and_odd_head_dim():
    g = torch.Generator().manual_seed(12)
    # a [B, H, S, D] tensor seen as BSHD (strides (H*S*D, D, S*D, 1)), head dim 12 (padded)
    x = torch.randn(2, 3, 70, 12, generator=g).to(torch.float16).transpose(1, 2)
    p = torch.randn(12, 8, generator=g)
    got = _check(x, p, True)
    assert got.dtype == torch.uint8 and int(got.max()) < 256 and got.unique().numel() > 32
    # a head slice of a wider tensor, and a non-unit last stride (copied)
    y = torch.randn(1, 50, 4, 32, generator=g)
    _check(y[:, :, 1:3], torch.randn(32, 5, generator=g), False)
    z = torch.randn(1, 40, 2, 16, generator=g).transpose(2, 3).contiguous().transpose(2, 3)
    assert z.stride(-1) != 1
    _check(z, torch.randn(16, 6, generator=g), True)
    assert lsh_rank_fused(x[:, :0], p).shape == (2, 3, 0)
