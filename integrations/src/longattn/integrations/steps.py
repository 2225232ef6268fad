"""One training step of the tiny demo models, sharded over ranks or in one process.

The demo rows (:mod:`longattn.integrations.demo`) and the tests share these:

* :func:`training_data` -- a padded (left, right and unpadded rows) or packed (one row of
  documents, positions restarting) batch;
* :func:`sharded_step` -- on one rank: :func:`~longattn.integrations.transformers.shard_inputs`,
  forward, backward with ``all_reduce_grads``, DDP over the cp group, or FSDP2 on a 2 x 2
  (dp x cp) mesh, and one AdamW step;
* :func:`reference_step` -- the same model and batch in one process with transformers' ``sdpa``.

Each returns ``{"logits", "loss", "grads", "params"}`` (full tensors; the parameters after the
step). Padding tokens predict nothing in a sharded batch, so the reference gets the same
``shift_labels`` (:func:`longattn.integrations.demo.shifted_labels`).
"""

from __future__ import annotations

import torch

from longattn.integrations import demo


def training_data(what: str, seed: int, seq: int = 24):
    """``(input_ids, labels, position_ids, attention_mask)`` of a whole batch: ``padded`` (3
    rows of ``seq``), ``padded4`` (4 rows), or ``packed`` (4 documents of ``seq - 1`` tokens in
    one row, so :func:`shard_inputs` pads it to a multiple of the ranks)."""
    if what == "packed":
        g = torch.Generator().manual_seed(seed)
        cuts = sorted(torch.randperm(seq - 3, generator=g)[:3].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, seq - 1])]
        ids, labels, pos = demo.tiny_packed_batch(lengths, seed)
        return ids, labels, pos, None
    if what not in ("padded", "padded4"):
        raise ValueError(f"what must be 'padded', 'padded4' or 'packed', got {what!r}")
    ids, labels, mask = demo.tiny_padded_batch(4 if what == "padded4" else 3, seq, seed)
    return ids, labels, None, mask


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2's DTensors


def _result(model, loss, logits):
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    return {"logits": logits, "loss": loss.detach(), "grads": grads, "params": params}


def reference_step(kind, data, scale=1):
    """One process. ``scale``: the gradient reaching the logits is multiplied by it and the
    parameter gradients divided by it again (in float64): what averaging ``scale`` ranks'
    gradients computes (``longattn.integrations.training``). A packed batch of a
    bidirectional model runs document by document (transformers' bidirectional mask ignores
    packing)."""
    ids, labels, pos, mask = data
    if pos is not None and "bidirectional" in kind:
        return _reference_by_document(kind, data, scale)
    model = demo.tiny_model(kind)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels,
                shift_labels=demo.shifted_labels(labels, mask), use_cache=False)
    if scale != 1:
        out.logits.register_hook(lambda g: g * scale)
    out.loss.backward()
    for p in model.parameters():
        p.grad.div_(scale)
    return _result(model, out.loss, out.logits.detach())


def _reference_by_document(kind, data, scale):
    ids, labels, pos, _ = data
    model = demo.tiny_model(kind)
    shifted = demo.shifted_labels(labels)
    starts = (pos[0] == 0).nonzero()[:, 0].tolist() + [pos.shape[1]]
    count = (shifted != -100).sum()  # the whole batch's: the same token mean
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
    return _result(model, loss, torch.cat(logits, dim=1))


def mesh_2x2():
    """A 2 x 2 CPU ``DeviceMesh`` with dims ``("dp", "cp")`` over a 4-rank world."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))


def sharded_step(kind, layout, how, data, group=None):
    """One step on this rank. ``how``: ``all_reduce`` (``all_reduce_grads`` over ``group``),
    ``ddp`` (``DistributedDataParallel`` over ``group``) or ``fsdp`` (``fully_shard`` on
    :func:`mesh_2x2`; replica ``d`` takes rows ``2d, 2d+1`` of ``data`` and passes
    ``dp_group``). Returns the result dict with this rank's logits gathered (original token
    order; for ``fsdp`` its replica's rows)."""
    from longattn.common.dist import LOCAL
    from longattn.integrations.transformers import all_reduce_grads, register, shard_inputs, unshard

    torch.set_num_threads(1)
    model = demo.tiny_model(kind, register())
    ids, labels, pos, mask = data
    net, dp = model, LOCAL
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, process_group=group)
    elif how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = mesh_2x2()
        net = fully_shard(model, mesh=mesh)
        group, dp = mesh["cp"], mesh["dp"]
        rows = slice(2 * dp.get_local_rank(), 2 * dp.get_local_rank() + 2)
        ids, labels, mask = ids[rows], labels[rows], mask[rows]
    batch = shard_inputs(ids, labels, pos, mask, group=group, layout=layout, dp_group=dp)
    out = net(**batch, use_cache=False)
    out.loss.backward()
    if how == "all_reduce":
        all_reduce_grads(model, group)
    return _result(model, out.loss, unshard(out.logits, group=group, batch=batch))
