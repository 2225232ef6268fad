"""Where a package's scripts are and how one is run: the one runner behind ``longattn bench`` /
``repro`` and ``python -m longattn.common.bench PKG [SCRIPT] [ARGS ...]`` (which needs no
``longattn`` command: a package installed alone brings common).

A package's scripts are its checkout's ``<root>/<pkg>/bench/`` when there is one, else the copy
its installed wheel carries (``longattn/<pkg>/scripts/bench``). A script runs with this Python
in the current directory; it gets ``--out bench_out/<pkg>`` (``bench_out/repro_<pkg>``) when its
arguments name no ``--out``, so nothing is written into the source tree or site-packages
unasked. A script that needs an optional dependency which is missing stops before it starts,
naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PACKAGES = ["common", "hamilton", "tree", "hyper", "ring_swa", "dilated", "integrations"]


def package_dir(pkg: str) -> Path | None:
    """The package's folder in the source checkout (``<root>/<pkg>``), if there is one: next
    to its editable install's sources, or under the current directory."""
    candidates = [Path(loc).resolve().parents[2] for loc in _locations(pkg)]  # <pkg>/src/...
    candidates.append(Path.cwd() / pkg)
    for c in candidates:
        if (c / "pyproject.toml").exists() and c.name == pkg:
            return c
    return None


def _locations(pkg: str) -> list[str]:
    try:
        spec = importlib.util.find_spec(f"longattn.{pkg}")
    except ModuleNotFoundError:
        spec = None
    return list(getattr(spec, "submodule_search_locations", None) or [])


def scripts_dirs(pkg: str) -> list[Path]:
    """Where ``pkg``'s scripts are: ``<root>/<pkg>/bench`` of a checkout, and the copy an
    installed wheel carries in ``longattn/<pkg>/scripts/bench``."""
    out = []
    where = package_dir(pkg)
    if where is not None:
        out.append(where / "bench")
    out += [Path(loc) / "scripts" / "bench" for loc in _locations(pkg)]
    return [d for d in out if d.is_dir()]


def script_name(pkg: str, kind: str) -> str:
    return "bench_kernels.py" if (kind, pkg) == ("bench", "common") else f"{kind}_{pkg}.py"


def script_packages(kind: str) -> list[str]:
    """The packages that have the ``kind`` script (``bench`` or ``repro``), in a checkout or
    in their installed wheel: the PKG choices of ``longattn bench`` / ``repro``."""
    return [pkg for pkg in PACKAGES
            if any((d / script_name(pkg, kind)).is_file() for d in scripts_dirs(pkg))]


def find_script(pkg: str, kind: str) -> Path:
    """``bench/bench_<pkg>.py`` (``bench_kernels.py`` for common) or ``repro_<pkg>.py`` of the
    checkout, else of the installed wheel; SystemExit with what exists when it is missing."""
    if pkg not in PACKAGES:
        raise SystemExit(f"longattn: PKG must be one of {PACKAGES}, got {pkg!r}")
    name = script_name(pkg, kind)
    dirs = scripts_dirs(pkg)
    for d in dirs:
        if (d / name).is_file():
            return d / name
    have = sorted({p.name for d in dirs for p in d.glob("*.py")})
    raise SystemExit(f"longattn: {pkg} has no {name} (installed or in a checkout); its scripts: "
                     f"{have or 'none'}")


# What a script imports beyond its package's own dependencies (module, the extra that brings it):
# these scripts plot their results at the end of the run, so a missing matplotlib is said first.
_PLOTS = [("matplotlib", "plots")]
SCRIPT_NEEDS = {
    ("dilated", "bench_dilated.py"): _PLOTS,
    ("hamilton", "predict_hamilton.py"): _PLOTS,
    ("hamilton", "predict_strategies.py"): _PLOTS,
    ("hamilton", "repro_hamilton.py"): _PLOTS,
    ("hyper", "bench_hyper.py"): _PLOTS,
    ("hyper", "bench_quality.py"): _PLOTS,
    ("hyper", "quality_hyper.py"): _PLOTS,
    ("hyper", "quality_vs_seed.py"): _PLOTS,
    ("tree", "bench_tree.py"): _PLOTS,
    ("tree", "predict_tree.py"): _PLOTS,
}


def check_needs(pkg: str, script: str, argv: list[str], *, who: str = "longattn") -> None:
    """SystemExit naming the extra to install when a module ``pkg``'s ``script`` (a file name)
    needs is missing, before the script starts (``--help`` needs nothing). ``who`` starts the
    message (the command that was run)."""
    if any(a in ("-h", "--help") for a in argv):
        return
    missing = [(m, extra) for m, extra in SCRIPT_NEEDS.get((pkg, script), [])
               if importlib.util.find_spec(m) is None]
    if missing:
        dist = f"longattn-{pkg.replace('_', '-')}"
        extras = ",".join(sorted({e for _, e in missing}))
        raise SystemExit(f"{who}: {script} needs {', '.join(m for m, _ in missing)}: "
                         f"pip install \"{dist}[{extras}]\" (or \"./{pkg}[{extras}]\" from a "
                         "clone)")


def script_argv(pkg: str, kind: str, argv: list[str]) -> list[str]:
    """The script's arguments: ``argv``, and ``--out bench_out/<pkg>`` (in the current
    directory) when it names no ``--out`` (nor asks for ``--help``), so that no run writes
    into the source tree or site-packages unless told to."""
    if any(a in ("-h", "--help") or a == "--out" or a.startswith("--out=") for a in argv):
        return list(argv)
    return [*argv, "--out", os.path.join("bench_out", pkg if kind == "bench" else
                                         f"repro_{pkg}")]


def run_script(path: Path, argv) -> int:
    cmd = [sys.executable, str(path), *argv]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=os.getcwd())


USAGE = """usage: python -m longattn.common.bench PKG [SCRIPT] [ARGS ...]

Runs one of PKG's benchmark scripts (default: its main one, bench_PKG.py; bench_kernels.py for
common) with ARGS, e.g. ``python -m longattn.common.bench hamilton --smoke`` or
``python -m longattn.common.bench hamilton predict_hamilton --out DIR``. Without PKG: the
packages and their scripts."""


def list_scripts(pkg: str) -> list[str]:
    """The names (without ``.py``) of ``pkg``'s scripts, the first place that has them."""
    dirs = scripts_dirs(pkg)
    return sorted(p.stem for p in dirs[0].glob("*.py")) if dirs else []


def main(argv: list[str]) -> int:
    """``python -m longattn.common.bench PKG [SCRIPT] [ARGS ...]``: SCRIPT is a script's name
    (with or without ``.py``) when the first argument after PKG names one, else the package's
    main benchmark; ARGS reach the script unchanged (plus ``--out``, see the module)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        for pkg in PACKAGES:
            if list_scripts(pkg):
                print(f"  {pkg}: {' '.join(list_scripts(pkg))}")
        return 0
    pkg, rest = argv[0], list(argv[1:])
    if pkg not in PACKAGES:
        raise SystemExit(f"python -m longattn.common.bench: PKG must be one of {PACKAGES}, "
                         f"got {pkg!r}")
    names = list_scripts(pkg)
    if rest and not rest[0].startswith("-"):
        name = rest[0].removesuffix(".py")
        if name not in names:
            raise SystemExit(f"python -m longattn.common.bench {pkg}: no script {rest[0]!r}; "
                             f"its scripts: {names or 'none'}")
        path, rest = scripts_dirs(pkg)[0] / f"{name}.py", rest[1:]
        kind = "repro" if name == script_name(pkg, "repro")[:-3] else "bench"
    else:
        path, kind = find_script(pkg, "bench"), "bench"
    check_needs(pkg, path.name, rest, who=f"python -m longattn.common.bench {pkg}")
    return run_script(path, script_argv(pkg, kind, rest))
