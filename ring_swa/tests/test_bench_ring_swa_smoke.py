"""bench_ring_swa.py --smoke on the CPU, and with --backends auto,fa4 under FlashAttention-4's
stand-in (:class:`longattn.common.testing.Fa4Standin`: float64 inside, bf16 out): the fa4
candidates (its native window, ring_swa's local step on it) are checked and timed beside the
current ones, a wrong kernel fails the check, and an fa4 that cannot run is reported and left
out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longattn.common.kernels import fa4_backend as fb
from longattn.common.testing import Fa4Standin, load_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_ring_swa.py"
FA4_CASES = ("fa4 (native window)", "ring_swa local [fa4]")
FA4_CANDIDATES = ("fa4", "ring_swa local [fa4]")


def _read(path):
    return tuple(json.loads((path / f"bench_ring_swa{x}.json").read_text())
                 for x in ("", "_correctness", "_summary"))


def test_smoke_default_records_no_backends(tmp_path):
    load_script(BENCH).main(["--smoke", "--out", str(tmp_path)])
    timings, checks, summary = _read(tmp_path)
    assert {r["extra"]["candidate"] for r in timings} == {"band s1 flip", "band s2 flash",
                                                          "ring_swa local"}
    assert all("backends" not in r["extra"] for r in timings)
    assert all("backend" not in c for c in checks) and summary["correct"]
    assert set(summary) == {"table", "verdict", "correct"}


def test_smoke_with_fa4_beside_the_current_kernels(tmp_path):
    standin = Fa4Standin(arch=90)
    with fb.use(standin, arch=90, device_type="cpu"):
        load_script(BENCH).main(["--smoke", "--out", str(tmp_path), "--backends", "auto,fa4"])
    # the native window went to FA4 as its window (left 8 in the check, 32 in the timings)
    windows = {(c["window_size_left"], c["window_size_right"]) for _, c in standin.calls}
    assert windows == {(8, 0), (32, 0)}, windows
    assert {name for name, _ in standin.calls} == {"fwd", "bwd"}
    timings, checks, summary = _read(tmp_path)
    for cand in FA4_CANDIDATES:
        for phase in ("fwd", "fwd+bwd"):
            r = [x for x in timings if x["what"] == f"{cand} {phase}"]
            assert len(r) == 1 and r[0]["median_ms"] > 0, (cand, phase)
            assert r[0]["extra"]["backends"] == "fa4" and r[0]["dtype"] == "bfloat16"
    assert {r["extra"]["backends"] for r in timings if r["extra"]["candidate"]
            not in FA4_CANDIDATES} == {"auto"}
    by = {c["case"]: c for c in checks}
    for case in FA4_CASES:
        c = by[case]
        errs = [c[k] for k in ("out", "lse", "dq", "dk", "dv")]
        assert c["ok"] and c["backend"] == "fa4" and c["tol"] == 2e-2, c
        assert all(0 < e <= 2e-2 for e in errs), c  # bf16 against the float64 oracle
    assert by["ring_swa local (auto)"]["out"] <= 1e-10  # the others still float64
    assert summary["correct"]
    assert summary["backends"] == {"auto": "ran", "fa4": "ran in bfloat16"}
    assert set(summary["verdict_by_backend"]["fa4"]) == {"fwd", "fwd+bwd"}
    assert summary["verdict_by_backend"]["fa4"]["fwd"]["best"] in FA4_CANDIDATES
    assert summary["verdict"]["fwd"]["best"] not in FA4_CANDIDATES
    table = {(r["phase"], r["candidate"]) for r in summary["table"]}
    assert ("fwd+bwd", "fa4") in table and ("fwd", "ring_swa local [fa4]") in table


class _WrongFa4(Fa4Standin):
    """FA4's stand-in with an output 5% too large: the fa4 checks must catch it."""

    def _flash_attn_fwd(self, *args, **kw):
        out, *rest = super()._flash_attn_fwd(*args, **kw)
        return (out * 1.05, *rest)


def test_the_fa4_checks_fail_for_a_wrong_kernel():
    mod = load_script(BENCH)
    with fb.use(_WrongFa4(arch=90), arch=90, device_type="cpu"):
        rows = mod.correctness("cpu", True, extra={"fa4": torch.bfloat16})
    by = {r["case"]: r for r in rows}
    for case in FA4_CASES:
        assert not by[case]["ok"] and by[case]["out"] > 2e-2, by[case]
    assert by["ring_swa local (auto)"]["ok"]


def test_fa4_unavailable_is_reported_and_left_out(tmp_path, capsys):
    mod = load_script(BENCH)
    with fb.use(Fa4Standin(arch=80), arch=80, device_type="cpu"):  # no sm80 backward in FA4
        mod.main(["--smoke", "--out", str(tmp_path), "--backends", "auto,fa4"])
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "backend fa4 unavailable" in ln]
    assert len(line) == 1 and "needs sm90 or newer" in line[0], out
    timings, checks, summary = _read(tmp_path)
    assert not any(r["extra"]["candidate"] in FA4_CANDIDATES for r in timings)
    assert not any(c["case"] in FA4_CASES for c in checks)
    assert summary["backends"]["auto"] == "ran"
    assert "needs sm90 or newer" in summary["backends"]["fa4"]
    assert summary["verdict_by_backend"] == {}
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--out", str(tmp_path), "--backends", "auto,cudnn"])
