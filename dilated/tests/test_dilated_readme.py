"""The README's quick start runs as written (the code block is extracted and executed), and the
API block spells the public keyword names."""

import inspect
from pathlib import Path

from longattn.common.testing import readme_python_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    blocks = readme_python_blocks(README)
    assert len(blocks) == 2, "the quick start holds the runnable block and the group example"
    return blocks[0]


def test_readme_quick_start_runs():
    ns: dict = {}
    exec(compile(quick_start(), str(README), "exec"), ns)  # noqa: S102 - our own README
    assert ns["out"].shape == (2, 100, 4, 16)
    assert ns["logits"].shape == (2, 100, 50)


def test_readme_names_the_public_signatures():
    from longattn.dilated import (
        DilatedAttention,
        FusedConfig,
        LongNet,
        LongNetLM,
        MultiheadDilatedAttention,
        dilated_attention,
    )

    text = README.read_text()
    api = text.split("## API", 1)[1].split("\n## ", 1)[0]
    positional = {"self", "q", "k", "v", "query", "key", "value", "x", "segment_lengths",
                  "dilation_rates", "embed_dim", "num_heads", "num_tokens"}
    for fn in (dilated_attention, DilatedAttention, DilatedAttention.forward, FusedConfig,
               MultiheadDilatedAttention, MultiheadDilatedAttention.forward, LongNet,
               LongNet.forward, LongNetLM.forward):
        for name in inspect.signature(fn).parameters:
            assert f"{name}=" in api or name in positional, (fn.__qualname__, name)
    for old in ("is_causal=False, scale", "build_plan", "FUSED", "fused.ROWS"):
        assert old not in text
