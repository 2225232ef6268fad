"""The model family of the quality benchmark (``bench/model_attention.py``): the copy task's
targets are predictable, training is deterministic and cached, and the smoke model learns the
task and attends to few keys, more so than random inputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from longattn.common.testing import shared_script

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    return shared_script(BENCH / f"{name}.py")


ma = _load("model_attention")


@pytest.fixture(scope="module")
def smoke():
    return ma.train(ma.SMOKE, log=None)


def test_copy_task_targets_follow_an_earlier_occurrence_of_their_bigram():
    cfg = ma.SMOKE
    x, mask = ma.copy_task(3, 400, torch.Generator().manual_seed(0), cfg)
    assert 0.2 < mask.float().mean() < 0.6
    for b, t in mask.nonzero().tolist():
        assert any(x[b, j - 2] == x[b, t - 2] and x[b, j - 1] == x[b, t - 1]
                   and x[b, j] == x[b, t] for j in range(2, t)), (b, t)


def test_smoke_model_learns_the_task(smoke):
    model, stats = smoke
    ev = stats["eval"]
    assert ev["acc"] > 0.5 > 4 * ev["chance_acc"], ev
    assert ev["loss"] < 0.5 * ev["chance_loss"], ev


def test_captured_qkv_shape_finite_and_more_concentrated_than_random(smoke):
    bq = _load("bench_quality")
    model, _ = smoke
    s = 256
    q, k, v = ma.capture_qkv(model, s, seed=0)
    for t in (q, k, v):
        assert t.shape == (1, s, 1, 64) and t.dtype == torch.float32
        assert torch.isfinite(t).all()
    q2, k2, v2 = bq.make_inputs("model", s, 1, 0, "cpu", torch.float32, model=model)
    assert torch.equal(q2, q) and torch.equal(v2, v)
    assert not torch.equal(bq.make_inputs("model", s, 1, 1, "cpu", torch.float32,
                                          model=model)[0], q)  # a fresh sequence per seed
    rq, rk, _ = bq.make_inputs("random", s, 1, 0, "cpu", torch.float32)
    trained, rand = bq.top_mass(q, k), bq.top_mass(rq, rk)
    assert trained > 2 * rand, (trained, rand)
    with pytest.raises(ValueError):
        ma.capture_qkv(model, s, seed=0, heads=2)


def test_training_is_deterministic_and_cached(tmp_path):
    cfg = dataclasses.replace(ma.SMOKE, steps=5)
    a, stats = ma.load_or_train(cfg, str(tmp_path), log=None)
    assert stats["cached"] is None and len(list(tmp_path.iterdir())) == 1
    b, _ = ma.train(cfg, log=None)
    c, stats = ma.load_or_train(cfg, str(tmp_path), log=None)
    assert stats["cached"]
    for m in (b, c):
        for (n, p), p2 in zip(a.state_dict().items(), m.state_dict().values()):
            assert torch.equal(p, p2), n
    assert ma.load_or_train(dataclasses.replace(cfg, seed=1), str(tmp_path), log=None)[1][
        "cached"] is None  # another configuration: another file
