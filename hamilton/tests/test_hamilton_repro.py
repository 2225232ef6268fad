"""hamilton's hardware targets through longattn.common.repro: the checks every package shares
(longattn.common.repro_checks), and MI300X-1's TASP claims predicted from the H200 step times."""

import pytest

from longattn.common import repro_checks as rc

PKG = "hamilton"


def test_predicted_from_the_h200_step_times():
    res, c = rc.run_checked(PKG, "MI300X-1")
    # every row's ring and TASP times are the model's; the claim is their mean ratio
    full = [r["ring_ms"] / r["tasp_ms"] for r in res["rows"] if r["mask"] == "full"]
    assert c["tasp_full_mean"]["value"] == pytest.approx(sum(full) / len(full), rel=1e-3)
    assert c["tasp_full_max"]["value"] == pytest.approx(max(full), rel=1e-3)
    assert c["tasp_full_mean"]["status"] == "predicted"
    assert c["tasp_full_measured"]["status"] == "not measured yet"
    # full mesh: TASP uses all 7 links, so it is never slower than ring in the model
    assert min(full) >= 1.0


# the checks every package's targets share
(test_dry_run, test_the_results_page_json_is_current,
 test_found_in_the_checkout_or_the_installed_wheel,
 test_the_command_outside_the_checkout) = rc.shared_tests(PKG, __file__)
