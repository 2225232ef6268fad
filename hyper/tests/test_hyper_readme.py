"""The README's quick start runs as written (the code block is extracted and executed)."""

from pathlib import Path

from longattn.common.testing import readme_python_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    blocks = readme_python_blocks(README)
    assert len(blocks) == 1, "the quick start holds one python block"
    return blocks[0]


def test_readme_quick_start_runs():
    ns: dict = {}
    exec(compile(quick_start(), str(README), "exec"), ns)  # noqa: S102 - our own README
    assert ns["out"].shape == (1, 1024, 4, 64)


def test_readme_names_the_public_signature():
    # the API block spells the public signatures' keyword names
    import inspect

    from longattn.hyper import HyperAttention, hyper_attention

    text = README.read_text()
    for name in inspect.signature(hyper_attention).parameters:
        assert f"{name}=" in text or name in ("q", "k", "v"), name
    for name in inspect.signature(HyperAttention.forward).parameters:
        assert f"{name}=" in text or name in ("self", "q", "k", "v"), name
