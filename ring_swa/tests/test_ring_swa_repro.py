"""ring_swa's hardware targets through longattn.common.repro: the checks every package shares
(longattn.common.repro_checks), and H200-1's local-vs-dense claim and window costs."""

import json

import pytest

from longattn.common import repro
from longattn.common import repro_checks as rc

PKG = "ring_swa"


def test_predicted_and_measured_from_the_committed_json():
    res, c = rc.run_checked(PKG, "H200-1")
    rows = json.loads((repro.package_dir(PKG) / "bench/results/h200/bench_ring_swa.json")
                      .read_text())
    ms = {r["what"]: r["median_ms"] for r in rows}
    assert c["local_vs_dense_fwd_bwd"]["value"] == pytest.approx(
        ms["cudnn dense causal fwd+bwd"] / ms["ring_swa local fwd+bwd"], rel=1e-3)
    for r in res["rows"]:  # a window narrower than the sequence is cheaper than dense
        assert r["ring_swa_ms"] < r["dense_ring_ms"]
        assert r["ring_swa_kv_bytes"] <= r["dense_ring_kv_bytes"]


# the claims of H100-1 read from the committed H100 JSON
FROM_H100 = ["local_vs_dense_fwd_bwd"]

# the checks every package's targets share
(test_dry_run, test_the_results_page_json_is_current,
 test_found_in_the_checkout_or_the_installed_wheel, test_the_command_outside_the_checkout,
 test_a_wheel_without_the_h100_json_says_so) = rc.shared_tests(PKG, __file__, FROM_H100)
