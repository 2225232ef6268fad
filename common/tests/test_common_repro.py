"""The target folders (data only, one schema), where they are found (checkout or installed
wheel), what the wheels carry, and the runner's own checks.

Only common is needed here (the folders are found from this file's checkout): the runs of
each package's targets are in that package's ``test_<pkg>_repro.py``."""

import importlib.machinery
import json
import os
import shutil
from pathlib import Path, PurePosixPath

import pytest

from longattn.common import repro, topology

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = [(p, t) for p in repro.PACKAGES for t in repro.TARGETS]


@pytest.mark.parametrize(("pkg", "target"), FOLDERS, ids=[f"{p}-{t}" for p, t in FOLDERS])
def test_every_target_folder_is_data_that_follows_the_schema(pkg, target):
    folder = ROOT / pkg / "targets" / target
    assert folder.is_dir(), folder
    repro.check_folder(folder)
    spec = json.loads((folder / "target.json").read_text())
    assert spec["package"] == pkg and spec["target"] == target
    hw = repro.hardware(spec)
    assert isinstance(hw, topology.Target) and hw.world_size >= 1


def test_no_other_target_folders_exist():
    """Every folder under a package's targets/ is one of the checked ones."""
    found = {(p, d.name) for p in repro.PACKAGES for d in (ROOT / p / "targets").iterdir()
             if d.is_dir()}
    assert found == set(FOLDERS)


def _copy(tmp_path, pkg="tree", target="H200-1"):
    dst = tmp_path / pkg / "targets" / target
    shutil.copytree(ROOT / pkg / "targets" / target, dst)
    # the measured files the schema checks for, under the copy's package folder
    spec = json.loads((dst / "target.json").read_text())
    for m in spec["measured"]:
        f = tmp_path / pkg / m["file"]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("[]")
    return dst


def test_a_copy_validates(tmp_path):
    repro.check_folder(_copy(tmp_path))


@pytest.mark.parametrize("name,mode", [("prepare.py", 0o644), ("run.sh", 0o644),
                                       ("notes.txt", 0o644), ("more.json", 0o755)])
def test_code_in_a_target_folder_is_refused(tmp_path, name, mode):
    dst = _copy(tmp_path)
    f = dst / "sub" / name
    f.parent.mkdir()
    f.write_text("{}")
    os.chmod(f, mode)
    with pytest.raises(ValueError, match="data only|executable"):
        repro.check_folder(dst)


def _breaks(spec):
    """(description, mutate(spec), message the error must hold)."""
    return [
        ("no claims", lambda s: s.pop("claims"), "claims"),
        ("empty claims", lambda s: s.update(claims=[]), "claims"),
        ("bad kind", lambda s: s["claims"][0].update(kind="guessed"), "kind"),
        ("paper_value text", lambda s: s["claims"][0].update(paper_value="8x"),
         "paper_value"),
        ("claim key missing", lambda s: s["claims"][0].pop("unit"), "claims\\[0\\]"),
        ("duplicate id", lambda s: s["claims"].append(dict(s["claims"][0])), "twice"),
        ("unknown key", lambda s: s.update(script="run.py"), "unknown keys"),
        ("wrong schema", lambda s: s.update(schema="x/2"), "schema"),
        ("wrong package", lambda s: s.update(package="hyper"), "package"),
        ("wrong target", lambda s: s.update(target="H100-1"), "target"),
        ("no hardware", lambda s: s["hardware"].pop("figures"), "hardware"),
        ("figure missing", lambda s: s["hardware"]["figures"].pop("nic_bw"), "nic_bw"),
        ("unknown topology", lambda s: s["hardware"].update(topology="B200-1"), "hardware"),
        ("dry_run key not in sweep", lambda s: s["dry_run"].update(gpus=3), "dry_run"),
        ("no sweep", lambda s: s.pop("sweep"), "sweep"),
        ("measured file missing", lambda s: s["measured"][0].update(file="nope.json"),
         "nope.json"),
        ("hbm_bw negative", lambda s: s["hardware"].update(hbm_bw=-1), "hbm_bw"),
    ]


@pytest.mark.parametrize("i", range(len(_breaks({}))))
def test_schema_breaks_are_named(tmp_path, i):
    dst = _copy(tmp_path)
    spec = json.loads((dst / "target.json").read_text())
    what, mutate, msg = _breaks(spec)[i]
    mutate(spec)
    (dst / "target.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=msg):
        repro.check_folder(dst)


def test_hardware_by_name_and_by_figures():
    by_name = repro.hardware({"hardware": {"topology": "MI300X-1"}})
    assert by_name is topology.TARGETS["MI300X-1"]
    spec = json.loads((ROOT / "tree" / "targets" / "H200-1" / "target.json").read_text())
    h200 = repro.hardware(spec)
    assert h200.device == "NVIDIA H200" and h200.world_size == 8


@pytest.mark.parametrize("a,b,same", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM 80GB", True),
    ("NVIDIA H200", "NVIDIA H200", True),
    ("NVIDIA H200", "NVIDIA H100 SXM 80GB", False),
    ("AMD Instinct MI300X", "AMD Instinct MI300X", True),
    ("cpu (x86_64, 2 cores)", "NVIDIA H200", False),
    (None, "NVIDIA H200", False),
])
def test_same_gpu(a, b, same):
    assert repro.same_gpu(a, b) is same


def _ctx(tmp_path):
    spec = json.loads((ROOT / "tree" / "targets" / "H200-1" / "target.json").read_text())
    folder = ROOT / "tree" / "targets" / "H200-1"
    return repro.Context("tree", "H200-1", spec, spec["sweep"], repro.hardware(spec), False,
                         folder)


def test_answer_checks_what_it_records(tmp_path):
    ctx = _ctx(tmp_path)
    with pytest.raises(ValueError, match="status"):
        ctx.answer("local_step_ms", 1.0, "guessed", "b")
    with pytest.raises(ValueError, match="not in"):
        ctx.answer("no_such_claim", 1.0, "measured", "b")
    with pytest.raises(ValueError, match="finite"):
        ctx.answer("local_step_ms", float("nan"), "measured", "b")
    with pytest.raises(ValueError, match="carries no value"):
        ctx.answer("local_step_ms", 1.0, "not measured yet", "b")
    rec = ctx.answer("local_step_ms", 2.33776, "measured", "b", source="f.json")
    assert rec["value"] == 2.338 and rec["paper"] == "not reported"
    with pytest.raises(ValueError, match="twice"):
        ctx.answer("local_step_ms", 1.0, "measured", "b")


def test_a_claim_timed_by_the_run_names_the_run(tmp_path):
    """On a GPU of the target's model (measure=True) a measured answer without a committed
    source is this run's, dated today; committed sources and predictions keep their own."""
    ctx = _ctx(tmp_path)
    ctx.measure = True
    rec = ctx.answer("local_step_ms", 2.0, "measured", "timed", device="NVIDIA H200")
    assert rec["source"] == "this run" and rec["date"] == repro._today()
    rec = ctx.answer("decode_speedup_max", 3.0, "predicted", "model")
    assert rec["source"] is None and rec["date"] is None
    ctx = _ctx(tmp_path)
    rec = ctx.answer("local_step_ms", 2.0, "measured", "read", source="f.json", date="d")
    assert (rec["source"], rec["date"]) == ("f.json", "d")


def test_write_puts_files_only_in_out(tmp_path):
    res = {"package": "tree", "target": "H200-1", "dry_run": True, "claims": [
        {"id": "a", "value": 1.0, "unit": "x", "paper_value": 8.0, "paper": "8x",
         "status": "predicted", "series": {"s": [[1, 2], [3, 4]]}}]}
    paths = repro.write(res, str(tmp_path / "out"), plots=False)
    assert [Path(p).name for p in paths] == ["repro_tree_H200-1_dry.json"]
    assert json.loads(Path(paths[0]).read_text())["claims"][0]["value"] == 1.0
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_unknown_package_and_target_are_named():
    with pytest.raises(ValueError, match="pkg"):
        repro.package_dir("flash")


# ---------------------------------------------------------------------------------------------
# checkout or installed wheel


def _spec_at(monkeypatch, pkg, where):
    """``longattn.<pkg>`` found at ``where`` (None: not importable)."""
    real = repro.importlib.util.find_spec

    def find_spec(name, *a):
        if name != f"longattn.{pkg}":
            return real(name, *a)
        if where is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(where)]
        return spec

    monkeypatch.setattr(repro.importlib.util, "find_spec", find_spec)


def test_the_checkout_first_then_the_installed_scripts(tmp_path, monkeypatch):
    checkout = tmp_path / "repo" / "tree"
    src = checkout / "src" / "longattn" / "tree"
    wheel = tmp_path / "site-packages" / "longattn" / "tree"
    for d in (src, wheel / "scripts" / "targets"):
        d.mkdir(parents=True)
    _spec_at(monkeypatch, "tree", wheel)  # a wheel: its scripts/
    assert repro.search_path("tree") == [wheel / "scripts"]
    assert repro.package_dir("tree") == wheel / "scripts"
    _spec_at(monkeypatch, "tree", src)  # a source tree without targets/: named, not used
    assert repro.search_path("tree") == [checkout, src / "scripts"]
    with pytest.raises(ValueError, match="no targets folder"):
        repro.package_dir("tree")
    (checkout / "targets").mkdir()
    assert repro.package_dir("tree") == checkout


def test_not_installed_the_checkout_common_comes_from(monkeypatch):
    """common's own tests run without the paper packages: their folders in this checkout."""
    _spec_at(monkeypatch, "hyper", None)
    assert ROOT / "hyper" in repro.search_path("hyper")
    assert repro.package_dir("hyper") == ROOT / "hyper"


def _wheel_copy(tmp_path, keep):
    """tree's H100-1 folder laid out as an installed wheel's scripts/, with only the measured
    files of the GPUs in ``keep``."""
    dst = tmp_path / "longattn" / "tree" / "scripts"
    folder = dst / "targets" / "H100-1"
    shutil.copytree(ROOT / "tree" / "targets" / "H100-1", folder)
    for m in json.loads((folder / "target.json").read_text())["measured"]:
        if any(repro.same_gpu(m["device"], k) for k in keep):
            (dst / m["file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / "tree" / m["file"], dst / m["file"])
    return folder


def test_a_wheel_lacking_a_measured_file_says_so(tmp_path):
    """In a checkout a missing measured file is an error (test_schema_breaks_are_named); an
    installed wheel that lacks one answers "not measured yet", saying why."""
    folder = _wheel_copy(tmp_path, keep=["NVIDIA H200"])
    assert repro.installed(folder.parents[1]) and not repro.installed(ROOT / "tree")
    repro.check_folder(folder)
    spec, sweep, _, got = repro.load_target("tree", "H100-1", folder.parents[1])
    assert got == folder
    ctx = repro.Context("tree", "H100-1", spec, sweep, repro.hardware(spec), False, folder)
    assert ctx.measured_file() is None
    assert "results not in the wheel" in ctx.not_measured("why")
    h200 = ctx.measured_file("NVIDIA H200")
    assert h200 is not None and ctx.not_measured("why", "NVIDIA H200") == "why"
    assert ctx.load(h200["file"])
    missing = next(m for m in spec["measured"] if repro.same_gpu(m["device"], "NVIDIA H100"))
    with pytest.raises(ValueError, match="not in the installed wheel"):
        ctx.load(missing["file"])
    full = _wheel_copy(tmp_path / "full", keep=["NVIDIA H100", "NVIDIA H200"])
    ctx = repro.Context("tree", "H100-1", spec, sweep, repro.hardware(spec), False, full)
    assert ctx.measured_file() is not None and ctx.not_measured("why") == "why"


def _wheel_config(pkg):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(ROOT / pkg / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]


def _ships(cfg, rel):
    """Whether the wheel carries the file ``rel`` of the package folder: hatch's only-include,
    then artifacts (kept even when excluded), else not excluded (an anchored pattern also
    excludes what lies under the folder it names)."""
    path = PurePosixPath("/" + rel)
    if not any(rel == d or rel.startswith(d + "/") for d in cfg["only-include"]):
        return False
    if any(path.match(a) for a in cfg.get("artifacts", [])):
        return True
    return not any(any(p.match(e) for p in [path, *path.parents[:-1]]) if e.startswith("/")
                   else path.match(e) for e in cfg["exclude"])


@pytest.mark.parametrize("pkg", repro.PACKAGES)
def test_the_wheel_carries_the_targets_and_the_json_they_name(pkg):
    """Where package_dir looks in an installed package (longattn/<pkg>/scripts/), the wheel
    puts targets/ and bench/, with every committed JSON a target names."""
    cfg = _wheel_config(pkg)
    assert cfg["sources"]["targets"] == f"longattn/{pkg}/scripts/targets"
    assert cfg["sources"]["bench"] == f"longattn/{pkg}/scripts/bench"
    files = sorted(str(p.relative_to(ROOT / pkg)) for p in (ROOT / pkg / "targets").rglob("*")
                   if p.is_file())
    for t in repro.TARGETS:
        spec = json.loads((ROOT / pkg / "targets" / t / "target.json").read_text())
        files += [m["file"] for m in spec["measured"]]
    assert files and [f for f in files if not _ships(cfg, f)] == []
    assert not _ships(cfg, "bench/results/not_named.json")  # only those


def test_the_claims_table_fits_100_columns():
    """The printed claims wrap (the paper's words are long), never cut."""
    paper = "270x (the seed's figure, one A10, vs Triton FlashAttention-2) " * 2
    res = {"package": "hyper", "target": "H200-1", "dry_run": True,
           "claims": [{"id": "speedup_noncausal_fwd", "value": None, "unit": "x",
                       "status": "not measured yet", "paper": paper},
                      {"id": "speedup_causal_fwd_bwd", "value": 12.25, "unit": "x",
                       "status": "measured", "paper": "16x"}]}
    text = repro._table(res)
    assert max(map(len, text.splitlines())) <= 100, text
    assert text.split().count("FlashAttention-2)") == 2 and "12.25 x" in text
