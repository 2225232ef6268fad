"""Precision at large logits and the NaN rule of dilated attention, single process and in gloo
worlds of 2 and 3 ranks, against the float64 oracle (``longattn.reference.dilated``).

Precision: float32 inputs whose scores are exact in float32 and lie near 1e2 or 1e4
(``common.testing.large_logit_qkv``, ``softmax_scale=1.0``), a schedule of 3 branches. One
kernel per branch is exact to float32 rounding; what the method adds is the merge of the
branches through their lse, which is float64 for float32 inputs (``common.dtypes.lse_dtype``),
so the merged out stays within 1e-5 of the oracle (a float32 lse near 1e4 is only good to
~1e-3 absolute, and the merge would be off by ~1e-4).

NaN: one NaN in q, k or v (on any rank): exactly the elements the float64 oracle makes NaN are
NaN (out and lse), every other element equals it; a LongNetLM training step's loss is NaN.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from longattn.common.dist import LOCAL
from longattn.common.testing import large_logit_qkv, random_like, rel_error, run_world
from longattn.dilated import LongNetLM, dilated_attention
from longattn.reference.dilated import dilated_attention as ref_forward
from longattn.reference.dilated import dilated_attention_backward as ref_backward
from longattn.reference.dilated import dilated_attention_union as ref_union

TOL = 1e-5  # the acceptance bound of the precision item (relative, like rel_error)
SEG, RATES = (8, 16, 32), (1, 2, 4)  # 3 branches; the 32-token segment spans ranks
S, H, D = 32, 4, 8


def _np(t):
    return t.detach().double().numpy()


def _precision_errors(logit, causal, rank=0, world=1, group=LOCAL):
    """rel_error of this rank's (out, lse, dq, dk, dv) against the float64 oracle, and lse's
    dtype. Global tensors are the same on every rank; the rank takes its chunk."""
    q, k, v = large_logit_qkv(1, S, S, H, H, D, logit=logit, seed=3 + causal)
    dout = random_like(q, seed=11)
    ro, rl = ref_forward(_np(q), _np(k), _np(v), SEG, RATES, causal=causal, scale=1.0)
    rg = ref_backward(_np(dout), _np(q), _np(k), _np(v), SEG, RATES, causal=causal, scale=1.0)
    n = S // world
    sl = slice(rank * n, rank * n + n)
    loc = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
    out, lse = dilated_attention(*loc, SEG, RATES, causal=causal, softmax_scale=1.0,
                                 group=group, return_lse=True)
    (out * dout[:, sl]).sum().backward()
    errs = {"out": rel_error(out, ro[:, sl]), "lse": rel_error(lse, rl[:, :, sl])}
    for name, t, g in zip(("dq", "dk", "dv"), loc, rg):
        errs[name] = rel_error(t.grad, g[:, sl])
    return errs, lse.dtype, out.dtype


def _check_precision(errs, lse_dt, out_dt):
    assert out_dt == torch.float32 and lse_dt == torch.float64
    assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("logit", [1e2, 1e4])
def test_large_logits_single_process(logit, causal):
    _check_precision(*_precision_errors(logit, causal))


def _precision_world(rank, world):
    return [_precision_errors(logit, causal, rank, world, dist.group.WORLD)
            for logit in (1e2, 1e4) for causal in (False, True)]


def test_large_logits_two_ranks():
    """Forward and backward, both logits, causal and not, on each rank's chunk (the
    32-token branch reads the other rank's sparsified K/V)."""
    for per_rank in run_world(2, _precision_world, timeout=120):
        for res in per_rank:
            _check_precision(*res)


# --------------------------------------------------------------------------------------------
# NaN

NAN_SEG, NAN_RATES = (4, 8, 16), (1, 2, 4)


def _nan_inputs(which, pos, head, s, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, s, nh, 4, generator=g, dtype=torch.float64)
               for nh in (4, 2, 2))  # GQA: 4 query heads on 2 kv heads
    {"q": q, "k": k, "v": v}[which][0, pos, head, 1] = float("nan")
    return [t.to(dtype) for t in (q, k, v)]


def _nan_compare(got, want, tol):
    """Elementwise: NaN exactly where the oracle has NaN, the rest within ``tol``."""
    got = got.detach().double().numpy()
    nan = np.isnan(want)
    if not np.array_equal(np.isnan(got), nan):
        return f"NaN pattern differs: {int(np.isnan(got).sum())} vs {int(nan.sum())} NaN"
    err = rel_error(got[~nan], want[~nan])
    return None if err <= tol else f"error {err:.2e} > {tol:.0e}"


# (which tensor, position, head): a key seen by several branches, a query, a value column, a
# row of the last kv head near the end (in the last rank's chunk)
NAN_CASES = [("q", 5, 1), ("k", 9, 0), ("v", 2, 1), ("k", 22, 1), ("q", 23, 3)]


def _nan_oracle(q, k, v, causal):
    """The oracle's out (per branch, then mixed: a NaN value reaches only the rows that
    read it) and lse (one softmax over the union of the branches' keys: the per-branch oracle
    turns a NaN lse into -inf in its mix, which is not what dense attention does)."""
    ro, rl = ref_forward(_np(q), _np(k), _np(v), NAN_SEG, NAN_RATES, causal=causal)
    _, ul = ref_union(_np(q), _np(k), _np(v), NAN_SEG, NAN_RATES, causal=causal)
    fin = ~np.isnan(ul)
    assert rel_error(rl[fin], ul[fin]) <= 1e-12  # the same lse where dense attention has one
    return ro, ul


def _nan_case(which, pos, head, causal, dtype, rank=0, world=1, group=LOCAL, s=24):
    q, k, v = _nan_inputs(which, pos, head, s, dtype, seed=pos)
    ro, rl = _nan_oracle(q, k, v, causal)
    assert np.isnan(ro).any() and (np.isnan(rl).any() or which == "v")
    n = s // world
    sl = slice(rank * n, rank * n + n)
    out, lse = dilated_attention(q[:, sl], k[:, sl], v[:, sl], NAN_SEG, NAN_RATES,
                                 causal=causal, group=group, return_lse=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    return [_nan_compare(out, ro[:, sl], tol), _nan_compare(lse, rl[:, :, sl], tol)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", NAN_CASES)
def test_nan_single_process(case, causal, dtype):
    assert _nan_case(*case, causal, dtype) == [None, None]


def _nan_world(rank, world):
    """Every NaN case (the NaN lands on rank pos // (24 / world)), causal and not."""
    return [_nan_case(*case, causal, torch.float64, rank, world, dist.group.WORLD)
            for case in NAN_CASES for causal in (False, True)]


@pytest.mark.parametrize("world", [2, 3])
def test_nan_in_a_group(world):
    res = run_world(world, _nan_world, timeout=120)
    for rank, per_rank in enumerate(res):
        for i, r in enumerate(per_rank):
            assert r == [None, None], (rank, i, r)


def _lm_step(group, rank, n, bad_rank):
    """One LongNetLM training step on this rank's chunk of 2 sequences; ``bad_rank`` has a NaN
    in the embedding of a token of its chunk. Returns (the all-reduced loss, whether the
    backward ran to the end, whether a gradient is NaN)."""
    torch.manual_seed(0)
    lm = LongNetLM(20, d_model=16, nhead=4, num_decoder_layers=1, dim_feedforward=16,
                   segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), group=group)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 20, (2, 8 * n + 1), generator=gen)
    sl = slice(rank * 8, rank * 8 + 8)
    inp, tgt = x[:, :-1][:, sl], x[:, 1:][:, sl]
    if rank == bad_rank:
        with torch.no_grad():
            lm.token_embedding.weight[inp[0, 3]] = float("nan")
    logits = lm(inp)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), tgt.reshape(-1),
                                             reduction="sum")
    loss.backward()
    nan_grad = any(torch.isnan(p.grad).any().item() for p in lm.parameters()
                   if p.grad is not None)
    total = loss.detach().clone()
    if n > 1:
        dist.all_reduce(total)
    return float(total), nan_grad


def test_nan_training_step_single_process():
    loss, nan_grad = _lm_step(LOCAL, 0, 1, 0)
    assert np.isnan(loss) and nan_grad


def _lm_world(rank, world):
    return [_lm_step(dist.group.WORLD, rank, world, bad) for bad in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_nan_training_step_in_a_group(world):
    """The NaN on each rank in turn: the step's loss is NaN on every rank."""
    for per_rank in run_world(world, _lm_world, timeout=120):
        for loss, _ in per_rank:
            assert np.isnan(loss)


def test_return_lse_must_be_a_bool():
    from longattn.common.dist import LOCAL
    from longattn.dilated import dilated_attention

    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        dilated_attention(q, q, q, [4], [1], group=LOCAL, return_lse="yes")
