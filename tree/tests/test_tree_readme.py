"""The README is a user guide a clone can follow: its quick start runs verbatim (one process
and a gloo world), and every number of its results tables is in the committed JSON."""

from __future__ import annotations

import json
import os
import re

from longattn.common.testing import run_world

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def quick_start() -> str:
    """The first ``python`` code block under the README's "Quick start" heading."""
    text = _readme()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_quick_start(rank, world, code):
    ns = {"__name__": "__main__"}
    exec(compile(code, "README.md quick start", "exec"), ns)  # noqa: S102 - the doc's code
    return ns["cache"].lens, ns["cache"].rank, ns["out"]


def test_readme_quick_start_runs_verbatim():
    code = quick_start()
    lens, rank, out = _run_quick_start(0, 1, code)  # a plain process: group=None
    assert lens == [303] and rank == 0
    res = run_world(3, _run_quick_start, code, timeout=120)
    for r, (lens_r, rank_r, out_r) in enumerate(res):
        assert rank_r == r and lens_r == [102, 102, 99]  # the cache really is sharded
        assert out_r.shape == out.shape and (out_r - out).abs().max() <= 1e-5
        assert (out_r - res[0][2]).abs().max() == 0  # identical on every rank


def test_readme_results_come_from_the_committed_json():
    text = _readme()
    with open(os.path.join(ROOT, "bench", "results", "h200", "bench_tree.json")) as f:
        bench = {r["method"].removeprefix("tree."): r for r in json.load(f)}
    rows = re.findall(r"^\| [^|]+ \| `([^`]+)` \| (torch|JAX) \| ([\d.]+) \| (\d+) \| ([\d.]+) \|$",
                      text, re.M)
    assert len(rows) == 8, rows
    for name, _, ms, gbps, x in rows:
        r = bench[name]
        assert f"{r['median_ms']:.3f}" == ms, name
        assert f"{r['bytes_moved'] / (r['median_ms'] * 1e-3) / 1e9:.0f}" == gbps, name
        assert f"{r['extra']['x_floor']:.2f}" == x, name
    floor = bench["triton_splitk[bn128/w4/s3]"]["extra"]
    assert f"{floor['hbm_floor_ms']:.3f} ms" in text
    assert f"{floor['copy_bw_rw'] / 1e9:,.0f} GB/s" in text
    with open(os.path.join(ROOT, "bench", "results", "predict_tree.json")) as f:
        pred = {r["target"]: r for r in json.load(f)["rows"] if r["context"] == 1 << 20}
    table = re.findall(r"^\| ([\w-]+)(?: \([^)]*\))? \| (\d+) \| ([\d.]+) \|$", text, re.M)
    assert len(table) == 5, table
    for target, gpus, speedup in table:
        r = pred[target if target in pred else target + "*"]
        assert r["gpus"] == int(gpus) and f"{r['speedup']:.1f}" == speedup, target
