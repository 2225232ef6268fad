"""tree's hardware targets through longattn.common.repro: every target's dry run, and
the full run's numbers against the committed JSON they come from."""

import json
import math

import pytest

from longattn.common import repro

PKG = "tree"
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


def test_predicted_and_measured_from_the_committed_json():
    res = repro.run(PKG, "H100-1", measure=False)
    c = _check(res, PKG, "H100-1")
    h100 = json.loads((repro.package_dir(PKG) / "bench/results/bench_tree.json").read_text())
    auto = next(r for r in h100 if r["method"] == "tree.tree_local_auto")
    assert c["local_step_ms"]["status"] == "measured"
    assert c["local_step_ms"]["value"] == pytest.approx(auto["median_ms"], rel=1e-3)
    for r in res["rows"]:  # ring moves p - 1 whole shards, tree two statistics all-reduces
        shard = 2 * r["context"] / r["gpus"] * 16 * 128 * 2
        assert r["ring_sent_bytes"] == pytest.approx((r["gpus"] - 1) * shard)
        assert r["ring_ms"] > r["tree_ms"]
    mi = _check(repro.run(PKG, "MI300X-1", measure=False), PKG, "MI300X-1")
    assert mi["local_step_ms"]["status"] == "not measured yet"


def test_the_results_page_json_is_current():
    """docs/results/ holds what a run from today's committed JSON gives (regenerate it with
    python -m longattn.common.report --refresh)."""
    folder = repro.package_dir(PKG).parent / "docs" / "results"
    for target in TARGETS:
        committed = json.loads((folder / f"repro_{PKG}_{target}.json").read_text())
        fresh = repro.run(PKG, target, measure=False)
        assert [(c["id"], c["value"], c["status"]) for c in committed["claims"]] == \
            [(c["id"], c["value"], c["status"]) for c in fresh["claims"]]
