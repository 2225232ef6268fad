"""The README's quick start runs as written (extracted and run under torchrun on 2 CPU ranks),
and its results tables say what the committed JSON says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]
README = PKG / "README.md"
RESULTS = PKG / "bench" / "results" / "h200"


def _section(title):
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def quick_start() -> str:
    blocks = re.findall(r"```python\n(.*?)```", _section("Quick start"), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_quick_start_runs_under_torchrun(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(quick_start())
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


LABELS = {
    "**cuDNN native window (`cudnn` backend)**": "cudnn",
    "ring_swa local step (`auto` picks `cudnn`)": "ring_swa local",
    'band, `BandConfig(split=1, anti="flip")`': "band s1 flip",
    'band, `BandConfig(split=2, anti="flash")`': "band s2 flash",
    "FlashAttention-2 window (`aten`)": "flash",
    "FlexAttention + block mask (compiled)": "flex",
    "dense causal cuDNN (whole S)": "cudnn dense causal",
}


FA4 = "\n### With FlashAttention-4"
FA4_LABELS = {
    "cuDNN native window (`cudnn`)": "cudnn",
    "ring_swa local step (`auto`: `cudnn`)": "ring_swa local",
    "**FA4 native window (`fa4` backend)**": "fa4",
    '**ring_swa local step, `backend="fa4"`**': "ring_swa local [fa4]",
    "FlexAttention + block mask (compiled)": "flex",
    "dense causal cuDNN (whole S)": "cudnn dense causal",
}


def _check_rows(text, summary, labels, count):
    """Every ``| fwd...`` row of ``text`` is its summary row at the printed precision."""
    rows = {(r["phase"], r["candidate"]): r for r in summary["table"]}
    lines = [ln for ln in text.splitlines() if ln.startswith("| fwd")]
    assert len(lines) == count
    for ln in lines:
        phase, label, ms, tflops, xflex, of_dense, spread = [c.strip() for c in
                                                             ln.strip("|").split("|")]
        r = rows[(phase, labels[label])]
        assert ms == f"{r['ms']:.2f}" and tflops == f"{r['TFLOP/s']:.0f}", ln
        assert xflex == ("—" if r["candidate"] == "cudnn dense causal" else
                         f"{r['x flex']:.2f}"), ln
        assert of_dense == f"{r['of dense']:.0%}" and spread == f"{r['spread']:.3f}", ln


def test_fa4_results_table_matches_the_committed_json():
    folder = PKG / "bench" / "results" / "h100" / "fa4_rows"
    summary = json.loads((folder / "bench_ring_swa_summary.json").read_text())
    section = _section("Results")
    text = section[section.index(FA4):]
    _check_rows(text, summary, FA4_LABELS, 12)
    assert summary["correct"] and summary["backends"] == {"auto": "ran", "fa4": "ran"}
    best = summary["verdict_by_backend"]["fa4"]["fwd+bwd"]
    assert best["meets"] and f"{best['of_dense']:.0%}" == "106%" and "106%" in text
    timings = json.loads((folder / "bench_ring_swa.json").read_text())
    assert {t["device"] for t in timings} == {"NVIDIA H100 80GB HBM3"} and "H100" in text
    assert {t["date"] for t in timings} == {"2026-12-05"} and "2026-12-05" in text


def test_results_table_matches_the_committed_json():
    summary = json.loads((RESULTS / "bench_ring_swa_summary.json").read_text())
    rows = {(r["phase"], r["candidate"]): r for r in summary["table"]}
    section = _section("Results").split(FA4)[0]
    assert len(rows) == 14
    _check_rows(section, summary, LABELS, 14)
    assert summary["correct"] and all(v["meets"] for v in summary["verdict"].values())
    timings = json.loads((RESULTS / "bench_ring_swa.json").read_text())
    assert {t["device"] for t in timings} == {"NVIDIA H200"} and "NVIDIA H200" in section
    assert {t["date"] for t in timings} == {"2026-12-04"} and "2026-12-04" in section
    assert {t["torch"] for t in timings} == {"2.11.0+cu130"} and "2.11.0+cu130" in section
    checks = json.loads((RESULTS / "bench_ring_swa_correctness.json").read_text())
    worst = {c["case"]: max(c[k] for k in ("out", "dq", "dk", "dv")) for c in checks}
    api = ("ring_swa_attn", "ring_streaming_llm_attn_varlen")
    assert max(e for name, e in worst.items() if name not in api) <= 3.8e-3
    assert max(worst[name] for name in api) <= 4.8e-3
    assert "<= 3.8e-3" in section and "<= 4.8e-3" in section
