"""``python -m longattn.common.bench PKG [SCRIPT] [ARGS]``: the packages' scripts run from a
checkout or an installed wheel without the ``longattn`` command; what reaches the script, and
the errors said before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from longattn.common import script_runner as sr

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """The script's command line instead of running it (from the checkout's root)."""
    seen = []
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sr.subprocess, "call", lambda cmd, cwd: seen.append((cmd, cwd)) or 0)
    monkeypatch.setattr(sr, "SCRIPT_NEEDS", {})
    return seen


def test_the_main_benchmark_by_default(calls):
    assert sr.main(["hamilton", "--smoke"]) == 0
    (cmd, cwd), = calls
    assert cmd[0] == sys.executable and cwd == str(ROOT)
    assert Path(cmd[1]) == ROOT / "hamilton" / "bench" / "bench_hamilton.py"
    assert cmd[2:] == ["--smoke", "--out", os.path.join("bench_out", "hamilton")]


@pytest.mark.parametrize("name", ["predict_hamilton", "predict_hamilton.py"])
def test_a_named_script_with_its_arguments(calls, name):
    assert sr.main(["hamilton", name, "--out=d", "--no-write"]) == 0
    (cmd, _), = calls
    assert Path(cmd[1]) == ROOT / "hamilton" / "bench" / "predict_hamilton.py"
    assert cmd[2:] == ["--out=d", "--no-write"]  # an --out of its own: nothing added


def test_common_main_script(calls):
    assert sr.main(["common"]) == 0
    assert Path(calls[0][0][1]).name == "bench_kernels.py"


def test_errors_before_anything_runs(calls):
    with pytest.raises(SystemExit, match="PKG must be one of"):
        sr.main(["flash", "--smoke"])
    with pytest.raises(SystemExit, match=r"hamilton: no script 'nope'; its scripts: \[.*"
                                         r"'bench_hamilton'"):
        sr.main(["hamilton", "nope"])
    with pytest.raises(SystemExit, match="integrations has no bench_integrations.py"):
        sr.main(["integrations"])  # no main benchmark; gpu_world is named explicitly
    assert calls == []


def test_a_missing_plotting_extra_is_named_first(monkeypatch, calls):
    monkeypatch.setattr(sr, "SCRIPT_NEEDS", {("tree", "predict_tree.py"): sr._PLOTS})
    real = sr.importlib.util.find_spec
    monkeypatch.setattr(sr.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match=r'longattn.common.bench tree: predict_tree.py needs '
                                         r'matplotlib: pip install "longattn-tree\[plots\]"'):
        sr.main(["tree", "predict_tree"])
    assert calls == []
    assert sr.main(["tree", "predict_tree", "--help"]) == 0  # help needs nothing


def test_every_plotting_script_is_listed():
    """A script that plots (matplotlib directly or common.bench.plot_lines) is in
    SCRIPT_NEEDS, so its missing extra is said before the run, not at its end."""
    plots = {(d.parent.name, p.name) for d in ROOT.glob("*/bench") for p in d.glob("*.py")
             if "matplotlib" in p.read_text() or "plot_lines" in p.read_text()}
    assert plots and plots == set(sr.SCRIPT_NEEDS)


def test_python_dash_m_lists_the_scripts():
    out = subprocess.run([sys.executable, "-m", "longattn.common.bench"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m longattn.common.bench PKG [SCRIPT] [ARGS ...]" in out.stdout
    assert ("  hamilton: bench_hamilton bench_packed bench_peer_ring bench_strategies "
            "predict_hamilton") in out.stdout


def _readme_lines():
    """Every ``python -m longattn.common.bench`` line of a README's bash block, as words."""
    import shlex

    found = []
    for readme in sorted(ROOT.glob("*/README.md")) + [ROOT / "README.md"]:
        in_bash = False
        for line in readme.read_text().splitlines():
            if line.startswith("```"):
                in_bash = line.strip() in ("```bash", "```sh", "```console")
                continue
            words = shlex.split(line, comments=True) if in_bash else []
            if words[:3] == ["python", "-m", "longattn.common.bench"]:
                found.append(words[3:])
    return found


def _equals_form(words):
    return [f"{w}={words[i + 1]}" if w.startswith("--") and i + 1 < len(words)
            and not words[i + 1].startswith("-") else w
            for i, w in enumerate(words) if i == 0 or not (words[i - 1].startswith("--")
                                                           and not w.startswith("-"))]


def test_the_readme_lines_run_verbatim(calls):
    """Each line, and its ``--opt=VALUE`` form, reaches the script it names (or lists them)."""
    lines = _readme_lines()
    assert len(lines) >= 3
    for words in lines + [_equals_form(w) for w in lines if any(x.startswith("--") for x in w)]:
        calls.clear()
        assert sr.main(words) == 0, words
        if words:
            (cmd, _), = calls
            name = words[1] if len(words) > 1 and not words[1].startswith("-") else None
            assert Path(cmd[1]).stem == (name or sr.script_name(words[0], "bench")[:-3])
            rest = words[1 + bool(name):]
            own_out = any(a == "--out" or a.startswith("--out=") for a in rest)
            assert cmd[2:] == rest + ([] if own_out else
                                      ["--out", os.path.join("bench_out", words[0])]), words
