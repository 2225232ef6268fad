"""The README's training scripts: the exact lines, on 4 CPU ranks; every ``longattn`` command
line of every README, in both option forms.

The README shows ``examples/quickstart.py`` (a packed batch under DDP over the context-parallel
ranks) and ``examples/train_2d.py`` (FSDP2 on a 2 x 2 data-parallel x context-parallel mesh)
verbatim (checked here). Each file runs unchanged (``runpy``) on every rank of the test
session's persistent 4-rank gloo world -- what torchrun would do, minus starting four fresh
interpreters: the world already has its process group, so the script's
``init_process_group("gloo")`` call is the one thing made a no-op. Every rank must print the
loss of the same model on the whole batch in one process.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
from pathlib import Path

import pytest
import torch

from longattn.common.testing import readme_python_blocks, run_world

HERE = Path(__file__).resolve().parent.parent
SCRIPTS = {"quickstart.py": "Quick start", "train_2d.py": "Data parallelism on top"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_readme_shows_the_script_verbatim_in_under_20_lines(name):
    blocks = [b for b in readme_python_blocks(HERE / "README.md", SCRIPTS[name])
              if f"torchrun --nproc_per_node=4 {name}" in b]
    assert len(blocks) == 1, f"the README must show {name} exactly once in its section"
    assert blocks[0] == (HERE / "examples" / name).read_text()
    code = [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(code) < 20, len(code)


def _docs(seed):
    torch.manual_seed(seed)
    return [{"input_ids": torch.randint(0, 1000, (n,)).tolist()} for n in (100, 37, 119)]


def _single_process_loss(name):
    """The scripts' model and documents (both replicas' for train_2d.py) in one process, with
    transformers' sdpa attention on the packed row."""
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    if name == "quickstart.py":  # the documents follow the model's initialisation
        docs = [{"input_ids": torch.randint(0, 1000, (n,)).tolist()} for n in (100, 37, 119)]
    else:
        docs = _docs(1) + _docs(2)
    # use_cache=False: with a cache, transformers does not detect packed documents (its
    # masks let them see each other)
    return model(**DataCollatorWithFlattening()(docs), use_cache=False).loss.item()


def _run_script(rank, world, path):
    import torch.distributed as dist

    out, init = io.StringIO(), dist.init_process_group
    dist.init_process_group = lambda *args, **kwargs: None  # the world's group is up already
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    finally:
        dist.init_process_group = init
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_script_runs_on_4_cpu_ranks(name):
    printed = run_world(4, _run_script, str(HERE / "examples" / name), timeout=240)
    ref = _single_process_loss(name)
    for rank, text in enumerate(printed):
        got = re.fullmatch(r"rank (\d): loss ([0-9.]+)\n", text)
        assert got and int(got.group(1)) == rank, text
        # printed with 6 decimals; a float32 model: the ranks' partial losses add up in another
        # order than one process's mean
        assert abs(float(got.group(2)) - ref) <= 2e-6 + 1e-6 * abs(ref), (rank, text, ref)


def test_results_table_is_the_committed_json():
    import json

    rows = json.loads((HERE / "results" / "demo.json").read_text())
    text = (HERE / "README.md").read_text()
    table = text[text.index("## Results"):]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "relative error" not in ln]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["what"].removeprefix("transformers "), (cells, row)
        assert cells[1] == row["shape"].removesuffix(" fp64"), (cells, row)
        assert cells[2] == f"{row['rel_err']:.1e}", (cells, row)
        assert cells[3] == f"{row['tol']:g}", (cells, row)
        assert cells[4] == ("" if row["bytes"] is None else str(row["bytes"])), (cells, row)


# ---------------------------------------------------------------------------------------------
# the command lines of every README


def _cli_examples():
    """``(readme, line)`` for every line of a bash block in a README that runs the ``longattn``
    command (or ``python -m longattn.integrations``), its comment dropped."""
    import shlex

    root = HERE.parent
    found = []
    for readme in sorted([root / "README.md", *root.glob("*/README.md")]):
        text, in_bash = readme.read_text(), False
        for line in text.splitlines():
            if line.startswith("```"):
                in_bash = line.strip() in ("```bash", "```sh", "```console")
                continue
            words = shlex.split(line, comments=True) if in_bash else []
            if words[:1] == ["longattn"] or words[:3] == ["python", "-m",
                                                          "longattn.integrations"]:
                found.append((readme.relative_to(root).as_posix(), words))
    return found


def _equals_form(words):
    """The same line with every ``--opt VALUE`` of one value written ``--opt=VALUE`` (None when
    it has no such option)."""
    out, i, changed = [], 0, False
    while i < len(words):
        w = words[i]
        one_value = (w.startswith("--") and "=" not in w and i + 1 < len(words)
                     and not words[i + 1].startswith("-")
                     and (i + 2 == len(words) or words[i + 2].startswith("-")))
        if one_value:
            out.append(f"{w}={words[i + 1]}")
            i, changed = i + 2, True
        else:
            out.append(w)
            i += 1
    return out if changed else None


def _cases():
    cases = []
    for readme, words in _cli_examples():
        cases.append(pytest.param(words, id=f"{readme}: {' '.join(words)}"))
        eq = _equals_form(words)
        if eq is not None:
            cases.append(pytest.param(eq, id=f"{readme}: {' '.join(eq)}"))
    return cases


def test_the_readmes_show_the_command():
    lines = [" ".join(w) for _, w in _cli_examples()]
    for cmd in ("--version", "list", "check", "demo", "bench", "repro"):
        assert any(ln.split()[1:2] == [cmd] or ln.endswith(f" {cmd}") for ln in lines), cmd


@pytest.mark.parametrize("words", _cases())
def test_readme_command_line_runs(words, monkeypatch, tmp_path, capsys):
    """The line, verbatim, through :func:`longattn.integrations.cli.main` in a scratch
    directory, with what it starts replaced by recorders: the rows (``check``/``demo``: one
    passing row), the GPU world and the script subprocess. It must parse, reach the right
    action with the line's values and exit 0."""
    from longattn.common import script_runner
    from longattn.integrations import cli, driver, gpu_world

    monkeypatch.chdir(tmp_path)
    seen = {}
    row = {"method": "m", "what": "w", "shape": "s", "rel_err": 0.0, "tol": 1e-10}

    def rows(only=None, run_world=None, log=print):
        seen["only"] = only
        return [row]

    monkeypatch.setattr(driver, "collect_rows", rows)
    monkeypatch.setattr(script_runner, "SCRIPT_NEEDS", {})  # parses with or without the plots
    monkeypatch.setattr(gpu_world, "run", lambda args: seen.setdefault("gpu", args) and 0)
    monkeypatch.setattr(script_runner.subprocess, "call",
                        lambda cmd, cwd: seen.setdefault("script", cmd) and 0)
    argv = words[3:] if words[0] == "python" else words[1:]
    if argv == ["--version"]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0 and "longattn-integrations" in capsys.readouterr().out
        return
    assert cli.main(argv) == 0
    flat = " ".join(argv)
    if argv[0] == "demo":
        out = argv[argv.index("--out") + 1] if "--out" in argv else flat.split("--out=")[1]
        assert (tmp_path / out / "demo.json").is_file()
    if argv[0] == "check" and "--only" in flat:
        assert seen["only"] == argv[argv.index("--only") + 1:]  # the line's last option
    if "--gpu-world" in flat:
        assert seen["gpu"].gpu_world
    if argv[0] in ("bench", "repro"):
        script = seen["script"]
        assert script[1].endswith(f"{argv[0]}_hamilton.py")
        assert "--out" in script or any(a.startswith("--out=") for a in script)
