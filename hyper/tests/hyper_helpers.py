"""Shared helpers of the hyper tests: random inputs, drawn randomness, the oracle replay."""

import numpy as np
import torch

from longattn.hyper import draw_projections, draw_sample_indices, make_plan
from longattn.reference.hyper import hyper_attention as ref_fwd
from longattn.reference.hyper import hyper_attention_backward as ref_bwd


def inputs(seed, b, sq, sk, hq, hkv, d, dtype=torch.float32, dv=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, sk, hkv, dv, generator=g, dtype=torch.float64).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def randomness(seed, q, k, *, causal, m, min_seq_len, r=4):
    g = torch.Generator().manual_seed(seed)
    p = draw_projections(q.shape[-1], r, generator=g)
    s = draw_sample_indices(q.shape[1], k.shape[1], q.shape[0], k.shape[2], m, causal=causal,
                            min_seq_len=min_seq_len, generator=g)
    return p, s


def n_calls(q, k, causal, min_seq_len):
    return len(make_plan(q.shape[1], k.shape[1], causal, min_seq_len).calls)


def oracle(q, k, v, p, s, dout=None, dlse=None, **kw):
    """(out, lse) and, with dout, (dq, dk, dv) of the float64 oracle as torch tensors."""
    if "softmax_scale" in kw:  # the oracle's name for it
        kw = {**kw, "scale": kw["softmax_scale"]}
        del kw["softmax_scale"]
    a = [t.detach().double().numpy() for t in (q, k, v)]
    sn = None if s is None else s.numpy()
    out, lse = ref_fwd(*a, projections=p.double().numpy(), sample_indices=sn, **kw)
    res = [torch.from_numpy(out), torch.from_numpy(lse)]
    if dout is not None:
        grads = ref_bwd(dout.double().numpy(), *a, projections=p.double().numpy(),
                        sample_indices=sn,
                        dlse=None if dlse is None else dlse.double().numpy(), **kw)
        res += [torch.from_numpy(np.asarray(x)) for x in grads]
    return res
