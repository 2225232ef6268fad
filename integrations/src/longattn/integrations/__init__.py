"""longattn.integrations: longattn in real models.

* :mod:`longattn.integrations.transformers` -- context-parallel attention for Hugging Face
  transformers models (``attn_implementation="longattn_cp"``), input sharding, loss and
  gradient reduction.
* :mod:`longattn.integrations.cache` -- a sequence-sharded KV cache for tree decoding (its
  layers are :class:`longattn.tree.cache.KVCache`).
* :mod:`longattn.integrations.relayout` -- move a sharded tensor between layouts.
* :mod:`longattn.integrations.driver` -- the demo driver behind ``longattn demo`` / ``check``
  and ``nox -s demo``.
* :mod:`longattn.integrations.cli` -- the ``longattn`` command (``demo``, ``check``,
  ``bench``, ``repro``, ``list``).

Nothing is imported here, so ``import longattn.integrations`` needs no transformers.
"""
