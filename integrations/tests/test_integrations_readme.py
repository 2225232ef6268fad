"""The README's training scripts: the exact lines, on 4 CPU ranks.

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
