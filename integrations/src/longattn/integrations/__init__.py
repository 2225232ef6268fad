"""longattn.integrations: longattn in real models.

* :mod:`longattn.integrations.transformers` -- context-parallel attention for Hugging Face
  transformers models (``attn_implementation="longattn_cp"``), input sharding, loss and
  gradient reduction.
* :mod:`longattn.integrations.training` -- this rank's batch (padded or packed), the gradient
  convention (averaged over the ranks, like DDP / FSDP) and the loss, gradient and gather
  helpers the transformers module re-exports.
* :mod:`longattn.integrations.steps` -- one training step of the tiny demo models, sharded or
  in one process (the demo rows and the tests).
* :mod:`longattn.integrations.cache` -- a sequence-sharded KV cache for tree decoding (its
  layers are :class:`longattn.tree.cache.KVCache`).
* :mod:`longattn.integrations.relayout` -- move a sharded tensor between layouts.
* :mod:`longattn.integrations.driver` -- the demo driver behind ``longattn demo`` / ``check``
  and ``nox -s demo``.
* :mod:`longattn.integrations.cli` -- the ``longattn`` command (``demo``, ``check``,
  ``bench``, ``repro``, ``list``).

Nothing is imported here, so ``import longattn.integrations`` needs no transformers.
"""

from longattn.common import version_of as _version_of

__version__ = _version_of("longattn-integrations")
