"""Every Triton kernel of common against its slow twin, run by the Triton interpreter on the
CPU: the one-pass merge (``merge_triton.merge_``) against the eager ``merge_partials_``
(``backend="torch"``), including dead rows holding garbage and row views; the band backend's
fused multi-partial merge (``band_merge_triton.merge``) against ``band_backend._merge_torch``."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from longattn.common.kernels import band_backend as band
from longattn.common.merge import merge_partials_
from longattn.common.testing import rel_error

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


@pytest.mark.parametrize("split,flip", [(1, True), (1, False), (2, True), (2, False)])
def test_band_fused_merge_equals_its_slow_twin(split, flip):
    g = torch.Generator().manual_seed(10 * split + flip)
    b, nc, c, h, dv = 2, 4, 8, 3, 16
    parts = [(torch.randn(b * nc, c, h, dv, generator=g).half(),
              torch.randn(b * nc, h, c, generator=g), 0, False)]
    js = list(range(1, split + 1))
    for j in js:
        lse = torch.randn(b * (nc - j), h, c, generator=g)
        lse[0, 0, :3] = float("-inf")  # rows this partial does not cover
        parts.append((torch.randn(b * (nc - j), c, h, dv, generator=g).half(), lse, j,
                      flip and j == js[-1]))
    o_t, l_t = band._merge_triton(parts, b, nc, c, h, dv, torch.float16)
    o_r, l_r = band._merge_torch([(o.double(), l_.double(), j, f) for o, l_, j, f in parts],
                                 b, nc, c, h, dv, torch.float64)
    assert o_t.dtype == torch.float16 and l_t.dtype == torch.float32
    assert o_t.shape == (b, nc * c, h, dv) and l_t.shape == (b, h, nc * c)
    assert rel_error(o_t, o_r) <= 2e-3  # fp16 output
    assert rel_error(l_t, l_r) <= 1e-6


def test_a_posinf_lse_gives_nan_in_every_merge():
    """A +inf lse (no partial has one; flash-attn writes it for a sum of 0 or NaN): every merge
    gives that row NaN in out and lse, the others untouched. The Triton merge returned NaN with
    lse -inf, a row the next merge dropped as empty."""
    from longattn.common.merge import merge_partials, merge_slots, merge_stacked

    g = torch.Generator().manual_seed(0)
    oa, ob = (torch.randn(1, 3, 2, 4, generator=g) for _ in range(2))
    la, lb = (torch.randn(1, 2, 3, generator=g) for _ in range(2))
    la[0, 1, 2] = float("inf")
    bad = torch.zeros(1, 2, 3, dtype=torch.bool)
    bad[0, 1, 2] = True
    res = {"merge_partials": merge_partials(oa, la, ob, lb),
           "merge_stacked": merge_stacked(torch.stack([oa, ob]),
                                          torch.stack([la, lb]).transpose(-1, -2)),
           "merge_slots": merge_slots(torch.stack([oa, ob]), torch.stack([la, lb]),
                                      backend="torch")}
    for backend in ("torch", "triton"):
        res[backend] = merge_partials_(oa.clone(), la.clone(), ob, lb, backend=backend)
    o, l_ = res["merge_stacked"]
    res["merge_stacked"] = (o, l_.transpose(-1, -2))  # [B, S, H] -> [B, H, S]
    want, want_lse = res["merge_stacked"]
    for name, (out, lse) in res.items():
        assert torch.equal(lse.isnan(), bad), name
        assert torch.equal(out.isnan(), bad.transpose(1, 2).unsqueeze(-1).expand_as(out)), name
        assert rel_error(out[~out.isnan()], want[~want.isnan()]) < 1e-6, name
        assert rel_error(lse[~bad], want_lse[~bad]) < 1e-6, name
