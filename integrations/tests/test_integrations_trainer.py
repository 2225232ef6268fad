"""``LongattnTrainer``: transformers' ``Trainer`` with the sequence sharded equals one process.

A tiny float64 Llama (``longattn.integrations.demo``, ``use_cache=False``) trained for 3
optimizer steps (AdamW, linear schedule, gradient accumulation 2, shuffled batches) on a list
of examples of mixed lengths, right-padded to a multiple of 4 (``attention_mask``) or packed
into one row per batch (``DataCollatorWithFlattening``), by ``trainer.train()`` on gloo worlds of
4 ranks, data-parallel x context-parallel 2 x 2 (``dp_group=mesh["dp"]``,
``cp_group=mesh["cp"]``; accelerate's DDP over the 4 processes averages the gradients), and of
2 ranks (cp = 2), against the stock ``Trainer`` in one process (transformers' ``sdpa``) with
the replicas' batches of each micro-step as one: every parameter and every logged gradient
norm within 1e-10 relative (the attention's float64 sums in another order; transformers'
float32 loss and RMSNorm make the same roundings, since 2 and 4 ranks scale the gradient by a
power of two), the logged losses within 1e-6 (float32). The reference runs in the test
process, after longattn's ``register()`` calls there: registering must leave the stock
``Trainer`` as it is (it once made it count each row's first label, 3.4e-3 off with right
padding, in any process that had registered longattn before).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from longattn.common.dist import LOCAL
from longattn.common.testing import rel_error, run_world
from longattn.integrations import demo

TOL = 1e-10
LOSS_TOL = 1e-6  # transformers' loss is float32
BATCH, ACCUM, STEPS = 2, 2, 3


def _examples(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(0, demo.VOCAB, (length,), generator=g)
        labels = ids.masked_fill(torch.rand(length, generator=g) < 0.15, -100)
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def pad_right(features, multiple=4):
    """Right-pad to a multiple of ``multiple`` tokens: ``input_ids``, ``labels`` (-100 at
    padding) and ``attention_mask``."""
    longest = max(len(f["input_ids"]) for f in features)
    s = -(-longest // multiple) * multiple
    ids = torch.zeros(len(features), s, dtype=torch.long)
    labels = torch.full((len(features), s), -100, dtype=torch.long)
    mask = torch.zeros(len(features), s, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _collator(what):
    if what == "padded":
        return pad_right
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening()


def _args(out_dir, batch):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=1e-2, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _losses(trainer):
    """The logged ``(loss, grad_norm)`` of every step (the norm catches a gradient scaled by a
    constant, which AdamW's update would hide)."""
    return [(row["loss"], row["grad_norm"]) for row in trainer.state.log_history
            if "loss" in row]


def _model(attn):
    model = demo.tiny_model("llama", attn)
    model.config.use_cache = False
    return model


def _register_everything():
    """Every registration longattn makes (the transformers and torch.compile attention, the
    mask function, the loss wrapper), as a process that also trains with longattn has them."""
    from longattn.integrations import compile as cpc
    from longattn.integrations.transformers import register

    register()
    cpc.register()


def reference(what, seed, replicas):
    """The stock Trainer, one process, ``sdpa``, the replicas' batches as one."""
    from transformers import Trainer

    _register_everything()
    model = _model("sdpa")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=_args(out, replicas * BATCH),
                          train_dataset=_examples(seed), data_collator=_collator(what))
        trainer.train()
    return _params(model), _losses(trainer)


_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _sharded(rank, world, what, seed):
    """``LongattnTrainer`` on this rank: dp x cp = 2 x 2 on 4 ranks, cp = 2 on 2 (accelerate
    reads the launcher's variables; they are restored after, the world is shared with other
    tests)."""
    from accelerate.state import AcceleratorState

    from longattn.integrations import steps
    from longattn.integrations.trainer import LongattnTrainer
    from longattn.integrations.transformers import register

    torch.set_num_threads(1)
    old = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    try:
        cp, dp = dist.group.WORLD, LOCAL
        if world == 4:
            mesh = steps.mesh_2x2()
            cp, dp = mesh["cp"], mesh["dp"]
        model = _model(register())
        with tempfile.TemporaryDirectory() as out:
            trainer = LongattnTrainer(model=model, args=_args(out, BATCH),
                                      train_dataset=_examples(seed),
                                      data_collator=_collator(what), cp_group=cp,
                                      dp_group=dp)
            trainer.train()
        return _params(model), _losses(trainer)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("world,what,seed", [(4, "padded", 0), (4, "packed", 1),
                                              (2, "packed", 2)])
def test_trainer_equals_one_process(world, what, seed):
    ref_params, ref_losses = reference(what, seed, world // 2)
    got = run_world(world, _sharded, what, seed, timeout=600)
    for rank, (params, losses) in enumerate(got):
        err = max(rel_error(params[n], p) for n, p in ref_params.items())
        moved = max(rel_error(params[n], p) for n, p in _params(_model("sdpa")).items())
        assert err <= TOL, f"{what} rank {rank}: parameters {err:.2e}"
        assert moved > 1e-4, f"{what}: training did not move the parameters ({moved:.1e})"
        assert len(losses) == len(ref_losses) == STEPS, (losses, ref_losses)
        for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
            assert rel_error(torch.tensor(loss), torch.tensor(ref_loss)) <= LOSS_TOL, (
                what, rank, losses, ref_losses)
            assert rel_error(torch.tensor(norm), torch.tensor(ref_norm)) <= TOL, (
                what, rank, losses, ref_losses)


def test_registering_leaves_the_stock_trainer_as_it_is():
    """After ``register()`` (and ``compile.register()``) in this process, the stock ``Trainer``
    counts ``num_items_in_batch`` over the shifted labels (transformers decides that from
    ``LOSS_MAPPING[loss_type] is ForCausalLMLoss``, so the entry must stay transformers' own),
    and every causal LM's loss is still longattn's wrapper (which ``shard_inputs``' batches
    need)."""
    from transformers import Trainer
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    _register_everything()
    assert LOSS_MAPPING["ForCausalLM"] is ForCausalLMLoss
    for attn in ("sdpa", "longattn_cp"):
        assert _model(attn).loss_function._longattn_original is ForCausalLMLoss, attn
    examples = _examples(0)
    batches = [pad_right(examples[i:i + BATCH]) for i in (0, BATCH)]
    first = sum(int((b["labels"][:, 0] != -100).sum()) for b in batches)
    assert first > 0, "no row's first label counts: the check below could not fail"
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=_model("sdpa"), args=_args(out, BATCH), train_dataset=examples,
                          data_collator=pad_right)
        _, count = trainer.get_batch_samples(iter(batches), ACCUM, torch.device("cpu"))
    shifted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert int(count) == shifted, (int(count), shifted, first)


def test_settings_that_change_the_loss_are_refused():
    """label_smoothing_factor and compute_loss_func change the loss; compute_loss returns the
    model's own sharded loss, so both trained silently without them before. A batch without
    labels was a bare KeyError."""
    from dataclasses import replace

    from longattn.integrations.trainer import LongattnTrainer
    from longattn.integrations.transformers import register

    name = register()
    with tempfile.TemporaryDirectory() as out:
        args = _args(out, BATCH)
        for kw, word in ((dict(args=replace(args, label_smoothing_factor=0.1)),
                          "label_smoothing_factor"),
                         (dict(args=args, compute_loss_func=lambda *a, **k: 0.0),
                          "compute_loss_func")):
            with pytest.raises(ValueError, match=word):
                LongattnTrainer(model=_model(name), train_dataset=_examples(0),
                                data_collator=pad_right, cp_group=LOCAL, **kw)
        trainer = LongattnTrainer(model=_model(name), args=args, train_dataset=_examples(0),
                                  data_collator=pad_right, cp_group=LOCAL)
        with pytest.raises(ValueError, match="trains on labels"):
            trainer.compute_loss(trainer.model, {"input_ids": torch.zeros(1, 4, dtype=int),
                                                 "cp_batch": None})
