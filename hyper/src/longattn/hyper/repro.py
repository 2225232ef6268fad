"""hyper's answers to ``python -m longattn.common.repro hyper --target T``.

One GPU measures every claim: the speed-up of ``hyper_attention`` over exact attention (our
baseline: cuDNN SDPA through ``longattn.common.kernels``; the seed measured Triton
FlashAttention-2 on an A10) at S = 131,072, causal forward, causal forward+backward and
non-causal forward, with the relative error of ``out`` beside it (random Gaussian inputs: see
the README's Quality section for why it is large). Numbers come from this run on a GPU of the
target's model, else from the committed benchmark of that GPU model (``measured`` in the target
folder), else "not measured yet". A dry run times nothing: it checks the sweep on tiny shapes
with the torch path on the CPU and reports the error of each case against exact attention.
"""

from __future__ import annotations

CASES = (("speedup_causal_fwd", "causal", True, False),
         ("speedup_causal_fwd_bwd", "causal fwd+bwd", True, True),
         ("speedup_noncausal_fwd", "non-causal", False, False))
S_CLAIM = 131072


def _pairs(rows):
    """{(what, S): (exact row, hyper row)} of a bench_hyper.py JSON."""
    out = {}
    for r in rows:
        key = (r["what"], r["shape"]["S"])
        slot = 0 if r["method"].startswith("exact") else 1 if r["method"] == "hyper" else None
        if slot is not None:
            out.setdefault(key, [None, None])[slot] = r
    return {k: v for k, v in out.items() if None not in v}


def run(ctx):
    if ctx.dry_run:
        return _dry(ctx)
    if ctx.measure:
        return _measure(ctx)
    m = ctx.measured_file()
    pairs = _pairs(ctx.load(m["file"])) if m else {}
    for cid, what, _, _ in CASES:
        p = pairs.get((what, S_CLAIM))
        if p is None:
            ctx.answer(cid, None, "not measured yet", ctx.not_measured(
                f"no committed benchmark on a {ctx.hw.device}: python hyper/bench/bench_hyper.py"))
            continue
        ex, hy = p
        xs = sorted(s for (w, s) in pairs if w == what)
        series = {f"{what} (vs cuDNN SDPA)": (xs, [pairs[(what, s)][0]["median_ms"]
                                                   / pairs[(what, s)][1]["median_ms"]
                                                   for s in xs])}
        err = hy["extra"].get("rel_err_out")
        ctx.answer(cid, ex["median_ms"] / hy["median_ms"], "measured",
                   f"committed benchmark: exact {ex['median_ms']:.4g} ms / hyper "
                   f"{hy['median_ms']:.4g} ms", source=m["file"], device=hy["device"],
                   date=hy["date"], error={"rel_err_out": err,
                                           "rel_err_grad": hy["extra"].get("rel_err_grad")},
                   series=series, x="S (tokens)", y="speed-up over cuDNN SDPA", logy=True)
    return {}


def _inputs(sw, s, device, dtype, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(sw["batch"], s, sw["heads"], sw["head_dim"], generator=g,
                        device=device).to(dtype) for _ in range(3)]


def _hyper(sw, q, k, v, causal):
    from longattn.hyper import hyper_attention

    return hyper_attention(q, k, v, causal=causal, lsh_num_projs=sw["lsh_num_projs"],
                           block_size=sw["block_size"], sample_size=sw["sample_size"],
                           min_seq_len=sw["min_seq_len"])


def _dry(ctx):
    """The sweep's tiny shapes through the torch path: the error against exact attention."""
    import torch

    from longattn.common.kernels import attention
    from longattn.common.testing import rel_error

    sw = ctx.sweep
    rows = []
    for s in sw["seq_lens"]:
        q, k, v = _inputs(sw, s, "cpu", getattr(torch, sw["dtype"]))
        for causal in (True, False):
            with torch.no_grad():
                err = rel_error(_hyper(sw, q, k, v, causal), attention(q, k, v, causal=causal))
            rows.append({"S": s, "causal": causal, "rel_err_out": err})
    for cid, *_ in CASES:
        ctx.answer(cid, None, "not measured yet", "a dry run times nothing")
    return {"rows": rows}


def _measure(ctx):
    """Time hyper against exact attention on this machine's GPU over the sweep."""
    import torch

    from longattn.common import bench
    from longattn.common.kernels import attention
    from longattn.common.testing import rel_error

    sw = ctx.sweep
    dtype = getattr(torch, sw["dtype"])
    rows = []
    for s in sw["seq_lens"]:
        q, k, v = _inputs(sw, s, "cuda", dtype)
        for _, what, causal, backward in CASES:
            t = measure_case(sw, q, k, v, causal, backward, device="cuda")
            with torch.no_grad():
                err = rel_error(_hyper(sw, q, k, v, causal).float(),
                                attention(q, k, v, causal=causal).float())
            rows.append({"what": what, "S": s, **t, "rel_err_out": err})
    dev = bench.device_name("cuda")
    for cid, what, _, _ in CASES:
        mine = [r for r in rows if r["what"] == what]
        last = mine[-1]
        ctx.answer(cid, last["exact_ms"] / last["hyper_ms"], "measured",
                   f"timed by this run at S = {last['S']}", device=dev,
                   error={"rel_err_out": last["rel_err_out"]},
                   series={what: ([r["S"] for r in mine],
                                  [r["exact_ms"] / r["hyper_ms"] for r in mine])},
                   x="S (tokens)", y="speed-up over cuDNN SDPA", logy=True)
    return {"rows": rows}


def measure_case(sw, q, k, v, causal, backward, *, device):
    """{exact_ms, hyper_ms}: alternated rounds (bench.time_interleaved)."""
    import torch

    from longattn.common import bench
    from longattn.common.kernels import attention

    def call(fn):
        if not backward:
            def f():
                with torch.no_grad():
                    fn()
            return f
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))

        def fb():
            fn(qq, kk, vv).float().sum().backward()
        return fb

    exact = lambda *a: attention(*(a or (q, k, v)), causal=causal)  # noqa: E731
    hyper = lambda *a: _hyper(sw, *(a or (q, k, v)), causal)  # noqa: E731
    t = bench.time_interleaved({"exact": call(exact), "hyper": call(hyper)}, device=device)
    return {"exact_ms": t["exact"], "hyper_ms": t["hyper"]}
