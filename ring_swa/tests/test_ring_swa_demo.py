"""The demo rows run and pass the float64 oracle."""

from longattn.common.testing import run_world
from longattn.ring_swa.demo import rows


def test_demo_rows():
    got = rows(run_world)
    assert len(got) == 4
    for row in got:
        assert set(row) == {"method", "what", "shape", "rel_err", "time_ms", "bytes"}
        assert row["rel_err"] <= 1e-10, row
        assert row["bytes"] > 0
