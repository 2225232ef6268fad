"""The demo rows (TASP, ring, zigzag ring on 4 ranks) are exact and report the right bytes."""

from longattn.common.testing import run_world
from longattn.hamilton.demo import HKV, WORLD, B, D, S, rows


def test_demo_rows():
    got = rows(run_world)
    assert [r["method"] for r in got] == ["hamilton.tasp", "hamilton.tasp", "hamilton.ring",
                                          "hamilton.zigzag_ring", "hamilton.allgather",
                                          "hamilton.ulysses", "hamilton.usp"]
    block = S // WORLD * B * HKV * 2 * D * 8  # one local K+V block in fp64
    for r in got:
        assert set(r) == {"method", "what", "shape", "rel_err", "time_ms", "bytes"}
        assert r["rel_err"] <= 1e-10, r
    for r in got[:4]:
        # forward: 3 steps of one block; backward: KV for 2 steps, dK/dV for 3
        assert r["bytes"] == (3 + 2 + 3) * block, r
    # allgather: the block to each of 3 peers, forward, and its gradient back
    assert got[4]["bytes"] == 2 * 3 * block
