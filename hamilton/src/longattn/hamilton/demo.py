"""Demo rows (entry point group ``longattn.demo``): TASP, Ring Attention, zigzag ring, all-gather,
Ulysses and USP (a 2 x 2 grid) on a CPU world of 4 gloo ranks, forward + backward in float64
against ``longattn.reference``.

``rel_err`` is the largest relative error over out, lse, dq, dk, dv (global tensors);
``time_ms`` the slowest rank's forward + backward; ``bytes`` the most bytes one rank sent
(KV forward, KV + fp32 dK/dV backward). ``what`` also gives the forward bytes per peer per step.
On 4 ranks no Hamiltonian decomposition of K_4* exists, so TASP runs the time-varying schedule.
"""

from __future__ import annotations

import time

import torch

WORLD = 4
B, S, HQ, HKV, D = 1, 96, 8, 2, 32

CASES = [  # (method, schedule, causal, what)
    ("hamilton.tasp", "tasp", True, "TASP causal (zigzag), time-varying all-to-all, GQA 4:1"),
    ("hamilton.tasp", "tasp", False, "TASP full mask, time-varying all-to-all, GQA 4:1"),
    ("hamilton.ring", "ring", False, "Ring Attention (schedule='ring'), full mask"),
    ("hamilton.zigzag_ring", "ring", True, "zigzag ring (schedule='ring', causal)"),
    ("hamilton.allgather", "allgather", True, "all-gather K/V (schedule='allgather', causal)"),
    ("hamilton.ulysses", "ulysses", True, "Ulysses all-to-all (schedule='ulysses', causal)"),
    ("hamilton.usp", "usp", True, "usp_attn: Ulysses over 2 x TASP over 2 ranks, causal"),
]


def _inputs(causal, seed):
    from longattn.reference import attention, attention_backward, causal_mask

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S, HKV, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, HKV, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, S, HQ, D, generator=g, dtype=torch.float64)
    mask = causal_mask(S, S) if causal else None
    out, lse = attention(q.numpy(), k.numpy(), v.numpy(), mask=mask)
    dq, dk, dv = attention_backward(dout.numpy(), q.numpy(), k.numpy(), v.numpy(), mask=mask)
    ref = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    return (q, k, v, dout), {name: torch.from_numpy(x) for name, x in ref.items()}


def run_cases(rank, n, cases):
    """Worker: per case this rank's squared errors / reference norms, time and messages."""
    import torch.distributed as tdist

    from longattn.common.comm import counting
    from longattn.hamilton import hamilton_attn, shard, usp_attn, usp_shard

    world = tdist.group.WORLD
    # the 2 x 2 grid of usp_attn: rank a * 2 + b has head-group rank a, seq-group rank b
    heads = [tdist.new_group([b, 2 + b]) for b in range(2)]
    seqs = [tdist.new_group([2 * a, 2 * a + 1]) for a in range(2)]
    grid = {"head_group": heads[rank % 2], "seq_group": seqs[rank // 2]}
    res = []
    for sched, causal, (q, k, v, dout), ref in cases:
        def loc(x, dim=1, causal=causal, sched=sched):
            if sched == "usp":
                return usp_shard(x, causal=causal, dim=dim, **grid)
            return shard(x, group=world, causal=causal, dim=dim)

        ql, kl, vl = (loc(t).requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        with counting() as fwd:
            if sched == "usp":
                out, lse = usp_attn(ql, kl, vl, causal=causal, schedule="tasp",
                                    return_lse=True, **grid)
            else:
                out, lse = hamilton_attn(ql, kl, vl, group=world, causal=causal,
                                         schedule=sched, return_lse=True)
        with counting() as bwd:
            out.backward(loc(dout))
        ms = (time.perf_counter() - t0) * 1e3
        got = {"out": out, "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
        sq = {name: (float((got[name].detach() - loc(r, 2 if name == "lse" else 1))
                           .pow(2).sum()), float(r.pow(2).sum()) / n)
              for name, r in ref.items()}
        res.append({"sq": sq, "ms": ms, "fwd": fwd.messages, "bwd": bwd.messages})
    return res


def rows(run_world):
    cases = []
    for i, (_, sched, causal, _) in enumerate(CASES):
        inputs, ref = _inputs(causal, seed=i)
        cases.append((sched, causal, inputs, ref))
    # the first case runs twice: its first run pays the one-off imports / allocations
    results = [r[1:] for r in run_world(WORLD, run_cases, cases[:1] + cases)]
    out = []
    for i, (method, _, _, what) in enumerate(CASES):
        per_rank = [r[i] for r in results]
        err = max((sum(p["sq"][name][0] for p in per_rank)
                   / sum(p["sq"][name][1] for p in per_rank)) ** 0.5
                  for name in per_rank[0]["sq"])
        sent = [sum(nb for kind, _, nb in p["fwd"] + p["bwd"] if kind == "send")
                for p in per_rank]
        fwd0 = [(peer, nb) for kind, peer, nb in per_rank[0]["fwd"] if kind == "send"]
        peers = sorted({p for p, _ in fwd0})
        sent0 = sum(nb for _, nb in fwd0)
        out.append({"method": method, "what": f"{what}; fwd {len(fwd0)} message(s) to "
                                              f"{len(peers)} peer(s), {sent0} B",
                    "shape": f"B{B} S{S} H{HQ}/{HKV} D{D} fp64 x{WORLD} ranks",
                    "rel_err": err, "time_ms": max(p["ms"] for p in per_rank),
                    "bytes": max(sent)})
    return out
