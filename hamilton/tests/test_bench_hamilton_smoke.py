"""bench_hamilton.py --smoke on the CPU: every +merge variant (HamiltonConfig's overlap_merges /
defer_dq) passes the correctness check, gives +merge's bits where it should, and is timed on
every simulated rank beside the kernels-only sequence and the dense baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longattn.common.testing import load_script


def _bench():
    return load_script(Path(__file__).resolve().parents[1] / "bench" / "bench_hamilton.py")


def test_bench_hamilton_smoke_variants(tmp_path, capsys):
    _bench().main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_hamilton.json").read_text())
    modes = ["+merge", "+merge overlap", "+merge overlap defer_dq"]
    checks = [r for r in data if r["what"].startswith("correctness")]
    assert sorted(r["extra"]["variant"] for r in checks) == sorted(modes)
    assert all(r["extra"]["ok"] for r in checks), checks
    overlap = [r for r in checks if r["extra"]["variant"] == "+merge overlap"]
    assert overlap[0]["extra"]["same_bits_as_merge"] is True
    assert [r["extra"]["deterministic"] for r in checks if r["extra"]["variant"] == "+merge"] \
        == [True]
    same = [r for r in data if r["what"].endswith(" vs +merge")]
    assert len(same) == 3 * 3  # ranks 0, 2, 3 x (a second +merge, the two variants)
    for r in same:
        if "defer_dq" not in r["extra"]["variant"]:
            assert r["extra"]["same_bits_fwd"] and r["extra"]["same_bits_fwd_bwd"], r
        assert r["extra"]["rel_diff_fwd_bwd"] <= 1e-2 and not r["extra"]["race"], r
    timed = {r["what"] for r in data if r["median_ms"] is not None}
    for rank in (0, 2, 3):
        for mode in ["kernels", *modes]:
            for direction in ("fwd", "fwd+bwd"):
                assert f"{direction} rank{rank} {mode}" in timed, timed
    flags = {r["what"]: (r["extra"].get("overlap_merges"), r["extra"].get("defer_dq"))
             for r in data if r["median_ms"] is not None}
    assert flags["fwd rank0 +merge overlap defer_dq"] == (True, True)
    assert flags["fwd rank0 +merge"] == (False, False)
    out = capsys.readouterr().out
    for mode in modes:
        assert f"efficiency fwd+bwd  {mode}" in out, out
    assert "RACE?" not in out


def test_bench_hamilton_variants_flag(tmp_path):
    mod = _bench()
    mod.main(["--smoke", "--out", str(tmp_path), "--variants", "defer", "--no-flex"])
    data = json.loads((tmp_path / "bench_hamilton.json").read_text())
    timed = {r["what"] for r in data if r["median_ms"] is not None}
    assert "fwd+bwd rank0 +merge defer_dq" in timed
    assert not any("overlap" in w for w in timed) and "fwd rank0 +merge" not in timed
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--out", str(tmp_path), "--variants", "merge,fused"])
