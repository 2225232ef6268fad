"""Every workflow of the longattn monorepo.

    nox -s demo                      every method on a CPU world of gloo ranks vs the oracle
                                     (the same program as ``longattn demo``)
    nox -s tests                     every test on the CPU, each package in its own venv:
                                     isolated(<pkg>) for the 8 packages, then cross (what CI runs)
    nox -s "isolated(<pkg>)"         one package installed alone with the documented command
                                     ``pip install "./<pkg>[test]"`` (its local dependencies come
                                     with it), its tests; LONGATTN_INSTALL_FROM=git installs from
                                     ``git+file://<root>#subdirectory=<pkg>`` (committed HEAD)
    nox -s cross                     the cross-package tests (tests/) with ``./longattn[all]``
    nox -s dev                       every test in one venv of editable installs (the quick loop)
    nox -s build                     wheels and sdists of every package (and the ``longattn``
                                     meta-distribution) into dist/
    nox -s wheels                    a fresh venv: installs ``longattn[all]`` from dist/ (after
                                     ``nox -s build``), runs ``longattn --version`` and ``check``
    nox -s faults                    the fault-injection suite (pytest -m faults): test ids per
                                     package and the wall time
    nox -s lint                      ruff
    nox -s "bench(<pkg>)"            a package's GPU benchmark script (GPU machine)
    nox -s "repro(<pkg>, <target>)"  a paper's claims on a hardware target (5 papers x H100-1,
                                     H100-2, H100-4, MI300X-1, H200-1; --dry-run on the CPU)
    nox -s report                    docs/results.md from every package's committed results

On the CPU machines torch is pinned to 2.13.0, a CPU wheel that lies on disk there (an open
range would pull a multi-GB CUDA build); the code itself works on torch >= 2.5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

TORCH = os.environ.get("LONGATTN_TORCH", "torch==2.13.0")
PAPERS = ["hamilton", "tree", "hyper", "ring_swa", "dilated"]
PACKAGES = ["reference", "common", *PAPERS, "integrations"]
META = "longattn"  # the meta-distribution folder: ``pip install "./longattn[hamilton]"``
# Each package names its local dependencies as direct references into the checkout (``pip
# install ./hamilton`` brings ./common). Editable installs of several local packages in one pip
# call would clash with those references, and wheels must not carry them: with this variable set
# to "" they are plain names (see any */pyproject.toml).
PLAIN_DEPS = {"LONGATTN_PLAIN_DEPS": ""}
TARGETS = ["H100-1", "H100-2", "H100-4", "MI300X-1", "H200-1"]
# Bytecode is written as modules are first imported (only what runs is compiled, once per venv):
# some machines set PYTHONDONTWRITEBYTECODE, and then every process of a gloo world compiled
# torch from source at start-up; an empty value turns it off.
RUN_ENV = {"PYTHONDONTWRITEBYTECODE": ""}
CPU_ENV = {
    "TRITON_INTERPRET": "1",  # Triton kernels run on the CPU interpreter
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",  # 8 JAX CPU devices
    "JAX_PLATFORMS": "cpu",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    **RUN_ENV,
}


def _install(session, packages, extra="test"):
    """Editable installs of local packages in one installer call (so local deps resolve
    locally), torch first (see :func:`_torch`)."""
    if "reference" not in packages or len(packages) > 1:
        _torch(session)
    args = []
    for p in packages:
        args += ["-e", f"./{p}[{extra}]" if extra else f"./{p}"]
    _fast_install(session, *args, env=PLAIN_DEPS)


def _fast_install(session, *args, env=None):
    """``uv pip install`` into the session's venv when uv is on the PATH (.ci/run installs it):
    it resolves and installs the packages' dependencies several times faster than pip, from the
    same metadata. Without uv, pip does the same. Neither byte-compiles: see ``RUN_ENV``."""
    if shutil.which("uv"):
        session.run_install("uv", "pip", "install", "-q", "--python",
                            os.path.join(session.bin, "python"), *args, env=env, external=True)
    else:
        session.install("--no-compile", *args, env=env)


def _find_links():
    """pip's ``find-links`` (where the CPU torch wheel lies on the CPU machines), from the
    environment or pip's configuration: uv reads neither, so it is passed on explicitly."""
    links = os.environ.get("PIP_FIND_LINKS", "")
    if not links:
        try:
            links = subprocess.run([sys.executable, "-m", "pip", "config", "get",
                                    "global.find-links"], capture_output=True, text=True,
                                   timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            links = ""
    return links.split()


def _torch(session):
    """``torch`` as pinned by ``TORCH``, before anything that depends on it (so that no
    resolver picks a multi-GB CUDA build): through uv with pip's find-links when uv is there,
    else through pip."""
    if shutil.which("uv"):
        links = [a for link in _find_links() for a in ("--find-links", link)]
        _fast_install(session, *links, TORCH)
    else:
        session.install("--no-compile", TORCH)


def _pytest(session, *args):
    """pytest with one xdist worker per core (``LONGATTN_TEST_WORKERS=N`` to choose; ``0``
    runs in this process): many tests are one Python process running the Triton interpreter,
    so two cores halve their time; work stealing keeps a slow tail off one worker."""
    workers = os.environ.get("LONGATTN_TEST_WORKERS", "auto")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers,
                "--dist", "worksteal", *args, *session.posargs, env=CPU_ENV)


@nox.session(venv_backend="none")
def tests(session):
    """Every test on the CPU, each package in its own venv: ``isolated(<pkg>)`` for the 8
    packages (the package installed non-editable with nothing but its declared dependencies,
    so a missing one fails its tests), then ``cross`` (the cross-package tests, with every
    package). What CI runs. Arguments after ``--`` reach every pytest run."""
    for pkg in PACKAGES:
        session.notify(f"isolated({pkg})", posargs=session.posargs)
    session.notify("cross", posargs=session.posargs)


@nox.session(reuse_venv=False)
@nox.parametrize("pkg", [nox.param(p, id=p) for p in PACKAGES])
def isolated(session, pkg):
    """One package installed the way its README says, non-editable, into a fresh venv with
    nothing but its declared dependencies (its local ones come through their direct
    references), and its own tests (pytest-xdist is added to run them). ``uv pip install`` when
    uv is there, else ``pip install``: both read the same metadata. ``LONGATTN_INSTALL_FROM=
    git``: from ``git+file://`` of the committed HEAD, with pip >= 24.1."""
    _torch(session)
    if os.environ.get("LONGATTN_INSTALL_FROM") == "git":
        url = f"git+file://{os.path.abspath('.')}#subdirectory={pkg}"
        dist = f"longattn-{pkg.replace('_', '-')}"
        session.install("-U", "pip>=24.1")  # older pips reject ``name @ git+file:///...``
        session.install("--no-compile", f"{dist}[test] @ {url}")
    else:
        _fast_install(session, f"./{pkg}[test]")
    _fast_install(session, "pytest-xdist")
    _pytest(session, f"{pkg}/tests")


@nox.session(reuse_venv=False)
def cross(session):
    """The cross-package tests (``tests/``: the conventions table against every signature, NaN
    through every method, the demo driver, the packages' metadata) in a fresh venv with
    ``./longattn[all]`` (every package, non-editable) and the test runner."""
    _torch(session)
    _fast_install(session, "./longattn[all]", "pytest>=7", "pytest-xdist", "hypothesis>=6",
                  "hatchling>=1.21")
    _pytest(session, "tests")


@nox.session
def dev(session):
    """Every test (all packages and the cross-package ones) in one venv with every package
    installed editable: the quick loop while changing code (``nox -s dev -- -k merge``)."""
    # hatchling: tests/test_longattn_packaging.py reads the packages' metadata with it
    _install(session, PACKAGES)
    _fast_install(session, "pytest-xdist", "hatchling>=1.21")
    _pytest(session)


@nox.session
def build(session):
    """Wheels and sdists of the 8 packages and the ``longattn`` meta-distribution into dist/.

    Built with LONGATTN_PLAIN_DEPS="" so that their metadata names local packages by plain
    name (no ``file://`` path of this machine): install them with ``pip install --find-links
    dist "longattn[hamilton]"`` (or ``longattn-hamilton``, ...). Each wheel is built from its
    sdist, which checks that the sdist is complete."""
    session.install("build", "hatchling>=1.21")
    shutil.rmtree("dist", ignore_errors=True)
    for folder in [*PACKAGES, META]:
        session.run("python", "-m", "build", "--no-isolation", "--outdir", "dist", folder,
                    env=PLAIN_DEPS, silent=True)
    session.run("python", "-c", _LIST_DIST)


_LIST_DIST = """
import os, zipfile
names = sorted(os.listdir('dist'))
for n in names:
    print(f"  dist/{n}  {os.path.getsize(os.path.join('dist', n)) // 1024} KiB")
for n in names:
    if n.endswith('.whl'):
        meta = [zipfile.ZipFile(os.path.join('dist', n)).read(m).decode()
                for m in zipfile.ZipFile(os.path.join('dist', n)).namelist()
                if m.endswith('METADATA')][0]
        deps = [ln for ln in meta.splitlines() if ln.startswith('Requires-Dist:')]
        assert not [d for d in deps if ' @ ' in d], f'{n}: a direct reference in {deps}'
print(f"{sum(n.endswith('.whl') for n in names)} wheels, "
      f"{sum(n.endswith('.tar.gz') for n in names)} sdists in dist/")
"""


@nox.session(reuse_venv=False)
def wheels(session):
    """The wheels of ``nox -s build`` in a fresh venv: ``pip install --find-links dist
    "longattn[all]"``, then ``longattn --version``, ``longattn list``, the installed repro
    script's ``--help`` and ``longattn check`` (the CPU correctness matrix) run outside the
    checkout, so nothing of the source tree is used."""
    if not os.path.isdir("dist"):
        session.error("dist/ is missing: run `nox -s build` first")
    _torch(session)
    _fast_install(session, "--find-links", "dist", "longattn[all]")
    tmp = session.create_tmp()
    with session.chdir(tmp):
        session.run("longattn", "--version", env=RUN_ENV)
        session.run("longattn", "list", env=RUN_ENV)
        # the scripts the wheels carry start from site-packages (their --help: no GPU here)
        session.run("longattn", "repro", "--target", "H100-1", "hamilton", "--help", silent=True)
        # the same runner without the longattn command: every package's scripts, one started
        session.run("python", "-m", "longattn.common.bench", env=RUN_ENV)
        session.run("python", "-m", "longattn.common.bench", "hamilton", "predict_hamilton",
                    "--help", silent=True, env=RUN_ENV)
        session.run("longattn", "check", *session.posargs, env=CPU_ENV)


@nox.session
def demo(session):
    """The main job: a CPU world of gloo ranks runs every method against the oracle.

    Runs ``longattn demo`` (``longattn.integrations.driver``; ``python tests/demo.py`` is the
    same program): ``nox -s demo -- --only hamilton --out DIR``."""
    _install(session, PACKAGES, extra="test")
    session.install("matplotlib", "tqdm")
    session.run("python", "-m", "longattn.integrations", "demo", *session.posargs, env=CPU_ENV)


@nox.session
def faults(session):
    """The fault-injection suite (``pytest -m faults``) on the CPU: prints how many test ids
    each package has in it, runs them, and prints the wall time."""
    _install(session, PACKAGES)
    session.run("python", "-c", _FAULT_REPORT, *session.posargs, env=CPU_ENV)


# Counts the collected fault-suite ids per package, runs them, prints the wall time.
_FAULT_REPORT = """
import collections, subprocess, sys, time
cmd = [sys.executable, '-m', 'pytest', '-m', 'faults', '-p', 'no:cacheprovider']
ids = subprocess.run(cmd + ['-q', '--collect-only'], capture_output=True, text=True).stdout
ids = [line for line in ids.splitlines() if '::' in line]
per = collections.Counter(line.split('/')[0] for line in ids)
for pkg, n in sorted(per.items()):
    print(f'{pkg:14s} {n:5d} test ids')
print(f'{"total":14s} {len(ids):5d} test ids')
t0 = time.perf_counter()
rc = subprocess.run(cmd + ['-q', *sys.argv[1:]]).returncode
print(f'fault suite: {len(ids)} test ids, wall time {time.perf_counter() - t0:.1f} s, exit {rc}')
sys.exit(rc)
"""


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")


def _script(pkg, name):
    path = os.path.join(pkg, "bench", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    return path


@nox.session
@nox.parametrize("pkg", [nox.param(p, id=p) for p in ["common", *PAPERS]])
def bench(session, pkg):
    """A package's GPU benchmark (prints a table, writes JSON/plots to --out or $OUT)."""
    _install(session, PACKAGES, extra=None)
    session.install("matplotlib", "tqdm")
    if shutil.which("nvidia-smi"):  # NVIDIA GPU: the cudnn backend the READMEs' numbers used
        session.install("-e", "./common[cudnn]")
    name = "bench_kernels.py" if pkg == "common" else f"bench_{pkg}.py"
    session.run("python", _script(pkg, name), *session.posargs)


@nox.session
@nox.parametrize(
    ["pkg", "target"],
    [nox.param(p, t, id=f"{p}, {t}") for p in PAPERS for t in TARGETS],
)
def repro(session, pkg, target):
    """A paper's headline claims on one hardware target (``<pkg>/targets/<target>/``), through
    the one runner ``python -m longattn.common.repro``: measured where this machine is the
    target's GPU, predicted otherwise; ``--dry-run`` on the CPU, ``--out DIR``."""
    _install(session, PACKAGES, extra=None)
    _fast_install(session, "matplotlib", "tqdm")
    session.run("python", "-m", "longattn.common.repro", pkg, "--target", target,
                *session.posargs, env=CPU_ENV if not shutil.which("nvidia-smi") else None)


@nox.session
def report(session):
    """docs/results.md regenerated from every package's committed results (``--refresh``
    re-runs each package x target from the committed JSON into docs/results/ first)."""
    _install(session, PACKAGES, extra=None)
    _fast_install(session, "matplotlib", "tqdm")
    session.run("python", "-m", "longattn.common.report", *session.posargs)
