"""transformers' ``Trainer`` with the sequence sharded over a context-parallel group.

    from longattn.integrations.trainer import LongattnTrainer
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register())
    trainer = LongattnTrainer(model=model, args=args, train_dataset=ds,
                              data_collator=collator, cp_group=cp, dp_group=dp)
    trainer.train()   # torchrun over dp x cp ranks: the one-process training, exactly

``Trainer``'s own context parallelism (``ParallelismConfig(cp_size=...)``) runs only
transformers' ``sdpa`` attention through ``torch.distributed.tensor.experimental.context_parallel``;
:class:`LongattnTrainer` leaves it off and does three things instead (see ``docs/trainer.md``):

* **the same batch on every cp rank**: the data loader's shard (accelerate's
  ``BatchSamplerShard``) is over the data-parallel replicas only (``dp_group``), not over every
  process, so the ranks of one cp group read the same batches;
* **the batch sharded**: every micro-batch of an optimizer step goes through
  :func:`~longattn.integrations.training.shard_inputs` (padded or packed batches included), and
  its ``num_items_in_batch`` becomes the counted labels of the whole step (every micro-batch of
  the gradient accumulation, every dp replica), so each micro-batch's loss is its share of the
  step's mean token loss, as ``Trainer`` computes it in one process;
* **no second scaling**: ``compute_loss`` returns the model's loss as it is (longattn's loss
  wrapper already makes the gradient one to be averaged over dp x cp, which the DDP that
  accelerate wraps around the model does, and reports the whole step's share), where
  ``Trainer`` would multiply it by the number of processes and recount the items.

The world must be exactly the dp x cp ranks (accelerate averages the gradients over every
process). Map-style datasets; ``train()`` only (``evaluate()`` / ``predict()`` are not
sharded).
"""

from __future__ import annotations

import torch

from longattn.common.dist import LOCAL, agree, resolve_group
from longattn.integrations.training import shard_inputs

__all__ = ["LongattnTrainer", "BATCH_KEYS"]  # noqa: F822 - LongattnTrainer is made on first use

BATCH_KEYS = ("input_ids", "labels", "position_ids", "attention_mask")
"""The keys a collated batch may have (what :func:`shard_inputs` takes)."""


def _make():
    """Subclass ``transformers.Trainer`` on first use (module ``__getattr__``), so importing
    this module needs no transformers."""
    from transformers import Trainer

    class LongattnTrainer(Trainer):
        """``transformers.Trainer`` training a model registered with
        :func:`longattn.integrations.transformers.register` with the sequence sharded over
        ``cp_group``. Extra keywords: ``cp_group`` (ProcessGroup, 1-D DeviceMesh or LOCAL;
        longattn's group rule, so ``None`` raises in a world of several ranks), ``dp_group``
        (the data-parallel group, default ``LOCAL``), ``layout`` (default
        :func:`~longattn.integrations.transformers.layout_for` of the model's config). The
        world must be exactly ``dp x cp`` ranks. Every other argument is ``Trainer``'s."""

        loss_is_scaled_for_ga = True  # each micro-batch's loss is its share of the step

        def __init__(self, *args, cp_group=None, dp_group=LOCAL, layout=None, **kwargs):
            super().__init__(*args, **kwargs)
            from longattn.integrations.transformers import layout_for

            self.cp_group, self.dp_group = cp_group, dp_group
            self.cp_layout = layout or layout_for(self.model.config)
            self._cp = resolve_group(cp_group, name="cp_group")
            self._dp = resolve_group(dp_group, name="dp_group")
            world = self.args.world_size

            def check():
                _check_loss_settings(self)
                return _check_world(self._cp, self._dp, world)

            agree("LongattnTrainer", self._cp, check)

        def get_train_dataloader(self):
            """``Trainer``'s loader, sharded over the dp replicas only: every rank of a cp
            group reads the same batches (accelerate's ``BatchSamplerShard`` over
            ``dp_group``'s size and rank)."""
            loader = super().get_train_dataloader()
            shard = getattr(loader, "batch_sampler", None)
            if self.args.world_size > 1:
                if not hasattr(shard, "num_processes"):
                    raise ValueError(
                        "LongattnTrainer needs a map-style train_dataset (accelerate's "
                        f"BatchSamplerShard), got a loader with {type(shard).__name__}")
                shard.num_processes = self._dp.size
                shard.process_index = self._dp.rank
            return loader

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            """The micro-batches of one optimizer step, each sharded; ``num_items_in_batch``
            is the counted labels of all of them over every dp replica."""
            samples = []
            for _ in range(num_batches):
                try:
                    samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            batches = [self._shard(s) for s in samples]
            if not batches or "num_items_in_batch" not in batches[0]:
                return batches, None
            total = sum(int(b["num_items_in_batch"]) for b in batches)
            for b in batches:
                b["num_items_in_batch"] = torch.tensor(total, device=device)
            return batches, torch.tensor(total, device=device)

        def _shard(self, sample):
            extra = sorted(set(sample) - set(BATCH_KEYS))
            if extra:
                raise ValueError(f"LongattnTrainer: the collated batch has keys {extra}; it "
                                 f"may hold only {BATCH_KEYS} (shard_inputs' arguments)")
            return shard_inputs(
                sample["input_ids"], sample.get("labels"), sample.get("position_ids"),
                sample.get("attention_mask"), group=self.cp_group, layout=self.cp_layout,
                dp_group=self.dp_group,
                vocab_size=getattr(self.model.config, "vocab_size", None))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The model's loss as it is: the whole step's share, its gradient meant to be
            averaged over dp x cp (``Trainer`` would scale it by the process count)."""
            if "cp_batch" not in inputs:
                raise ValueError("LongattnTrainer.compute_loss takes the batches of "
                                 "get_batch_samples (sharded); evaluation is not sharded")
            if "labels" not in inputs:
                raise ValueError("LongattnTrainer trains on labels: the batch has none (give "
                                 "the collator labels, e.g. DataCollatorForLanguageModeling or "
                                 "DataCollatorWithFlattening over rows with input_ids)")
            outputs = model(**inputs)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            return (loss, outputs) if return_outputs else loss

    LongattnTrainer.__module__ = __name__
    return LongattnTrainer


def _check_loss_settings(trainer):
    """Trainer settings that change the loss, which compute_loss (the model's own sharded loss)
    would silently ignore."""
    if getattr(trainer.args, "label_smoothing_factor", 0) not in (0, 0.0):
        raise ValueError(f"LongattnTrainer does not support label_smoothing_factor="
                         f"{trainer.args.label_smoothing_factor} (the loss is the model's own, "
                         "summed over the ranks); use 0")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError("LongattnTrainer does not support compute_loss_func (the loss is the "
                         "model's own, summed over the ranks)")


def _check_world(cp, dp, world):
    if cp.size * dp.size != world:
        raise ValueError(
            f"cp_group ({cp.size} ranks) x dp_group ({dp.size} ranks) must be the whole world "
            f"of {world} processes (accelerate averages the gradients over every process)")
    return None, {"cp size": cp.size, "dp size": dp.size, "world": world}


def __getattr__(name):
    if name == "LongattnTrainer":
        cls = _make()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
