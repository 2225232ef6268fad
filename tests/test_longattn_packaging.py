"""Every longattn package ships a ``py.typed`` marker (PEP 561) and a ``__version__`` that is its
installed distribution's version; the distributions name each other by direct reference into the
clone (plain names in built wheels), and their extras cover what their tests and scripts import.
Installing the built wheels into a fresh venv is ``nox -s build wheels``."""

import re
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["common", "reference", "hamilton", "tree", "hyper", "ring_swa", "dilated",
            "integrations"]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_py_typed_in_source_tree(pkg):
    marker = ROOT / pkg / "src" / "longattn" / pkg / "py.typed"
    assert marker.is_file(), f"{marker} is missing"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_version_is_distribution_version(pkg):
    mod = import_module(f"longattn.{pkg}")
    assert isinstance(getattr(mod, "__version__", None), str), f"longattn.{pkg}.__version__"
    try:
        expected = version(f"longattn-{pkg.replace('_', '-')}")
    except PackageNotFoundError:  # a source tree on sys.path: the fallback
        expected = "0+unknown"
    assert mod.__version__ == expected


# ---------------------------------------------------------------------------------------------
# how the distributions name each other, and their extras (hatchling reads the pyproject files)

FOLDERS = {f"longattn-{p.replace('_', '-')}": p for p in PACKAGES}


def _metadata(folder, monkeypatch, plain):
    from hatchling.metadata.core import ProjectMetadata
    from hatchling.plugin.manager import PluginManager
    from packaging.requirements import Requirement

    if plain:
        monkeypatch.setenv("LONGATTN_PLAIN_DEPS", "")
    else:
        monkeypatch.delenv("LONGATTN_PLAIN_DEPS", raising=False)
    core = ProjectMetadata(str(ROOT / folder), PluginManager()).core
    reqs = [Requirement(r) for r in core.dependencies]
    extras = {k: [Requirement(r) for r in v] for k, v in core.optional_dependencies.items()}
    return reqs, extras


@pytest.mark.parametrize("folder", [*PACKAGES, "longattn"])
def test_local_dependencies_point_into_the_clone(folder, monkeypatch):
    """``pip install ./<folder>`` (or a git URL's subdirectory) finds every local package it
    names: a direct reference to the folder of that distribution in the same checkout."""
    reqs, extras = _metadata(folder, monkeypatch, plain=False)
    local = [r for r in reqs + sum(extras.values(), []) if r.name.startswith("longattn-")]
    assert local or folder == "reference"
    for r in local:
        assert r.url == (ROOT / FOLDERS[r.name]).as_uri(), (folder, str(r))
        assert f'name = "{r.name}"' in (ROOT / FOLDERS[r.name] / "pyproject.toml").read_text()


@pytest.mark.parametrize("folder", [*PACKAGES, "longattn"])
def test_built_wheels_name_local_packages_plainly(folder, monkeypatch):
    """What ``nox -s build`` puts in the wheels: no path of the building machine."""
    reqs, extras = _metadata(folder, monkeypatch, plain=True)
    for r in reqs + sum(extras.values(), []):
        assert r.url is None, (folder, str(r))


def _imports(paths, module):
    pattern = re.compile(rf"^\s*(import|from) {module}\b|importorskip\(\"{module}\"", re.M)
    return sorted(p.name for p in paths if pattern.search(p.read_text()))


@pytest.mark.parametrize("pkg", [p for p in PACKAGES if p != "reference"])
def test_extras_cover_what_the_code_imports(pkg, monkeypatch):
    """A module the package's tests import (or skip without) is in its ``test`` extra; one its
    bench scripts import is in an extra of the same name (``plots`` for matplotlib)."""
    _, extras = _metadata(pkg, monkeypatch, plain=True)
    names = {k: {r.name for r in v} for k, v in extras.items()}
    tests = list((ROOT / pkg / "tests").glob("*.py"))
    for module in ("triton", "jax", "transformers", "matplotlib", "tqdm"):
        users = _imports(tests, module)
        assert not users or module in names["test"], (pkg, module, users)
    scripts = list((ROOT / pkg / "bench").glob("*.py"))
    for module, extra in (("matplotlib", "plots"), ("jax", "jax"), ("triton", "triton")):
        users = _imports(scripts, module)
        if module == "matplotlib":
            users += [p.name for p in scripts if "plot_lines(" in p.read_text()]
        assert not users or module in names.get(extra, ()), (pkg, extra, users)


def test_meta_distribution_offers_every_package(monkeypatch):
    reqs, extras = _metadata("longattn", monkeypatch, plain=True)
    assert {r.name for r in reqs} == {"longattn-common", "longattn-reference"}
    everything = {r.name for r in extras["all"]}
    for dist, folder in FOLDERS.items():
        if folder not in ("common", "reference"):
            assert {r.name for r in extras[folder.replace("_", "-")]} == {dist}
            assert dist in everything
