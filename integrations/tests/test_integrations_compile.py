"""``torch.compile`` of a model whose attention is longattn's custom op (``compile.register``).

On a 2-rank gloo world, tiny float64 models (``longattn.integrations.demo``), batches from
``shard_inputs`` (plain, padded and packed; Llama: hamilton, Qwen2: hamilton + ring_swa):
``torch.compile(model, fullgraph=True)`` of the forward without labels gives the eager model's
logits and, through the op's ``register_autograd``, its parameter gradients within 1e-12
(relative); a forward with labels compiles with ``fullgraph=False`` (the loss sums the ranks'
shares on the host) and gives the eager loss and gradients within 1e-12. The compiled graph
holds the custom op, never a collective. A bad ``position_ids`` on one rank raises the same
error on both ranks from the compiled model. The backend is ``aot_eager`` (dynamo and
AOTAutograd, so the fake implementation and the autograd registration are what the trace
uses; no C++ code generation on the CPU runners). One world start-up for the whole file.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import rel_error, run_world
from longattn.integrations import demo, steps

TOL = 1e-12

# (model, layout, data, seed): hamilton (plain, padded) and hamilton packed + ring_swa varlen
CASES = [("llama", "zigzag", "plain", 0), ("llama", "zigzag", "padded", 2),
         ("qwen2", "contiguous", "packed", 4)]
LOSS_CASE = 1  # the case also run with labels (fullgraph=False)


def _data(what, seed):
    if what == "plain":
        ids, labels = demo.tiny_batch(2, 24, seed)
        return ids, labels, None, None
    return steps.training_data(what, seed)


def _run(model, batch, labels, weight):
    """Forward (+ loss) and backward; returns (logits, loss or None, grads)."""
    kw = dict(batch)
    if not labels:
        for key in ("labels", "shift_labels", "num_items_in_batch"):
            kw.pop(key, None)
    module = getattr(model, "_orig_mod", model)  # a compiled model's parameters
    module.zero_grad(set_to_none=True)
    out = model(**kw, use_cache=False)
    loss = out.loss if labels else (out.logits * weight).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    return out.logits.detach(), (out.loss.detach() if labels else None), grads


def _errors(got, ref):
    errs = {"logits": rel_error(got[0], ref[0]),
            "grads": max(rel_error(got[2][n], g) for n, g in ref[2].items())}
    if ref[1] is not None:
        errs["loss"] = rel_error(got[1], ref[1])
    return errs


def _recording(ops):
    """aot_eager, recording the op names of the graphs dynamo hands it."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def _bad_positions(compiled, batch, rank):
    """Rank 1 passes shifted position_ids to the compiled model (the same keywords, so no
    recompilation): its error, or None."""
    kw = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels",
                                                      "num_items_in_batch")}
    kw["position_ids"] = kw["position_ids"] + (1 if rank == 1 else 0)
    try:
        compiled(**kw, use_cache=False)
    except ValueError as e:
        return str(e)
    return None


def _compile_cases(rank, world):
    from longattn.integrations.compile import register
    from longattn.integrations.transformers import shard_inputs

    torch.set_num_threads(1)
    name = register()
    cp = dist.group.WORLD
    rows, seen, bad = [], [], None
    for i, (kind, layout, what, seed) in enumerate(CASES):
        ids, labels, pos, mask = _data(what, seed)
        batch = shard_inputs(ids, labels, pos, mask, group=cp, layout=layout)
        eager = demo.tiny_model(kind, name)
        weight = torch.randn(batch["input_ids"].shape + (demo.VOCAB,), dtype=torch.float64,
                             generator=torch.Generator().manual_seed(100 + seed + rank))
        torch._dynamo.reset()
        compiled = torch.compile(demo.tiny_model(kind, name), fullgraph=True,
                                 backend=_recording(seen) if i == 0 else "aot_eager")
        row = {"fullgraph": _errors(_run(compiled, batch, False, weight),
                                    _run(eager, batch, False, weight))}
        if i == 0:
            ops = list(seen)  # the graphs of the first compilation
            bad = _bad_positions(compiled, batch, rank)
        if i == LOSS_CASE:
            torch._dynamo.reset()
            compiled = torch.compile(demo.tiny_model(kind, name), backend="aot_eager")
            row["labels"] = _errors(_run(compiled, batch, True, weight),
                                    _run(eager, batch, True, weight))
            # a second batch: a new loss value, which Dynamo guarded on, retraced into the
            # loss's agreement and failed there (RecursionError)
            ids, labels, pos, mask = _data(what, seed + 1)
            batch = shard_inputs(ids, labels, pos, mask, group=cp, layout=layout)
            row["labels, second batch"] = _errors(_run(compiled, batch, True, weight),
                                                  _run(eager, batch, True, weight))
        rows.append(row)
    torch._dynamo.reset()
    return rows, ops, bad


@pytest.fixture(scope="module")
def results():
    return run_world(2, _compile_cases, timeout=600)


def test_compiled_model_equals_eager(results):
    """fullgraph=True (no labels: logits, gradients) and fullgraph=False (labels: loss too)
    on every rank and case within 1e-12; NaN fails (rel_error of NaN is NaN)."""
    for rank, (rows, _, _) in enumerate(results):
        for case, row in zip(CASES, rows):
            for mode, errs in row.items():
                assert all(e <= TOL for e in errs.values()), f"rank {rank} {case} {mode}: {errs}"


def test_graph_has_op_and_no_collective(results):
    """Every layer's attention is the opaque op (2 layers); no collective is traced."""
    for _, ops, _ in results:
        assert sum("cp_attention" in op for op in ops) == 2, ops
        assert not any("all_gather" in op or "all_reduce" in op or "c10d" in op for op in ops)


def test_bad_position_ids_raise_on_every_rank(results):
    """The compiled model's op runs the eager checks: rank 1's shifted positions raise the
    same ValueError, naming position_ids, on both ranks."""
    got = [bad for _, _, bad in results]
    assert all(msg is not None and "position_ids" in msg for msg in got), got
    assert got[0].split("bad argument")[0] == got[1].split("bad argument")[0]
