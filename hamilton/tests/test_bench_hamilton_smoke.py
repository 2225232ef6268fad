"""bench_hamilton.py --smoke on the CPU: every +merge variant (HamiltonConfig's overlap_merges /
defer_dq) passes the correctness check, gives +merge's bits where it should, and is timed on
every simulated rank beside the kernels-only sequence and the dense baseline; with
--backends auto,fa4 the same on FlashAttention-4's stand-in beside the current kernels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longattn.common.kernels import fa4_backend as fb
from longattn.common.testing import Fa4Standin, load_script


def _bench():
    return load_script(Path(__file__).resolve().parents[1] / "bench" / "bench_hamilton.py")


def test_bench_hamilton_smoke_variants(tmp_path, capsys):
    _bench().main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_hamilton.json").read_text())
    modes = ["+merge", "+merge overlap", "+merge overlap defer_dq",
             "+merge overlap defer_merge defer_dq"]
    checks = [r for r in data if r["what"].startswith("correctness")]
    assert sorted(r["extra"]["variant"] for r in checks) == sorted(modes)
    assert all(r["extra"]["ok"] for r in checks), checks
    overlap = [r for r in checks if r["extra"]["variant"] == "+merge overlap"]
    assert overlap[0]["extra"]["same_bits_as_merge"] is True
    assert [r["extra"]["deterministic"] for r in checks if r["extra"]["variant"] == "+merge"] \
        == [True]
    same = [r for r in data if r["what"].endswith(" vs +merge")]
    assert len(same) == 3 * 4  # ranks 0, 2, 3 x (a second +merge, the three variants)
    for r in same:
        if "defer" not in r["extra"]["variant"]:
            assert r["extra"]["same_bits_fwd"] and r["extra"]["same_bits_fwd_bwd"], r
        assert r["extra"]["rel_diff_fwd_bwd"] <= 1e-2 and not r["extra"]["race"], r
    timed = {r["what"] for r in data if r["median_ms"] is not None}
    for rank in (0, 2, 3):
        for mode in ["kernels", *modes]:
            for direction in ("fwd", "fwd+bwd"):
                assert f"{direction} rank{rank} {mode}" in timed, timed
    flags = {r["what"]: (r["extra"].get("overlap_merges"), r["extra"].get("defer_dq"),
                         r["extra"].get("defer_merge"))
             for r in data if r["median_ms"] is not None}
    assert flags["fwd rank0 +merge overlap defer_dq"] == (True, True, False)
    assert flags["fwd rank0 +merge overlap defer_merge defer_dq"] == (True, True, True)
    assert flags["fwd rank0 +merge"] == (False, False, False)
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


# --backends auto,fa4: FlashAttention-4 (its CPU stand-in, float64 inside, bf16 out) beside the
# current kernels in the same run


class _WrongFa4(Fa4Standin):
    """FA4's stand-in with an output 5% too large: the fa4 check must catch it."""

    def _flash_attn_fwd(self, *args, **kw):
        out, *rest = super()._flash_attn_fwd(*args, **kw)
        return (out * 1.05, *rest)


def test_bench_hamilton_fa4_beside_auto(tmp_path, capsys):
    standin = Fa4Standin(arch=90)
    with fb.use(standin, arch=90, device_type="cpu"):
        _bench().main(["--smoke", "--out", str(tmp_path), "--variants", "merge",
                       "--backends", "auto,fa4"])
    assert {name for name, _ in standin.calls} == {"fwd", "bwd"}
    # the causal step-0 call and the non-causal step calls both went to FA4
    assert {c["window_size_right"] for _, c in standin.calls} == {0, None}
    data = json.loads((tmp_path / "bench_hamilton.json").read_text())
    checks = {r["what"]: r["extra"] for r in data if r["what"].startswith("correctness")}
    assert set(checks) == {"correctness ring", "correctness ring [fa4]"}
    fa4 = checks["correctness ring [fa4]"]
    assert fa4["backend"] == "fa4" and fa4["ok"] and fa4["deterministic"]
    assert all(0 < e <= 2e-2 for e in fa4["errors"].values()), fa4
    # the fa4 run's lse is its own (FA4's float32 lse, not the torch backend's)
    assert fa4["errors"]["lse"] != checks["correctness ring"]["errors"]["lse"]
    timed = {r["what"]: r["extra"] for r in data if r["median_ms"] is not None}
    for rank in (0, 2, 3):
        for mode in ("kernels", "+merge"):
            for direction in ("fwd", "fwd+bwd"):
                assert timed[f"{direction} rank{rank} {mode}"]["backend"] == "auto"
                ex = timed[f"{direction} rank{rank} {mode} [fa4]"]
                assert ex["backend"] == "fa4" and ex["variant"] == mode
                assert ex["efficiency"] > 0 and ex["baseline"] == "dense(torch)"
    same = [r["extra"] for r in data if r["what"].endswith(" vs +merge [fa4]")]
    assert len(same) == 3 and all(r["same_bits_fwd_bwd"] and not r["race"] for r in same)
    backends = [r["extra"]["backends"] for r in data if r["what"] == "backends"]
    assert backends == [{"auto": "ran", "fa4": "ran"}]
    out = capsys.readouterr().out
    assert "efficiency fwd+bwd  +merge [fa4]" in out and "FAILED" not in out


def test_bench_hamilton_fa4_writes_the_deferred_slots_in_place(tmp_path):
    """With defer_merge and defer_dq on the fa4 backend (its stand-in), every step's kernel
    call gets its slot as FA4's ``out`` / ``dq`` (FA4 writes there; nothing is copied in), and
    the rank's results match the default loop's within bf16 rounding."""
    standin = Fa4Standin(arch=90)
    with fb.use(standin, arch=90, device_type="cpu"):
        _bench().main(["--smoke", "--out", str(tmp_path), "--variants", "merge,defer_all",
                       "--backends", "fa4"])
    fwd = [c for name, c in standin.calls if name == "fwd"]
    bwd = [c for name, c in standin.calls if name == "bwd"]
    # the default loop's calls allocate (out None), the deferred loop's write into slots
    assert any(c["out"] is None for c in fwd) and any(c["out"] is not None for c in fwd)
    assert any(c["dq"] is None for c in bwd) and any(c["dq"] is not None for c in bwd)
    slots = [c["out"] for c in fwd if c["out"] is not None]
    assert all(fb.writable(t) and t._base is not None for t in slots)  # views of one buffer
    data = json.loads((tmp_path / "bench_hamilton.json").read_text())
    same = [r["extra"] for r in data
            if r["what"].endswith(" +merge defer_merge defer_dq vs +merge [fa4]")]
    assert len(same) == 3 and not any(r["race"] for r in same)
    assert all(r["rel_diff_fwd"] <= 1e-2 and r["rel_diff_fwd_bwd"] <= 1e-2 for r in same), same


def test_bench_hamilton_fa4_check_fails_for_a_wrong_kernel():
    with fb.use(_WrongFa4(arch=90), arch=90, device_type="cpu"):
        errs, _ = _bench().check(torch.device("cpu"), torch.bfloat16, 4, 12, 2, 16, "ring",
                                 backend="fa4")
    assert errs["out"] > 2e-2, errs


def test_bench_hamilton_fa4_unavailable_is_reported(tmp_path, capsys):
    with fb.use(Fa4Standin(arch=80), arch=80, device_type="cpu"):  # no sm80 backward in FA4
        _bench().main(["--smoke", "--out", str(tmp_path), "--variants", "merge",
                       "--backends", "auto,fa4"])
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("backend fa4 unavailable")]
    assert len(line) == 1 and "needs sm90 or newer" in line[0], out
    data = json.loads((tmp_path / "bench_hamilton.json").read_text())
    assert not any("[fa4]" in r["what"] for r in data)
    assert "fwd+bwd rank0 +merge" in {r["what"] for r in data}
    backends = [r["extra"]["backends"] for r in data if r["what"] == "backends"]
    assert backends[0]["auto"] == "ran" and "needs sm90" in backends[0]["fa4"]


def test_profile_hamilton_cases_run_on_the_cpu():
    """common/bench/profile_kernels.py's hamilton-* closures (rank 0's fwd+bwd with merges, one
    per variant) at a tiny size on the CPU: each builds, runs and returns the rank's
    gradients, the same for every variant."""
    from pathlib import Path

    from longattn.common.testing import load_script

    mod = load_script(Path(__file__).resolve().parents[2] / "common" / "bench" /
                      "profile_kernels.py", "profile_kernels_hamilton")
    got = [mod.hamilton_case(v, device="cpu", n=3, tokens=24, heads=2, dim=8)()
           for v in ("merge", "overlap", "overlap+defer", "overlap+defer_all")]
    for g in got[1:]:
        for key in ("dq", "dk", "dv"):
            torch.testing.assert_close(g[key], got[0][key])
    assert all(got[0][key].abs().sum() > 0 for key in ("dq", "dk", "dv"))
