"""longattn.tree.jax: Tree Attention decoding (and the ring baseline) in JAX with shard_map.

``tree_decode(q, k, v, *, mesh, axis_name, scale=None, kv_lens=None, causal=True)`` and
``ring_decode(...)``; ``local_attention`` is the local step (split-K XLA, Pallas or cuDNN).
See :mod:`longattn.tree.jax.decode` for the layout.
"""

from longattn.tree.jax.decode import lower, merge, ring_decode, tree_decode
from longattn.tree.jax.hlo import collective_bytes
from longattn.tree.jax.local import local_attention

__all__ = ["tree_decode", "ring_decode", "local_attention", "merge", "lower",
           "collective_bytes"]
