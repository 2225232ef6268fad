"""tree's hardware targets through longattn.common.repro: every target's dry run, and
the full run's numbers against the committed JSON they come from."""

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest

from longattn.common import repro

PKG = "tree"
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


def _wheel_without(tmp_path, device):
    """The package's targets laid out as an installed wheel's scripts/ folder, with every
    committed JSON they name but those of ``device``."""
    src, dst = repro.package_dir(PKG), tmp_path / "longattn" / PKG / "scripts"
    shutil.copytree(src / "targets", dst / "targets")
    for t in TARGETS:
        for m in json.loads((src / "targets" / t / "target.json").read_text())["measured"]:
            if not repro.same_gpu(m["device"], device):
                (dst / m["file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / m["file"], dst / m["file"])
    return dst


# the claims of H100-1 read from the committed H100 JSON
FROM_H100 = ["local_step_ms"]


def test_a_wheel_without_the_h100_json_says_so(tmp_path):
    """The measured claims of a wheel that lacks the committed H100 JSON are "not measured
    yet", saying so; the predicted ones still come from the H200 JSON."""
    root = _wheel_without(tmp_path, "NVIDIA H100")
    c = _check(repro.run(PKG, "H100-1", measure=False, root=root), PKG, "H100-1")
    for cid in FROM_H100:
        assert c[cid]["status"] == "not measured yet", c[cid]
        assert "results not in the wheel" in c[cid]["basis"], c[cid]
    assert {v["status"] for k, v in c.items() if k not in FROM_H100} <= {"predicted"}
