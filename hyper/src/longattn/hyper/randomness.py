"""The randomness of a call, drawn in a fixed order so it can be replayed.

``hyper_attention(..., generator=g)`` draws (1) the projections, if not given, then (2) the
sample indices, if not given, with exactly these functions; calling them yourself with an
identically seeded generator gives the same tensors, which the float64 oracle
``longattn.reference.hyper.hyper_attention`` then replays.
"""

from __future__ import annotations

import torch

from longattn.hyper.plan import make_plan

_NK: dict = {}


def _dev(generator, device):
    if generator is not None:
        return generator.device
    return torch.device("cpu") if device is None else torch.device(device)


def draw_projections(head_dim, lsh_num_projs, *, generator=None, device=None):
    """Gaussian hyperplanes ``[head_dim, lsh_num_projs]`` (float32)."""
    w = torch.randn(head_dim, lsh_num_projs, generator=generator,
                    device=_dev(generator, device), dtype=torch.float32)
    return w if device is None else w.to(device)


def draw_sample_indices(seqlen_q, seqlen_k, batch, kv_heads, sample_size, *, causal,
                        min_seq_len, generator=None, device=None):
    """Sample indices ``[n_calls, batch, kv_heads, sample_size]`` (int64): for core call ``c``
    of :func:`longattn.hyper.plan.make_plan`, uniform with replacement over ``[0, nk_c)``
    (positions in that call's sorted key order)."""
    plan = make_plan(seqlen_q, seqlen_k, bool(causal), min_seq_len)
    n = len(plan.calls)
    dev = _dev(generator, device)
    u = torch.rand(n, batch, kv_heads, sample_size, generator=generator, device=dev,
                   dtype=torch.float64)
    key = (plan, str(dev))
    if key not in _NK:  # cached: no host-to-device copy (and sync) per call
        _NK[key] = torch.tensor([c[3] for c in plan.calls], dtype=torch.float64, device=dev)
    nk = _NK[key]
    idx = torch.minimum((u * nk.view(n, 1, 1, 1)).to(torch.int64),
                        (nk.view(n, 1, 1, 1) - 1).to(torch.int64))
    return idx if device is None else idx.to(device)
