"""``common/bench/check_fa4.py``, the FlashAttention-4 GPU probe, on the CPU: its ``--smoke``
run (FA4's stand-in in place of the kernels) goes through every step and writes its JSON; its
float64 reference, FLOP count and document lengths are checked against plain computations; on a
machine without CUDA the real run says so and exits 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longattn.common import bench
from longattn.common import kernels as K
from longattn.common.testing import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "check_fa4.py"


@pytest.fixture(scope="module")
def probe():
    return load_script(SCRIPT, "check_fa4")


def test_smoke_run_writes_every_step(probe, tmp_path):
    before = (dict(K.BACKENDS), dict(K.UNAVAILABLE))
    assert probe.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert (dict(K.BACKENDS), dict(K.UNAVAILABLE)) == before  # the stand-in is gone again
    doc = json.loads((tmp_path / "check_fa4.json").read_text())
    assert doc["env"]["fa4"] == "FA4's stand-in (--smoke)"
    assert "flash-attn-4" in doc["env"]["versions"]
    names = [r["case"] for r in doc["correctness"]]
    assert names == ([c[0] for c in probe.DENSE_CASES + probe.VARLEN_CASES]
                     + ["NaN rule", "out= / dq_out= slots"])
    assert all(r["ok"] is True for r in doc["correctness"]), doc["correctness"]
    assert len(doc["table"]) == 2 * len(probe.SMOKE_SPEED)
    for r in doc["speed"]:
        assert all(k in r for k in bench.SCHEMA_KEYS)
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["extra"]["first_call_s"] >= 0
    assert {r["what"] for r in doc["speed"]} == {"fa4 fwd", "fa4 fwd+bwd", "torch fwd",
                                                 "torch fwd+bwd"}


def test_skips_and_budget(probe, tmp_path):
    assert probe.main(["--smoke", "--out", str(tmp_path), "--skip", "speed",
                       "--budget", "0"]) == 0
    doc = json.loads((tmp_path / "check_fa4.json").read_text())
    assert doc["speed"] == [] and all(r.get("skipped") == "time budget"
                                      for r in doc["correctness"])


def test_a_wrong_kernel_fails_the_probe(probe, tmp_path, monkeypatch):
    """The probe can fail: a stand-in with top-left causal masks (not FA4's bottom-right)."""
    from longattn.common.testing import Fa4Standin

    orig = Fa4Standin.mask
    monkeypatch.setattr(Fa4Standin, "mask", staticmethod(
        lambda sq, sk, c, l, r, device="cpu": orig(sk, sk, c, l, r, device)[:sq]))
    assert probe.main(["--smoke", "--out", str(tmp_path), "--skip", "speed"]) == 1
    doc = json.loads((tmp_path / "check_fa4.json").read_text())
    bad = {r["case"] for r in doc["correctness"] if r["ok"] is False}
    assert "causal Sq<Sk D128" in bad and "causal D128" not in bad


def test_without_cuda_the_real_run_says_so(probe, tmp_path, capsys, monkeypatch):
    """On every machine (CUDA hidden where there is one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_reference_with_dlse_is_the_oracle():
    """The probe's float64 reference (common.testing.dense_reference64) with d(lse)."""
    from longattn.common.testing import dense_reference64
    from longattn.reference import attention, attention_backward, document_mask

    lq, lk = [5, 9, 4], [7, 9, 2]  # the last document has rows without keys (causal)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(n, h, 8, generator=g) for n, h in ((18, 4), (18, 2), (18, 2),
                                                                    (18, 4)))
    dlse = torch.randn(4, 18, generator=g)
    cq, ck = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    mask = document_mask(cq, ck, causal=True)
    assert not mask.any(-1).all()
    out, lse, grads = dense_reference64(q, k, v, dout, mask, 8 ** -0.5, dlse)
    args = [t.double().numpy()[None] for t in (q, k, v)]
    ro, rl = attention(*args, mask=mask)
    rg = attention_backward(dout.double().numpy()[None], *args, mask=mask,
                            dlse=dlse.double().numpy()[None])
    assert np.array_equal(np.isneginf(lse.numpy()), np.isneginf(rl[0]))
    for got, ref in zip((out, *grads), (ro[0], *(x[0] for x in rg))):
        assert np.abs(got.numpy() - ref).max() <= 1e-12 * max(1.0, np.abs(ref).max())


def test_visible_pairs(probe):
    from longattn.reference import causal_mask, window_mask

    for sq, sk, causal, window in ((7, 7, True, (-1, -1)), (5, 9, True, (2, -1)),
                                   (9, 5, True, (-1, -1)), (6, 6, False, (1, 2)),
                                   (8, 8, False, (-1, -1))):
        m = window_mask(sq, sk, window)
        m = m & causal_mask(sq, sk) if causal else m
        assert probe.visible_pairs([sq], [sk], causal, window) == int(m.sum())
    assert probe.visible_pairs([32768], [32768], True, (-1, -1)) == 32768 * 32769 // 2

