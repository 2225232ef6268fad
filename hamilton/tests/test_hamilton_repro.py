"""hamilton's hardware targets through longattn.common.repro: every target's dry run, and
the full run's numbers against the committed JSON they come from."""

import importlib
import json
import math
from pathlib import Path

import pytest

from longattn.common import repro

PKG = "hamilton"
TARGETS = repro.TARGETS
ROOT = Path(__file__).resolve().parents[2]  # the checkout these tests lie in


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


def test_predicted_from_the_h200_step_times():
    res = repro.run(PKG, "MI300X-1", measure=False)
    c = _check(res, PKG, "MI300X-1")
    # every row's ring and TASP times are the model's; the claim is their mean ratio
    full = [r["ring_ms"] / r["tasp_ms"] for r in res["rows"] if r["mask"] == "full"]
    assert c["tasp_full_mean"]["value"] == pytest.approx(sum(full) / len(full), rel=1e-3)
    assert c["tasp_full_max"]["value"] == pytest.approx(max(full), rel=1e-3)
    assert c["tasp_full_mean"]["status"] == "predicted"
    assert c["tasp_full_measured"]["status"] == "not measured yet"
    # full mesh: TASP uses all 7 links, so it is never slower than ring in the model
    assert min(full) >= 1.0


def test_the_results_page_json_is_current():
    """docs/results/ holds what a run from today's committed JSON gives (regenerate it with
    python -m longattn.common.report --refresh)."""
    folder = ROOT / "docs" / "results"  # the checkout's page (runs: the package as installed)
    for target in TARGETS:
        committed = json.loads((folder / f"repro_{PKG}_{target}.json").read_text())
        fresh = repro.run(PKG, target, measure=False)
        assert [(c["id"], c["value"], c["status"]) for c in committed["claims"]] == \
            [(c["id"], c["value"], c["status"]) for c in fresh["claims"]]


def test_found_in_the_checkout_or_the_installed_wheel():
    """An editable install runs from the checkout's folder, a wheel from the scripts/ folder
    it carries; either holds every target and every file the targets name."""
    here = Path(importlib.import_module(f"longattn.{PKG}").__file__).resolve().parent
    editable = ROOT / PKG / "src" in here.parents
    d = repro.package_dir(PKG)
    assert d == (ROOT / PKG if editable else here / "scripts")
    assert repro.target_names(PKG) == sorted(TARGETS)
    for t in TARGETS:
        spec = json.loads((d / "targets" / t / "target.json").read_text())
        assert [m["file"] for m in spec["measured"] if not (d / m["file"]).is_file()] == [], t


def test_the_command_outside_the_checkout(tmp_path, monkeypatch, capsys):
    """``python -m longattn.common.repro PKG --target T --dry-run --out DIR`` (its main, in
    this process) from a folder outside the checkout."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert repro.main([PKG, "--target", "H100-2", "--dry-run", "--out", "out", "--no-plot"]) == 0
    assert f"wrote out/repro_{PKG}_H100-2_dry.json" in capsys.readouterr().out
    res = json.loads((out / f"repro_{PKG}_H100-2_dry.json").read_text())
    assert (res["package"], res["target"], res["dry_run"]) == (PKG, "H100-2", True)
    _check(res, PKG, "H100-2")
