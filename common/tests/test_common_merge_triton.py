"""The one-pass Triton merge (run by the Triton interpreter on the CPU) equals the eager merge,
including dead rows holding garbage and row views."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from longattn.common.merge import merge_partials_

pytest.importorskip("triton")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("b,s,h,d", [(1, 5, 3, 16), (2, 7, 2, 24)])
def test_triton_merge_equals_eager(seed, b, s, h, d):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(b, s, h, d, generator=g)
    lse = torch.randn(b, h, s, generator=g) * 3
    ob = torch.randn(b, s, h, d, generator=g).to(torch.bfloat16)
    lb = torch.randn(b, h, s, generator=g) * 3
    lse[:, 0, 1] = float("-inf")  # a dead on one row
    out[:, 1, 0] = float("nan")  # ... whose out holds garbage
    lb[:, 1, 2] = float("-inf")  # b dead on another
    ob[:, 2, 1] = float("nan")
    lse[:, 0, 3] = lb[:, 0, 3] = float("-inf")  # both dead
    ref_o, ref_l = out.clone(), lse.clone()
    merge_partials_(ref_o, ref_l, ob, lb, backend="torch")
    tri_o, tri_l = out.clone(), lse.clone()
    merge_partials_(tri_o, tri_l, ob, lb, backend="triton")
    assert not torch.isnan(tri_o).any()
    torch.testing.assert_close(tri_l, ref_l, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tri_o, ref_o, rtol=1e-5, atol=1e-5)


def test_triton_merge_on_row_views():
    g = torch.Generator().manual_seed(9)
    out, lse = torch.randn(1, 8, 2, 16, generator=g), torch.randn(1, 2, 8, generator=g)
    ob, lb = torch.randn(1, 4, 2, 16, generator=g), torch.randn(1, 2, 4, generator=g)
    ref_o, ref_l = out.clone(), lse.clone()
    merge_partials_(ref_o[:, 4:], ref_l[:, :, 4:], ob, lb, backend="torch")
    merge_partials_(out[:, 4:], lse[:, :, 4:], ob, lb, backend="triton")
    torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_l, rtol=1e-6, atol=1e-6)


def test_bad_backend_raises():
    o, l_ = torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="backend"):
        merge_partials_(o, l_, o.clone(), l_.clone(), backend="cuda")


def test_triton_says_why_it_cannot_serve():
    o, l_ = torch.zeros(1, 2, 1, 4, dtype=torch.float64), torch.zeros(1, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton'.*float32"):
        merge_partials_(o, l_, o.clone(), l_.clone(), backend="triton")
    o = torch.zeros(1, 2, 1, 8)[..., ::2]  # head_dim not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        merge_partials_(o, torch.zeros(1, 1, 2), o.clone(), torch.zeros(1, 1, 2),
                        backend="triton")
