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

    from longattn.common.dtypes import lse_dtype
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
            o, lse = td.decode(q, k, v, softmax_scale=0.25, right=right, block_n=16,
                               splits=splits)
            # lse in lse_dtype: float64 for float32 inputs, float32 for bf16
            assert o.dtype == torch.float32 and lse.dtype == lse_dtype(dtype)
            assert rel_error(o, ro) <= tol and rel_error(lse, rl) <= tol, (dtype, i)
            o2, _ = local_attention(q, k, v, softmax_scale=0.25, right=right,
                                    backend="triton_decode")
            assert rel_error(o2, ro) <= tol
    _check_merge_twin()
    _check_per_row()
    _check_nan()
    _check_large_logits()
    # what it cannot serve is refused (and the planner fills the GPU)
    assert td.supports(*(torch.zeros(1, 1, 2, 24) for _ in range(3))) is not None
    assert td.make_plan(1 << 20, 16, block_n=64, device=None) == (33, 31808)
    print("OK")


def _split_partials(q, k, v, right, splits):
    """The kernel's raw per-split ``(acc, m, l)`` and the shape arguments of merge_splits."""
    import torch
    import triton

    from longattn.tree import triton_decode as td

    b, lq, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    rows, block_m = lq * (hq // hkv), max(16, triton.next_power_of_2(lq * (hq // hkv)))
    n, split_len = td.make_plan(s_len, b * hkv, block_n=16, splits=splits)
    acc = torch.empty(b * hkv, n, rows, d)  # the kernel stores the real rows only
    m, l_ = torch.empty(b * hkv, n, rows), torch.empty(b * hkv, n, rows)
    td._split_kernel[(n, b * hkv)](
        q, k, v, acc, m, l_, m, m, m, m, m, m,  # per-row / item pointers unread (both off)
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), s_len, lq, hkv, b, 0.25, right,
        split_len, G=hq // hkv, ROWS=rows, BLOCK_M=block_m, BLOCK_N=16, D=d, SPLITS=n,
        IEEE=True)
    return acc, m, l_


def _check_merge_twin():
    """merge_splits (the fast split-K epilogue) against its slow twin merge_stacked on the
    normalised partials, with splits that see no key (S < Lq, a causal cut)."""
    import torch

    from longattn.common.merge import merge_stacked
    from longattn.tree import triton_decode as td

    for i, (b, lq, hq, hkv, s, right, splits) in enumerate(CASES):
        g = torch.Generator().manual_seed(10 + i)
        q, k, v = (torch.randn(b, n, h, 16, generator=g)
                   for n, h in ((lq, hq), (s, hkv), (s, hkv)))
        acc, m, l_ = _split_partials(q, k, v, right, splits)
        fast_o, fast_l = td.merge_splits(acc, m, l_, b, lq, hq)
        # slow twin: [splits, BH, rows(, D)] normalised partials
        so, sl = merge_stacked((acc / l_.unsqueeze(-1)).transpose(0, 1),
                               (m + torch.log(l_)).transpose(0, 1))
        g_ = hq // hkv  # rows are (t, g) per (b, KV head): to BSHD / [B, Hq, Lq]
        slow_o = so.reshape(b, hkv, lq, g_, 16).permute(0, 2, 1, 3, 4).reshape(b, lq, hq, 16)
        slow_l = sl.reshape(b, hkv, lq, g_).permute(0, 1, 3, 2).reshape(b, hq, lq)
        assert torch.allclose(fast_o, slow_o, rtol=1e-5, atol=1e-6), i
        assert torch.equal(torch.isneginf(fast_l), torch.isneginf(slow_l)), i
        live = ~torch.isneginf(fast_l)
        assert torch.allclose(fast_l[live], slow_l[live], rtol=1e-6, atol=1e-6), i


def _check_per_row():
    """Per-row lengths and windows (cache_seqlens) in one launch, against the float64 oracle:
    rows ending inside the first split (the later splits run no key block), an empty row
    (out 0, lse -inf), a row whose first new tokens see nothing, NaN past every row's length
    (never read); float32 within 1e-5, bf16 within 2e-2. Equal to the one-row calls."""
    import itertools

    import numpy as np
    import torch

    from longattn.common.testing import rel_error
    from longattn.reference import attention
    from longattn.tree import triton_decode as td

    b, lq, hq, hkv, s = 5, 4, 4, 2, 70
    seqlens, rights = [70, 0, 9, 2, 40], [-1, -1, 0, 0, 3]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        g = torch.Generator().manual_seed(4)
        q, k, v = (torch.randn(b, n, h, 16, generator=g).to(dtype)
                   for n, h in ((lq, hq), (s, hkv), (s, hkv)))
        for i, n in enumerate(seqlens):
            k[i, n:] = float("nan")
            v[i, n:] = float("nan")
        # splits=3: the dense grid, splits counted from slot 0; None: one program per split
        # that has keys (the itemized launch), splits counted from each row's first slot
        runs = [td.decode(q, k, v, softmax_scale=0.25, block_n=16, splits=sp, seqlens=seqlens,
                          rights=rights) for sp in (3, None)]
        for (o, lse), (i, (n, right)) in itertools.product(runs, enumerate(zip(seqlens,
                                                                              rights))):
            j, t = np.arange(n)[None, :], np.arange(lq)[:, None]
            mask = np.ones((lq, n), bool) if right < 0 else j <= t + n - lq + right
            ro, rl = (np.zeros((1, lq, hq, 16)), np.full((1, hq, lq), -np.inf))
            if n:
                ro, rl = attention(q[i:i + 1].double().numpy(),
                                   *(x[i:i + 1, :n].double().numpy() for x in (k, v)),
                                   mask=mask, scale=0.25)
            assert rel_error(o[i:i + 1], ro) <= tol and rel_error(lse[i:i + 1], rl) <= tol, i
            if n and dtype == torch.float32:  # the same as a launch of that row alone
                o1, l1 = td.decode(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n],
                                   softmax_scale=0.25, right=right, block_n=16, splits=3)
                assert rel_error(o[i:i + 1], o1) <= 1e-6 and rel_error(lse[i:i + 1], l1) <= 1e-6
    # itemized with starts (left padding: NaN before each row's start, never read) and a
    # batch with nothing to read (no launch: out 0, lse -inf)
    starts = [5, 0, 3, 2, 39]
    q, k, v = (torch.randn(b, n, h, 16, generator=g) for n, h in ((lq, hq), (s, hkv), (s, hkv)))
    for i, (s0, n) in enumerate(zip(starts, seqlens)):
        k[i, :s0], v[i, :s0], k[i, n:], v[i, n:] = (float("nan"),) * 4
    o, lse = td.decode(q, k, v, softmax_scale=0.25, block_n=16, seqlens=seqlens, starts=starts)
    for i, (s0, n) in enumerate(zip(starts, seqlens)):
        if n > s0:
            o1, l1 = td.decode(q[i:i + 1], k[i:i + 1, s0:n], v[i:i + 1, s0:n],
                               softmax_scale=0.25, block_n=16)
            assert rel_error(o[i:i + 1], o1) <= 1e-6 and rel_error(lse[i:i + 1], l1) <= 1e-6, i
        else:
            assert not o[i].any() and torch.isneginf(lse[i]).all(), i
    o, lse = td.decode(q, k, v, softmax_scale=0.25, block_n=16, seqlens=[0, 0, 3, 2, 1],
                       starts=[0, 0, 3, 2, 1])
    assert not o.any() and torch.isneginf(lse).all()


def _check_nan():
    """A NaN key makes the rows that see it NaN in out and lse; the others stay exact."""
    import torch

    from longattn.tree import triton_decode as td

    b, lq, hq, hkv, s = 1, 4, 4, 2, 40
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, h, 16, generator=g) for n, h in ((lq, hq), (s, hkv), (s, hkv)))
    k[0, s - 2, 1, 5] = float("nan")  # seen by new tokens 2 and 3 (causal), KV head 1 only
    o, lse = td.decode(q, k, v, softmax_scale=0.25, right=0, block_n=16, splits=3)
    nan_o = torch.isnan(o).any(-1)  # [B, Lq, Hq]
    nan_l = torch.isnan(lse).transpose(1, 2)
    want = torch.zeros(b, lq, hq, dtype=torch.bool)
    want[0, 2:, 2:] = True  # heads 2, 3 share KV head 1
    assert torch.equal(nan_o, want) and torch.equal(nan_l, want), (nan_o, nan_l)


def _check_large_logits():
    """float32 scores near 1e2 and 1e4 (exact, softmax_scale=1.0) over 4 splits: the split-K
    epilogue merges in float64 statistics, so out and lse stay within 1e-5 of float64."""
    import torch

    from longattn.common.testing import large_logit_qkv, rel_error
    from longattn.reference import attention, causal_mask
    from longattn.tree import triton_decode as td

    for logit in (1e2, 1e4):
        q, k, v = large_logit_qkv(2, 3, 150, 4, 2, 16, logit=logit, seed=5)
        ro, rl = attention(*(x.double().numpy() for x in (q, k, v)), mask=causal_mask(3, 150),
                           scale=1.0)
        o, lse = td.decode(q, k, v, softmax_scale=1.0, right=0, block_n=16, splits=4)
        assert lse.dtype == torch.float64
        errs = rel_error(o, ro), rel_error(lse, rl)
        assert max(errs) <= 1e-5, (logit, errs)
        print(f"large logits {logit:g}: out {errs[0]:.2e} lse {errs[1]:.2e}")


def test_triton_decode_kernel_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__)] + sys.path)
    res = subprocess.run([sys.executable, "-c",
                          "import test_tree_triton as t; t._check_interpreted()"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    print(res.stdout)


def test_split_plan_fills_whole_waves_for_rows_of_different_lengths():
    """With ``rows``, the programs that read keys fill their waves of resident programs about
    as well as an even share of the work could (no long tail of a few programs), no split
    starts past the longest row, and rows with nothing to read launch one split."""
    pytest.importorskip("triton")
    from longattn.tree import triton_decode as td

    lens, hkv, bn, slots = [4096, 1 << 20, 70_000, 9, 0, 300_000], 8, 64, 264
    n, split_len = td.make_plan(1 << 21, len(lens) * hkv, block_n=bn, rows=lens, slots=slots)
    per = split_len // bn
    blocks = [-(-x // bn) for x in lens]

    def cost(per):  # waves of resident programs times the split length
        return -(-hkv * sum(td._row_programs(blocks, per)) // slots) * per

    ideal = hkv * sum(blocks) / slots  # blocks per resident program, evenly spread
    assert cost(per) <= 1.1 * ideal, (per, ideal)
    assert (n - 1) * split_len < max(lens) <= n * split_len  # nothing past the longest row
    # an even share of 4 programs per SM (the plan before) leaves a tail: a worse cost
    assert cost(-(-hkv * sum(blocks) // (4 * 132))) > cost(per)
    # splits count from a row's first slot: 6 slots are 2 splits of 4, none is 0
    assert td._row_programs([6, 0], 4) == [2, 0]
    assert td._row_lengths([9, 0, 3], [3, 0, 5]) == [6, 0, 0]
    # nothing to read: one split, not a grid of empty programs
    assert td.make_plan(1 << 20, 16, block_n=bn, rows=[0, 0], slots=slots)[0] == 1
    # without rows (every row full) the plan is the former one
    assert td.make_plan(1 << 20, 16, block_n=64) == (33, 31808)


def test_resident_programs_from_shared_memory_and_threads():
    pytest.importorskip("triton")
    from longattn.tree import triton_decode as td

    # bn128 / 4 stages at head dim 128, bf16: 3 x 64 KiB + 8 KiB fits once in an SM
    assert td.resident_programs(None, block_n=128, num_warps=4, num_stages=4, head_dim=128,
                                itemsize=2) == 132
    assert td.resident_programs(None, block_n=64, num_warps=8, num_stages=4, head_dim=128,
                                itemsize=2) == 2 * 132
    # threads bound small tiles: 2048 threads / (16 warps of 32) = 4
    assert td.resident_programs(None, block_n=16, num_warps=16, num_stages=2, head_dim=16,
                                itemsize=2) == 4 * 132


def test_launch_config_by_device_name():
    pytest.importorskip("triton")
    from longattn.tree import triton_decode as td

    assert td.default_config(None) == td.FALLBACK == td.default_config("cpu")
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        cfg = dict(td._config_for(name))
        assert cfg == dict(block_n=64, num_warps=8, num_stages=4), name
    assert dict(td._config_for("NVIDIA A100-SXM4-80GB")) == td.FALLBACK


def test_bench_decode_batch_smoke(tmp_path):
    """The batch-of-requests benchmark on the CPU (Triton interpreted): default against the
    float64 reference per row, the NaN-filled slots past each row unread, every method timed."""
    pytest.importorskip("triton")
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_decode_batch.py"
    res = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "default vs float64" in res.stdout and "-> ok" in res.stdout, res.stdout
    rows = json.loads((tmp_path / "bench_decode_batch.json").read_text())
    names = {r["method"] for r in rows}
    assert {"tree.batch_decode.default", "tree.batch_decode.triton[bn16/w4/s1]"} <= names
    assert all(r["extra"]["ok"] for r in rows), rows
