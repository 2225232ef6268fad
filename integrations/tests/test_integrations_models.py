"""End to end: stock transformers causal LMs with the sequence sharded over gloo ranks.

Logits, loss, parameter gradients and the parameters after one AdamW step of a tiny randomly
initialised Llama (full attention: hamilton), Mistral (sliding window 11 on every layer:
ring_swa), Qwen2 (one full and one sliding-window layer) and a bidirectional Llama
(``config.is_causal=False``: hamilton non-causal) sharded over 2 and 4 ranks equal
the same model run on the full sequence in one process with transformers' own ``sdpa``
attention (exact float64 softmax; ``eager`` would round its softmax to float32).

Tolerance 1e-10 (relative, whole tensors; the fp64 standard). The stock RMSNorm computes in
float32 and transformers' loss upcasts logits with ``.float()`` (a downcast for float64), so the
1e-16 differences of the attention (summation order across ranks) usually vanish in those
roundings (logits come out bit-identical); a flipped float32 rounding would show as ~1e-8 and
fail loudly rather than pass silently. The loss itself is float32 in transformers (see
LOSS_TOL). Real faults -- a wrong mask, position, window, layout or
a lost gradient -- give errors of 1e-3 and more (a window off by one must fail, below).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import rel_error, run_world
from longattn.integrations.demo import tiny_batch as data
from longattn.integrations.demo import tiny_model as build

TOL = 1e-10
# transformers computes the loss in float32 whatever the model's dtype (``logits.float()``);
# the ranks' float32 partial sums are added in another order than one process's float32 mean.
LOSS_TOL = 1e-6
WINDOWS = {"llama": None, "mistral": 11, "qwen2": 5}


def _sharded_step(rank, world, kind, layout, seed, batch=2, seq=32):
    """One training step of ``kind`` with the sequence sharded over the world's ranks."""
    from longattn.integrations.transformers import (
        all_reduce_grads,
        reduce_loss,
        register,
        shard_inputs,
        unshard,
    )

    torch.set_num_threads(1)
    cp = dist.group.WORLD
    model = build(kind, register())
    ids, labels = data(batch, seq, seed)
    inputs = shard_inputs(ids, labels, group=cp, layout=layout)
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    all_reduce_grads(model, cp)
    logits = unshard(out.logits, group=cp, layout=layout)
    loss = reduce_loss(out.loss, cp)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return logits, loss, grads, params


def _cases(rank, world, cases):
    return [_sharded_step(rank, world, *c) for c in cases]


def _reference(kind, seed, batch=2, seq=32):
    torch.manual_seed(0)
    model = build(kind, "sdpa")
    ids, labels = data(batch, seq, seed)
    out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads, params


def _compare(got, ref, what):
    logits, loss, grads, params = got
    r_logits, r_loss, r_grads, r_params = ref
    errs = {"logits": rel_error(logits, r_logits)}
    loss_err = rel_error(loss, r_loss)
    assert loss_err <= LOSS_TOL, f"{what}: loss relative error {loss_err:.2e}"
    errs["grads"] = max(rel_error(grads[n], r_grads[n]) for n in r_grads)
    errs["params"] = max(rel_error(params[n], r_params[n]) for n in r_params)
    # every parameter must receive a gradient (attention sent the k/v gradients home)
    assert all(bool(torch.any(g != 0)) for g in grads.values()), f"{what}: a zero gradient"
    assert max(errs.values()) <= TOL, f"{what}: relative errors {errs}"
    return errs


# (kind, layout): the model's own layout and, to exercise the relayout, the other one.
CASES = [("llama", "zigzag"), ("llama", "contiguous"), ("mistral", "contiguous"),
         ("mistral", "zigzag"), ("qwen2", "contiguous"), ("llama-bidirectional", "contiguous")]


@pytest.mark.parametrize("world", [2, 4])
def test_training_step_matches_single_process(world):
    cases = [(kind, lay, seed) for seed, (kind, lay) in enumerate(CASES)]
    results = run_world(world, _cases, cases, timeout=240)
    for (kind, lay, seed), got0 in zip(cases, results[0]):
        ref = _reference(kind, seed)
        _compare(got0, ref, f"{kind} {lay} on {world} ranks")
        for r in range(1, world):  # every rank ends with the same parameters
            got = results[r][cases.index((kind, lay, seed))]
            for n, p in got0[3].items():
                assert torch.equal(p, got[3][n]), f"{kind}: rank {r} parameters differ"


def _wrong_window_step(rank, world):
    """The sharded run of a model whose config says window 11 but whose reference uses 12."""
    return _sharded_step(rank, world, "mistral", "contiguous", 0)[0]


def test_comparison_detects_an_off_by_one_window():
    # A reference whose window is one key wider must not pass: the tolerance is tight enough.
    got = run_world(2, _wrong_window_step)[0]
    torch.manual_seed(0)
    ref_model = build("mistral", "sdpa")
    ref_model.config.sliding_window = 12
    ids, _ = data(2, 32, 0)
    ref = ref_model(input_ids=ids, use_cache=False).logits.detach()
    assert rel_error(got, ref) > 100 * TOL
    ref_model.config.sliding_window = 11
    assert rel_error(got, ref_model(input_ids=ids, use_cache=False).logits) <= TOL


# --------------------------------------------------------------------------------------------
# bad input raises on every rank, before any attention communication


def _bad(rank, world, what):
    try:
        _bad_call(what)
    except ValueError as e:
        return str(e)
    return None


def _bad_call(what):
    from longattn.integrations.transformers import register, shard_inputs

    model = build("llama", register())
    ids, labels = data(1, 16, 0)
    inputs = shard_inputs(ids, labels, group=dist.group.WORLD, layout="zigzag")
    if what == "no_positions":  # the model's default positions 0..S_local-1 are wrong
        inputs.pop("position_ids")
    elif what == "shifted_positions":  # positions of no layout
        inputs["position_ids"] = inputs["position_ids"] + 1
    elif what == "padding":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][:, 0] = 0
    elif what == "dropout":
        model.config.attention_dropout = 0.1
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        model.train()
    elif what == "indivisible":
        inputs = shard_inputs(ids[:, :15], labels[:, :15], group=dist.group.WORLD,
                              layout="zigzag")
    model(**inputs, use_cache=False)


@pytest.mark.parametrize("what,match", [
    ("no_positions", "position"), ("shifted_positions", "position"), ("padding", "padding"),
    ("dropout", "dropout"), ("indivisible", "divisible")])
def test_bad_input_raises_on_every_rank(what, match):
    msgs = run_world(4, _bad, what, timeout=60)  # a hang would time out and fail
    assert all(m is not None and match in m for m in msgs), msgs
