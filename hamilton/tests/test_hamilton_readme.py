"""The README's quick start runs as written (its code block is extracted and executed) in one
process without torch.distributed and on every rank of gloo worlds of 2 and 4 ranks; the API
block spells every keyword of the public signatures."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from longattn.common.testing import run_world

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quick start holds one python block"
    return blocks[0]


def _run(code: str) -> dict:
    ns: dict = {"__name__": "__main__"}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own README
    return ns


def _run_on_rank(rank, n, code):
    ns = _run(code)
    return tuple(ns["out"].shape), tuple(ns["full"].shape), ns["ql"].grad is not None


def test_quick_start_one_process():
    import torch.distributed as dist

    assert not dist.is_initialized()
    ns = _run(quick_start())
    assert ns["group"] is None and ns["full"].shape == (1, 96, 8, 32)


@pytest.mark.parametrize("n", [2, 4])
def test_quick_start_in_a_world(n):
    for out_shape, full_shape, has_grad in run_world(n, _run_on_rank, quick_start()):
        assert out_shape == (1, 96 // n, 8, 32) and full_shape == (1, 96, 8, 32) and has_grad


def test_readme_names_the_public_signatures():
    from longattn.hamilton import HamiltonConfig, hamilton_attn, shard, unshard

    text = README.read_text()
    for fn in (hamilton_attn, shard, unshard):
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind is p.KEYWORD_ONLY:
                assert f"{name}=" in text, (fn.__name__, name)
    for name in inspect.signature(HamiltonConfig).parameters:
        assert f"{name}=" in text, name
