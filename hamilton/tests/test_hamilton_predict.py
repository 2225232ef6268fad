"""The prediction model: TASP's all-to-all against ring's single peer on the four targets."""

from __future__ import annotations

import importlib.util
import os

import pytest

from longattn.common import topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def predict():
    spec = importlib.util.spec_from_file_location(
        "predict_hamilton", os.path.join(ROOT, "bench", "predict_hamilton.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_comm_per_step_follows_the_topology(predict):
    # MI300X full mesh: ring uses one 64 GB/s link, TASP all 7 -> 7x less time per byte
    t = topology.get_target("MI300X-1")
    cfg = predict.load_config("MI300X-1")
    s = predict.schedules(cfg)
    ring, tasp = (predict.per_gb_step_times(t, s[m]) for m in ("ring", "tasp"))
    assert len(ring) == len(tasp) == 7
    assert ring[0][1] == pytest.approx(1 / 64)
    assert tasp[0][1] == pytest.approx(1 / 64 / 7)
    # H100 NVSwitch: a single peer gets 370 of 450 GB/s
    t = topology.get_target("H100-1")
    s = predict.schedules(predict.load_config("H100-1"))
    ring, tasp = (predict.per_gb_step_times(t, s[m]) for m in ("ring", "tasp"))
    assert ring[0][1] / tasp[0][1] == pytest.approx(450 / 370)
    # 2 nodes: ring's node-boundary GPU sends a whole block over its NIC; the two-level
    # schedule sends 1/8 of it, flat TASP 8/15
    t = topology.get_target("H100-2")
    s = predict.schedules(predict.load_config("H100-2"))
    g = {m: predict.per_gb_step_times(t, s[m])[0][1] for m in ("ring", "tasp", "two_level")}
    assert g["ring"] == pytest.approx(1 / 50)
    assert g["tasp"] == pytest.approx(8 / 15 / 50)
    assert g["two_level"] == pytest.approx(max(1 / 8 / 50, 7 / 8 / 450))


def test_speedup_vanishes_when_compute_bound(predict):
    steps = predict.StepTimes()
    t = topology.get_target("MI300X-1")
    s = predict.schedules(predict.load_config("MI300X-1"))
    gb = {m: predict.per_gb_step_times(t, s[m]) for m in ("ring", "tasp")}
    small = [predict.predict_call(t, gb[m], "full", 512, 1, 20, 64, steps)[0] for m in gb]
    large = [predict.predict_call(t, gb[m], "full", 65536, 1, 20, 64, steps)[0] for m in gb]
    assert small[0] / small[1] > 3  # communication-bound: TASP's 7 links help
    assert large[0] / large[1] == pytest.approx(1.0, abs=1e-3)  # compute-bound: no gain
