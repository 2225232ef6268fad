"""Reproducible test cases on a world of ranks, their float64 oracle and the exact traffic the
window needs (used by the tests and the demo; the oracle part imports ``longattn.reference``).

A case is a plain dict (it travels pickled to the gloo ranks):
``{"kind": "dense" | "varlen", "n": ranks, "seed", "hq", "hkv", "d", "window", "ns", "dtype",
"b", "m"}`` (dense: batch b, m tokens per rank) or ``"lengths", "counts"`` (varlen: sequence
lengths, tokens per rank); optional ``"api": "seed" | "canonical"`` (which function runs it),
``"scale"`` (``softmax_scale``), ``"logit"`` (q, k, v from
:func:`longattn.common.testing.large_logit_qkv`: float32-exact scores near that logit with
``scale = 1.0``) and ``"nan"``: a list of ``(tensor, batch, position, head, dim)`` entries of
q / k / v set to NaN (``batch`` is ignored for varlen), or the older ``"nan_key"`` (with
``"nan_batch"``, dense): that key position is NaN.
Every rank builds the same global tensors from the seed and takes its shard, so only results
travel.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist

from longattn.common.comm import counting

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def global_inputs(case):
    """(q, k, v, dout) global tensors in float64: dense BSHD ``[b, n m, H, D]``, varlen THD."""
    g = torch.Generator().manual_seed(case["seed"])
    if case["kind"] == "dense":
        lead = (case["b"], case["n"] * case["m"])
    else:
        lead = (sum(case["lengths"]),)
    q = torch.randn(*lead, case["hq"], case["d"], generator=g, dtype=torch.float64)
    k = torch.randn(*lead, case["hkv"], case["d"], generator=g, dtype=torch.float64)
    v = torch.randn(*lead, case["hkv"], case["d"], generator=g, dtype=torch.float64)
    dout = torch.randn(*lead, case["hq"], case["d"], generator=g, dtype=torch.float64)
    if "logit" in case:  # exact in float32: the float64 oracle sees the same numbers
        from longattn.common.testing import large_logit_qkv

        b, t = (1, lead[0]) if len(lead) == 1 else lead
        q, k, v = (x.double().reshape(*lead, *x.shape[2:]) for x in large_logit_qkv(
            b, t, t, case["hq"], case["hkv"], case["d"], logit=case["logit"], seed=case["seed"]))
    for name, bi, pos, h, e in case.get("nan", ()):
        t = {"q": q, "k": k, "v": v}[name]
        t[(bi, pos, h, e) if case["kind"] == "dense" else (pos, h, e)] = float("nan")
    if "nan_key" in case:  # fault injection: one key (of batch row "nan_batch") is NaN
        if case["kind"] == "dense":
            k[case.get("nan_batch", 0), case["nan_key"]] = float("nan")
        else:
            k[case["nan_key"]] = float("nan")
    return q, k, v, dout


def cu_seqlens(case):
    return torch.tensor(np.concatenate([[0], np.cumsum(case["lengths"])]), dtype=torch.int32)


def offsets(case):
    if case["kind"] == "dense":
        return [r * case["m"] for r in range(case["n"] + 1)]
    return [0, *np.cumsum(case["counts"]).tolist()]


def shard(x, case, rank):
    off = offsets(case)
    return x[:, off[rank]:off[rank + 1]] if case["kind"] == "dense" else x[off[rank]:off[rank + 1]]


def run_case(rank, world, case, group=None, backend="auto", api=None):
    """Run one case on this rank: forward, backward; returns local results and traffic.

    ``api="seed"`` calls the seed-compatible function of the case, ``"canonical"`` calls
    :func:`ring_swa_attn` (with ``backend``); by default ``case["api"]`` or ``"seed"``.
    ``group`` defaults to the world.
    """
    from longattn.ring_swa import (
        ring_sliding_window_attn,
        ring_sliding_window_attn_varlen,
        ring_streaming_llm_attn,
        ring_streaming_llm_attn_varlen,
        ring_swa_attn,
    )

    api = api or case.get("api", "seed")
    dtype = DTYPES[case["dtype"]]
    group = dist.group.WORLD if group is None else group
    q, k, v, dout = (shard(t, case, rank).to(dtype) for t in global_inputs(case))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dense = case["kind"] == "dense"
    scale = case.get("scale")
    lse = None
    if api == "canonical":
        def call():
            nonlocal lse
            out, lse = ring_swa_attn(q, k, v, window_size=(case["window"], 0), group=group,
                                     cu_seqlens=None if dense else cu_seqlens(case),
                                     num_sink_tokens=case["ns"], softmax_scale=scale,
                                     return_lse=True, backend=backend)
            return out
    else:
        if backend != "auto":
            raise ValueError("the seed-compatible functions have no backend argument")
        kw = dict(cp_group=group, softmax_scale=scale)
        if case["ns"]:
            kw["num_sink_tokens"] = case["ns"]
        if dense:
            fn = ring_streaming_llm_attn if case["ns"] else ring_sliding_window_attn
            args = (q, k, v, case["window"])
        else:
            fn = ring_streaming_llm_attn_varlen if case["ns"] else ring_sliding_window_attn_varlen
            args = (q, k, v, case["window"], cu_seqlens(case))

        def call():
            return fn(*args, **kw)
    t0 = time.perf_counter()
    with counting() as fwd:
        out = call()
    with counting() as bwd:
        out.backward(dout)
    ms = (time.perf_counter() - t0) * 1e3
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "fwd": sorted(fwd.messages), "bwd": sorted(bwd.messages), "ms": ms}


def run_cases(rank, world, cases, backend="auto"):
    """``run_world`` entry: every case on this world (one world start for many cases)."""
    return [run_case(rank, world, c, backend=backend) for c in cases]


def oracle_mask(case):
    """Global [T, T] visibility mask (True = visible) from the reference's mask builders."""
    from longattn.reference import causal_mask, document_mask, sink_mask, window_mask

    w, ns = case["window"], case["ns"]
    if case["kind"] == "dense":
        s = case["n"] * case["m"]
        m = window_mask(s, s, (w, 0)) & causal_mask(s)
        return m | sink_mask(s, s, ns) if ns else m
    cu = cu_seqlens(case).numpy()
    return document_mask(cu, cu, causal=True, window=(w, 0), num_sink_tokens=ns)


def oracle(case, with_lse=False):
    """(out, dq, dk, dv) of the whole sequence in float64 from ``longattn.reference``
    (``(out, lse, dq, dk, dv)`` with ``with_lse``)."""
    from longattn.reference import attention, attention_backward

    q, k, v, dout = (t.numpy() for t in global_inputs(case))
    if case["kind"] == "varlen":
        q, k, v, dout = (x[None] for x in (q, k, v, dout))
    m = oracle_mask(case)
    out, lse = attention(q, k, v, mask=m, scale=case.get("scale"))
    grads = attention_backward(dout, q, k, v, mask=m, scale=case.get("scale"))
    res = [out, lse, *grads] if with_lse else [out, *grads]
    return [x[0] for x in res] if case["kind"] == "varlen" else res


def row_oracle(case):
    """``{out, lse, dq, dk, dv}`` in float64 (numpy, global) from ``longattn.reference``
    applied row by row to the keys each query sees (gradients of the rows summed): the dense
    oracle with masked keys truly absent, so a NaN reaches exactly the rows that see it and the
    gradients those rows touch (a masked NaN value never meets a zero weight)."""
    import numpy as np

    from longattn.reference import attention, attention_backward

    q, k, v, dout = (t.numpy() for t in global_inputs(case))
    if case["kind"] == "varlen":
        q, k, v, dout = (x[None] for x in (q, k, v, dout))
    m = oracle_mask(case)
    scale = case.get("scale")
    b, t, hq = q.shape[:3]
    out = np.zeros(q.shape[:3] + v.shape[3:])
    lse = np.full((b, hq, t), -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for i in range(t):
        idx = np.flatnonzero(m[i])
        if not idx.size:
            continue
        qi, ki, vi, di = q[:, i:i + 1], k[:, idx], v[:, idx], dout[:, i:i + 1]
        o, ls = attention(qi, ki, vi, scale=scale)
        # the reference gives a row whose scores hold a NaN lse = -inf (its empty-row rule):
        # such a row's lse is NaN (the row's out is NaN there too)
        s = np.einsum("bqhd,bkhd->bhqk", qi, np.repeat(ki, hq // k.shape[2], axis=2))
        ls = np.where(np.isnan(s).any(-1), np.nan, ls)
        out[:, i], lse[:, :, i] = o[:, 0], ls[:, :, 0]
        gq, gk, gv = attention_backward(di, qi, ki, vi, scale=scale)
        dq[:, i] = gq[:, 0]
        dk[:, idx] += gk
        dv[:, idx] += gv
    res = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    return {key: x[0] for key, x in res.items()} if case["kind"] == "varlen" else res


def gather(results, case, key):
    """Concatenate the ranks' local results along the token axis (lse: its last axis)."""
    if key == "lse":
        return torch.cat([r[key] for r in results], dim=-1)
    return torch.cat([r[key] for r in results], dim=1 if case["kind"] == "dense" else 0)


def expected_messages(case):
    """Per rank, the exact (kind, peer, bytes) lists of forward and backward, computed from the
    oracle mask: rank r needs from rank j the key columns of j's range that some query of r's
    range sees; one message per (pair, direction) when that set is not empty."""
    m = oracle_mask(case)
    off = offsets(case)
    n = case["n"]
    b = case["b"] if case["kind"] == "dense" else 1
    per_tok = b * case["hkv"] * 2 * case["d"] * DTYPES[case["dtype"]].itemsize
    fwd = [[] for _ in range(n)]
    bwd = [[] for _ in range(n)]
    for r in range(n):
        for j in range(n):
            if j == r:
                continue
            cols = m[off[r]:off[r + 1], off[j]:off[j + 1]].any(axis=0).sum()
            if cols:
                nb = int(cols) * per_tok
                fwd[r].append(("recv", j, nb))
                fwd[j].append(("send", r, nb))
                bwd[r].append(("send", j, nb))
                bwd[j].append(("recv", r, nb))
    return [sorted(x) for x in fwd], [sorted(x) for x in bwd]


def errors(results, case):
    """Relative errors of out, dq, dk, dv against the oracle (NaN -> inf)."""
    from longattn.common.testing import rel_error

    ref = oracle(case)
    return {key: rel_error(gather(results, case, key), r)
            for key, r in zip(("out", "dq", "dk", "dv"), ref)}
