"""The ``longattn`` command (also ``python -m longattn.integrations``).

    longattn list                          installed methods, their demo rows and scripts
    longattn check [--only PKG ...]        correctness matrix of every installed method against
                                           the float64 oracle on a CPU world of gloo ranks
    longattn check --gpu-world N[,N...] [--device cuda|cpu]
                                           every distributed method on worlds of N ranks on
                                           one device against one process (docs/gpu-world.md)
    longattn demo [--only PKG ...] [--out DIR]
                                           the same rows with time and bytes; writes
                                           demo.json (and demo.png with matplotlib) into DIR
    longattn bench PKG [ARGS ...]          runs PKG/bench/bench_PKG.py ARGS (common:
                                           bench_kernels.py), e.g. ``--smoke`` or ``--out DIR``
    longattn repro --target T [PKG] [ARGS ...]
                                           runs PKG/bench/repro_PKG.py --target T ARGS
                                           (PKG defaults to hamilton)
    longattn report [ARGS ...]             docs/results.md from the committed results
                                           (python -m longattn.common.report ARGS)

``check`` and ``demo`` run :mod:`longattn.integrations.driver`, the one demo driver (``nox -s
demo`` and ``python tests/demo.py`` run the same): the foundation rows of ``longattn.common``
against the oracle and every package's demo entry point (group ``longattn.demo``:
``rows(run_world) -> list[dict]``); a row passes when its ``rel_err`` is finite and at most its
``tol`` (2e-2 when the row gives none). They run on the CPU (``TRITON_INTERPRET=1``, JAX on 8
CPU devices, one thread per rank), print tables at most 100 columns wide and exit 1 when a row
fails or none ran; ``demo`` checks that ``--out`` is writable before any row runs. ``bench`` and
``repro`` run the package's script with this Python in the current directory: the checkout's
``<pkg>/bench/`` when there is one, else the copy the installed wheel carries
(``longattn/<pkg>/scripts/bench``), and return its exit code. PKG's choices are the packages
that have the script; what follows PKG (bench) or ``--target T [PKG]`` (repro) reaches the
script unchanged (``--out DIR`` and ``--out=DIR`` alike), plus ``--out bench_out/<pkg>``
(``bench_out/repro_<pkg>``) when it names no ``--out``, so nothing is written into the source
tree or site-packages unasked. A script that needs an optional dependency which is missing (the
plots: matplotlib) stops before it starts, naming the extra to install. ``longattn --version``
lists the installed longattn distributions.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from importlib.metadata import PackageNotFoundError, version

# the one runner of the packages' scripts lives in common (``python -m longattn.common.bench``)
from longattn.common.script_runner import (
    PACKAGES,
    check_needs,
    find_script,
    run_script,
    script_argv,
    script_packages,
    scripts_dirs,
)
from longattn.integrations import driver

CPU_ENV = {
    "TRITON_INTERPRET": "1",  # Triton kernels on the CPU interpreter (set before triton loads)
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
    "OMP_NUM_THREADS": "1",
}


# ---------------------------------------------------------------------------------------------
# rows: demo and check (one implementation: longattn.integrations.driver)


def cmd_check(args) -> int:
    if args.gpu_world:
        if args.only:
            raise SystemExit("longattn check: --only is for the CPU matrix; with --gpu-world "
                             "use --methods")
        from longattn.integrations import gpu_world

        return gpu_world.run(args)
    return driver.run_check(args.only)


def cmd_demo(args) -> int:
    return driver.run_demo(args.only, args.out)


# ---------------------------------------------------------------------------------------------
# scripts: bench and repro


def cmd_bench(args) -> int:
    path = find_script(args.pkg, "bench")
    check_needs(args.pkg, path.name, args.args, who=f"longattn bench {args.pkg}")
    return run_script(path, script_argv(args.pkg, "bench", args.args))


def cmd_repro(args) -> int:
    try:
        from longattn.common.topology import TARGETS
    except ImportError:
        TARGETS = None
    if TARGETS is not None and args.target not in TARGETS:
        raise SystemExit(f"longattn: --target must be one of {sorted(TARGETS)}, "
                         f"got {args.target!r}")
    path = find_script(args.pkg, "repro")
    check_needs(args.pkg, path.name, args.args, who=f"longattn repro {args.pkg}")
    return run_script(path,
                       ["--target", args.target, *script_argv(args.pkg, "repro", args.args)])


def cmd_list(args) -> int:
    demos = {e.name for e in driver.demo_entry_points()} | {driver.FOUNDATION}
    rows = []
    for pkg in PACKAGES:
        if importlib.util.find_spec(f"longattn.{pkg}") is None:
            continue
        dirs = scripts_dirs(pkg)
        scripts = sorted({p.name for d in dirs for p in d.glob("*.py")})
        rows.append({"package": pkg, "demo rows": "yes" if pkg in demos else "",
                     "scripts": " ".join(scripts),
                     "scripts from": str(dirs[0]) if dirs else ""})
    print(driver.fit_table(rows, ["package", "demo rows", "scripts", "scripts from"]))
    return 0


# ---------------------------------------------------------------------------------------------


def versions() -> str:
    """``longattn-integrations 0.1.0`` and every other installed longattn distribution."""
    out = []
    for pkg in ["integrations", *[p for p in PACKAGES if p != "integrations"], "reference"]:
        try:
            out.append(f"longattn-{pkg.replace('_', '-')} {version(f'longattn-{pkg}')}")
        except PackageNotFoundError:
            continue
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="longattn", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:16]) + "\n")
    ap.add_argument("--version", action="version", version=versions(),
                    help="the installed longattn distributions and their versions")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="installed methods, demo rows and scripts")
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser("check", help="correctness matrix against the oracle (CPU world)")
    p.add_argument("--only", nargs="+", metavar="PKG", help="only these packages' rows")
    from longattn.integrations.gpu_world import add_arguments

    add_arguments(p)
    p.set_defaults(fn=cmd_check, cpu=True)
    p = sub.add_parser("demo", help="demo rows with time and bytes, JSON and plot")
    p.add_argument("--only", nargs="+", metavar="PKG", help="only these packages' rows")
    p.add_argument("--out", default="demo_out",
                   help="output folder (default demo_out; checked before any row runs)")
    p.set_defaults(fn=cmd_demo, cpu=True)
    # bench / repro: main() splits the script's arguments off before argparse sees them
    p = sub.add_parser("bench", help="a package's GPU benchmark script")
    p.add_argument("pkg", choices=script_packages("bench"))
    p.add_argument("args", nargs="*", metavar="ARGS",
                   help="passed to the script (--smoke, --out DIR)")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("repro", help="a package's reproduction sweep for a hardware target")
    p.add_argument("--target", required=True, help="H100-1, H100-2, H100-4 or MI300X-1")
    p.add_argument("pkg", nargs="?", default="hamilton", choices=script_packages("repro"))
    p.add_argument("args", nargs="*", metavar="ARGS",
                   help="passed to the script (--dry-run, --out DIR)")
    p.set_defaults(fn=cmd_repro)
    p = sub.add_parser("report", add_help=False,
                       help="docs/results.md from every package's committed results")
    p.set_defaults(fn=cmd_report)
    return ap


def cmd_report(args) -> int:
    from longattn.common.report import main as report

    return report(args.args)


def split_script_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(own, script)``: for ``bench PKG ARGS`` and ``repro --target T [PKG] ARGS``, the tokens
    the command parses itself and the script's arguments, passed on verbatim. argparse cannot
    tell the script's option values from PKG (``repro --target T --dry-run --out DIR`` would
    read DIR as PKG), so the script's arguments are everything after PKG (bench) or after the
    leading ``--target T`` / ``--target=T`` / PKG / ``-h`` tokens (repro; ``-h`` after PKG
    is the script's)."""
    cmd_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if cmd_at is None or argv[cmd_at] not in ("bench", "repro"):
        return argv, []
    own, rest = argv[:cmd_at + 1], argv[cmd_at + 1:]
    i, seen_pkg = 0, False
    while i < len(rest):
        a = rest[i]
        if (a in ("-h", "--help") and not seen_pkg) or a.startswith("--target="):
            i += 1  # ``repro --target T PKG --help``: the script's help
        elif a == "--target":
            i += 2
        elif not a.startswith("-") and not seen_pkg:
            i, seen_pkg = i + 1, True
        else:
            break
        if argv[cmd_at] == "bench" and seen_pkg:
            break
    own, script = own + rest[:i], rest[i:]
    if argv[cmd_at] == "repro" and not any(a.startswith("--target") for a in own):
        own, script = _take_target(own, script)  # ``repro --dry-run --target T``
    return own, script


def _take_target(own: list[str], script: list[str]) -> tuple[list[str], list[str]]:
    for j, a in enumerate(script):
        if a.startswith("--target="):
            return own + [a], script[:j] + script[j + 1:]
        if a == "--target" and j + 1 < len(script):
            return own + script[j:j + 2], script[:j] + script[j + 2:]
    return own, script


def main(argv=None) -> int:
    ap = parser()
    own, script_args = split_script_args(list(sys.argv[1:] if argv is None else argv))
    if own[:1] == ["report"]:  # every argument is the report's own (its --help included)
        args = ap.parse_args(own[:1])
        args.args = own[1:]
        return args.fn(args)
    args = ap.parse_args(own)
    if args.cmd in ("bench", "repro"):
        args.args = [*args.args, *script_args]
    # the CPU environment, except for a device run of ``check --gpu-world`` (Triton compiles)
    if getattr(args, "cpu", False) and not (getattr(args, "gpu_world", None)
                                            and args.device != "cpu"):
        for k, v in CPU_ENV.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        import torch

        torch.set_num_threads(1)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
