"""docs/results.md is regenerated from JSON, and every package README's results tables quote
only numbers their committed JSON (or log) holds.

Only common is needed: the packages' folders are found in this checkout."""

import json
import shutil
from pathlib import Path

import pytest

from longattn.common import report, repro

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("pkg", repro.PACKAGES)
def test_readme_results_tables_quote_only_numbers_the_json_holds(pkg):
    rows = report.result_tables((ROOT / pkg / "README.md").read_text())
    assert sum(len(report.table_numbers(line)) for _, line, _ in rows) > 0  # tables found
    assert report.check_readme(pkg) == []


def _held_anywhere(pkg, value):
    values = [v for p in sorted((ROOT / pkg).rglob("*.json"))
              for rec in report._file_records(str(p)) for v in rec]
    return report._held(value, values + report._views(pkg, ROOT / pkg))


def test_a_readme_changed_by_hand_fails_the_check(tmp_path):
    """One number of hyper's README altered in a copy: the check names it, and only it."""
    text = (ROOT / "hyper" / "README.md").read_text()
    _, line, _ = next(r for r in report.result_tables(text) if report.table_numbers(r[1]))
    tok = report.table_numbers(line)[-1]
    dec = len(tok.split(".")[1]) if "." in tok else 0
    step = 10 ** -dec
    new = tok
    while new == tok or _held_anywhere("hyper", new):  # a value no JSON of hyper holds
        new = f"{float(new.replace(',', '')) + 7 * step:.{dec}f}"
    changed = line[:line.rindex(tok)] + new + line[line.rindex(tok) + len(tok):]
    copy = tmp_path / "README.md"
    copy.write_text(text.replace(line, changed, 1))
    assert report.check_readme("hyper") == []
    assert report.check_readme("hyper", copy) == [(new, changed)]


@pytest.mark.parametrize("pkg", ["hamilton", "ring_swa", "dilated"])
def test_a_number_from_another_record_fails_the_check(pkg, tmp_path):
    """A row's number replaced by one its JSON holds elsewhere (what a by-hand edit in a large
    prediction file looked like to a check of each number alone): the row's record does not
    hold it together with the rest of the row, so the check names the row."""
    text = (ROOT / pkg / "README.md").read_text()
    for _, line, _ in report.result_tables(text):
        toks = report.table_numbers(line)
        if not toks:
            continue
        tok = toks[-1]
        dec = len(tok.split(".")[1]) if "." in tok and "e" not in tok else 0
        step = 10 ** -dec
        for k in range(1, 200):
            new = f"{float(tok.replace(',', '')) + k * step:.{dec}f}"
            if not _held_anywhere(pkg, new):
                continue
            changed = line[:line.rindex(tok)] + new + line[line.rindex(tok) + len(tok):]
            copy = tmp_path / "README.md"
            copy.write_text(text.replace(line, changed, 1))
            if report.check_readme(pkg, copy):
                assert {row for _, row in report.check_readme(pkg, copy)} == {changed}
                return
    pytest.fail(f"{pkg}: no row whose number another record holds was caught")


def test_bounds_and_names_are_not_results():
    assert report.table_numbers("| causal | 155.6 | `bn64/w4` | >= 10x: met | K_16 | H100-2 |") \
        == ["155.6"]
    assert report.table_numbers("| 1,048,576 | 96% | 2^20 |") == ["1,048,576", "96"]


def test_held_at_the_printed_precision():
    assert report._held("12.53", [12.530614])
    assert not report._held("12.54", [12.530614])
    assert report._held("96", [0.9641])  # a percentage of a fraction
    assert report._held("1,048,576", [1048576.0])
    assert not report._held("0.10", [0.1051])


def test_committed_page_is_the_rendering_of_the_committed_json(tmp_path):
    """docs/results.md is what the report makes of docs/results/*.json (never typed)."""
    results = report.collect(str(ROOT / "docs" / "results"))
    assert set(results) == set(repro.PACKAGES)
    assert all(len(v) == len(repro.TARGETS) for v in results.values())
    out = tmp_path / "docs" / "results.md"
    shutil.copytree(ROOT / "docs" / "results", tmp_path / "docs" / "results")
    text = report.render(results, str(out), None)

    def strip(t):  # the image links need the plots, which this test does not draw
        return "\n".join(x for x in t.splitlines() if not x.startswith("!["))

    assert strip(text).split() == strip((ROOT / "docs" / "results.md").read_text()).split()
    for res in (r for rs in results.values() for r in rs):
        for c in res["claims"]:
            assert c["status"] in repro.STATUSES
            if c["status"] == "measured":
                assert c["source"] and c["device"] and c["date"], c
            if c["status"] == "not measured yet":
                assert c["value"] is None, c


def test_a_gpu_run_lists_the_claims_it_timed_itself(tmp_path):
    """A run kept in results/gpu/ adds, under its paper's table, the claims whose source is
    "this run", and only those."""
    src = ROOT / "docs" / "results"
    shutil.copytree(src, tmp_path / "results", ignore=shutil.ignore_patterns("gpu"))
    res = json.loads((src / "repro_tree_H100-1.json").read_text())
    res["git_sha"] = "abc1234"
    timed = dict(res["claims"][-1], source="this run", value=2.5, date="2026-12-05")
    res["claims"] = res["claims"][:-1] + [timed]
    (tmp_path / "results" / "gpu").mkdir()
    (tmp_path / "results" / "gpu" / "repro_tree_H100-1.json").write_text(json.dumps(res))
    runs = report.collect_gpu(str(tmp_path / "results"))
    assert list(runs) == ["tree"]
    text = report.render(report.collect(str(tmp_path / "results")), str(tmp_path / "r.md"),
                         None)
    own = [x for x in text.splitlines() if "abc1234" in x]
    assert len(own) == 1 and "| 2.50 ms |" in own[0] and timed["claim"] in own[0]
    empty = report.render(report.collect(str(tmp_path / "results")), str(tmp_path / "e.md"),
                          None, gpu_runs={})
    assert "abc1234" not in empty and "Timed on a GPU" not in empty
