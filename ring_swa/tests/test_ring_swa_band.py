"""The band decomposition (the GPU fast path) run on the CPU with the torch backend for its
pieces, against the float64 oracle; and its fused Triton merge under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from longattn.common.kernels import Request
from longattn.common.kernels import band_backend as band
from longattn.common.testing import rel_error
from longattn.reference import attention, attention_backward, causal_mask, window_mask


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(band, "MIN_CHUNK", 2)


@pytest.mark.parametrize("split, anti", [(1, "flip"), (1, "flash"), (2, "flip"), (2, "flash")])
def test_band_matches_oracle_fp64(small_chunks, split, anti):
    g = torch.Generator().manual_seed(split * 10 + len(anti))
    b, s, hq, hkv, d, w = 2, 24, 4, 2, 8, 6
    q = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64)
    dout = torch.randn_like(q)
    kw = dict(scale=0.4, window=(w, 0), split=split, anti=anti, backend="torch")
    out, lse = band.forward(q, k, v, merge="torch", **kw)
    m = window_mask(s, s, (w, 0)) & causal_mask(s)
    args = [t.numpy() for t in (q, k, v)]
    ro, rl = attention(*args, mask=m, scale=0.4)
    assert rel_error(out, ro) <= 1e-10 and rel_error(lse, rl) <= 1e-10
    grads = band.backward(dout, q, k, v, out, lse, **kw)
    for got, ref in zip(grads, attention_backward(dout.numpy(), *args, mask=m, scale=0.4)):
        assert rel_error(got, ref) <= 1e-10


def test_band_geometry_and_supports():
    assert band.geometry(8192, 8192, (4096, 0), 1) == (4096, 2)
    assert band.geometry(131072, 131072, (4096, 0), 2) == (2048, 64)
    assert band.geometry(8192, 8192, (4096, 0), 2) == (2048, 4)
    assert band.geometry(4096, 4096, (4096, 0), 1) is None  # one chunk: nothing to split
    assert band.geometry(8192, 8192, (4095, 0), 1) is None  # S not a multiple of the chunk
    assert band.geometry(8192, 8192, (4096, 1), 1) is None  # not causal
    assert band.geometry(8192, 4096, (4096, 0), 1) is None  # Sq != Sk
    q = torch.randn(1, 8192, 2, 64, dtype=torch.bfloat16)
    assert band.supports(Request(q, q, q, True, (4096, 0))) is not None  # CPU: refused


MERGE_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from longattn.common.kernels import band_backend as band
    torch.manual_seed(0)
    b, nc, c, h, dv = 2, 4, 8, 3, 16
    for split, flip in ((1, True), (2, True), (2, False)):
        parts = [(torch.randn(b * nc, c, h, dv).half(), torch.randn(b * nc, h, c), 0, False)]
        js = [1, 2] if split == 2 else [1]
        for j in js:
            lse = torch.randn(b * (nc - j), h, c)
            lse[0, 0, :3] = float("-inf")  # rows this partial does not cover
            parts.append((torch.randn(b * (nc - j), c, h, dv).half(), lse, j,
                          flip and j == js[-1]))
        o_t, l_t = band._merge_triton(parts, b, nc, c, h, dv, torch.float16)
        o_r, l_r = band._merge_torch([(o.double(), l.double(), j, f) for o, l, j, f in parts],
                                     b, nc, c, h, dv, torch.float64)
        eo = ((o_t.double() - o_r).norm() / o_r.norm()).item()
        el = ((l_t.double() - l_r).norm() / l_r.norm()).item()
        assert eo < 2e-3 and el < 1e-6, (split, flip, eo, el)
    print("OK")
""")


def test_band_triton_merge_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", MERGE_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
