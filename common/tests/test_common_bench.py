"""longattn.common.bench: CPU timing, the JSON result schema (round trip), tables, output
folders, progress bars and plots."""

from __future__ import annotations

import json
import time

import pytest
import torch

from longattn.common import bench as B


def test_time_fn_on_cpu_warms_up_and_repeats():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = B.time_fn(fn, warmup=2, rep=5)
    assert len(calls) == 7
    assert isinstance(ms, float) and ms >= 2.0  # a 2 ms sleep never measures shorter
    assert B.time_fn(lambda: None, device="cpu", warmup=0, rep=3) >= 0.0


def test_time_fn_returns_the_median():
    seq = iter([0.0, 0.0, 0.03, 0.001, 0.001])  # warm-up, then 3 timed: 30 ms, 1 ms, 1 ms

    def fn():
        time.sleep(next(seq))

    ms = B.time_fn(fn, warmup=2, rep=3)
    assert 1.0 <= ms < 30.0


def test_time_interleaved_alternates_and_reports_spread():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    res = B.time_interleaved(fns, rounds=3, warmup=0, rep=1)
    assert order == ["a", "b"] * 3
    assert set(res) == {"a", "b", "a spread", "b spread"}
    assert res["a spread"] >= 1.0 and res["b"] >= 0.0


def test_result_schema():
    r = B.result("ring", "forward", median_ms=2.0, shape={"S": 1024, "H": 8},
                 dtype=torch.bfloat16, flops=4e12, bytes_moved=123, target="H100-1",
                 device="cpu", note="x")
    assert tuple(r) == B.SCHEMA_KEYS or set(r) == set(B.SCHEMA_KEYS)
    assert r["method"] == "ring" and r["what"] == "forward" and r["target"] == "H100-1"
    assert r["dtype"] == "bfloat16" and r["shape"] == {"S": 1024, "H": 8}
    assert r["tflops"] == pytest.approx(4e12 / 2e-3 / 1e12)
    assert r["bytes_moved"] == 123 and r["extra"] == {"note": "x"}
    assert r["device"].startswith("cpu") and r["torch"] == torch.__version__
    assert len(r["date"]) == 10
    assert r["git_sha"] is None or isinstance(r["git_sha"], str)
    json.dumps(r)  # serialisable as is
    r2 = B.result("m", "w", median_ms=None, flops=1e9)
    assert r2["tflops"] is None and r2["median_ms"] is None and r2["dtype"] is None


def test_write_read_round_trip(tmp_path):
    rows = [B.result("a", "fwd", median_ms=1.5, shape={"S": 8}, dtype=torch.float32),
            B.result("b", "bwd", median_ms=3.0, flops=1e9, extra_field=[1, 2])]
    path = B.write_results(rows, tmp_path / "sub" / "dir" / "res.json")
    back = B.read_results(path)
    assert back == json.loads(json.dumps(rows))
    for r in back:
        assert all(k in r for k in B.SCHEMA_KEYS)


def test_write_results_rejects_rows_missing_schema_keys(tmp_path):
    bad = {"method": "x"}
    with pytest.raises(ValueError, match="lacks keys"):
        B.write_results([bad], tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_out_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    d = B.out_dir(str(tmp_path / "default"))
    assert d == str(tmp_path / "default") and (tmp_path / "default").is_dir()
    monkeypatch.setenv("OUT", str(tmp_path / "env"))
    assert B.out_dir(str(tmp_path / "default")) == str(tmp_path / "env")
    assert B.out_dir(str(tmp_path / "default"), str(tmp_path / "cli")) == str(tmp_path / "cli")
    assert (tmp_path / "env").is_dir() and (tmp_path / "cli").is_dir()


def test_format_table():
    rows = [{"method": "ring", "ms": 1.234567, "bytes": None},
            {"method": "tasp-long-name", "ms": 12.0, "bytes": 42}]
    t = B.format_table(rows)
    lines = t.splitlines()
    assert lines[0].split() == ["method", "ms", "bytes"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "1.235" in lines[2] and "12" in lines[3] and "42" in lines[3]
    assert all(len(line) == len(lines[1]) for line in lines)  # aligned columns
    assert B.format_table([]) == "(no rows)"
    assert B.format_table(rows, ["ms"]).splitlines()[0].strip() == "ms"


def test_format_table_wraps_to_a_width():
    rows = [{"what": "merge of four ranks' key-shard partials " * 3, "ms": 1.5},
            {"what": "short", "ms": 2.0}]
    wide = B.format_table(rows)
    assert len(wide.splitlines()) == 4 and max(map(len, wide.splitlines())) > 60
    t = B.format_table(rows, width=60)
    lines = t.splitlines()
    assert max(map(len, lines)) <= 60 and len(lines) > 4  # wrapped onto continuation lines
    assert " ".join(t.split()).count("key-shard") == 3  # words kept whole, nothing lost
    assert lines[-1].split() == ["short", "2"]


def test_progress_yields_every_item():
    assert list(B.progress(range(5), desc="sweep")) == [0, 1, 2, 3, 4]
    assert list(B.progress(iter("abc"), total=3)) == ["a", "b", "c"]


def test_progress_is_quiet_without_a_tty(capsys):
    import tqdm  # noqa: F401  (in the test extra: the bar, not the plain iterable, is tested)

    bar = B.progress(range(50), desc="quiet")
    assert bar.disable  # before iterating (closing sets it too): captured stderr is no terminal
    assert list(bar) == list(range(50))
    assert capsys.readouterr().err == ""


def test_plot_lines_writes_a_png(tmp_path):
    path = B.plot_lines({"ring": ([1, 2, 4], [1.0, 2.0, 4.0]), "tasp": ([1, 2, 4], [1, 1.5, 2])},
                        tmp_path / "p" / "plot.png", xlabel="GPUs", ylabel="ms", title="t",
                        logx=True, logy=True)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_device_name_and_git_sha():
    assert B.device_name().startswith("cpu")
    assert B.device_name("cpu").startswith("cpu")
    sha = B.git_sha()
    assert sha is None or (isinstance(sha, str) and len(sha) >= 7)


def test_git_sha_marks_edits(tmp_path, monkeypatch):
    """A tree with edits on top of its commit says so: the commit alone would name code that
    did not run."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        return
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["-C", str(tmp_path), "add", "a.py"], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-qm", "a"], check=True)
    monkeypatch.chdir(tmp_path)
    clean = B.git_sha()
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "a.py").write_text("x = 2\n")
    assert B.git_sha() == clean  # asked once per directory and process
    B._git_sha.cache_clear()
    assert B.git_sha() == clean + "+dirty"


def test_parse_backends_keeps_order_drops_repeats_and_names_the_option():
    assert B.parse_backends("auto, torch,auto,,torch") == ["auto", "torch"]
    assert B.parse_backends("fa4", allowed=("fa4",)) == ["fa4"]
    with pytest.raises(ValueError, match="--backends.*nope"):
        B.parse_backends("auto,nope")
    with pytest.raises(ValueError, match="--backends"):
        B.parse_backends(" , ")
    with pytest.raises(ValueError, match="not among auto, fa4"):
        B.parse_backends("torch", allowed=("fa4",))


def test_backend_dtype_runs_half_precision_backends_in_bf16_or_says_why():
    from longattn.common.kernels import fa4_backend
    from longattn.common.testing import Fa4Standin

    assert B.backend_dtype("auto", "cpu", torch.float64, 16) == (torch.float64, None)
    assert B.backend_dtype("torch", "cpu", torch.float64, (16, 32)) == (torch.float64, None)
    dt, why = B.backend_dtype("fa4", "cpu", torch.float32, 16)
    if fa4_backend.MISSING is not None:  # this machine: the package is not installed
        assert dt is None and "flash-attn-4" in why
    with fa4_backend.use(Fa4Standin(), arch=90, device_type="cpu"):
        assert B.backend_dtype("fa4", "cpu", torch.float32, (64, 128)) == (torch.bfloat16, None)
        assert B.backend_dtype("fa4", "cpu", torch.float16, 64) == (torch.float16, None)
        dt, why = B.backend_dtype("fa4", "cpu", torch.float32, (64, 12))
        assert dt is None and "head_dim 12" in why
    with fa4_backend.use(Fa4Standin(), arch=80, device_type="cpu"):
        dt, why = B.backend_dtype("fa4", "cpu", torch.bfloat16, 64)
        assert dt is None and "sm90" in why


def test_backend_tag_leaves_auto_rows_named_as_before():
    assert B.backend_tag("dilated fwd", "auto") == "dilated fwd"
    assert B.backend_tag("dilated fwd", "fa4") == "dilated fwd [fa4]"


def test_parse_backends_names_the_option_it_parses():
    with pytest.raises(ValueError, match="--leaf-backend: \\['x'\\] not among auto, fa4"):
        B.parse_backends("auto,x", ("auto", "fa4"), option="--leaf-backend")


def test_draw_documents_and_cu_seqlens():
    lens = B.draw_documents(262144, 1024, 32768, seed=0)
    assert sum(lens) == 262144 and min(lens) >= 1024 and max(lens) <= 32768
    assert lens == B.draw_documents(262144, 1024, 32768, seed=0)
    assert lens != B.draw_documents(262144, 1024, 32768, seed=1)
    cu = B.cu_seqlens([3, 0, 5])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8]


def test_backends_option_parses_and_reports_through_argparse(capsys):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="auto", type=B.backends_option())
    ap.add_argument("--leaf", default="auto", type=B.backends_option(("fa4",), option="--leaf"))
    args = ap.parse_args([])
    assert args.backends == ["auto"] and args.leaf == ["auto"]
    assert ap.parse_args(["--backends", "auto,torch,auto"]).backends == ["auto", "torch"]
    with pytest.raises(SystemExit):
        ap.parse_args(["--leaf", "auto,torch"])
    assert "--leaf: ['torch'] not among auto, fa4" in capsys.readouterr().err


def test_usable_backends_says_what_runs_and_why_not():
    from longattn.common.kernels import fa4_backend
    from longattn.common.testing import Fa4Standin

    said = []
    with fa4_backend.use(Fa4Standin(), arch=90, device_type="cpu"):
        runs, status = B.usable_backends(["auto", "fa4"], "cpu", torch.float32, 64,
                                         say=said.append)
    assert runs == {"auto": torch.float32, "fa4": torch.bfloat16}
    assert status == {"auto": "ran", "fa4": "ran in bfloat16"}
    assert said == ["backend fa4: runs in bfloat16 (it serves no torch.float32)"]
    said.clear()
    with fa4_backend.use(Fa4Standin(), arch=80, device_type="cpu"):
        runs, status = B.usable_backends(["auto", "fa4"], "cpu", torch.bfloat16, 64,
                                         say=said.append, label="leaf backend")
    assert runs == {"auto": torch.bfloat16} and "needs sm90" in status["fa4"]
    assert said[0].startswith("leaf backend fa4 unavailable, left out: ")
