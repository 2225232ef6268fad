"""longattn.tree: exact cross-device decoding by tree reduction (Tree Attention).

* :func:`tree_decode` -- replicated new queries against a sequence-sharded KV cache: a local
  attention step per rank, then one all-reduce MAX and one all-reduce SUM (optionally
  hierarchical: inside nodes, across nodes, back inside).
* :func:`ring_decode` -- the Ring Attention baseline: the KV shards travel around the ring.
* :class:`KVCache` -- a sequence-sharded KV cache whose tail rank takes the new tokens.
* :mod:`longattn.tree.jax` -- the same in JAX with ``shard_map``.

Torch functions are forward only (inference).
"""

from longattn.common import version_of as _version_of

__version__ = _version_of("longattn-tree")

from longattn.tree.cache import KVCache, empty_cache
from longattn.tree.decode import hierarchy_groups, tree_decode
from longattn.tree.ring import ring_decode

__all__ = ["tree_decode", "ring_decode", "hierarchy_groups", "KVCache", "empty_cache"]
