"""One results page for every paper, generated from JSON.

    python -m longattn.common.report [--out docs/results.md] [--refresh] [--check-readmes]

Reads the reproduction results ``repro_<pkg>_<T>.json`` (written by
:mod:`longattn.common.repro`) from ``--results`` (default: the folder ``results`` beside
``--out``) and writes one Markdown page: per paper and target, each claim, the paper's figure,
our number, whether it was measured or predicted, and the command, device and date behind it,
with one plot per paper (when matplotlib imports). ``--refresh`` first re-runs every package's
targets from the committed benchmark JSON (no GPU: ``measure=False``) into ``--results``.

It also checks the packages' READMEs: the numbers of each row of a table in a results section
must be held together, at the precision printed, by one record (a JSON object or array, or a
line of a log) of the committed files that section names (or, where it names none, any JSON of
the package), with the figures the package derives from its JSON (``readme_views`` in its
repro module). ``--check-readmes`` prints the numbers that
are not and exits 1.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from longattn.common import repro

# a number in prose or a table cell; not a piece of a name (bn64, K_16, H100-2, 2^20)
NUM = re.compile(r"(?<![\w.^/-])\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?(?!\^|[.,]?\d)")
RESULT_HEADING = re.compile(r"result|predict|benchmark|speed|quality", re.I)
# a committed result file a section names: `bench/results/x.json`, `x.{json,png}`,
# `targets/<T>/config.json` (any target), `bench/results/x_log.txt`
FILE_REF = re.compile(r"`([\w./<>-]+?)\.(json|txt|log|\{[^}`]*\})`")
BOUND = re.compile(r"(?:>=|<=|≥|≤|<|>)\s*$")


# ---------------------------------------------------------------------------------------------
# collecting and rendering


def refresh(results_dir: str) -> list[str]:
    """Re-run every package x target from the committed JSON (predictions and the measured
    numbers of committed benchmarks) into ``results_dir``."""
    paths = []
    for pkg in repro.PACKAGES:
        for t in repro.target_names(pkg):
            res = repro.run(pkg, t, measure=False)
            # the sweep's rows (hundreds per target) are the command's to recompute
            res["rows_omitted"] = len(res.pop("rows"))
            paths += repro.write(res, results_dir, plots=False)
    return paths


def collect(results_dir: str) -> dict:
    """{pkg: [result, ...]} of the full (not dry) runs in ``results_dir``, targets in order."""
    out = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "repro_*.json"))):
        with open(path) as f:
            res = json.load(f)
        if res.get("dry_run"):
            continue
        out.setdefault(res["package"], []).append(res)
    order = {t: i for i, t in enumerate(repro.TARGETS)}
    for rs in out.values():
        rs.sort(key=lambda r: order.get(r["target"], len(order)))
    return out


def collect_gpu(results_dir: str) -> dict:
    """{pkg: [result, ...]} of the runs on a GPU of the target's model kept in
    ``results_dir/gpu`` (each as the runner wrote it there, its measured claims timed by the
    run itself), in target and date order."""
    out = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "gpu", "repro_*.json"))):
        with open(path) as f:
            res = json.load(f)
        out.setdefault(res["package"], []).append(res)
    order = {t: i for i, t in enumerate(repro.TARGETS)}
    for rs in out.values():
        rs.sort(key=lambda r: (order.get(r["target"], len(order)), r["date"]))
    return out


def _gpu_lines(runs) -> list[str]:
    """The table of the claims a GPU run timed itself (the others are the table's above)."""
    rows = [(r, c) for r in runs for c in r["claims"] if c["source"] == "this run"]
    if not rows:
        return []
    lines = ["Timed on a GPU by the runner itself (`python -m longattn.common.repro` on a GPU of "
             "the target's model measures these claims instead of reading a committed "
             "benchmark; the run's JSON is in `results/gpu/`):", "",
             "| target | claim | paper | ours | device | date | commit | command |",
             "|---|---|---|---|---|---|---|---|"]
    for r, c in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (
            r["target"], c["claim"], c["paper"], _fmt(c["value"], c["unit"]) + _err(c),
            c["device"], c["date"], r["git_sha"], f"`{r['command']}`")) + " |")
    return lines + [""]


def _fmt(v, unit):
    if v is None:
        return "—"
    if unit == "tokens":
        return f"{v:,.0f}"
    num = f"{v:.2f}" if abs(v) < 10 else f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return num + ("x" if unit == "x" else "" if unit == "ratio" else f" {unit}")


def _cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def render(results: dict, out_md: str, img_dir: str | None, gpu_runs: dict | None = None
           ) -> str:
    """The Markdown page (and the plots in ``img_dir``); returns the text. ``gpu_runs``
    (default: :func:`collect_gpu` of the results folder beside ``out_md``): runs on a GPU, whose
    self-timed claims get a table under their paper's."""
    gpu_runs = collect_gpu(_results_of(out_md)) if gpu_runs is None else gpu_runs
    rel = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(out_md))) if img_dir else None
    lines = ["# Results: every paper's claims on every hardware target", "",
             "Generated by `python -m longattn.common.report --refresh` from the JSON in "
             f"`{os.path.relpath(_results_of(out_md), os.path.dirname(os.path.abspath(out_md)))}`"
             " (never edited by hand). **measured**: one GPU measured it (the committed "
             "benchmark JSON named in *source*, its device and date); **predicted**: the "
             "alpha-beta model of `longattn.common.topology` with the target's figures, fed "
             "with a single-GPU step measured on an NVIDIA H200 (the JSON in *source*); "
             "**not measured yet**: neither exists. Regenerate one row with the command in "
             "*command*. The targets' sweeps, figures and claims are the data in "
             "`<pkg>/targets/<T>/target.json`.", ""]
    for pkg in repro.PACKAGES:
        rs = results.get(pkg)
        if not rs:
            lines += [f"## {pkg}", "", "No results JSON.", ""]
            continue
        paper = rs[0]["paper"]
        lines += [f"## {pkg}: {paper['title']} ({paper['ref']})", "",
                  "| target | claim | paper | ours | how | basis | source | device | date "
                  "| command |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            for c in r["claims"]:
                lines.append("| " + " | ".join(_cell(x) for x in (
                    r["target"], c["claim"], c["paper"], _fmt(c["value"], c["unit"])
                    + _err(c), f"**{c['status']}**", c["basis"], c["source"] or "—",
                    c["device"] or "—", c["date"] or r["date"], f"`{r['command']}`")) + " |")
        lines.append("")
        lines += _gpu_lines(gpu_runs.get(pkg, []))
        if img_dir:
            png = plot_package(pkg, rs, img_dir)
            if png:
                lines += [f"![{pkg}]({rel}/{os.path.basename(png)})", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, "w") as f:
        f.write(text)
    return text


def _err(c):
    e = c.get("error") or {}
    parts = [f"{k.replace('rel_err_', 'rel. error ')} {v:.3g}" for k, v in e.items()
             if v is not None]
    return f" ({', '.join(parts)})" if parts else ""


def plot_package(pkg, results, img_dir):
    """One panel per claim with a series, one line per (target, series)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("no plots: matplotlib is not installed (extra longattn-common[test], or pip "
              "install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(dict.fromkeys(c["id"] for r in results for c in r["claims"] if c.get("series")))
    if not ids:
        return None
    fig, axes = plt.subplots(1, len(ids), figsize=(6 * len(ids), 4.2), squeeze=False)
    for ax, cid in zip(axes[0], ids):
        first = None
        for r in results:
            for c in r["claims"]:
                if c["id"] != cid or not c.get("series"):
                    continue
                first = first or c
                for label, (xs, ys) in c["series"].items():
                    ax.plot(xs, ys, marker="o", ms=3, label=f"{r['target']}: {label}")
        if first["paper_value"] is not None and first["unit"] in ("x", "ratio"):
            ax.axhline(first["paper_value"], color="k", ls=":", lw=1,
                       label=f"paper: {first['paper']}")
        ax.set_xscale("log", base=2)
        if first.get("logy"):
            ax.set_yscale("log")
        ax.set_xlabel(first.get("x", ""))
        ax.set_ylabel(first.get("y", first["unit"]))
        ax.set_title(f"{cid} ({first['status']})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=5.5)
    fig.suptitle(f"{pkg}", fontsize=10)
    fig.tight_layout()
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(img_dir, f"{pkg}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _results_of(out_md):
    return os.path.join(os.path.dirname(os.path.abspath(out_md)), "results")


# ---------------------------------------------------------------------------------------------
# README numbers against the JSON


def json_numbers(obj) -> list[float]:
    """Every number in a JSON value (numbers inside strings too: logs of checks)."""
    out = []
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            out += json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out += json_numbers(v)
    elif isinstance(obj, str):
        for m in NUM.findall(obj):
            try:
                out.append(float(m.replace(",", "")))
            except ValueError:
                pass
    return out


def result_tables(md: str):
    """[(section heading, table line, [json paths the section names])] for every table row of
    a results section (a heading matching RESULT_HEADING, or under one)."""
    rows, stack, refs = [], [], {}
    for line in md.splitlines():
        m = re.match(r"^(#+)\s+(.*)", line)
        if m:
            level = len(m.group(1))
            stack = [(lv, t) for lv, t in stack if lv < level] + [(level, m.group(2))]
            continue
        key = tuple(stack)
        refs.setdefault(key, [])
        for r in FILE_REF.finditer(line):
            exts = r.group(2).strip("{}").split(",")
            refs[key] += [f"{r.group(1)}.{e.strip()}" for e in exts
                          if e.strip() in ("json", "txt", "log")]
        if not (line.startswith("|") and any(RESULT_HEADING.search(t) for _, t in stack)):
            continue
        if re.match(r"^\|[-| :]+\|\s*$", line):
            continue
        rows.append((stack[-1][1] if stack else "", line, key))
    return [(h, line, refs.get(key, [])) for h, line, key in rows]


def _held(token: str, values) -> bool:
    s = token.replace(",", "")
    x = float(s)
    dec = len(s.split(".")[1]) if "." in s and "e" not in s.lower() else 0
    tol = 0.5 * 10 ** -dec + 1e-9 * abs(x)
    return any(abs(v - x) <= tol or abs(v * 100 - x) <= tol for v in values)


def table_numbers(line: str) -> list[str]:
    """The numbers of a table row; code spans (names like ``bn64``) and bounds (the 50 of
    ">= 50x: met", a target, not a result) left out."""
    out = []
    for cell in line.strip().strip("|").split("|"):
        cell = re.sub(r"`[^`]*`", "", cell)
        out += [m.group(0) for m in NUM.finditer(cell) if not BOUND.search(cell[:m.start()])]
    return out


def _resolve(pkg_dir: Path, ref: str) -> list[str]:
    """The files a section's reference names: a path under the package (``<T>`` any folder),
    else every file of that name under the package."""
    pattern = re.sub(r"<[^>]*>", "*", ref)
    found = sorted(glob.glob(str(pkg_dir / pattern)))
    if not found and "/" not in ref:
        found = sorted(str(p) for p in pkg_dir.rglob(ref))
    return found


def _records(obj, out: list) -> list:
    """Every JSON object and array of ``obj`` (nested ones too) as the list of the numbers of
    its whole subtree: the records a README row may have been copied from."""
    nums = json_numbers(obj)
    if isinstance(obj, (dict, list)) and nums:
        out.append(nums)
    for v in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()):
        _records(v, out)
    return out


def _file_records(path: str) -> list[list[float]]:
    """A JSON file's records (:func:`_records`); a log's lines, one record each."""
    if path.endswith(".json"):
        with open(path) as f:
            return _records(json.load(f), [])
    with open(path, errors="replace") as f:
        return [json_numbers(line) for line in f]


def check_readme(pkg: str, readme: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """[(number, table line)] of README table numbers the JSON does not hold.

    A row is held when one record (one JSON object or array of the files its section names,
    with everything inside it, or one line of a named log) holds every number of the row at
    the precision printed, together with the package's derived figures (``readme_views``); a
    row of derived figures alone is held too. Numbers held only by different records are not
    enough: a number changed by hand rarely lands in the record the rest of its row came from,
    while in a large file some value lies within its rounding by chance. The numbers of a row
    that is not held and that no record holds on their own are reported (all of the row's,
    when each is held somewhere but no record holds them together)."""
    pkg_dir = repro.package_dir(pkg)
    text = Path(readme or pkg_dir / "README.md").read_text()
    every = sorted(glob.glob(str(pkg_dir / "**" / "*.json"), recursive=True))
    cache = {}

    def records(path):
        if path not in cache:
            cache[path] = _file_records(path)
        return cache[path]

    views = _views(pkg, pkg_dir)
    bad = []
    for _, line, refs in result_tables(text):
        toks = table_numbers(line)
        if not toks:
            continue
        files = [f for r in refs for f in _resolve(pkg_dir, r)] or every
        recs = [rec for f in files for rec in records(f)]
        if all(_held(t, views) for t in toks) or any(
                all(_held(t, rec + views) for t in toks) for rec in recs):
            continue
        flat = [v for rec in recs for v in rec] + views
        alone = [t for t in toks if not _held(t, flat)]
        bad += [(tok, line) for tok in (alone or toks)]
    return bad


def _views(pkg, pkg_dir):
    """Figures the package derives from its JSON for its README (``readme_views`` of its
    repro module, loaded from its file: the package need not be installed)."""
    mod_name = repro.HOOKS[pkg]
    path = pkg_dir / "src" / Path(*mod_name.split("."))
    spec = importlib.util.spec_from_file_location(f"_longattn_views_{pkg}", f"{path}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, "readme_views", None)
    return [float(v) for v in fn(pkg_dir)] if fn else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longattn.common.report",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("docs", "results.md"))
    p.add_argument("--results", default=None, help="folder of repro_*.json (default: "
                   "'results' beside --out)")
    p.add_argument("--refresh", action="store_true",
                   help="re-run every target from the committed JSON first")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--check-readmes", action="store_true",
                   help="only check the READMEs' results tables against the JSON")
    a = p.parse_args(argv)
    if a.check_readmes:
        bad = {pkg: check_readme(pkg) for pkg in repro.PACKAGES}
        for pkg, rows in bad.items():
            for tok, line in rows:
                print(f"{pkg}/README.md: {tok} is in no JSON: {line.strip()}")
        return 1 if any(bad.values()) else 0
    results_dir = a.results or _results_of(a.out)
    if a.refresh:
        refresh(results_dir)
    res = collect(results_dir)
    render(res, a.out, None if a.no_plot else results_dir)
    print(f"wrote {a.out} ({sum(len(v) for v in res.values())} results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
