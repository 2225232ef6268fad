"""Training the way users train: padded batches, DDP and FSDP2 on top, the gradient convention.

Every case is a tiny float64 model (``longattn.integrations.demo``) against the same model in
one process with transformers' ``sdpa`` attention on the same batch: logits at the real tokens,
every parameter gradient and every parameter after one AdamW step within 1e-10 relative, the
whole model after that step (all parameters as one vector) within 1e-12 for the DDP / FSDP2
cases, the loss within 1e-6 (transformers computes it in float32). Per tensor, 1e-12 would
measure noise: a key projection's bias has a gradient of exactly zero in exact arithmetic
(softmax ignores a shift shared by a row's scores), so its ~1e-19 rounding residue, which
AdamW divides by its own size, moves the zero-initialised bias by ~1e-13 either way. Padding
tokens predict nothing in the sharded batch, so the reference gets the same ``shift_labels``.

Gradients are meant to be averaged over the ranks (DDP / FSDP / ``all_reduce_grads``); the
loss every rank reports is the whole batch's. Each world (2, 3 and 4 ranks) starts once and
runs all of its cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import rel_error, run_world
from longattn.integrations import steps

TOL = 1e-10
STEP_TOL = 1e-12
LOSS_TOL = 1e-6  # transformers' loss is float32 (logits.float())


def _run_cases(rank, world, cases):
    return [steps.sharded_step(kind, layout, how, steps.training_data(what, seed),
                               dist.group.WORLD)
            for kind, layout, how, what, seed in cases]


def _compare(got, ref, mask, tol, what):
    real = torch.ones(ref["logits"].shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    errs = {"logits": rel_error(got["logits"][real], ref["logits"][real]),
            "grads": max(rel_error(got["grads"][n], g) for n, g in ref["grads"].items())}
    errs["params"] = max(rel_error(got["params"][n], p) for n, p in ref["params"].items())
    names = sorted(ref["params"])
    step = rel_error(torch.cat([got["params"][n].reshape(-1) for n in names]),
                     torch.cat([ref["params"][n].reshape(-1) for n in names]))
    loss_err = rel_error(got["loss"], ref["loss"])
    assert loss_err <= LOSS_TOL, f"{what}: loss relative error {loss_err:.2e}"
    assert all(bool(torch.any(g != 0)) for g in got["grads"].values()), f"{what}: a zero grad"
    assert max(errs.values()) <= TOL, f"{what}: relative errors {errs}"
    assert step <= tol, f"{what}: the model after one AdamW step {step:.1e}"


# SCALED: each rank's gradient is k times its share (k ranks average it), scaled at the float64
# logits. transformers' RMSNorm rounds every token's gradient to float32 on its way back, and
# round(k g) / k == round(g) only when k is a power of two; so for k = 3 the exact comparison is
# with one process whose logits gradient is scaled the same way (then divided by k), and the
# plain one-process gradient is matched to float32 rounding (FP32_TOL).
FP32_TOL = 1e-6

# (model, layout, how, data, seed)
CASES = {
    2: [("llama", "zigzag", "all_reduce", "padded", 0), ("qwen2", "contiguous", "ddp", "padded", 1),
        ("llama", "zigzag", "ddp", "packed", 2),
        ("qwen2", "contiguous", "all_reduce", "packed", 3)],
    3: [("llama", "zigzag", "ddp", "padded", 4), ("qwen2", "contiguous", "all_reduce", "padded", 5),
        ("llama", "contiguous", "all_reduce", "packed", 6),
        ("qwen2", "contiguous", "ddp", "packed", 7),
        ("llama-bidirectional", "contiguous", "all_reduce", "packed", 8)],
    4: [("llama", "contiguous", "all_reduce", "padded", 9),
        ("qwen2", "contiguous", "ddp", "padded", 10), ("llama", "zigzag", "fsdp", "padded4", 11),
        ("llama", "zigzag", "all_reduce", "packed", 12),
        ("qwen2", "zigzag", "ddp", "packed", 13)],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_padded_packed_and_data_parallel_match_one_process(world):
    """Left- and right-padded rows (and one unpadded) and packed documents (one row, positions
    restarting, 4 documents of 23 tokens), Llama (hamilton), Qwen2 (hamilton + ring_swa) and a
    bidirectional Llama (packed), with all_reduce_grads, DDP over the cp group and (4 ranks)
    FSDP2 on a 2 x 2 (dp x cp) mesh with ``dp_group``: the exact gradient of the whole batch's
    mean token loss, and every rank reports the whole loss."""
    cases = CASES[world]
    results = run_world(world, _run_cases, cases, timeout=300)
    for i, (kind, layout, how, what, seed) in enumerate(cases):
        data = steps.training_data(what, seed)
        k = 4 if how == "fsdp" else world
        ref = steps.reference_step(kind, data, scale=k)
        label = f"{kind} {layout} {how} {what} on {world} ranks"
        if k & (k - 1):  # not a power of two: the plain gradient to float32 rounding
            plain = steps.reference_step(kind, data)["grads"]
            err = max(rel_error(results[0][i]["grads"][n], g) for n, g in plain.items())
            assert err <= FP32_TOL, f"{label}: {err:.1e} from the plain one-process gradient"
        tol = STEP_TOL if how in ("ddp", "fsdp") else TOL
        mask = data[3]
        for r in range(world):
            got, sub, m = results[r][i], ref, mask
            if how == "fsdp":  # each replica's logits are its own rows
                rows = slice(2 * (r // 2), 2 * (r // 2) + 2)
                sub, m = {**ref, "logits": ref["logits"][rows]}, mask[rows]
            _compare(got, sub, m, tol, f"{label}, rank {r}")
            assert torch.equal(got["loss"], results[0][i]["loss"]), f"{label}: losses differ"


def _bad_mask_in_one_replica(rank, world):
    """Rank 3 (replica 1) passes a mask padded in the middle; the other replica's ranks wait
    for the count over ``dp_group`` and must raise too."""
    from longattn.integrations.transformers import shard_inputs

    mesh = steps.mesh_2x2()
    ids, labels, _, mask = steps.training_data("padded4", 0)
    d = mesh["dp"].get_local_rank()
    ids, labels, mask = (x[2 * d:2 * d + 2] for x in (ids, labels, mask))
    if rank == 3:
        mask = torch.ones_like(mask)
        mask[0, 5] = 0
    try:
        shard_inputs(ids, labels, attention_mask=mask, group=mesh["cp"], dp_group=mesh["dp"])
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.faults
def test_a_bad_batch_in_one_replica_raises_on_all_dp_x_cp_ranks():
    msgs = run_world(4, _bad_mask_in_one_replica, timeout=120)  # a hang would time out
    assert all(m is not None and "neither left- nor right-padded" in m for m in msgs), msgs


def _nan_step(rank, world):
    """A NaN in the embedding of one token (row 2, position 5: on rank 0 only): every rank's
    loss must be NaN."""
    from longattn.integrations import demo
    from longattn.integrations.transformers import register, shard_inputs

    torch.set_num_threads(1)
    model = demo.tiny_model("llama", register())
    ids, labels, _, mask = steps.training_data("padded", 0)
    ids = ids.masked_fill(ids == demo.VOCAB - 1, 0)
    ids[2, 5] = demo.VOCAB - 1  # the only token with this id
    with torch.no_grad():
        model.model.embed_tokens.weight[demo.VOCAB - 1] = float("nan")
    batch = shard_inputs(ids, labels, attention_mask=mask, group=dist.group.WORLD)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item()


def test_a_nan_on_one_rank_makes_every_ranks_loss_nan():
    losses = run_world(2, _nan_step, timeout=120)
    assert all(x != x for x in losses), losses


def _ignore_index_step(rank, world):
    """shard_inputs(..., ignore_index=-1): the batch carries it to the loss, which skipped only
    transformers' -100 before (the -1 it fills in was a class index: an error on one rank while
    the other waited). Against the same model in one process on the same labels."""
    from longattn.integrations import demo
    from longattn.integrations.transformers import register, shard_inputs

    torch.set_num_threads(1)
    ids, labels = demo.tiny_batch(2, 16)
    labels = labels.masked_fill(labels == -100, -1)  # this batch's ignored labels say -1
    labels[0, 3] = -1
    ref_labels = labels.masked_fill(labels == -1, -100)
    ref = demo.tiny_model("llama")(ids, labels=ref_labels, use_cache=False).loss
    model = demo.tiny_model("llama", register())
    batch = shard_inputs(ids, labels, group=dist.group.WORLD, ignore_index=-1)
    loss = model(**batch, use_cache=False).loss
    return abs(loss.item() - ref.item()) / abs(ref.item())


def test_ignore_index_reaches_the_loss():
    errs = run_world(2, _ignore_index_step, timeout=120)
    assert max(errs) <= LOSS_TOL, errs


def _fsdp2_then_cp_average(rank, world):
    """FSDP2 over the dp sub-mesh of a 2 x 2 (dp, cp) mesh, then all_reduce_grads over cp (the
    documented call where the wrapper does not average over cp): its gradients are DTensors,
    on which the all-reduce raised an operator error; every rank of a cp group holds the same
    shard, so their local shards average. Against one process on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from longattn.integrations import demo
    from longattn.integrations.transformers import all_reduce_grads, register, shard_inputs

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    model = fully_shard(demo.tiny_model("llama", register()), mesh=mesh["dp"])
    ids, labels, pos, mask = steps.training_data("padded4", 3)
    rows = slice(2 * mesh["dp"].get_local_rank(), 2 * mesh["dp"].get_local_rank() + 2)
    batch = shard_inputs(ids[rows], labels[rows], pos, mask[rows], group=mesh["cp"],
                         dp_group=mesh["dp"])
    model(**batch, use_cache=False).loss.backward()
    all_reduce_grads(model, mesh["cp"])
    ref = steps.reference_step("llama", (ids, labels, pos, mask))
    return max(rel_error(p.grad.full_tensor(), ref["grads"][n])
               for n, p in model.named_parameters())


def test_all_reduce_grads_on_fsdp2_gradients():
    errs = run_world(4, _fsdp2_then_cp_average, timeout=300)
    assert max(errs) <= TOL, errs
