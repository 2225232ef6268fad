"""API conformance across packages, against the table of ``docs/conventions.md``.

* every package imports (PEP 420 namespace: no ``longattn/__init__.py``);
* every row of the conventions table names an entry point that exists, and its real signature
  (``inspect.signature``) has exactly the table's parameters: names, order, kinds (positional
  or keyword-only, ``*args`` / ``**kwargs``) and defaults; config records are frozen dataclasses;
* the table is complete (every name in a method package's ``__all__`` and in
  ``longattn.integrations.transformers.__all__`` has a row) and consistent (the group column
  says "one rule" wherever the signature takes ``group=None`` / ``cp_group=None``, and only
  where it takes a group);
* the canonical names: no keyword of a ``method`` / ``helper`` / ``module`` row uses a
  retired name (``scale``, ``is_causal``, ``window``, ``impl``, ``kv_lens``, ``cp_group``), no
  package exports a plan builder under another name than ``make_plan``;
* the dependency rules: no paper package imports another, ``reference`` imports numpy only,
  ``common`` never imports ``reference`` or a paper package;
* every paper package registers a ``longattn.demo`` entry point.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONVENTIONS = ROOT / "docs" / "conventions.md"
PAPERS = ["hamilton", "tree", "hyper", "ring_swa", "dilated"]
KINDS = {"method", "module", "seed", "callback", "helper", "config", "value"}
RETIRED = {"scale": "softmax_scale", "is_causal": "causal", "window": "window_size",
           "impl": "backend", "kv_lens": "shard_lens", "cp_group": "group"}
PLAN_BUILDERS = {"build_plan", "make_plans", "plan", "build_plans"}
NONE = "—"


# --------------------------------------------------------------------------------------------
# the table


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row (``\\|`` inside a cell is a literal bar)."""
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def _code(cell: str) -> str | None:
    """The text of a cell that is one backticked span, else None (``—``)."""
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else None


def read_table(text: str) -> list[dict]:
    """The rows of the table whose header starts with ``entry point``."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if cells[0] == "entry point":
            header = cells
            continue
        if header is None or set(cells[0]) <= {"-", ":", " "}:
            continue
        row = dict(zip(header, cells))
        row["target"] = _code(row["entry point"])
        row["sig"] = _code(row["signature"])
        rows.append(row)
    return rows


ROWS = read_table(CONVENTIONS.read_text())


def _spec(src: str) -> inspect.Signature:
    """The signature written in the table (a ``def`` header; defaults may name ``torch``,
    ``LOCAL`` (``longattn.common.dist.LOCAL``) and builtins)."""
    from longattn.common.dist import LOCAL

    ns: dict = {"torch": torch, "LOCAL": LOCAL}
    exec(f"def f{src}: pass", ns)  # noqa: S102 - the repository's own document
    return inspect.signature(ns["f"])


def _resolve(target: str):
    module, attr = target.split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def signature_problems(actual: inspect.Signature, spec: inspect.Signature) -> list[str]:
    """Every difference between the real parameters and the table's: order and names, kinds,
    defaults."""
    a, s = list(actual.parameters.values()), list(spec.parameters.values())
    problems = []
    if [p.name for p in a] != [p.name for p in s]:
        problems.append(f"parameters {[p.name for p in a]}, table {[p.name for p in s]}")
        return problems
    for pa, ps in zip(a, s):
        if pa.kind != ps.kind:
            problems.append(f"{pa.name!r} is {pa.kind.description}, table {ps.kind.description}")
        same = pa.default is ps.default or (type(pa.default) is type(ps.default)
                                            and pa.default == ps.default)
        if not same:
            problems.append(f"{pa.name!r} default {pa.default!r}, table {ps.default!r}")
    return problems


def test_the_table_is_read():
    assert len(ROWS) > 80
    for row in ROWS:
        assert row["target"] and ":" in row["target"], row
        assert row["kind"] in KINDS, row
        assert row["layout"] and row["`group=None`"], row
        assert row["sig"] is not None or row["signature"] == NONE, row
    targets = [r["target"] for r in ROWS]
    assert len(targets) == len(set(targets)), "a row appears twice"


def test_the_checker_itself():
    sig = _spec("(q, k, v, *, causal=False, softmax_scale=None)")
    assert signature_problems(sig, sig) == []
    assert signature_problems(_spec("(q, k, v, causal=False, softmax_scale=None)"), sig)
    assert signature_problems(_spec("(q, k, v, *, causal=True, softmax_scale=None)"), sig)
    assert signature_problems(_spec("(q, k, v, *, causal=0, softmax_scale=None)"), sig)
    assert signature_problems(_spec("(q, k, v, *, softmax_scale=None, causal=False)"), sig)
    assert signature_problems(_spec("(q, k, v, *, causal=False, softmax_scale=None, x=1)"), sig)
    assert signature_problems(_spec("(query, k, v, *, causal=False, softmax_scale=None)"), sig)
    assert signature_problems(_spec("(q, k, v, *a, **kw)"), _spec("(q, k, v, *a, **kw)")) == []
    rows = read_table("| entry point | signature | kind |\n|---|---|---|\n"
                      "| `m:f` | `(a, b=\"x\\|y\")` | helper |\n| `m:g` | — | config |\n")
    assert [(r["target"], r["sig"]) for r in rows] == [("m:f", '(a, b="x|y")'), ("m:g", None)]


@pytest.mark.parametrize("row", ROWS, ids=[r["target"] for r in ROWS])
def test_entry_point_has_the_table_signature(row):
    try:
        obj = _resolve(row["target"])
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{row['target']} is missing: {e}")
    if row["kind"] == "config":
        assert dataclasses.is_dataclass(obj) and obj.__dataclass_params__.frozen, \
            f"{row['target']} must be a frozen dataclass"
    if row["sig"] is None:
        return
    assert callable(obj), f"{row['target']} is not callable"
    actual = inspect.signature(obj)
    problems = signature_problems(actual, _spec(row["sig"]))
    assert not problems, f"{row['target']}{actual} vs the table {row['sig']}: " + "; ".join(
        problems)


@pytest.mark.parametrize("row", ROWS, ids=[r["target"] for r in ROWS])
def test_group_column_and_canonical_names(row):
    if row["sig"] is None:
        return
    params = _spec(row["sig"]).parameters
    groups = [p for name, p in params.items() if name in ("group", "cp_group")]
    says = row["`group=None`"]
    if "mesh" in says:
        assert {"mesh", "axis_name"} <= set(params), row
    elif says == "one rule":
        assert groups, f"{row['target']}: the group column says 'one rule' but it takes no group"
    else:
        assert not any(p.default is None for p in groups), (
            f"{row['target']} takes group=None: its group column must say 'one rule'")
    if row["kind"] in ("seed", "callback"):
        return  # compatibility surfaces keep their seed's / framework's names
    for p in params.values():
        keyword = p.kind == p.KEYWORD_ONLY or p.default is not p.empty
        if keyword and p.name in RETIRED:
            pytest.fail(f"{row['target']}: keyword {p.name!r} is retired; the canonical name is "
                        f"{RETIRED[p.name]!r}")


@pytest.mark.parametrize("module", [*(f"longattn.{p}" for p in PAPERS),
                                    "longattn.integrations.transformers"])
def test_the_table_lists_every_exported_name(module):
    mod = importlib.import_module(module)
    listed = {r["target"].split(":")[1].split(".")[0] for r in ROWS
              if r["target"].split(":")[0] == module}
    exported = set(getattr(mod, "__all__", ())) - {"NAME"}
    assert exported, f"{module} has no __all__"
    missing = sorted(exported - listed)
    assert not missing, f"{module} exports {missing}, which docs/conventions.md does not list"
    builders = sorted(PLAN_BUILDERS & exported)
    assert not builders, f"{module} exports plan builders {builders}: name them make_plan"


# --------------------------------------------------------------------------------------------
# packages


@pytest.mark.parametrize("pkg", ["common", "reference", *PAPERS, "integrations"])
def test_package_imports(pkg):
    mod = importlib.import_module(f"longattn.{pkg}")
    assert mod.__name__ == f"longattn.{pkg}"
    assert not (ROOT / pkg / "src" / "longattn" / "__init__.py").exists()  # PEP 420 namespace


def test_topology_defines_the_four_targets():
    topo = importlib.import_module("longattn.common.topology")
    assert set(topo.TARGETS) == {"H100-1", "H100-2", "H100-4", "MI300X-1"}


@pytest.mark.parametrize("pkg", PAPERS)
def test_paper_packages_register_demo_rows(pkg):
    eps = {ep.name: ep for ep in metadata.entry_points(group="longattn.demo")}
    assert pkg in eps, f"no longattn.demo entry point for {pkg} (have {sorted(eps)})"
    fn = eps[pkg].load()
    assert callable(fn)
    assert list(inspect.signature(fn).parameters)[:1] == ["run_world"]


# --------------------------------------------------------------------------------------------
# dependency rules (static: the import statements in each package's source)


def _imports(pkg: str, *, eager_only: bool = False) -> set[str]:
    """Modules imported anywhere in the package's source, or (``eager_only``) only those
    imported when the package is imported (not inside function bodies: lazy imports in a
    ``demo.rows`` or an oracle helper for tests are allowed)."""
    names = set()
    for path in (ROOT / pkg / "src").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        todo = [tree]
        while todo:
            node = todo.pop()
            for child in ast.iter_child_nodes(node):
                if eager_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda)):
                    continue
                todo.append(child)
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _longattn_pkgs(names):
    return {n.split(".")[1] for n in names if n.startswith("longattn.") and n.count(".") >= 1}


@pytest.mark.parametrize("pkg", PAPERS)
def test_no_paper_package_imports_another(pkg):
    used = _longattn_pkgs(_imports(pkg)) - {pkg, "common"}
    assert not (used & set(PAPERS)), f"longattn.{pkg} imports {sorted(used & set(PAPERS))}"
    eager = _longattn_pkgs(_imports(pkg, eager_only=True))
    assert "reference" not in eager, f"importing longattn.{pkg} imports the oracle"


def test_reference_imports_numpy_only():
    third_party = {n.split(".")[0] for n in _imports("reference")}
    stdlib = {"__future__", "math", "itertools", "functools", "dataclasses", "typing",
              "collections", "warnings", "numbers", "operator", "importlib"}
    assert third_party - stdlib - {"numpy", "longattn"} == set(), third_party
    assert _longattn_pkgs(_imports("reference")) <= {"reference"}


def test_common_never_imports_reference_or_a_paper_package():
    used = _longattn_pkgs(_imports("common")) - {"common"}
    assert not used, f"longattn.common imports {sorted(used)}"
