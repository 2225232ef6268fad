"""The README is a user guide a clone can follow: its quick start runs as written (the code
block is extracted and executed), it spells the public keyword names, the aten table's figures
are the committed JSON's, and no file of the package points outside the repository's own
files (design notes, issue threads)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from longattn.common.testing import readme_python_blocks

PKG = Path(__file__).resolve().parents[1]
ROOT = PKG.parent
README = PKG / "README.md"


def quick_start() -> str:
    blocks = readme_python_blocks(README)
    assert len(blocks) == 1, "the quick start holds one python block"
    return blocks[0]


def test_readme_quick_start_runs():
    ns: dict = {}
    exec(compile(quick_start(), str(README), "exec"), ns)  # noqa: S102 - our own README
    assert ns["out"].shape == (1, 256, 8, 64) and ns["lse"].shape == (1, 8, 256)
    assert ns["qg"].grad is not None


def test_readme_names_the_public_signatures():
    from longattn.common import kernels as K
    from longattn.common.kernels import varlen as V

    text = README.read_text()
    for fn in (K.attention_forward, K.attention_backward, K.attention, K.pick_backend,
               V.attention_forward_varlen, V.attention_backward_varlen, V.attention_varlen):
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind == p.KEYWORD_ONLY:
                assert f"{name}=" in text, f"{fn.__name__}: {name}"
    for record in (K.BandConfig(), K.TorchConfig()):
        for name in record.__dataclass_fields__:
            assert f"{name}=" in text, f"{type(record).__name__}.{name}"


def test_readme_table_figures_are_the_committed_json():
    rows = json.loads((PKG / "bench" / "results" / "h200" / "bench_kernels.json").read_text())
    text = README.read_text()
    table = [ln for ln in text.splitlines() if re.match(r"\| \d+ \| (yes|no) \|", ln)]
    assert len(table) == 3
    for ln in table:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        s, causal = int(cells[0]), cells[1] == "yes"
        shown = [re.match(r"[\d.]+", cells[i]).group(0) for i in (2, 3, 5, 6)]
        whats = ["cudnn sdpa fwd", "longattn aten fwd", "cudnn sdpa fwd+bwd",
                 "longattn aten fwd+bwd"]
        for what, fig in zip(whats, shown):
            (r,) = [r for r in rows if r["what"] == what and r["shape"]["S"] == s
                    and r["shape"]["causal"] == causal]
            decimals = len(fig.split(".")[1]) if "." in fig else 0
            assert abs(r["median_ms"] - float(fig)) <= 0.5 * 10 ** -decimals + 1e-12, (what, s)


def test_readme_cites_files_that_exist():
    for path in re.findall(r"`((?:common|ring_swa)/bench/results/[\w./]+)`", README.read_text()):
        assert (ROOT / path).is_file(), path


FORBIDDEN = [r"shared/", r"DESIGN\.md", r"closing note", r"\bissue \d", r"foundation issue"]


@pytest.mark.parametrize("pattern", FORBIDDEN)
def test_no_pointers_outside_the_repository(pattern):
    files = [README, *sorted((PKG / "src").rglob("*.py")), *sorted((PKG / "bench").glob("*.py")),
             *sorted((PKG / "bench").glob("*.sh")),
             *[p for p in sorted((PKG / "tests").glob("*.py")) if p.name != Path(__file__).name]]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line, flags=re.I)]
    assert not hits, hits
