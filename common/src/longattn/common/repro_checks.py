"""Checks every package's repro tests share: one home, parametrized by the package name.

Each ``<pkg>/tests/test_<pkg>_repro.py`` binds the shared tests by name from
``shared_tests(PKG, __file__, FROM_H100)`` and keeps its own; ``root`` is the checkout the
calling test lies in, found from the test file, since this module may run from a wheel.

    check_claims(res, pkg, target) -> {claim id: claim}
    check_dry_run(pkg, target, tmp_path)
    check_results_page_is_current(pkg, root)
    check_found_in_checkout_or_wheel(pkg, root)
    check_command_outside_the_checkout(pkg, tmp_path, monkeypatch, capsys)
    check_wheel_without_h100_json(pkg, tmp_path, from_h100)
    run_checked(pkg, target, **kw) -> (res, {claim id: claim})   # measure=False
    shared_tests(pkg, test_file, from_h100=None) -> the shared test functions, for a test file
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

from longattn.common import repro

TARGETS = repro.TARGETS


def check_claims(res, pkg, target):
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


def check_dry_run(pkg, target, tmp_path):
    """The dry run measures nothing, and what it writes names the target."""
    res = repro.run(pkg, target, dry_run=True)
    claims = check_claims(res, pkg, target)
    assert all(c["status"] != "measured" for c in claims.values())
    paths = repro.write(res, str(tmp_path), plots=False)
    assert json.loads(open(paths[0]).read())["target"] == target


def check_results_page_is_current(pkg, root):
    """docs/results/ holds what a run from today's committed JSON gives (regenerate it with
    python -m longattn.common.report --refresh)."""
    folder = root / "docs" / "results"  # the checkout's page (runs: the package as installed)
    for target in TARGETS:
        committed = json.loads((folder / f"repro_{pkg}_{target}.json").read_text())
        fresh = repro.run(pkg, target, measure=False)
        assert [(c["id"], c["value"], c["status"]) for c in committed["claims"]] == \
            [(c["id"], c["value"], c["status"]) for c in fresh["claims"]]


def check_found_in_checkout_or_wheel(pkg, root):
    """An editable install runs from the checkout's folder, a wheel from the scripts/ folder
    it carries; either holds every target and every file the targets name."""
    here = Path(importlib.import_module(f"longattn.{pkg}").__file__).resolve().parent
    editable = root / pkg / "src" in here.parents
    d = repro.package_dir(pkg)
    assert d == (root / pkg if editable else here / "scripts")
    assert repro.target_names(pkg) == sorted(TARGETS)
    for t in TARGETS:
        spec = json.loads((d / "targets" / t / "target.json").read_text())
        assert [m["file"] for m in spec["measured"] if not (d / m["file"]).is_file()] == [], t


def check_command_outside_the_checkout(pkg, tmp_path, monkeypatch, capsys):
    """``python -m longattn.common.repro PKG --target T --dry-run --out DIR`` (its main, in
    this process) from a folder outside the checkout."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert repro.main([pkg, "--target", "H100-2", "--dry-run", "--out", "out", "--no-plot"]) == 0
    assert f"wrote out/repro_{pkg}_H100-2_dry.json" in capsys.readouterr().out
    res = json.loads((out / f"repro_{pkg}_H100-2_dry.json").read_text())
    assert (res["package"], res["target"], res["dry_run"]) == (pkg, "H100-2", True)
    check_claims(res, pkg, "H100-2")


def wheel_without(pkg, tmp_path, device):
    """The package's targets laid out as an installed wheel's scripts/ folder, with every
    committed JSON they name but those of ``device``."""
    src, dst = repro.package_dir(pkg), tmp_path / "longattn" / pkg / "scripts"
    shutil.copytree(src / "targets", dst / "targets")
    for t in TARGETS:
        for m in json.loads((src / "targets" / t / "target.json").read_text())["measured"]:
            if not repro.same_gpu(m["device"], device):
                (dst / m["file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / m["file"], dst / m["file"])
    return dst


def check_wheel_without_h100_json(pkg, tmp_path, from_h100):
    """The measured claims of a wheel that lacks the committed H100 JSON (``from_h100``: the
    claims of H100-1 read from it) are "not measured yet", saying so; the predicted ones
    still come from the H200 JSON."""
    _, c = run_checked(pkg, "H100-1", root=wheel_without(pkg, tmp_path, "NVIDIA H100"))
    for cid in from_h100:
        assert c[cid]["status"] == "not measured yet", c[cid]
        assert "results not in the wheel" in c[cid]["basis"], c[cid]
    assert {v["status"] for k, v in c.items() if k not in from_h100} <= {"predicted"}


def run_checked(pkg, target, **kw):
    """``repro.run(pkg, target, measure=False, **kw)`` and its claims by id, checked."""
    res = repro.run(pkg, target, measure=False, **kw)
    return res, check_claims(res, pkg, target)


def shared_tests(pkg, test_file, from_h100=None):
    """The tests every ``test_<pkg>_repro.py`` shares, bound to ``pkg``, in this order:
    test_dry_run (one per target), test_the_results_page_json_is_current,
    test_found_in_the_checkout_or_the_installed_wheel, test_the_command_outside_the_checkout
    and, where ``from_h100`` names the claims of H100-1 read from the committed H100 JSON,
    test_a_wheel_without_the_h100_json_says_so. ``test_file``: the calling file, two folders
    below the checkout's root."""
    import pytest  # only test files call this; the package itself does not need pytest

    root = Path(test_file).resolve().parents[2]

    @pytest.mark.parametrize("target", TARGETS)
    def test_dry_run(target, tmp_path):
        check_dry_run(pkg, target, tmp_path)

    def test_the_results_page_json_is_current():
        check_results_page_is_current(pkg, root)

    def test_found_in_the_checkout_or_the_installed_wheel():
        check_found_in_checkout_or_wheel(pkg, root)

    def test_the_command_outside_the_checkout(tmp_path, monkeypatch, capsys):
        check_command_outside_the_checkout(pkg, tmp_path, monkeypatch, capsys)

    def test_a_wheel_without_the_h100_json_says_so(tmp_path):
        check_wheel_without_h100_json(pkg, tmp_path, from_h100)

    tests = (test_dry_run, test_the_results_page_json_is_current,
             test_found_in_the_checkout_or_the_installed_wheel,
             test_the_command_outside_the_checkout)
    return tests if from_h100 is None else (*tests, test_a_wheel_without_the_h100_json_says_so)
