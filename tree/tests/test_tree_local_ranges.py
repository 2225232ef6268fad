"""The local decode step with per-row starts and skipped slots (what a left-padded batch's
decode needs: its padding sits in the middle of each row's slots, and a sliding window starts
each row at its own slot): the split-K Triton kernel (interpreted) and the shared kernels' slow
twin against the float64 oracle with the same mask, over many random rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longattn.common.testing import rel_error
from longattn.reference import attention
from longattn.tree.local import local_attention


def _rows(rng, b, n, lq):
    seqlens = rng.integers(0, n + 1, size=b).tolist()
    starts = [int(rng.integers(0, s + 1)) if s else 0 for s in seqlens]
    skips = []
    for _ in range(b):
        lo = int(rng.integers(0, n + 1))
        skips.append((lo, int(rng.integers(lo, n + 1))) if rng.random() < 0.8 else (0, 0))
    rights = [int(rng.choice([-1, 0, 2])) for _ in range(b)]
    return seqlens, starts, skips, rights


def _oracle(q, k, v, scale, seqlens, starts, skips, rights):
    b, lq, hq, _ = q.shape
    n = k.shape[1]
    mask = np.zeros((b, 1, lq, n), dtype=bool)
    j = np.arange(n)
    for r, (s_len, s0, (lo, hi), right) in enumerate(zip(seqlens, starts, skips, rights)):
        for t in range(lq):
            lim = s_len if right < 0 else t + s_len - lq + right + 1
            mask[r, 0, t] = (j >= s0) & (j < min(s_len, lim)) & ~((j >= lo) & (j < hi))
    to = lambda x: x.double().numpy()  # noqa: E731
    return attention(to(q), to(k), to(v), mask=mask, scale=scale)


@pytest.mark.parametrize("backend", ["triton_decode", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("seed", range(4))
def test_starts_and_skips_match_the_oracle(backend, dtype, tol, seed):
    rng = np.random.default_rng(seed)
    b, n, lq, hq, hkv, d = 5, 97, int(rng.choice([1, 3])), 8, 2, 32
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, m, h, d, generator=g).to(dtype)
               for m, h in ((lq, hq), (n, hkv), (n, hkv)))
    seqlens, starts, skips, rights = _rows(rng, b, n, lq)
    scale = d ** -0.5
    out, lse = local_attention(q, k, v, softmax_scale=scale, right=rights, backend=backend,
                               seqlens=seqlens, starts=starts, skips=skips)
    ref_out, ref_lse = _oracle(q, k, v, scale, seqlens, starts, skips, rights)
    empty = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse.double().numpy()), empty)
    assert not torch.isnan(out).any()
    assert rel_error(out.double().numpy(), ref_out) <= tol
    live = ~empty
    if live.any():
        assert rel_error(lse.double().numpy()[live], ref_lse[live]) <= tol


def test_skips_read_no_skipped_slot():
    """A NaN in a skipped slot or before a row's start stays out of the result: those slots
    are never read (a NaN in a visible slot makes its row NaN, as everywhere)."""
    b, n, d = 2, 40, 16
    q, k, v = (torch.randn(b, m, 2, d) for m in (1, n, n))
    k[:, 10:20] = float("nan")  # skipped
    v[:, :4] = float("nan")  # before the start
    for backend in ("triton_decode", "torch"):
        out, _ = local_attention(q, k, v, softmax_scale=d ** -0.5, backend=backend,
                                 seqlens=[n, 30], starts=[4, 5], skips=[(10, 20), (8, 20)])
        assert not torch.isnan(out).any(), backend
        out, _ = local_attention(q, k, v, softmax_scale=d ** -0.5, backend=backend,
                                 seqlens=[n, 30], starts=[4, 5], skips=[(10, 19), (8, 20)])
        assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any(), backend


def test_one_range_for_every_row_is_one_view_call():
    """Every row alike with no skip: one call on the view ``k[:, start:end]``, equal to the
    call on that slice."""
    q, k, v = (torch.randn(3, m, 4, 16, dtype=torch.float64) for m in (1, 50, 50))
    a = local_attention(q, k, v, softmax_scale=0.25, backend="torch", seqlens=[45] * 3,
                        starts=[7] * 3)
    b = local_attention(q, k[:, 7:45], v[:, 7:45], softmax_scale=0.25, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_starts_need_seqlens():
    q, k, v = (torch.randn(1, m, 2, 16) for m in (1, 8, 8))
    with pytest.raises(ValueError, match="starts and skips need seqlens"):
        local_attention(q, k, v, softmax_scale=0.25, starts=[1])
