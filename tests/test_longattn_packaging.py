"""Every longattn package ships a ``py.typed`` marker (PEP 561) and a ``__version__`` that is its
installed distribution's version."""

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
