"""The demo rows (run in-process here; the demo runs the cases on 4 gloo ranks in parallel)."""

from longattn.hyper.demo import CASES, rows, run_case


def test_demo_rows_match_oracle():
    def serial_world(n, fn, cases):
        return [fn(r, n, cases) for r in range(n)]

    out = rows(serial_world)
    assert len(out) == len(CASES)
    for r in out:
        assert set(r) == {"method", "what", "shape", "rel_err", "time_ms", "bytes"}
        assert r["rel_err"] < 1e-10 and r["bytes"] is None and r["time_ms"] > 0, r
    assert run_case(len(CASES), len(CASES) + 1, CASES) is None  # idle extra rank
