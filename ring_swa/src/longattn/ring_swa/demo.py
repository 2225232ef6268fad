"""Demo rows (entry point group ``longattn.demo``): ring SWA, streaming sinks and varlen on a CPU
world of 4 gloo ranks, forward + backward in float64 against ``longattn.reference``.

``rel_err`` is the largest relative error over out, dq, dk, dv; ``time_ms`` the slowest rank's
forward + backward; ``bytes`` the most K/V (+ dK/dV) bytes one rank sent.
"""

from __future__ import annotations

WORLD = 4


def _cases():
    base = dict(n=WORLD, hq=4, hkv=2, d=16, dtype="float64")
    return [
        ("ring_sliding_window_attn", "SWA w=M+1 (2 hops), GQA",
         dict(base, kind="dense", b=2, m=32, window=33, ns=0, seed=1)),
        ("ring_streaming_llm_attn", "window 20 + 4 sinks",
         dict(base, kind="dense", b=2, m=32, window=20, ns=4, seed=2)),
        ("ring_sliding_window_attn_varlen", "6 seqs (one of 1 token), uneven ranks",
         dict(base, kind="varlen", lengths=[40, 1, 17, 33, 9, 28], counts=[30, 41, 25, 32],
              window=24, ns=0, seed=3)),
        ("ring_streaming_llm_attn_varlen", "per-sequence sinks (2), w=12",
         dict(base, kind="varlen", lengths=[40, 1, 17, 33, 9, 28], counts=[32] * 4, window=12,
              ns=2, seed=4)),
    ]


def _shape(case):
    if case["kind"] == "dense":
        return f"B{case['b']} S{case['n'] * case['m']} H{case['hq']}/{case['hkv']} D{case['d']}"
    return f"T{sum(case['lengths'])} ({len(case['lengths'])} seqs) H{case['hq']}/{case['hkv']}"


def rows(run_world):
    from longattn.ring_swa.cases import errors, run_cases

    cases = _cases()
    # the first case runs twice: its first run pays the one-off imports / allocations
    results = run_world(WORLD, run_cases, [cases[0][2]] + [c for _, _, c in cases])
    results = [r[1:] for r in results]
    out = []
    for i, (method, what, case) in enumerate(cases):
        per_rank = [r[i] for r in results]
        sent = [sum(nb for kind, _, nb in r["fwd"] + r["bwd"] if kind == "send")
                for r in per_rank]
        out.append({"method": f"ring_swa.{method}", "what": what, "shape": _shape(case),
                    "rel_err": max(errors(per_rank, case).values()),
                    "time_ms": max(r["ms"] for r in per_rank), "bytes": max(sent)})
    return out
