"""One demo driver: ``python tests/demo.py`` (what ``nox -s demo`` runs) and ``longattn demo``
print and write the same rows, from one implementation (``longattn.integrations.driver``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a small configuration: the foundation rows and one package's rows
ONLY = ["common", "tree"]


def _rows(cmd, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([*cmd, "--only", *ONLY, "--out", str(out)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads((out / "demo.json").read_text())
    return {(r["method"], r["what"], r.get("shape")) for r in rows}, res.stdout


def test_tests_demo_and_longattn_demo_give_the_same_rows(tmp_path):
    script, printed = _rows([sys.executable, "tests/demo.py"], tmp_path / "script")
    command, _ = _rows([sys.executable, "-m", "longattn.integrations", "demo"], tmp_path / "cli")
    assert script == command
    assert {m.split(".")[0] for m, _, _ in script} == set(ONLY), script
    assert ("common", "kernels torch fwd+bwd causal") in {(m, w) for m, w, _ in script}
    assert "kernels torch fwd+bwd" in printed  # the foundation rows are printed (wrapped)


def test_nox_demo_runs_longattn_demo():
    text = (ROOT / "noxfile.py").read_text()
    session = text[text.index("def demo(session)"):]
    session = session[:session.index("\n@nox.session")]
    assert '"-m", "longattn.integrations", "demo"' in session
