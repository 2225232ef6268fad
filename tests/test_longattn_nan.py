"""The NaN rule across the library, end to end through the public entry points: one NaN in q,
k or v, on rank 0 or rank 1 of a 2-rank gloo world (hamilton_attn, ring_swa_attn,
dilated_attention with a group, tree_decode) or in one process (hyper_attention), float64.

The oracle is the dense float64 reference (``longattn.reference``) on the unsharded inputs with
each method's visibility (causal; the window; dilated's branches; decoding's bottom-right
causal mask; hyper below ``min_seq_len`` is exact attention). Required:

* lse: NaN exactly where the oracle's lse is NaN, equal (1e-10 relative) elsewhere;
* out: NaN wherever the oracle's out is NaN because a row *sees* the NaN (a NaN query row,
  every row that sees a NaN key, the NaN value's column in every row that sees it); every
  element the oracle leaves finite equals it (1e-10 relative). The one freedom: the oracle
  multiplies a NaN *value* by the zero weight of rows that do not see it, so those elements
  may be NaN or finite (a method that never meets the NaN keeps them finite);
* the trainable methods: the loss ``sum(out * r)`` of a forward + backward step, summed over
  the ranks, is NaN (and the backward runs).

The packages test their NaN rule in depth; this is the thin cross-package check.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.distributed as tdist

from longattn import reference as R
from longattn.common.layout import join_shards, take_shard
from longattn.common.testing import run_world

N = 2
B, S, HQ, HKV, D = 1, 16, 4, 2, 8
LQ = 2  # tree_decode: new tokens
WINDOW = 5  # ring_swa: window_size=(WINDOW, 0)
SEG, RATES = [4, 8], [1, 2]  # dilated branches
SPOT = {"q": (1, 2), "k": (1, 3), "v": (0, 5)}  # (head, dim) of the NaN in each tensor
METHODS = ["hamilton", "ring_swa", "dilated", "tree"]
CASES = [(m, which, bad) for m in METHODS for which in "qkv" for bad in range(N)]
TOL = 1e-10


def _layout(method):
    return "zigzag" if method == "hamilton" else "contiguous"


def _inputs(method, which, bad_rank, seed=3):
    """Global float64 q, k, v with one NaN in ``which`` at a token ``bad_rank`` holds (tree:
    q is the replicated new tokens, so its NaN is on every rank), and the loss weights."""
    g = torch.Generator().manual_seed(seed)
    sq = LQ if method == "tree" else S
    q = torch.randn(B, sq, HQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, S, HKV, D, generator=g, dtype=torch.float64) for _ in "kv")
    r = torch.randn(B, sq, HQ, D, generator=g, dtype=torch.float64)
    mine = take_shard(torch.arange(S).view(1, S), bad_rank, N, layout=_layout(method))[0]
    t = LQ - 1 if (method, which) == ("tree", "q") else int(mine[len(mine) // 2 + 1])
    h, d = SPOT[which]
    {"q": q, "k": k, "v": v}[which][0, t, h, d] = float("nan")
    return q, k, v, r


def _call(method, q, k, v, group):
    if method == "hamilton":
        from longattn.hamilton import hamilton_attn

        return hamilton_attn(q, k, v, group=group, causal=True, return_lse=True)
    if method == "ring_swa":
        from longattn.ring_swa import ring_swa_attn

        return ring_swa_attn(q, k, v, window_size=(WINDOW, 0), group=group, return_lse=True)
    if method == "dilated":
        from longattn.dilated import dilated_attention

        return dilated_attention(q, k, v, SEG, RATES, causal=True, group=group, return_lse=True)
    if method == "tree":
        from longattn.tree import tree_decode

        return tree_decode(q, k, v, group=group, causal=True, return_lse=True)
    if method == "hyper":
        from longattn.hyper import hyper_attention

        return hyper_attention(q, k, v, causal=True, min_seq_len=4 * S, return_lse=True)
    raise AssertionError(method)


def _rank(rank, n):
    torch.set_num_threads(1)
    world = tdist.group.WORLD
    res = []
    for method, which, bad in CASES:
        q, k, v, r = _inputs(method, which, bad)
        lay = _layout(method)
        loc = [x if method == "tree" and x is q else take_shard(x, rank, n, layout=lay)
               for x in (q, k, v)]
        r_loc = r if method == "tree" else take_shard(r, rank, n, layout=lay)
        train = method != "tree"
        loc = [x.clone().requires_grad_(train) for x in loc]
        out, lse = _call(method, *loc, world)
        loss = None
        if train:
            mine = (out * r_loc).sum()
            mine.backward()
            total = mine.detach().reshape(1).clone()
            tdist.all_reduce(total, group=world)
            loss = float(total)
        res.append((out.detach(), lse.detach(), loss))
    return res


@functools.cache
def _results():
    per_rank = run_world(N, _rank, timeout=300)
    got = {}
    for i, (method, which, bad) in enumerate(CASES):
        if method == "tree":  # replicated output
            out, lse, loss = per_rank[0][i]
            assert all(torch.allclose(p[i][0], out, rtol=0, atol=0, equal_nan=True)
                       for p in per_rank[1:])
        else:
            lay = _layout(method)
            out = join_shards([p[i][0] for p in per_rank], layout=lay, dim=1)
            lse = join_shards([p[i][1] for p in per_rank], layout=lay, dim=2)
            loss = per_rank[0][i][2]
        got[(method, which, bad)] = (out, lse, loss)
    return got


def _visible(method):
    """``[B or 1, HQ, Sq, S]`` visibility of each method (True: the row sees the key)."""
    if method in ("hamilton", "hyper"):
        return R.causal_mask(S)[None, None]
    if method == "ring_swa":
        return R.window_mask(S, S, (WINDOW, 0))[None, None]
    if method == "dilated":
        from longattn.reference.dilated import dilated_masks

        return dilated_masks(S, HQ, SEG, RATES, causal=True).any(0)[None]
    return R.causal_mask(LQ, S)[None, None]  # tree: bottom-right aligned


def _oracle(method, q, k, v):
    if method == "dilated":  # one dense softmax over the union of the branches' keys
        from longattn.reference.dilated import dilated_attention_union

        with np.errstate(invalid="ignore"):
            return dilated_attention_union(q.numpy(), k.numpy(), v.numpy(), SEG, RATES,
                                           causal=True)
    with np.errstate(invalid="ignore"):
        return R.attention(q.numpy(), k.numpy(), v.numpy(), mask=_visible(method))


def _check(method, which, bad, out, lse, loss):
    q, k, v, _ = _inputs(method, which, bad)
    ref_out, ref_lse = (torch.from_numpy(np.ascontiguousarray(x)) for x in
                        _oracle(method, q, k, v))
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    lse = lse.double()
    # lse: NaN exactly where the oracle's is, equal elsewhere
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse)), (method, which, bad)
    fin = ~torch.isnan(ref_lse)
    assert torch.equal(torch.isinf(lse[fin]), torch.isinf(ref_lse[fin]))
    fin &= ~torch.isinf(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() <= TOL * ref_lse[fin].abs().max()
    # out: the NaN rows the oracle has because a row sees the NaN must be NaN
    must = torch.isnan(ref_out)
    if which == "v":  # only rows that see the NaN value must be NaN (its column)
        _, t, h, d = torch.nonzero(torch.isnan(v))[0].tolist()
        sees = torch.from_numpy(np.broadcast_to(_visible(method), (B, HQ) + ref_lse.shape[2:]
                                                + (S,))[..., t].copy())  # [B, HQ, Sq]
        heads = torch.arange(HQ) // (HQ // HKV) == h
        must = torch.zeros_like(must)
        must[..., d] = (sees & heads[None, :, None]).transpose(1, 2)
    assert torch.isnan(out[must]).all(), (method, which, bad)
    finite = ~torch.isnan(ref_out)
    assert not torch.isnan(out[finite]).any(), (method, which, bad)
    err = (out[finite] - ref_out[finite]).abs().max() / ref_out[finite].abs().max()
    assert err <= TOL, (method, which, bad, float(err))
    if method != "tree":
        assert loss is not None and np.isnan(loss), (method, which, bad, loss)


@pytest.mark.parametrize("method,which,bad", CASES,
                         ids=[f"{m}-{w}-rank{b}" for m, w, b in CASES])
def test_one_nan_on_one_rank(method, which, bad):
    _check(method, which, bad, *_results()[(method, which, bad)])


@pytest.mark.parametrize("which", "qkv")
def test_one_nan_hyper_attention(which):
    q, k, v, r = _inputs("hyper", which, 0)
    loc = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = _call("hyper", *loc, None)
    loss = (out * r).sum()
    loss.backward()
    _check("hyper", which, 0, out.detach(), lse.detach(), float(loss.detach()))
