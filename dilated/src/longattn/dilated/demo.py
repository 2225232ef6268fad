"""Rows of ``nox -s demo`` for dilated attention (entry point ``longattn.demo``)."""

from __future__ import annotations

import time

import torch

SEG, RATES = (4, 8, 16, 32, 64), (1, 2, 4, 6, 12)  # LongNet's schedule scaled by 1/512


def _inputs(b, s, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*sh, generator=g, dtype=torch.float64)
            for sh in ((b, s, hq, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, hq, d))]


def _oracle_err(out, grads, q, k, v, dout, causal):
    from longattn.common.testing import rel_error
    from longattn.reference.dilated import dilated_attention as ref_fwd
    from longattn.reference.dilated import dilated_attention_backward as ref_bwd

    c = lambda t: t.detach().numpy()  # noqa: E731
    ro, _ = ref_fwd(c(q), c(k), c(v), SEG, RATES, causal=causal)
    rg = ref_bwd(c(dout), c(q), c(k), c(v), SEG, RATES, causal=causal)
    return max([rel_error(out, ro)] + [rel_error(a, b) for a, b in zip(grads, rg)])


def _rank_fn(rank, world, s, hq, hkv, d):
    """One rank of the distributed demo: its chunk's output and gradients, bytes, time."""
    import torch.distributed as dist

    from longattn.common import comm
    from longattn.dilated import dilated_attention

    q, k, v, dout = _inputs(1, s, hq, hkv, d, seed=7)
    l = s // world
    sl = slice(rank * l, rank * l + l)
    loc = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
    dilated_attention(*loc, SEG, RATES, causal=True, group=dist.group.WORLD)  # plan, warm-up
    t0 = time.perf_counter()
    with comm.counting() as c:
        out = dilated_attention(*loc, SEG, RATES, causal=True, group=dist.group.WORLD)
        out.backward(dout[:, sl])
    ms = (time.perf_counter() - t0) * 1e3
    return out.detach(), [t.grad for t in loc], c.bytes_sent, ms


def rows(run_world):
    """Single-process and 4-rank distributed dilated attention against the float64 oracle."""
    from longattn.dilated import dilated_attention

    out_rows = []
    b, s, hq, hkv, d = 2, 61, 6, 2, 8
    for causal in (False, True):
        q, k, v, dout = _inputs(b, s, hq, hkv, d, seed=1 + causal)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        dilated_attention(q, k, v, SEG, RATES, causal=causal)  # plan, warm-up
        t0 = time.perf_counter()
        out = dilated_attention(qq, kk, vv, SEG, RATES, causal=causal)
        out.backward(dout)
        ms = (time.perf_counter() - t0) * 1e3
        err = _oracle_err(out, [qq.grad, kk.grad, vv.grad], q, k, v, dout, causal)
        out_rows.append(dict(
            method="dilated", what=f"dilated attention fwd+bwd, {'causal' if causal else 'full'}",
            shape=f"B{b} S{s} Hq{hq} Hkv{hkv} D{d} w{list(SEG)} r{list(RATES)}",
            rel_err=err, time_ms=ms, bytes=None))
    world, s2 = 4, 128
    res = run_world(world, _rank_fn, s2, 4, 4, d)
    q, k, v, dout = _inputs(1, s2, 4, 4, d, seed=7)
    out = torch.cat([r[0] for r in res], 1)
    grads = [torch.cat([r[1][i] for r in res], 1) for i in range(3)]
    err = _oracle_err(out, grads, q, k, v, dout, True)
    out_rows.append(dict(
        method="dilated", what=f"distributed dilated attention fwd+bwd, {world} ranks, causal",
        shape=f"B1 S{s2} H4 D{d} w{list(SEG)} r{list(RATES)}", rel_err=err,
        time_ms=max(r[3] for r in res), bytes=max(r[2] for r in res)))
    return out_rows
