"""The demo rows of longattn.tree (registered as the ``longattn.demo`` entry point)."""

from importlib.metadata import entry_points

from longattn.common.testing import run_world


def test_tree_demo_rows():
    eps = [e for e in entry_points(group="longattn.demo") if e.name == "tree"]
    assert eps, "pip install --no-deps -e ./tree registers the entry point"
    rows = eps[0].load()(run_world)
    assert len(rows) == 6
    for r in rows:
        assert set(r) == {"method", "what", "shape", "rel_err", "time_ms", "bytes"}
        tol = 1e-10 if "float64" in r["what"] else 1e-5
        assert r["rel_err"] <= tol, r
    tree = [r for r in rows if r["method"] == "tree.tree_decode"]
    ring = [r for r in rows if r["method"] == "tree.ring_decode"]
    for t, g in zip(tree, ring):
        assert t["bytes"] * 100 < g["bytes"]  # tree moves O(B*H*D), ring moves the KV
