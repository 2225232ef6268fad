"""longattn.tree.jax: Tree Attention decoding (and the ring baseline) in JAX with shard_map.

``tree_decode(q, k, v, *, mesh, axis_name, softmax_scale=None, shard_lens=None,
cache_seqlens=None, causal=True)`` and ``ring_decode(...)`` over a mesh;
``tree_decode_per_device(q, k, v, *, axis_name, ...)`` and ``ring_decode_per_device`` from
inside a ``shard_map`` of your own; ``local_attention`` is the local step (split-K XLA, Pallas
or cuDNN).
:mod:`longattn.tree.jax.merge` is the one JAX merge rule (``merge_stacked``, ``finish_rows``)
and accumulation-dtype rule (``acc_dtype``) of longattn. See :mod:`longattn.tree.jax.decode`
for the layout.
"""

from longattn.tree.jax.decode import (
    lower,
    ring_decode,
    ring_decode_per_device,
    tree_decode,
    tree_decode_per_device,
)
from longattn.tree.jax.hlo import collective_bytes
from longattn.tree.jax.local import local_attention
from longattn.tree.jax.merge import acc_dtype, finish_rows, merge_stacked

__all__ = ["tree_decode", "ring_decode", "tree_decode_per_device", "ring_decode_per_device",
           "local_attention", "merge_stacked", "finish_rows",
           "acc_dtype", "lower", "collective_bytes"]
