"""The README is a user guide a clone can follow: its quick start runs verbatim (one process
and a gloo world), and every number of its results tables is in the committed JSON."""

from __future__ import annotations

import json
import os
import re

from longattn.common.testing import readme_python_blocks, run_world

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
        # the cache really is sharded: every rank holds part of it, wherever KVCache puts it
        assert rank_r == r and sum(lens_r) == 303 and all(lens_r) and lens_r == res[0][0]
        assert out_r.shape == out.shape and (out_r - out).abs().max() <= 1e-5
        assert (out_r - res[0][2]).abs().max() == 0  # identical on every rank


def _run_block(rank, world, code):
    ns = {"__name__": "__main__"}
    exec(compile(code, "README.md quick start", "exec"), ns)  # noqa: S102 - the doc's code
    return ns["seqlens"].tolist(), ns["out"]


def test_readme_cache_seqlens_block_runs_verbatim():
    """The ``cache_seqlens`` block (its own checks against attention_forward per row) in one
    process and on 3 ranks: the 45-token row lies on rank 0 alone, the empty row nowhere."""
    code = readme_python_blocks(os.path.join(ROOT, "README.md"))[1]
    assert "cache_seqlens=seqlens" in code
    seqlens, out = _run_block(0, 1, code)
    assert seqlens == [700, 0, 45]
    res = run_world(3, _run_block, code, timeout=120)
    assert [r[0] for r in res] == [[234, 0, 45], [234, 0, 0], [232, 0, 0]]
    for _, out_r in res:
        assert (out_r - out).abs().max() <= 1e-5


def test_readme_jax_block_runs_verbatim():
    """The JAX block (a user's own shard_map around tree_decode_per_device, checked against
    jax.nn.dot_product_attention inside the block) on the 8 CPU devices of conftest.py."""
    import pytest

    jax = pytest.importorskip("jax")
    code = readme_python_blocks(os.path.join(ROOT, "README.md"))[2]
    assert "tree_decode_per_device" in code
    ns = {"__name__": "__main__"}
    exec(compile(code, "README.md JAX quick start", "exec"), ns)  # noqa: S102 - the doc's code
    assert ns["p"] == len(jax.devices()) == 8


def test_readme_results_come_from_the_committed_json():
    text = _readme()
    with open(os.path.join(ROOT, "bench", "results", "h200", "bench_tree.json")) as f:
        bench = {r["method"].removeprefix("tree."): r for r in json.load(f)}
    rows = re.findall(r"^\| [^|]+ \| `([^`]+)` \| (torch|JAX) \| ([\d.]+) \| (\d+) \| ([\d.]+) \|$",
                      text, re.M)
    assert len(rows) == 9, rows
    for name, _, ms, gbps, x in rows:
        r = bench[name]
        assert f"{r['median_ms']:.3f}" == ms, name
        assert f"{r['bytes_moved'] / (r['median_ms'] * 1e-3) / 1e9:.0f}" == gbps, name
        assert f"{r['extra']['x_floor']:.2f}" == x, name
    floor = bench["triton_splitk[bn128/w4/s3]"]["extra"]
    assert f"{floor['hbm_floor_ms']:.3f} ms" in text
    assert f"{floor['copy_bw_rw'] / 1e9:,.0f} GB/s" in text
    with open(os.path.join(ROOT, "bench", "results", "h200", "decode_batch", "run3.json")) as f:
        batch = {r["method"].removeprefix("tree.batch_decode."): r for r in json.load(f)}
    rows = re.findall(r"^\| [^|]+ \| `([^`]+)` \| ([\d.]+) \| (\d+) \| ([\d.]+) \|$", text,
                      re.M)
    assert len(rows) == 3, rows
    for name, ms, gbps, x in rows:
        r = batch[name]
        assert f"{r['median_ms']:.4g}" == ms, name
        assert f"{r['bytes_moved'] / (r['median_ms'] * 1e-3) / 1e9:.0f}" == gbps, name
        assert f"{r['extra']['x_floor']:.3f}" == x, name
    assert f"floor {r['extra']['hbm_floor_ms']:.3f} ms" in text
    with open(os.path.join(ROOT, "bench", "results", "predict_tree.json")) as f:
        pred = {r["target"]: r for r in json.load(f)["rows"] if r["context"] == 1 << 20}
    table = re.findall(r"^\| ([\w-]+)(?: \([^)]*\))? \| (\d+) \| ([\d.]+) \|$", text, re.M)
    assert len(table) == 5, table
    for target, gpus, speedup in table:
        r = pred[target if target in pred else target + "*"]
        assert r["gpus"] == int(gpus) and f"{r['speedup']:.1f}" == speedup, target
