"""Groups and the agreement of every rank: the one rule of ``group=None``, 1-D meshes, the
position check made by every rank on every call, and mismatches that raise everywhere.

Every case runs in a persistent gloo world; a hang would hit the world's timeout and fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn.common.dist import LOCAL
from longattn.common.testing import rel_error, run_world
from longattn.integrations.demo import tiny_batch as data
from longattn.integrations.demo import tiny_model as build


def _error(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _group_none(rank, world):
    from longattn.integrations.cache import ShardedCache
    from longattn.integrations.relayout import relayout
    from longattn.integrations.transformers import (
        all_reduce_grads,
        reduce_loss,
        register,
        shard_inputs,
        unshard,
    )

    ids, labels = data(1, 16, 0)
    model = build("llama", register())
    x = torch.zeros(1, 4, 2)
    got = {
        "shard_inputs": _error(lambda: shard_inputs(ids, labels)),
        "unshard": _error(lambda: unshard(x)),
        "reduce_loss": _error(lambda: reduce_loss(torch.tensor(1.0))),
        "all_reduce_grads": _error(lambda: all_reduce_grads(model)),
        "ShardedCache": _error(lambda: ShardedCache()),
        "relayout": _error(lambda: relayout(x, "zigzag", "contiguous")),
    }
    batch = shard_inputs(ids, labels, group=dist.group.WORLD)
    batch.pop("cp_group")  # the model's attention then gets cp_group=None
    got["attention"] = _error(lambda: model(**batch, use_cache=False))
    return got


def test_group_none_is_an_error_in_a_world_of_several_ranks():
    for got in run_world(4, _group_none, timeout=120):
        for what, msg in got.items():
            assert msg is not None and msg.startswith("ValueError"), (what, msg)
            name = "cp_group" if what == "attention" else "group"
            assert f"{name}=None is ambiguous" in msg, (what, msg)


def test_group_none_and_local_are_this_process_alone():
    from longattn.integrations.transformers import reduce_loss, shard_inputs, unshard

    ids, labels = data(1, 16, 0)
    for group in (None, LOCAL):
        batch = shard_inputs(ids, labels, group=group)
        assert torch.equal(batch["input_ids"], ids) and batch["cp_group"] is LOCAL
        assert torch.equal(unshard(ids, group=group), ids)
        assert reduce_loss(torch.tensor(2.5), group).item() == 2.5


def _mesh_step(rank, world, layout):
    from torch.distributed.device_mesh import init_device_mesh

    from longattn.integrations.demo import train_step
    from longattn.integrations.transformers import register

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    logits, loss, grads = train_step(build("qwen2", register()), *data(2, 32, 3), layout=layout,
                                     group=mesh)
    two_d = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
    err = _error(lambda: train_step(build("llama", register()), *data(1, 16, 0),
                                    layout="zigzag", group=two_d))
    return logits, loss, grads, err


def test_a_1d_device_mesh_is_a_group():
    from longattn.integrations.demo import train_step

    results = run_world(4, _mesh_step, "contiguous", timeout=180)
    ref = train_step(build("qwen2"), *data(2, 32, 3))
    logits, loss, grads, err = results[0]
    assert rel_error(logits, ref[0]) <= 1e-10
    assert max(rel_error(grads[n], ref[2][n]) for n in grads) <= 1e-10
    for res in results:
        assert res[3] is not None and "1-D DeviceMesh" in res[3], res[3]


def _positions_every_call(rank, world):
    """Rank 0 passes the *same* position_ids tensor to every forward, the others fresh equal
    copies; then rank 0 changes its tensor in place (same object, wrong values)."""
    from longattn.integrations.transformers import register, shard_inputs

    torch.set_num_threads(1)
    model = build("llama", register())
    ids, _ = data(1, 16, 0)
    batch = shard_inputs(ids, group=dist.group.WORLD)
    outs = []
    with torch.no_grad():
        for _ in range(2):
            if rank != 0:
                batch = {**batch, "position_ids": batch["position_ids"].clone()}
            outs.append(model(**batch, use_cache=False).logits)
        if rank == 0:
            batch["position_ids"].add_(1)
        err = _error(lambda: model(**batch, use_cache=False))
    return torch.equal(outs[0], outs[1]), err


def test_the_position_check_runs_on_every_rank_on_every_call():
    for rank, (same, err) in enumerate(run_world(4, _positions_every_call, timeout=120)):
        assert same
        assert err is not None and "position_ids" in err and "rank(s) [0]" in err, (rank, err)


def _mismatch(rank, world, what):
    from longattn.integrations.transformers import all_reduce_grads, register, shard_inputs

    torch.set_num_threads(1)
    cp = dist.group.WORLD
    ids, labels = data(1, 16, 0)
    if what == "sliding_window":  # rank 1 built its model with another window
        model = build("mistral", register())
        if rank == 1:
            model.config.sliding_window = 12
        return _error(lambda: model(**shard_inputs(ids, labels, group=cp, layout="contiguous"),
                                    use_cache=False))
    if what == "layout":  # rank 1 sharded in another layout (by hand: shard_inputs would
        # refuse a layout that differs between ranks itself)
        from longattn.common.layout import take_shard

        model = build("llama", register())
        batch = shard_inputs(ids, labels, group=cp, layout="zigzag")
        if rank == 1:
            pos = torch.arange(ids.shape[1]).unsqueeze(0)
            batch = {**batch, **{k: take_shard(x, rank, world, layout="striped") for k, x in
                                 (("input_ids", ids), ("position_ids", pos))}}
            batch.pop("labels"), batch.pop("shift_labels")
            batch.pop("num_items_in_batch"), batch.pop("cp_batch")  # sharded by hand
        return _error(lambda: model(**batch, use_cache=False))
    if what == "grads":  # rank 1 has one gradient fewer
        model = build("llama", register())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        if rank == 1:
            next(model.parameters()).grad = None
        return _error(lambda: all_reduce_grads(model, cp))
    raise AssertionError(what)


@pytest.mark.parametrize("what,match", [
    ("sliding_window", "sliding_window must be the same on every rank"),
    ("layout", "position_ids layout must be the same on every rank"),
    ("grads", "parameters with a gradient must be the same on every rank"),
])
def test_a_mismatch_raises_on_every_rank(what, match):
    msgs = run_world(4, _mismatch, what, timeout=120)
    assert all(m is not None and match in m for m in msgs), msgs


def test_transformers_attention_wants_4d_tensors():
    from longattn.integrations.transformers import attention

    model = build("llama")
    module = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    kv = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"query must be a 4-D \[batch, heads, seq, head_dim\]"):
        attention(module, q[0], kv, kv)
    with pytest.raises(ValueError, match="value must be a 4-D"):
        attention(module, q, kv, kv[0])
