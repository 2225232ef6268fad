"""bench_strategies.py --smoke on the CPU: the simulated ranks pass the correctness check and
one timed record per (strategy, mask, pass) lands in the JSON."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path


def test_bench_strategies_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_strategies.py"
    spec = importlib.util.spec_from_file_location("bench_strategies", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_strategies.json").read_text())
    checks = [r for r in data if r["extra"]["kind"] == "correctness"]
    assert checks and all(r["extra"]["ok"] for r in checks), checks
    timed = Counter((r["extra"]["strategy"], r["extra"]["mask"], r["extra"]["direction"])
                    for r in data if r["extra"]["kind"] == "strategy")
    want = {(s, m, p) for s in ("allgather", "ulysses", "usp 2x2") for m in ("causal", "full")
            for p in ("fwd", "fwd+bwd")}
    assert set(timed) == want and set(timed.values()) == {1}, timed
    assert all(r["median_ms"] > 0 and r["extra"]["efficiency"] > 0 for r in data
               if r["extra"]["kind"] == "strategy")
