"""The target folders: the paper's sweep, servable by every configured schedule."""

from __future__ import annotations

import importlib.util
import os

import pytest

from longattn.hamilton.args import resolve_schedule
from longattn.hamilton.schedules import (
    multi_ring_schedule,
    ring_schedule,
    two_level_schedule,
    validate_schedule,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["H100-1", "H100-2", "H100-4", "MI300X-1"]


def _repro():
    spec = importlib.util.spec_from_file_location(
        "repro_hamilton", os.path.join(ROOT, "bench", "repro_hamilton.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dry_run", [False, True])
def test_sweep_is_servable(target, dry_run):
    repro = _repro()
    cfg = repro.load_config(target, dry_run)
    n = cfg["nodes"] * cfg["gpus_per_node"]
    configs = repro.sweep(cfg)
    assert configs and all(b * s <= cfg["max_tokens"] for _, s, b, _, _ in configs)
    if not dry_run:  # the paper's grid: 13 lengths, heads 20/4/12 at head dim 64
        assert [s for s in cfg["seq_multipliers"]] == [1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64,
                                                        96, 128]
        assert cfg["heads_dim"] == [[20, 64], [4, 64], [12, 64]]
        assert {s for _, s, _, _, _ in configs} == {k * cfg["basic_len"]
                                                    for k in cfg["seq_multipliers"]}
    scheds = {"ring": ring_schedule(n), "tasp": multi_ring_schedule(n),
              "two_level": two_level_schedule(cfg["nodes"], cfg["gpus_per_node"])}
    for s in scheds.values():
        validate_schedule(s)
    for mask, seqlen, _, _, _ in configs:
        for method in cfg["methods"][mask]:
            resolve_schedule(scheds[method], n, seqlen // n, mask == "causal")  # raises if not
