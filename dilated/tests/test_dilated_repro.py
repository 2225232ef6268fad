"""dilated's hardware targets through longattn.common.repro: the checks every package shares
(longattn.common.repro_checks), and H200-1's runtime flatness and dense crossover."""

import json

import pytest

from longattn.common import repro
from longattn.common import repro_checks as rc

PKG = "dilated"


def test_predicted_and_measured_from_the_committed_json():
    res, c = rc.run_checked(PKG, "H200-1")
    rows = json.loads((repro.package_dir(PKG) / "bench/results/bench_dilated_h200.json")
                      .read_text())
    ns = [r["extra"]["ns_per_token"] for r in rows if r["what"] == "dilated fwd+bwd"]
    assert c["runtime_flatness_measured"]["value"] == pytest.approx(max(ns) / min(ns),
                                                                    rel=1e-3)
    x = c["dense_crossover"]["value"]
    # below the crossover dense is cheaper per token, above it dilated
    assert all((r["dense_ns_per_token"] < r["dilated_ns_per_token"]) == (r["S"] < x)
               for r in res["rows"])


def test_the_flatness_a_gpu_run_times():
    """What a run on a GPU of the target's model times (there with device cuda), on the CPU
    at a tiny size: ns per token at each length, B = tokens / S, finite and positive."""
    from longattn.dilated import repro as dr

    spec = json.loads((repro.package_dir(PKG) / "targets/H200-1/target.json").read_text())
    sw = dict(spec["sweep"], segments=[16, 32], rates=[1, 2], dtype="float32", heads=2,
              head_dim=8)
    ns, dev = dr.measure_flatness(sw, device="cpu", tokens=512, lengths=(128, 256))
    assert sorted(ns) == [128, 256] and all(0 < x < float("inf") for x in ns.values())
    assert dev.startswith("cpu")
    assert dr.MEASURE_LENGTHS == tuple(1 << p for p in range(15, 21))


# the claims of H100-1 read from the committed H100 JSON
FROM_H100 = ["runtime_flatness_measured"]

# the checks every package's targets share
(test_dry_run, test_the_results_page_json_is_current,
 test_found_in_the_checkout_or_the_installed_wheel, test_the_command_outside_the_checkout,
 test_a_wheel_without_the_h100_json_says_so) = rc.shared_tests(PKG, __file__, FROM_H100)
