"""bench/tune_hyper.py: its variants are HyperConfigs written at the command line, a name that
is not a field is refused, and without a GPU it stops saying so (it times only on CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longattn.common.testing import load_script
from longattn.hyper import HyperConfig

pytest.importorskip("triton")

TUNE = Path(__file__).resolve().parents[1] / "bench" / "tune_hyper.py"


def test_variants_are_hyper_configs():
    mod = load_script(TUNE)
    assert mod.parse_variant("default") == HyperConfig()
    assert mod.parse_variant(" fwd_tile=256, grad_accum=float32") == HyperConfig(
        fwd_tile=256, grad_accum="float32")
    assert [mod.parse_variant(v) for v in mod.DEFAULT_VARIANTS.split(";")] == [
        HyperConfig(), HyperConfig(grad_accum="float32"), HyperConfig(fwd_tile=256)]
    with pytest.raises(ValueError, match="bwd_tile"):
        mod.parse_variant("bwd_tile=128")
    with pytest.raises(ValueError, match="fwd_tile"):  # HyperConfig's own check
        mod.parse_variant("fwd_tile=100")


def test_stops_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        load_script(TUNE).main([])
