"""hyper's hardware targets through longattn.common.repro: every target's dry run, and
the full run's numbers against the committed JSON they come from."""

import json
import math

import pytest

from longattn.common import repro

PKG = "hyper"
TARGETS = repro.TARGETS


def _check(res, pkg, target):
    """Every claim of the target answered once, with a status and nothing made up."""
    spec = json.loads((repro.package_dir(pkg) / "targets" / target / "target.json").read_text())
    assert [c["id"] for c in res["claims"]] == [c["id"] for c in spec["claims"]]
    for c in res["claims"]:
        assert c["status"] in repro.STATUSES, c
        if c["status"] == "not measured yet":
            assert c["value"] is None, c
        elif c["value"] is not None:
            assert math.isfinite(c["value"]) and c["value"] > 0, c
        if c["status"] == "measured" and not res["dry_run"]:
            assert c["source"] and c["device"] and c["date"], c
    return {c["id"]: c for c in res["claims"]}


@pytest.mark.parametrize("target", TARGETS)
def test_dry_run(target, tmp_path):
    res = repro.run(PKG, target, dry_run=True)
    claims = _check(res, PKG, target)
    assert all(c["status"] != "measured" for c in claims.values())
    paths = repro.write(res, str(tmp_path), plots=False)
    assert json.loads(open(paths[0]).read())["target"] == target


def test_measured_from_the_committed_json_of_the_same_gpu():
    res = repro.run(PKG, "H200-1", measure=False)
    c = _check(res, PKG, "H200-1")
    rows = json.loads((repro.package_dir(PKG) / "bench/results/h200/bench_hyper.json")
                      .read_text())
    ms = {(r["method"], r["what"]): r["median_ms"] for r in rows}
    assert c["speedup_causal_fwd"]["value"] == pytest.approx(
        ms[("exact (cuDNN SDPA)", "causal")] / ms[("hyper", "causal")], rel=1e-3)
    assert c["speedup_noncausal_fwd"]["error"]["rel_err_out"] > 0
    mi = _check(repro.run(PKG, "MI300X-1", measure=False), PKG, "MI300X-1")
    assert {v["status"] for v in mi.values()} == {"not measured yet"}


def test_dry_run_runs_the_sweep_on_tiny_shapes():
    """The dry run calls hyper on the sweep's tiny shapes (torch path) and records the error
    against exact attention for each."""
    res = repro.run(PKG, "H200-1", dry_run=True)
    assert len(res["rows"]) == 2 * len(repro.load_target(PKG, "H200-1")[2]["seq_lens"])
    assert all(math.isfinite(r["rel_err_out"]) for r in res["rows"])


def test_the_results_page_json_is_current():
    """docs/results/ holds what a run from today's committed JSON gives (regenerate it with
    python -m longattn.common.report --refresh)."""
    folder = repro.package_dir(PKG).parent / "docs" / "results"
    for target in TARGETS:
        committed = json.loads((folder / f"repro_{PKG}_{target}.json").read_text())
        fresh = repro.run(PKG, target, measure=False)
        assert [(c["id"], c["value"], c["status"]) for c in committed["claims"]] == \
            [(c["id"], c["value"], c["status"]) for c in fresh["claims"]]
