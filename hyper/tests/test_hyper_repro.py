"""hyper's hardware targets through longattn.common.repro: the checks every package shares
(longattn.common.repro_checks), H200-1's speedups from the H200 JSON, and the dry run's sweep."""

import json
import math

import pytest

from longattn.common import repro
from longattn.common import repro_checks as rc

PKG = "hyper"


def test_measured_from_the_committed_json_of_the_same_gpu():
    _, c = rc.run_checked(PKG, "H200-1")
    rows = json.loads((repro.package_dir(PKG) / "bench/results/h200/bench_hyper.json")
                      .read_text())
    ms = {(r["method"], r["what"]): r["median_ms"] for r in rows}
    assert c["speedup_causal_fwd"]["value"] == pytest.approx(
        ms[("exact (cuDNN SDPA)", "causal")] / ms[("hyper", "causal")], rel=1e-3)
    assert c["speedup_noncausal_fwd"]["error"]["rel_err_out"] > 0
    _, mi = rc.run_checked(PKG, "MI300X-1")
    assert {v["status"] for v in mi.values()} == {"not measured yet"}


def test_dry_run_runs_the_sweep_on_tiny_shapes():
    """The dry run calls hyper on the sweep's tiny shapes (torch path) and records the error
    against exact attention for each."""
    res = repro.run(PKG, "H200-1", dry_run=True)
    assert len(res["rows"]) == 2 * len(repro.load_target(PKG, "H200-1")[2]["seq_lens"])
    assert all(math.isfinite(r["rel_err_out"]) for r in res["rows"])


# the claims of H100-1 read from the committed H100 JSON
FROM_H100 = ["speedup_causal_fwd", "speedup_causal_fwd_bwd", "speedup_noncausal_fwd"]

# the checks every package's targets share
(test_dry_run, test_the_results_page_json_is_current,
 test_found_in_the_checkout_or_the_installed_wheel, test_the_command_outside_the_checkout,
 test_a_wheel_without_the_h100_json_says_so) = rc.shared_tests(PKG, __file__, FROM_H100)
