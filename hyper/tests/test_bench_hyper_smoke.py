"""bench_hyper.py --smoke on the CPU with --leaf-backend auto,fa4 under FlashAttention-4's
stand-in (:class:`longattn.common.testing.Fa4Standin`: float64 inside, bf16 out): HyperAttention
with fa4 leaves is checked (Triton path against the torch path, and against the float64 oracle)
and timed beside the default leaves, a wrong kernel fails the check, and an fa4 that cannot run
is reported and left out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from longattn.common.kernels import fa4_backend as fb
from longattn.common.testing import Fa4Standin, load_script
from longattn.hyper import HyperConfig

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_hyper.py"
MODES = ("causal", "causal fwd+bwd", "non-causal")


def _errors(out, marker):
    """The rel errors out/lse/dq/dk/dv of the check lines that hold ``marker``."""
    lines = [ln for ln in out.splitlines() if "rel err out/lse/dq/dk/dv" in ln and marker in ln]
    return lines, [[float(x) for x in re.search(r"= ([\d.e+\- ]+) \(tol", ln).group(1).split()]
                   for ln in lines]


def _smoke(tmp_path, capsys, leaves):
    """bench_hyper --smoke with ``--leaf-backend leaves`` under FA4's stand-in: the stand-in
    (its calls), the output, and the checks of the non-auto leaves passed within 3e-2."""
    standin = Fa4Standin(arch=90)
    with fb.use(standin, arch=90, device_type="cpu"):
        rc = load_script(BENCH).main(["--smoke", "--no-sweep", "--out", str(tmp_path),
                                      "--leaf-backend", leaves])
    assert rc == 0
    out = capsys.readouterr().out
    lines, errs = _errors(out, "bfloat16")
    assert len(lines) == 2 and all(ln.lstrip().startswith("PASS") for ln in lines), out
    assert all(0 < e <= 3e-2 for row in errs for e in row), errs  # Triton (fa4) vs torch path
    return standin, out


def test_smoke_with_fa4_leaves_beside_auto(tmp_path, capsys):
    standin, out = _smoke(tmp_path, capsys, "auto,fa4")
    # the causal leaves went to FA4 (causal: right 0), forward and backward
    assert {(name, c["window_size_right"]) for name, c in standin.calls} >= {("fwd", 0),
                                                                             ("bwd", 0)}
    oracle = re.search(r"(PASS|FAIL) torch path \(fa4 leaves, bfloat16\) vs float64 oracle: "
                       r"(\S+)", out)
    assert oracle and oracle.group(1) == "PASS" and 0 < float(oracle.group(2)) <= 3e-2, out
    rows = json.loads((tmp_path / "bench_hyper.json").read_text())
    hyper = {r["what"]: r for r in rows if r["method"] == "hyper"}
    for mode in MODES:
        a, f = hyper[mode], hyper[f"{mode} [fa4]"]
        assert a["extra"]["leaf_backend"] == "auto" and a["dtype"] == "float32"
        assert f["extra"]["leaf_backend"] == "fa4" and f["dtype"] == "bfloat16"
        assert f["median_ms"] > 0 and f["extra"]["speedup"] > 0
        assert f["extra"]["leaf_backends"] == {"auto": "ran", "fa4": "ran in bfloat16"}
    # one exact baseline per configuration, shared by both variants
    assert sorted(r["what"] for r in rows if r["method"].startswith("exact")) == sorted(MODES)
    assert "correctness checks: PASS" in out


def test_smoke_with_the_fa4_leaf_backward_only(tmp_path, capsys):
    # --leaf-backend auto/fa4: the leaves' forward on auto, their backward on FA4
    # (HyperConfig.leaf_backend_bwd), checked and timed beside auto
    standin, out = _smoke(tmp_path, capsys, "auto,auto/fa4")
    assert {name for name, _ in standin.calls} == {"bwd"}
    rows = json.loads((tmp_path / "bench_hyper.json").read_text())
    hyper = {r["what"]: r for r in rows if r["method"] == "hyper"}
    f = hyper["causal fwd+bwd [auto/fa4]"]
    assert f["extra"]["leaf_backend"] == "auto/fa4" and f["dtype"] == "bfloat16"
    assert f["extra"]["leaf_backends"] == {"auto": "ran", "auto/fa4": "ran in bfloat16"}
    assert f["extra"]["samples_chunk"] == HyperConfig().samples_chunk
    assert "correctness checks: PASS" in out


class _WrongFa4(Fa4Standin):
    """FA4's stand-in with an output 5% too large: the fa4 check must catch it."""

    def _flash_attn_fwd(self, *args, **kw):
        out, *rest = super()._flash_attn_fwd(*args, **kw)
        return (out * 1.05, *rest)


def test_the_fa4_leaf_check_fails_for_a_wrong_kernel(capsys):
    mod = load_script(BENCH)
    conf = HyperConfig(leaf_backend="fa4")
    with fb.use(_WrongFa4(arch=90), arch=90, device_type="cpu"):
        assert not mod.check_correctness("cpu", "triton", conf, tiny=True, dtype=torch.bfloat16)
    lines, errs = _errors(capsys.readouterr().out, "causal bfloat16")
    assert lines[0].lstrip().startswith("FAIL") and errs[0][0] > 3e-2, lines


def test_fa4_unavailable_is_reported_and_left_out(tmp_path, capsys):
    mod = load_script(BENCH)
    with fb.use(Fa4Standin(arch=80), arch=80, device_type="cpu"):  # no sm80 backward in FA4
        assert mod.main(["--smoke", "--no-sweep", "--out", str(tmp_path),
                         "--leaf-backend", "auto,fa4,auto/fa4"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("leaf backend fa4 unavailable")]
    assert len(line) == 1 and "needs sm90 or newer" in line[0], out
    rows = json.loads((tmp_path / "bench_hyper.json").read_text())
    assert not any("fa4]" in r["what"] for r in rows)
    status = rows[0]["extra"]["leaf_backends"]
    assert status["auto"] == "ran" and "needs sm90 or newer" in status["fa4"]
    assert status["auto/fa4"] == status["fa4"]
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--leaf-backend", "cudnn"])


def test_a_stopped_run_keeps_the_modes_it_timed(tmp_path, monkeypatch):
    # the JSON is rewritten after each timed mode: a run stopped (here: interrupted in the
    # third mode's timing, as a time cap would) keeps the rows of the first two
    mod = load_script(BENCH)
    measure, calls = mod.measure, []

    def stop_third(*args, **kw):
        calls.append(args[:3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return measure(*args, **kw)

    monkeypatch.setattr(mod, "measure", stop_third)
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--smoke", "--no-sweep", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_hyper.json").read_text())
    assert [r["what"] for r in rows] == ["causal", "causal", "causal fwd+bwd", "causal fwd+bwd"]
    assert all(r["median_ms"] > 0 for r in rows)
