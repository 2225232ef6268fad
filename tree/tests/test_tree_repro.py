"""tree's hardware targets through longattn.common.repro: the checks every package shares
(longattn.common.repro_checks), and H100-1's local step and ring bytes from the committed JSON."""

import json

import pytest

from longattn.common import repro
from longattn.common import repro_checks as rc

PKG = "tree"


def test_predicted_and_measured_from_the_committed_json():
    res, c = rc.run_checked(PKG, "H100-1")
    h100 = json.loads((repro.package_dir(PKG) / "bench/results/bench_tree.json").read_text())
    auto = next(r for r in h100 if r["method"] == "tree.tree_local_auto")
    assert c["local_step_ms"]["status"] == "measured"
    assert c["local_step_ms"]["value"] == pytest.approx(auto["median_ms"], rel=1e-3)
    for r in res["rows"]:  # ring moves p - 1 whole shards, tree two statistics all-reduces
        shard = 2 * r["context"] / r["gpus"] * 16 * 128 * 2
        assert r["ring_sent_bytes"] == pytest.approx((r["gpus"] - 1) * shard)
        assert r["ring_ms"] > r["tree_ms"]
    _, mi = rc.run_checked(PKG, "MI300X-1")
    assert mi["local_step_ms"]["status"] == "not measured yet"


# the claims of H100-1 read from the committed H100 JSON
FROM_H100 = ["local_step_ms"]

# the checks every package's targets share
(test_dry_run, test_the_results_page_json_is_current,
 test_found_in_the_checkout_or_the_installed_wheel, test_the_command_outside_the_checkout,
 test_a_wheel_without_the_h100_json_says_so) = rc.shared_tests(PKG, __file__, FROM_H100)
