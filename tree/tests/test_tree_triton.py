"""The split-K Triton decode kernel (the torch GPU local step), run by the Triton CPU
interpreter in a subprocess: TRITON_INTERPRET must be set before triton is first imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = [  # (B, Lq, Hq, Hkv, S, right, splits)
    (1, 1, 4, 2, 100, -1, None), (2, 4, 4, 2, 70, 0, 3), (3, 2, 3, 3, 33, 1, 2),
    (1, 4, 8, 2, 5, -1, 1), (2, 4, 2, 1, 2, 0, 1),  # S < Lq: the first tokens see nothing
]


def _check_interpreted():
    import numpy as np
    import torch

    from longattn.common.testing import rel_error
    from longattn.reference import attention
    from longattn.tree import triton_decode as td
    from longattn.tree.local import local_attention

    assert os.environ.get("TRITON_INTERPRET") == "1"
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for i, (b, lq, hq, hkv, s, right, splits) in enumerate(CASES):
            g = torch.Generator().manual_seed(i)
            q, k, v = (torch.randn(b, n, h, 16, generator=g).to(dtype)
                       for n, h in ((lq, hq), (s, hkv), (s, hkv)))
            assert td.supports(q, k, v) is None
            j, t = np.arange(s)[None, :], np.arange(lq)[:, None]
            mask = np.ones((lq, s), bool) if right < 0 else j <= t + s - lq + right
            ro, rl = attention(*(x.double().numpy() for x in (q, k, v)), mask=mask, scale=0.25)
            o, lse = td.decode(q, k, v, scale=0.25, right=right, block_n=16, splits=splits)
            assert o.dtype == torch.float32 and lse.dtype == torch.float32
            assert rel_error(o, ro) <= tol and rel_error(lse, rl) <= tol, (dtype, i)
            o2, _ = local_attention(q, k, v, scale=0.25, right=right, backend="triton_decode")
            assert rel_error(o2, ro) <= tol
    # what it cannot serve is refused (and the planner fills the GPU)
    assert td.supports(*(torch.zeros(1, 1, 2, 24) for _ in range(3))) is not None
    assert td.plan(1 << 20, 16, block_n=64, device=None) == (33, 31808)
    print("OK")


def test_triton_decode_kernel_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__)] + sys.path)
    res = subprocess.run([sys.executable, "-c",
                          "import test_tree_triton as t; t._check_interpreted()"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
