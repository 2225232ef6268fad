"""One runner for every paper's reproduction on a hardware target.

    python -m longattn.common.repro <pkg> --target T [--dry-run] [--out DIR]

A target is a folder of data, ``<pkg>/targets/<T>/target.json`` (schema below), holding the
paper's sweep for that hardware, the hardware (the name of a :mod:`longattn.common.topology`
entry, or its figures), the paper's headline claims, and the committed JSON files our measured
numbers come from. The package supplies the code: a module with ``run(ctx) -> dict`` (found
through the entry point group ``longattn.repro``, else the module named in :data:`HOOKS`),
which answers every claim of the target as

* ``measured``: one GPU measured it (this run, on a GPU of the target's kind, or a committed
  benchmark JSON of that kind of GPU, named with its device and date);
* ``predicted``: the alpha-beta model of :mod:`longattn.common.topology` with the target's
  figures, fed with a single-GPU step measured on an H200 (committed JSON);
* ``not measured yet``: neither exists (or this installed wheel lacks the committed JSON).

``--dry-run`` runs the folder's tiny ``dry_run`` sweep, predictions only, on any machine in
seconds. Output: ``repro_<pkg>_<T>.json`` (and a PNG of the claims' series when matplotlib
imports) in ``--out`` or the current directory.

It runs from a source checkout or from installed wheels: each paper's wheel carries its
``targets/`` and ``bench/`` (with the committed results JSON the runs read) in
``longattn/<pkg>/scripts/`` (:func:`package_dir` says which is used).

``target.json`` schema ``longattn.target/1``::

    {"schema": "longattn.target/1", "package": str, "target": str (the folder's name),
     "paper": {"title": str, "ref": str},
     "hardware": {"topology": <name in topology.TARGETS>} or {"figures": {<Target fields>}},
                 optional "hbm_bw" (bytes/s) and "sources" ({field: where it comes from}),
     "sweep": {...} or "sweep_file": "<json in the folder, whose 'dry_run' key is the tiny one>",
     "dry_run": {...}  (with "sweep": keys of the sweep it overrides),
     "claims": [{"id", "claim", "paper", "paper_value": number | null, "unit",
                 "kind": "measured" | "predicted"}],
     "measured": [{"file": <path under the package>, "device": str, "use": str}],
     "notes": str (optional)}
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from longattn.common import topology

SCHEMA = "longattn.target/1"
PACKAGES = ("hamilton", "tree", "hyper", "ring_swa", "dilated")
TARGETS = ("H100-1", "H100-2", "H100-4", "MI300X-1", "H200-1")
# package -> module with run(ctx); used while the packages declare no ``longattn.repro`` entry
# point (hamilton's module has its own name: hamilton.repro is not ours to create)
HOOKS = types.MappingProxyType({
    "hamilton": "longattn.hamilton.repro_target", "tree": "longattn.tree.repro",
    "hyper": "longattn.hyper.repro", "ring_swa": "longattn.ring_swa.repro",
    "dilated": "longattn.dilated.repro"})  # read-only: the package -> module table
STATUSES = ("measured", "predicted", "not measured yet")
KINDS = ("measured", "predicted")
DATA_SUFFIXES = (".json", ".png")  # what a target folder may hold: data, never code
_TOP_KEYS = {"schema", "package", "target", "paper", "hardware", "sweep", "sweep_file",
             "dry_run", "claims", "measured", "notes"}
_CLAIM_KEYS = {"id", "claim", "paper", "paper_value", "unit", "kind"}
_TARGET_FIELDS = {f.name for f in dataclasses.fields(topology.Target)}


# ---------------------------------------------------------------------------------------------
# target folders


def package_dir(pkg: str) -> Path:
    """The folder holding ``pkg``'s ``targets/`` and the ``bench/`` files its repro reads: the
    first of :func:`search_path` that has a ``targets`` folder."""
    if pkg not in PACKAGES:
        raise ValueError(f"pkg must be one of {list(PACKAGES)}, got {pkg!r}")
    places = search_path(pkg)
    for d in places:
        if (d / "targets").is_dir():
            return d
    raise ValueError(f"pkg {pkg!r}: no targets folder in {[str(d) for d in places]} (install "
                     f"longattn-{pkg.replace('_', '-')}, or run from a source checkout)")


def search_path(pkg: str) -> list[Path]:
    """Where :func:`package_dir` looks, in order.

    * ``longattn.<pkg>`` importable: the source checkout it comes from (``<root>/<pkg>``, the
      folder above its ``src/``: an editable install or a source tree on ``sys.path``), then the
      ``scripts/`` folder its installed wheel carries (``targets/`` and ``bench/``, with the
      committed results the repro reads);
    * not importable (common's own tests run without the paper packages): ``<root>/<pkg>`` of
      the checkout common comes from, its source tree or the local folder pip installed it
      from."""
    spec = importlib.util.find_spec(f"longattn.{pkg}")
    if spec is not None and spec.submodule_search_locations:
        here = Path(list(spec.submodule_search_locations)[0]).resolve()
        src = here.parents[1]  # <root>/<pkg>/src of a checkout
        return ([src.parent] if src.name == "src" else []) + [here / "scripts"]
    return [root / pkg for root in _common_checkouts()]


def _common_checkouts() -> list[Path]:
    """The repository roots common comes from: its source tree (editable install or
    ``sys.path``), the folder a non-editable ``pip install <root>/common`` named (the
    distribution's ``direct_url.json``; a wheel from an index or git has none), then any
    checkout on ``sys.path`` (the current folder of ``python -m``, pytest's root)."""
    here = Path(__file__).resolve()
    roots = [here.parents[4]] if here.parents[2].name == "src" else []
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        url = json.loads(distribution("longattn-common").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, ValueError):
        url = {}
    if url.get("url", "").startswith("file://") and "dir_info" in url:
        from urllib.parse import unquote, urlparse

        roots.append(Path(unquote(urlparse(url["url"]).path)).parent)
    mine = Path("common", "src", "longattn", "common", "repro.py")
    roots += [Path(p or ".").resolve() for p in sys.path if (Path(p or ".") / mine).is_file()]
    return list(dict.fromkeys(roots))


def installed(pkg_dir: Path) -> bool:
    """Whether ``pkg_dir`` (a :func:`package_dir`) is an installed wheel's ``scripts/`` folder,
    which carries only the results JSON the repro reads, not the whole checkout."""
    return Path(pkg_dir).name == "scripts"


def _package_of(folder: Path) -> str:
    """The package of a target folder ``<pkg dir>/targets/<T>``."""
    root = Path(folder).parents[1]
    return root.parent.name if installed(root) else root.name


def target_names(pkg: str, root: Path | None = None) -> list[str]:
    base = Path(root or package_dir(pkg)) / "targets"
    return sorted(p.name for p in base.iterdir() if (p / "target.json").is_file())


def _fail(path, msg):
    raise ValueError(f"{path}: {msg}")


def _need(d, key, typ, path, where="target"):
    if key not in d:
        _fail(path, f"{where} lacks key {key!r}")
    if not isinstance(d[key], typ) or isinstance(d[key], bool) and typ is not bool:
        _fail(path, f"{where} key {key!r} must be {getattr(typ, '__name__', typ)}, "
                    f"got {type(d[key]).__name__}")
    return d[key]


def validate_target(data: dict, path, *, pkg: str | None = None, name: str | None = None,
                    folder: Path | None = None) -> None:
    """Raise ``ValueError`` naming the file and the key when ``data`` breaks the schema."""
    if not isinstance(data, dict):
        _fail(path, "must hold one JSON object")
    extra = set(data) - _TOP_KEYS
    if extra:
        _fail(path, f"unknown keys {sorted(extra)}")
    if _need(data, "schema", str, path) != SCHEMA:
        _fail(path, f"schema must be {SCHEMA!r}, got {data['schema']!r}")
    if pkg is not None and _need(data, "package", str, path) != pkg:
        _fail(path, f"package must be {pkg!r}, got {data['package']!r}")
    if name is not None and _need(data, "target", str, path) != name:
        _fail(path, f"target must be the folder's name {name!r}, got {data['target']!r}")
    paper = _need(data, "paper", dict, path)
    for k in ("title", "ref"):
        _need(paper, k, str, path, "paper")
    _validate_hardware(_need(data, "hardware", dict, path), path)
    if ("sweep" in data) == ("sweep_file" in data):
        _fail(path, "give exactly one of 'sweep' and 'sweep_file'")
    if "sweep" in data:
        sweep = _need(data, "sweep", dict, path)
        if not sweep:
            _fail(path, "sweep must not be empty")
        dry = _need(data, "dry_run", dict, path)
        unknown = set(dry) - set(sweep)
        if unknown:
            _fail(path, f"dry_run keys {sorted(unknown)} are not keys of sweep")
    else:
        f = _need(data, "sweep_file", str, path)
        if "dry_run" in data:
            _fail(path, "with 'sweep_file' the dry run is that file's 'dry_run' key")
        if folder is not None:
            p = folder / f
            if p.suffix != ".json" or not p.is_file():
                _fail(path, f"sweep_file {f!r} is not a JSON file in {folder}")
            with open(p) as fh:
                if not isinstance(json.load(fh).get("dry_run"), dict):
                    _fail(path, f"sweep_file {f!r} lacks a 'dry_run' object")
    _validate_claims(_need(data, "claims", list, path), path)
    for i, m in enumerate(_need(data, "measured", list, path)):
        where = f"measured[{i}]"
        if not isinstance(m, dict):
            _fail(path, f"{where} must be an object")
        for k in ("file", "device", "use"):
            _need(m, k, str, path, where)
        # an installed wheel may lack a results file: its claim is then "not measured yet"
        if (folder is not None and not (folder.parents[1] / m["file"]).is_file()
                and not installed(folder.parents[1])):
            _fail(path, f"{where} file {m['file']!r} does not exist under {folder.parents[1]}")
    if "notes" in data:
        _need(data, "notes", str, path)


def _validate_hardware(hw, path):
    extra = set(hw) - {"topology", "figures", "hbm_bw", "sources"}
    if extra:
        _fail(path, f"hardware has unknown keys {sorted(extra)}")
    if ("topology" in hw) == ("figures" in hw):
        _fail(path, "hardware needs exactly one of 'topology' and 'figures'")
    if "topology" in hw:
        if hw["topology"] not in topology.TARGETS:
            _fail(path, f"hardware.topology must be one of {sorted(topology.TARGETS)}, "
                        f"got {hw['topology']!r}")
    else:
        fig = _need(hw, "figures", dict, path, "hardware")
        if set(fig) != _TARGET_FIELDS:
            _fail(path, f"hardware.figures must have exactly the fields {sorted(_TARGET_FIELDS)}"
                        f"; missing {sorted(_TARGET_FIELDS - set(fig))}, unknown "
                        f"{sorted(set(fig) - _TARGET_FIELDS)}")
    if "hbm_bw" in hw and not (isinstance(hw["hbm_bw"], (int, float)) and hw["hbm_bw"] > 0):
        _fail(path, f"hardware.hbm_bw must be a positive number, got {hw['hbm_bw']!r}")
    if "sources" in hw and not all(isinstance(v, str) for v in hw["sources"].values()):
        _fail(path, "hardware.sources must map fields to strings")


def _validate_claims(claims, path):
    if not claims:
        _fail(path, "claims must not be empty")
    seen = set()
    for i, c in enumerate(claims):
        where = f"claims[{i}]"
        if not isinstance(c, dict):
            _fail(path, f"{where} must be an object")
        if set(c) != _CLAIM_KEYS:
            _fail(path, f"{where} must have exactly the keys {sorted(_CLAIM_KEYS)}, got "
                        f"{sorted(c)}")
        for k in ("id", "claim", "paper", "unit", "kind"):
            _need(c, k, str, path, where)
        if c["kind"] not in KINDS:
            _fail(path, f"{where} kind must be one of {list(KINDS)}, got {c['kind']!r}")
        pv = c["paper_value"]
        if pv is not None and (isinstance(pv, bool) or not isinstance(pv, (int, float))):
            _fail(path, f"{where} paper_value must be a number or null, got {pv!r}")
        if c["id"] in seen:
            _fail(path, f"{where} id {c['id']!r} appears twice")
        seen.add(c["id"])


def check_folder(folder: Path, pkg: str | None = None) -> None:
    """A target folder holds data only: every file (at any depth) is JSON or PNG, none is
    executable, and ``target.json`` follows the schema (of ``pkg``; default: the package the
    folder lies in)."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        if p.suffix not in DATA_SUFFIXES:
            _fail(p, f"a target folder holds data only ({', '.join(DATA_SUFFIXES)} files)")
        if os.access(p, os.X_OK):
            _fail(p, "a target folder's files must not be executable")
    path = folder / "target.json"
    if not path.is_file():
        _fail(folder, "has no target.json")
    with open(path) as f:
        data = json.load(f)
    validate_target(data, path, pkg=pkg or _package_of(folder), name=folder.name,
                    folder=folder)


def load_target(pkg: str, target: str, root: Path | None = None
                ) -> tuple[dict, dict, dict, Path]:
    """``(spec, sweep, dry_run_sweep, folder)`` of a validated target folder of ``root``
    (default: :func:`package_dir`)."""
    root = Path(root or package_dir(pkg))
    folder = root / "targets" / target
    if not (folder / "target.json").is_file():
        raise ValueError(f"target must be one of {target_names(pkg, root)} for {pkg}, "
                         f"got {target!r}")
    check_folder(folder, pkg)
    with open(folder / "target.json") as f:
        spec = json.load(f)
    if "sweep" in spec:
        sweep = spec["sweep"]
        dry = {**sweep, **spec["dry_run"]}
    else:
        with open(folder / spec["sweep_file"]) as f:
            sweep = json.load(f)
        dry = {**sweep, **sweep["dry_run"]}
    return spec, sweep, dry, folder


def hardware(spec: dict) -> topology.Target:
    hw = spec["hardware"]
    if "topology" in hw:
        return topology.get_target(hw["topology"])
    return topology.Target(**hw["figures"])


def same_gpu(a: str | None, b: str | None) -> bool:
    """Whether two device names are the same GPU model (``H100``, ``H200``, ``MI300X``)."""
    def model(s):
        m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", s or "")
        return m.group(1) if m else None

    return model(a) is not None and model(a) == model(b)


# ---------------------------------------------------------------------------------------------
# what a package's run(ctx) gets


@dataclass
class Context:
    package: str
    target: str
    spec: dict
    sweep: dict
    hw: topology.Target
    dry_run: bool
    folder: Path
    measure: bool = False  # time the measured claims on this machine's GPU
    answers: dict = field(default_factory=dict)

    @property
    def pkg_dir(self) -> Path:
        return self.folder.parents[1]

    @property
    def hbm_bw(self) -> float | None:
        return self.spec["hardware"].get("hbm_bw")

    def claim_spec(self, cid: str) -> dict:
        for c in self.spec["claims"]:
            if c["id"] == cid:
                return c
        raise ValueError(f"claim id {cid!r} is not in {self.folder / 'target.json'}")

    def load(self, rel: str):
        """A committed JSON file of the package, by its path under the package folder."""
        path = self.pkg_dir / rel
        if not path.is_file() and installed(self.pkg_dir):
            raise ValueError(f"{self.package}: {rel} is not in the installed wheel "
                             f"({self.pkg_dir}); run from a source checkout")
        with open(path) as f:
            return json.load(f)

    def _entry(self, device):
        want = device or self.hw.device
        for m in self.spec["measured"]:
            if same_gpu(m["device"], want):
                return m
        return None

    def measured_file(self, device: str | None = None) -> dict | None:
        """The target's ``measured`` entry for ``device`` (default: the target's GPU), when its
        file is here (an installed wheel may lack it: see :meth:`not_measured`)."""
        m = self._entry(device)
        return m if m is not None and (self.pkg_dir / m["file"]).is_file() else None

    def not_measured(self, why: str, device: str | None = None) -> str:
        """The basis of a "not measured yet" answer: ``why``, or, when the target names a
        committed benchmark for ``device`` that this installed wheel does not carry, that."""
        m = self._entry(device)
        if m is not None and not (self.pkg_dir / m["file"]).is_file():
            return (f"results not in the wheel: {m['file']} is committed in the source "
                    "checkout only")
        return why

    def answer(self, cid: str, value, status: str, basis: str, *, source=None, device=None,
               date=None, error=None, series=None, **extra) -> dict:
        """Record the answer to claim ``cid``: ``value`` (a number or None), ``status`` (one of
        STATUSES), ``basis`` (how it was obtained), where from (``source``: a committed file,
        ``device``, ``date``), an optional ``error`` beside it, and ``series`` for the plot
        ({label: (xs, ys)}, with ``x`` / ``y`` axis names in ``extra``)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {status!r}")
        if cid in self.answers:
            raise ValueError(f"claim {cid!r} answered twice")
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"claim {cid!r}: value must be finite, got {value!r}")
        if status == "not measured yet" and value is not None:
            raise ValueError(f"claim {cid!r}: 'not measured yet' carries no value")
        if self.measure and status == "measured" and source is None:
            # timed by this run: the JSON this run writes is its record
            source, date = "this run", date or _today()
        c = self.claim_spec(cid)
        rec = {"id": cid, "claim": c["claim"], "paper": c["paper"],
               "paper_value": c["paper_value"], "unit": c["unit"], "kind": c["kind"],
               "value": None if value is None else float(f"{float(value):.4g}"),
               "status": status, "basis": basis, "source": source, "device": device,
               "date": date, "error": error}
        if series:
            rec["series"] = {k: [list(map(float, xs)), list(map(float, ys))]
                             for k, (xs, ys) in series.items()}
        rec.update(extra)
        self.answers[cid] = rec
        return rec


def _hook(pkg: str):
    from importlib.metadata import entry_points

    for ep in entry_points(group="longattn.repro"):
        if ep.name == pkg:
            return ep.load()
    mod = importlib.import_module(HOOKS[pkg])
    return mod.run


def run(pkg: str, target: str, *, dry_run: bool = False, measure: bool | None = None,
        command: str | None = None, root: Path | None = None) -> dict:
    """Run one package's target (from the folder ``root``, default :func:`package_dir`);
    returns the result record (what the JSON holds)."""
    spec, sweep, dry, folder = load_target(pkg, target, root)
    if measure is None:
        measure = not dry_run and _cuda_of(hardware(spec).device)
    ctx = Context(pkg, target, spec, dry if dry_run else sweep, hardware(spec), dry_run, folder,
                  measure=measure)
    if dry_run and measure:
        raise ValueError("measure: a dry run predicts only")
    t0 = time.perf_counter()
    out = _hook(pkg)(ctx) or {}
    missing = [c["id"] for c in spec["claims"] if c["id"] not in ctx.answers]
    if missing:
        raise RuntimeError(f"{pkg} {target}: claims {missing} were not answered")
    return {
        "package": pkg, "target": target, "dry_run": dry_run, "paper": spec["paper"],
        "hardware": dataclasses.asdict(ctx.hw), "hbm_bw": ctx.hbm_bw,
        "command": command or f"python -m longattn.common.repro {pkg} --target {target}"
                              + (" --dry-run" if dry_run else ""),
        "date": _today(),
        "git_sha": _git_sha(), "seconds": round(time.perf_counter() - t0, 3),
        "claims": [ctx.answers[c["id"]] for c in spec["claims"]],
        "rows": out.get("rows", []),
    }


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def _cuda_of(device: str) -> bool:
    """True when this machine has a CUDA GPU of the target's model (then measured claims are
    timed here)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and same_gpu(torch.cuda.get_device_name(), device)


def _git_sha():
    from longattn.common.bench import git_sha

    return git_sha()


# ---------------------------------------------------------------------------------------------
# output


def write(result: dict, out_dir: str, *, plots: bool = True) -> list[str]:
    """Write the JSON (and the PNG when matplotlib imports). Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    stem = f"repro_{result['package']}_{result['target']}" + ("_dry" if result["dry_run"] else "")
    path = os.path.join(out_dir, stem + ".json")
    with open(path, "w") as f:
        f.write(_dumps(result) + "\n")
    written = [path]
    if plots and any(c.get("series") for c in result["claims"]):
        if importlib.util.find_spec("matplotlib") is None:
            print("no plot: matplotlib is not installed (it comes with the extra "
                  "longattn-common[test], or pip install matplotlib)")
        else:
            written.append(plot(result, os.path.join(out_dir, stem + ".png")))
    return written


def _dumps(result: dict) -> str:
    """Indented JSON with one line per row (the sweeps have hundreds of rows)."""
    head = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)
    rows = ",\n  ".join(json.dumps(r) for r in result.get("rows", []))
    return head[:-2] + ',\n "rows": [\n  ' + rows + "\n ]\n}" if rows else head


def plot(result: dict, path: str) -> str:
    """One panel per claim that has a series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = [c for c in result["claims"] if c.get("series")]
    fig, axes = plt.subplots(1, len(claims), figsize=(5.5 * len(claims), 4), squeeze=False)
    for ax, c in zip(axes[0], claims):
        for label, (xs, ys) in c["series"].items():
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        if c["paper_value"] is not None and c["unit"] in ("x", "ratio"):
            ax.axhline(c["paper_value"], color="k", ls=":", lw=1, label=f"paper: {c['paper']}")
        ax.set_xscale("log", base=2)
        if c.get("logy"):
            ax.set_yscale("log")
        ax.set_xlabel(c.get("x", ""))
        ax.set_ylabel(c.get("y", c["unit"]))
        ax.set_title(f"{c['id']} ({c['status']})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{result['package']} on {result['target']}"
                 + (" (dry run)" if result["dry_run"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(result):
    """The claims, one per row (claim, our figure, measured / predicted, the paper's), within
    100 columns: :func:`longattn.common.bench.format_table` wraps the long cells."""
    from longattn.common.bench import format_table

    rows = [{"claim": c["id"], "ours": "-" if c["value"] is None else f"{c['value']:g} {c['unit']}",
             "how": c["status"], "paper": c["paper"]} for c in result["claims"]]
    head = f"{result['package']} on {result['target']}" + (" (dry run)" if result["dry_run"]
                                                            else "")
    return head + "\n" + format_table(rows, ["claim", "ours", "how", "paper"], width=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longattn.common.repro",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("package", choices=[*PACKAGES, "all"])
    p.add_argument("--target", default=None, help="a folder of <pkg>/targets (default: all)")
    p.add_argument("--dry-run", action="store_true", help="tiny sweep, predictions only")
    p.add_argument("--no-measure", action="store_true",
                   help="never time on this machine's GPU (use the committed JSON)")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default: .)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    pkgs = PACKAGES if a.package == "all" else (a.package,)
    out = a.out or os.getcwd()
    t0 = time.perf_counter()
    for pkg in pkgs:
        for t in ([a.target] if a.target else target_names(pkg)):
            cmd = f"python -m longattn.common.repro {pkg} --target {t}" + (
                " --dry-run" if a.dry_run else "")
            res = run(pkg, t, dry_run=a.dry_run, measure=False if a.no_measure else None,
                      command=cmd)
            paths = write(res, out, plots=not a.no_plot)
            print(_table(res))
            print("wrote " + ",\n      ".join(paths), flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
