"""Demo rows (entry point group ``longattn.demo``): HyperAttention replayed by the float64
oracle. HyperAttention is a single-device method, so the 4 gloo ranks simply run 4 cases in
parallel (no communication: ``bytes`` is None).

``rel_err`` is the largest relative error over out, lse, dq, dk, dv (with a d(lse) term)
against ``longattn.reference.hyper`` given the same projections and sampled columns (the exact
case: against ``longattn.reference.attention``); ``time_ms`` is the torch path's forward +
backward.
"""

from __future__ import annotations

import time

WORLD = 4

CASES = [  # what, b, s, hq, hkv, d, causal, smooth, block, samples, min_seq_len
    ("causal, GQA 4:2, odd length", 2, 77, 4, 2, 16, True, False, 8, 12, 10),
    ("causal, smooth_block band", 1, 64, 2, 2, 16, True, True, 8, 8, 8),
    ("non-causal, Sq != Sk, 40 samples", 1, 50, 2, 1, 16, False, False, 16, 40, 8),
    ("samples 0, block >= S: exact", 1, 48, 2, 1, 16, True, False, 48, 0, 4),
]


def _shape(c):
    _, b, s, hq, hkv, d, causal, *_ = c
    sk = "" if causal else f"/{s - 7}"
    return f"B{b} S{s}{sk} H{hq}/{hkv} D{d}"


def run_case(rank, world, cases):
    """Run ``cases[rank]`` (and nothing on extra ranks); returns (rel_err, ms) or None."""
    if rank >= len(cases):
        return None
    import numpy as np
    import torch

    from longattn.common.testing import rel_error
    from longattn.hyper import draw_projections, draw_sample_indices, hyper_attention
    from longattn.reference import attention, attention_backward, causal_mask
    from longattn.reference.hyper import hyper_attention as ref
    from longattn.reference.hyper import hyper_attention_backward as ref_bwd

    _, b, s, hq, hkv, d, causal, smooth, bs, m, msl = cases[rank]
    sk = s if causal else s - 7
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    p = draw_projections(d, 8, generator=g)
    si = draw_sample_indices(s, sk, b, hkv, m, causal=causal, min_seq_len=msl, generator=g)
    do = torch.randn(b, s, hq, d, generator=g, dtype=torch.float64)
    dl = torch.randn(b, hq, s, generator=g, dtype=torch.float64)
    for _ in range(2):  # the first run pays one-off imports and allocations
        t0 = time.perf_counter()
        out, lse = hyper_attention(q, k, v, causal=causal, block_size=bs, min_seq_len=msl,
                                   smooth_block=smooth, projections=p, sample_indices=si,
                                   return_lse=True, backend="torch")
        grads = torch.autograd.grad([out, lse], (q, k, v), [do, dl])
        ms = (time.perf_counter() - t0) * 1e3
    a = [t.detach().numpy() for t in (q, k, v)]
    if m == 0 and bs >= s:  # the approximation must be exact attention here
        mask = causal_mask(s, sk) if causal else None
        want = [*attention(*a, mask=mask),
                *attention_backward(do.numpy(), *a, mask=mask, dlse=dl.numpy())]
    else:
        kw = dict(projections=p.numpy(), sample_indices=si.numpy(), block_size=bs,
                  min_seq_len=msl, causal=causal, smooth_block=smooth)
        want = [*ref(*a, **kw), *ref_bwd(do.numpy(), *a, dlse=dl.numpy(), **kw)]
    errs = [rel_error(x, np.asarray(w)) for x, w in zip((out, lse, *grads), want)]
    return max(errs), ms


def rows(run_world):
    res = run_world(WORLD, run_case, CASES)
    out = []
    for c, r in zip(CASES, res):
        out.append({"method": "hyper.hyper_attention", "what": c[0], "shape": _shape(c),
                    "rel_err": r[0], "time_ms": r[1], "bytes": None})
    return out
