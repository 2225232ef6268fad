"""bench_dilated.py --smoke --backends auto,fa4 on the CPU: FlashAttention-4's stand-in
(:class:`longattn.common.testing.Fa4Standin`, float64 inside, bf16 out) runs the fa4 rows
beside the current kernels' rows, its correctness checks pass at bf16's tolerance (and a wrong
kernel fails them), and a requested fa4 that is not available is reported and left out."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from longattn.common import bench
from longattn.common.kernels import fa4_backend as fb
from longattn.common.testing import Fa4Standin, load_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_dilated.py"


def _rows(path):
    rows = json.loads((path / "bench_dilated.json").read_text())
    return {r["what"]: r for r in rows if r["what"] != "summary"}, rows[-1]["extra"]


@pytest.mark.slow  # ~25 s on 2 CPU cores: the fa4 check runs the oracle case in float64
def test_smoke_with_fa4_beside_auto(tmp_path, capsys):
    standin = Fa4Standin(arch=90)
    with fb.use(standin, arch=90, device_type="cpu"):
        assert load_script(BENCH).main(["--smoke", "--out", str(tmp_path),
                                        "--backends", "auto,fa4"]) == 0
    kinds = {name for name, _ in standin.calls}
    assert kinds == {"fwd", "bwd"} and len(standin.calls) > 100
    rows, summary = _rows(tmp_path)
    for s in (512, 2048):  # the smoke run's lengths, each backend's rows in one pool
        for what in ("fwd", "fwd+bwd"):
            for name, backend in ((f"dilated {what}", "auto"),
                                  (f"dilated {what} [fa4]", "fa4")):
                r = [x for x in json.loads((tmp_path / "bench_dilated.json").read_text())
                     if x["what"] == name and x["shape"].get("S") == s]
                assert len(r) == 1 and r[0]["median_ms"] > 0, name
                assert r[0]["extra"]["backend"] == backend
                assert r[0]["dtype"] == ("float32" if backend == "auto" else "bfloat16")
    dense = rows["dense causal fwd+bwd [fa4]"]
    assert dense["method"] == "fa4" and dense["median_ms"] > 0
    assert rows["dense causal fwd+bwd"]["method"] == "sdpa math"
    checks = ast.literal_eval(summary["checks"])
    fa4 = checks["oracle (S=700, GQA 3, causal) [fa4]"]
    assert set(fa4) == {"out", "dq", "dk", "dv"}
    assert all(0 < e <= 2e-2 for e in fa4.values()), fa4  # bf16 against the float64 oracle
    assert all(e <= 1e-5 for e in checks["oracle (S=700, GQA 3, causal)"].values())
    assert summary["correct"] is True
    assert ast.literal_eval(summary["backends"]) == {"auto": "ran", "fa4": "ran in bfloat16"}
    assert "per_token_max_over_min [fa4]" in summary
    assert "useful_tflops_over_dense_fa4_32k" in summary
    out = capsys.readouterr().out
    assert "correctness: PASS (tolerance 1e-05, [fa4] 0.02)" in out


class _WrongFa4(Fa4Standin):
    """FA4's stand-in with an output 5% too large: the fa4 check must catch it."""

    def _flash_attn_fwd(self, *args, **kw):
        out, *rest = super()._flash_attn_fwd(*args, **kw)
        return (out * 1.05, *rest)


def test_the_fa4_oracle_check_fails_for_a_wrong_kernel():
    mod = load_script(BENCH)
    config = mod.FusedConfig()
    with fb.use(_WrongFa4(arch=90), arch=90, device_type="cpu"):
        errs = mod.check_oracle("cpu", torch.bfloat16, config, "fa4")
    assert errs["out"] > 2e-2, errs  # (the right stand-in: below 2e-2, the test above)


def test_fa4_unavailable_is_reported_and_left_out(tmp_path, capsys):
    mod = load_script(BENCH)
    # an sm80 device: FA4 has no backward kernels there, so the backend refuses every call
    with fb.use(Fa4Standin(arch=80), arch=80, device_type="cpu"):
        assert bench.backend_dtype("fa4", "cpu", torch.float32, 16)[0] is None
        assert mod.main(["--smoke", "--out", str(tmp_path), "--backends", "auto,fa4"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("backend fa4 unavailable")]
    assert len(line) == 1 and "needs sm90 or newer" in line[0], out
    rows, summary = _rows(tmp_path)
    assert not any("[fa4]" in w for w in rows) and "dilated fwd+bwd" in rows
    backends = ast.literal_eval(summary["backends"])
    assert backends["auto"] == "ran" and "needs sm90 or newer" in backends["fa4"]
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--backends", "auto,nope"])
