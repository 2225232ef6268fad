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
from longattn.integrations import demo

TOL = 1e-10
STEP_TOL = 1e-12
LOSS_TOL = 1e-6  # transformers' loss is float32 (logits.float())
SEQ = 24  # divisible by 2n for n = 2, 3, 4 (zigzag)


def _result(model, out, logits, params_of=None):
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    return {"logits": logits, "loss": out.loss.detach(), "grads": grads, "params": params}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reference(kind, ids, labels, mask=None, position_ids=None, scale=1):
    """One process. ``scale``: the gradient reaching the logits is multiplied by it and the
    parameter gradients divided by it again (in float64), the computation the ranks' average
    makes (see SCALED)."""
    model = demo.tiny_model(kind)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels,
                shift_labels=demo.shifted_labels(labels, mask), use_cache=False)
    if scale != 1:
        out.logits.register_hook(lambda g: g * scale)
    out.loss.backward()
    for p in model.parameters():
        p.grad.div_(scale)
    return _result(model, out, out.logits.detach())


def _reference_by_document(kind, ids, labels, pos, scale=1):
    """One process, each packed document run on its own (transformers' bidirectional mask
    ignores packing, so a packed row would let documents see each other); the loss is the
    same token mean (``num_items_in_batch``: the whole batch's count)."""
    model = demo.tiny_model(kind)
    shifted = demo.shifted_labels(labels)
    starts = (pos[0] == 0).nonzero()[:, 0].tolist() + [pos.shape[1]]
    count = (shifted != -100).sum()
    logits, loss = [], 0
    for a, b in zip(starts, starts[1:]):
        out = model(input_ids=ids[:, a:b], labels=labels[:, a:b], shift_labels=shifted[:, a:b],
                    num_items_in_batch=count, use_cache=False)
        if scale != 1:
            out.logits.register_hook(lambda g: g * scale)
        logits.append(out.logits.detach())
        loss = loss + out.loss
    loss.backward()
    for p in model.parameters():
        p.grad.div_(scale)
    return _result(model, type("Out", (), {"loss": loss})(), torch.cat(logits, dim=1))


def _sharded(kind, layout, batch_args, how, cp, dp_group=None):
    """One step on this rank: ``how`` is ``all_reduce`` (all_reduce_grads), ``ddp`` or
    ``fsdp`` (the model wrapped over ``cp`` or the 2-D mesh ``dp_group``)."""
    from longattn.common.dist import LOCAL
    from longattn.integrations.transformers import all_reduce_grads, register, shard_inputs, unshard

    torch.set_num_threads(1)
    model = demo.tiny_model(kind, register())
    ids, labels, mask, pos = batch_args
    net = model
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, process_group=cp)
    elif how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        net = fully_shard(model, mesh=dp_group)
    group = dp_group["cp"] if how == "fsdp" else cp
    batch = shard_inputs(ids, labels, pos, mask, group=group, layout=layout,
                         dp_group=dp_group["dp"] if how == "fsdp" else LOCAL)
    out = net(**batch, use_cache=False)
    out.loss.backward()
    if how == "all_reduce":
        all_reduce_grads(model, cp)
    return _result(model, out, unshard(out.logits, group=group, batch=batch))


def _mesh_2x2():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))


def _data(what, seed):
    """``(input_ids, labels, position_ids, attention_mask)`` of the whole batch."""
    if what == "packed":  # 23 tokens: shard_inputs pads to a multiple of the ranks
        g = torch.Generator().manual_seed(seed)
        cuts = sorted(torch.randperm(21, generator=g)[:3].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, 23])]
        ids, labels, pos = demo.tiny_packed_batch(lengths, seed)
        return ids, labels, pos, None
    ids, labels, mask = demo.tiny_padded_batch(4 if what == "padded4" else 3, SEQ, seed)
    return ids, labels, None, mask


def _run_cases(rank, world, cases):
    out = []
    for kind, layout, how, what, seed in cases:
        ids, labels, pos, mask = _data(what, seed)
        if how == "fsdp":  # data parallel x context parallel: replica d takes rows 2d, 2d+1
            mesh = _mesh_2x2()
            rows = slice(2 * mesh["dp"].get_local_rank(), None)
            rows = slice(rows.start, rows.start + 2)
            args = (ids[rows], labels[rows], mask[rows], None)
            out.append(_sharded(kind, layout, args, how, None, mesh))
        else:
            out.append(_sharded(kind, layout, (ids, labels, mask, pos), how, dist.group.WORLD))
    return out


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
    for i, (kind, layout, how, data, seed) in enumerate(cases):
        ids, labels, pos, mask = _data(data, seed)
        k = 4 if how == "fsdp" else world
        one = _reference_by_document if "bidirectional" in kind else _reference
        ref = one(kind, ids, labels, mask, pos, scale=k) if one is _reference else one(
            kind, ids, labels, pos, scale=k)
        what = f"{kind} {layout} {how} on {world} ranks"
        if k & (k - 1):  # not a power of two: the plain gradient to float32 rounding
            plain = (_reference(kind, ids, labels, mask, pos) if one is _reference
                     else one(kind, ids, labels, pos))["grads"]
            err = max(rel_error(results[0][i]["grads"][n], g) for n, g in plain.items())
            assert err <= FP32_TOL, f"{what}: {err:.1e} from the plain one-process gradient"
        tol = STEP_TOL if how in ("ddp", "fsdp") else TOL
        for r in range(world):
            got = results[r][i]
            if how == "fsdp":  # each replica's logits are its own rows
                d = r // 2
                sub = {**ref, "logits": ref["logits"][2 * d:2 * d + 2]}
                _compare(got, sub, mask[2 * d:2 * d + 2], tol, f"{what}, rank {r}")
            else:
                _compare(got, ref, mask, tol, f"{what}, rank {r}")
            assert torch.equal(got["loss"], results[0][i]["loss"]), f"{what}: losses differ"
