"""The per-target prediction script (alpha-beta model of tree vs ring decoding)."""

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    path = os.path.join(HERE, "..", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tree_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_predict_tree(tmp_path):
    mod = _load("predict_tree")
    rows = mod.main(["--out", str(tmp_path)])
    assert (tmp_path / "predict_tree.png").stat().st_size > 0
    gpus = {r["gpus"] for r in rows}
    assert min(gpus) == 8 and max(gpus) == 64
    assert {r["context"] for r in rows} == set(mod.CONTEXTS)
    for label in {r["target"] for r in rows}:
        rs = sorted((r for r in rows if r["target"] == label), key=lambda r: r["context"])
        # ring moves the KV: its time grows ~linearly in N; the tree only reads N / p locally
        assert rs[-1]["ring_ms"] / rs[0]["ring_ms"] > 0.5 * rs[-1]["context"] / rs[0]["context"]
        assert all(r["speedup"] > 1 for r in rs)
        assert all(a["speedup"] <= b["speedup"] for a, b in zip(rs, rs[1:]))
