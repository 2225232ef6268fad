"""The ``longattn`` command: row collection and the pass/fail rule, script lookup, errors,
and this package's own demo rows on a real 4-rank world."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longattn.common import script_runner as sr
from longattn.integrations import cli, driver

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_optional_needs(monkeypatch, request):
    """The argument tests run whether or not the scripts' plotting extra is installed; the
    missing-extra test sets its own."""
    if request.node.name != "test_a_missing_optional_dependency_names_its_extra":
        monkeypatch.setattr(sr, "SCRIPT_NEEDS", {})


@pytest.mark.parametrize("row,ok", [
    ({"rel_err": 1e-12, "tol": 1e-10}, True),
    ({"rel_err": 1e-9, "tol": 1e-10}, False),
    ({"rel_err": 1e-2}, True),  # default tolerance 2e-2
    ({"rel_err": 3e-2}, False),
    ({"rel_err": float("nan")}, False),
    ({"rel_err": float("inf"), "tol": 1e300}, False),
    ({"rel_err": None}, True),  # a row that makes no accuracy claim (a timing row)
])
def test_row_pass_rule(row, ok):
    assert driver.row_passes(row) is ok


def _stub_rows(rows):
    def collect(only=None, run_world=None, log=print):
        return rows
    return collect


def test_check_exit_code_and_table(monkeypatch, capsys):
    good = {"method": "m", "what": "w", "shape": "s", "rel_err": 1e-12, "tol": 1e-10}
    bad = {**good, "what": "broken", "rel_err": float("nan")}
    monkeypatch.setattr(driver, "collect_rows", _stub_rows([good]))
    assert cli.main(["check"]) == 0
    monkeypatch.setattr(driver, "collect_rows", _stub_rows([good, bad]))
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" in out and "broken" in out
    monkeypatch.setattr(driver, "collect_rows", _stub_rows([]))
    assert cli.main(["check"]) == 1  # nothing checked is not a pass


def test_demo_writes_json(monkeypatch, tmp_path):
    rows = [{"method": "m", "what": "w", "shape": "s", "rel_err": 1e-12, "tol": 1e-10,
             "time_ms": 1.5, "bytes": 64}]
    monkeypatch.setattr(driver, "collect_rows", _stub_rows(rows))
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert '"bytes": 64' in (tmp_path / "demo.json").read_text()


def test_a_package_that_raises_gives_a_failing_row(monkeypatch):
    class EP:
        name = "boom"

        def load(self):
            def rows(run_world):
                raise RuntimeError("kaput")
            return rows

    monkeypatch.setattr(driver, "demo_entry_points", lambda only=None: [EP()])
    rows = driver.collect_rows(["boom"], run_world=object())
    assert len(rows) == 1 and "kaput" in rows[0]["what"] and not driver.row_passes(rows[0])


def test_unknown_only_package():
    with pytest.raises(SystemExit, match="no demo rows"):
        cli.main(["check", "--only", "nonexistent"])


def test_bench_and_repro_run_the_package_scripts(monkeypatch):
    calls = []
    monkeypatch.setattr(sr.subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    assert cli.main(["bench", "common", "--smoke", "--out", "x"]) == 0
    cmd, cwd = calls[-1]
    assert cmd[1] == str(ROOT / "common" / "bench" / "bench_kernels.py")
    assert cmd[2:] == ["--smoke", "--out", "x"] and cwd == os.getcwd()
    script = ROOT / "hamilton" / "bench" / "repro_hamilton.py"
    assert cli.main(["repro", "--target", "H100-2", "--dry-run"]) == 0
    assert calls[-1][0][1:] == [str(script), "--target", "H100-2", "--dry-run",
                                "--out", os.path.join("bench_out", "repro_hamilton")]


def test_script_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "integrations"])  # no bench script: not a choice
    assert "invalid choice: 'integrations'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="integrations has no bench_integrations.py"):
        sr.find_script("integrations", "bench")
    with pytest.raises(SystemExit, match="target must be one of"):
        cli.main(["repro", "--target", "TPU-9"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonexistent"])  # argparse: invalid choice
    with pytest.raises(SystemExit):
        cli.main(["demo", "--smoke"])  # unknown options only pass through to scripts


@pytest.mark.parametrize("argv, script_args", [
    (["--dry-run", "--out", "d"], ["--dry-run", "--out", "d"]),
    (["--dry-run", "--out=d"], ["--dry-run", "--out=d"]),
    (["hamilton", "--out", "tree"], ["--out", "tree"]),  # a value that is a package name
    (["hamilton", "--help"], ["--help"]),  # after PKG: the script's help
])
@pytest.mark.parametrize("target", [["--target", "H100-1"], ["--target=H100-1"]])
def test_repro_option_forms(monkeypatch, argv, script_args, target):
    calls = []
    monkeypatch.setattr(sr.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert cli.main(["repro", *target, *argv]) == 0
    script = ROOT / "hamilton" / "bench" / "repro_hamilton.py"
    assert calls == [[sys.executable, str(script), "--target", "H100-1", *script_args]]


def test_repro_target_after_script_options(monkeypatch):
    calls = []
    monkeypatch.setattr(sr.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert cli.main(["repro", "--dry-run", "--target", "H100-4", "--out", "d"]) == 0
    assert calls[-1][2:] == ["--target", "H100-4", "--dry-run", "--out", "d"]


@pytest.mark.parametrize("argv", [["--smoke", "--out", "d"], ["--out=d"], ["--out", "common"],
                                  ["-h"]])
def test_bench_option_forms(monkeypatch, argv):
    calls = []
    monkeypatch.setattr(sr.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert cli.main(["bench", "tree", *argv]) == 0
    assert calls == [[sys.executable, str(ROOT / "tree" / "bench" / "bench_tree.py"), *argv]]


def test_bench_without_out_writes_under_the_current_directory(monkeypatch, tmp_path):
    """No ``--out``: ``bench_out/<pkg>`` in the current directory (the script's own default
    would be the source tree, or site-packages for an installed wheel); the script runs there."""
    calls = []
    monkeypatch.setattr(sr.subprocess, "call",
                        lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "tree", "--smoke"]) == 0
    cmd, cwd = calls[-1]
    assert cmd[2:] == ["--smoke", "--out", os.path.join("bench_out", "tree")]
    assert cwd == str(tmp_path)


def test_scripts_found_inside_an_installed_package(monkeypatch, tmp_path):
    """Without a checkout, the copy a wheel carries (``longattn/<pkg>/scripts/bench``) runs;
    the choices are the packages that carry the script."""
    pkg = tmp_path / "longattn" / "tree"
    (pkg / "scripts" / "bench").mkdir(parents=True)
    (pkg / "scripts" / "bench" / "bench_tree.py").write_text("")
    monkeypatch.setattr(sr, "package_dir", lambda name: None)
    monkeypatch.setattr(sr, "_locations", lambda name: [str(pkg)] if name == "tree" else [])
    assert sr.find_script("tree", "bench") == pkg / "scripts" / "bench" / "bench_tree.py"
    assert sr.script_packages("bench") == ["tree"]
    assert sr.script_packages("repro") == []
    with pytest.raises(SystemExit, match="hamilton has no repro_hamilton.py"):
        sr.find_script("hamilton", "repro")


def test_tables_fit_100_columns():
    long = "a very long description of what this row checked " * 3
    rows = [{"method": "integrations", "what": long, "shape": "B2 S64 H4/2 D8 fp64 " * 2,
             "rel_err": 1.23e-12, "tol": 1e-10}]
    text = driver.check_table(rows)
    assert max(map(len, text.splitlines())) <= 100, text
    assert text.split().count("description") == 3  # wrapped, not cut


def test_script_choices_are_the_packages_with_the_script(capsys):
    for kind in ("bench", "repro"):
        have = [p for p in cli.PACKAGES
                if (ROOT / p / "bench" / sr.script_name(p, kind)).is_file()]
        assert sr.script_packages(kind) == have
    assert "integrations" not in sr.script_packages("bench")
    assert sr.script_packages("repro") == ["hamilton"]
    with pytest.raises(SystemExit):
        cli.main(["repro", "--target", "H100-1", "tree"])
    assert "invalid choice: 'tree'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["repro", "--target", "H100-1", "--help"])  # before PKG: repro's own help
    assert "--target" in capsys.readouterr().out


def test_repro_out_dir_reaches_the_script():
    """The real script parses ``--out DIR`` (then prints its help and exits 0)."""
    r = subprocess.run([sys.executable, "-m", "longattn.integrations", "repro", "--target",
                        "H100-1", "hamilton", "--dry-run", "--out", "d", "--help"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--dry-run" in r.stdout and "repro_hamilton.py" in r.stdout


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "longattn.integrations", "list"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "integrations" in res.stdout and "bench_kernels.py" in res.stdout


def test_demo_checks_out_before_any_row_runs(monkeypatch, tmp_path, capsys):
    def collect(*args, **kwargs):
        raise AssertionError("a row ran")

    monkeypatch.setattr(driver, "collect_rows", collect)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write the results to --out"):
        cli.main(["demo", "--out", str(blocker / "out")])
    assert "longattn demo:" not in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "longattn-integrations 0.1.0" in out and "longattn-common " in out


def test_integrations_demo_rows_on_a_4_rank_world(capsys):
    rows = driver.collect_rows(["integrations"])
    assert len(rows) == 10  # 5 model rows, 5 training rows (padded, packed, DDP, FSDP2)
    for r in rows:
        assert driver.row_passes(r), r
        assert r["rel_err"] <= (1e-6 if "fp32 loss" in r["what"] else 1e-10), r
    assert rows[0]["bytes"] > 0  # the attention communicated


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
    """Before the script starts (its plot comes after the whole run)."""
    calls = []
    monkeypatch.setattr(sr.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    real = sr.importlib.util.find_spec
    monkeypatch.setattr(sr.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match=r'needs matplotlib: pip install "longattn-tree\[plots\]"'):
        cli.main(["bench", "tree", "--out", "d"])
    with pytest.raises(SystemExit, match=r"longattn-hamilton\[plots\]"):
        cli.main(["repro", "--target", "H100-1", "--dry-run"])
    assert calls == []
    assert cli.main(["bench", "tree", "--help"]) == 0  # help needs nothing


def test_report_renders_the_results_page(tmp_path):
    """``longattn report ARGS`` is ``python -m longattn.common.report ARGS``: the page from the
    committed results, here into a temporary file (both option forms)."""
    from longattn.integrations.cli import main

    for form in (["--out", str(tmp_path / "a.md")], [f"--out={tmp_path / 'b.md'}"]):
        assert main(["report", *form, "--no-plot"]) == 0
    a, b = (tmp_path / "a.md").read_text(), (tmp_path / "b.md").read_text()
    assert a == b and "hamilton" in a and "measured" in a
