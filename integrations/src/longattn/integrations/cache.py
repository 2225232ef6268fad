"""A KV cache sharded over the sequence, for decoding with :func:`longattn.tree.tree_decode`.

    cp = torch.distributed.group.WORLD                    # the context-parallel group
    cache = ShardedCache(group=cp, layout=lay)            # lay: the prefill's layout
    out = model(**shard_inputs(prompt, group=cp, layout=lay), past_key_values=cache,
                use_cache=True)
    ... logits of the last prompt token: unshard(out.logits, group=cp, layout=lay)[:, -1] ...
    out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)   # replicated

Each layer's keys and values live in a :class:`longattn.tree.cache.KVCache` (tree's
sequence-sharded cache, the one home of its storage rules), wrapped as a transformers cache
layer:

* The first call (the prefill) stores each rank's shard of the prompt: rank ``r`` keeps the
  keys/values of the tokens ``layout.positions(S, r, n, layout)`` (``KVCache.lens`` is
  ``[S/n] * n``).
* Every later call brings new tokens that are the same on every rank (decoding):
  ``KVCache.append`` stores them on the rank owning the sequence tail (the last rank), so the
  global cache is the union of the shards with no duplicates, and the new tokens are the last
  keys of the last rank's shard -- :func:`tree_decode`'s contract.
* ``get_seq_length()`` is the *global* length (``KVCache.seq_len``), so the model's default
  ``position_ids`` for the new tokens are their global positions.

The returned key tensor carries a small record (``_longattn_state``: decoding or not, the
global positions of this rank's cached keys and of the new tokens, every rank's cached length,
the group) that the attention function reads: ``tree_decode`` gets ``shard_lens`` from it, and
sliding-window layers select each new token's window from the positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from longattn.common import layout as _layout
from longattn.common.dist import Group, agree, resolve_group
from longattn.tree.cache import KVCache, check_new_tokens


@dataclass
class CacheState:
    decoding: bool
    positions: torch.Tensor  # global positions of this rank's cached keys (int64, CPU)
    query_positions: torch.Tensor  # global positions of the tokens of this call
    lens: list  # every rank's number of cached keys (KVCache.lens)
    group: object  # the cache's group, as given


class ShardedLayer(DynamicLayer):
    """One layer of a :class:`ShardedCache`: a :class:`~longattn.tree.cache.KVCache` (BSHD
    buffers, this rank's shard) seen by transformers as BHSD ``keys`` / ``values``."""

    is_croppable = False

    def __init__(self, g: Group, layout: str, group=None):
        super().__init__()
        self.g, self.layout, self.group = g, layout, group
        self.kv: KVCache | None = None
        self.positions: torch.Tensor | None = None  # global positions of the local keys

    def update(self, key_states, value_states, *args, **kwargs):
        """Store this call's keys/values ``[B, Hkv, S, D]``; returns this rank's cached keys and
        values (BHSD views of the KVCache buffers), the key tensor carrying the state.

        Checked on every rank before any rank writes (:func:`longattn.common.dist.agree`, one
        small all-gather): 4-D tensors, the cache's batch / heads / head dim / dtype when
        decoding, and the same shapes, dtype, device type and phase (prefill or decoding) on
        every rank; a bad call on any rank raises the same error on every rank and leaves every
        rank's cache as it was."""
        agree("ShardedCache.update", self.g, lambda: self._check(key_states, value_states))
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # BSHD
        n, rank, length = self.g.size, self.g.rank, k.shape[1]
        if self.kv is None:  # the prefill: every rank stores its shard
            self.kv = KVCache(k.contiguous(), v.contiguous(), [length] * n, rank)
            self.positions = _layout.positions(length * n, rank, n, self.layout)
            new, decoding = self.positions, False
        else:  # decoding: the same new tokens on every rank; the tail rank keeps them
            start = self.kv.seq_len
            new = torch.arange(start, start + length)
            mine = [new[s:s + c] for r, s, c in self.kv.placement(length) if r == rank]
            self.kv.append(k, v)
            self.positions = torch.cat([self.positions, *mine])
            decoding = True
        self.keys = self.kv.local_k.transpose(1, 2)
        self.values = self.kv.local_v.transpose(1, 2)
        keys = self.keys.view_as(self.keys)  # a fresh tensor object to carry this call's state
        keys._longattn_state = CacheState(decoding, self.positions, new, list(self.kv.lens),
                                          self.group)
        return keys, self.values

    def _check(self, key_states, value_states):
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 4:
                raise ValueError(f"{name} must be a 4-D [batch, kv_heads, seq, head_dim] tensor, "
                                 f"got {tuple(t.shape)}")
        if value_states.shape[:3] != key_states.shape[:3]:
            raise ValueError(f"value_states {tuple(value_states.shape)} must have the batch, heads "
                             f"and length of key_states {tuple(key_states.shape)}")
        if value_states.dtype != key_states.dtype:
            raise TypeError(f"value_states dtype {value_states.dtype} must be key_states' "
                            f"{key_states.dtype}")
        decoding = self.kv is not None
        if decoding:
            for name, t, buf in (("key_states", key_states, self.kv.k),
                                 ("value_states", value_states, self.kv.v)):
                check_new_tokens(name, t, buf, seq_dim=2)
        elif self.g.distributed:
            _layout.positions(key_states.shape[2] * self.g.size, self.g.rank, self.g.size,
                              self.layout)  # the prefill's shards must split in the layout
        return None, {"decoding": decoding, "key_states.shape": tuple(key_states.shape),
                      "value_states.shape": tuple(value_states.shape),
                      "dtype": key_states.dtype, "device type": key_states.device.type,
                      "layout": self.layout}

    def get_seq_length(self) -> int:
        """Global number of cached tokens (all ranks together)."""
        return 0 if self.kv is None else self.kv.seq_len

    def _refuse(self, what):
        raise NotImplementedError(f"ShardedCache does not support {what}: the cache is sharded "
                                  "over the ranks of its group")

    def crop(self, tokens_to_remove):
        self._refuse("crop()")

    def reorder_cache(self, beam_idx):
        self._refuse("beam search (reorder_cache)")

    def batch_repeat_interleave(self, repeats):
        self._refuse("batch_repeat_interleave()")

    def batch_select_indices(self, indices):
        self._refuse("batch_select_indices()")


class ShardedCache(DynamicCache):
    """Sequence-sharded :class:`transformers.DynamicCache` (see the module docstring); its layers
    are :class:`ShardedLayer` s (one :class:`~longattn.tree.cache.KVCache` each).

    Args:
        group: the context-parallel group: a ``ProcessGroup``, a 1-D ``DeviceMesh``,
            ``LOCAL`` or None (this process alone; an error in a world of several ranks).
        layout: the layout of the prefill's shards (``shard_inputs``' ``layout``), the same on
            every rank (checked on every rank: one small all-gather).
    """

    def __init__(self, *, group=None, layout: str = "zigzag"):
        g = resolve_group(group)

        def check():
            if not isinstance(layout, str) or layout not in _layout.LAYOUTS:
                raise ValueError(f"layout must be one of {_layout.LAYOUTS}, got {layout!r}")
            return None, {"layout": layout}

        agree("ShardedCache", g, check)  # the same layout on every rank, checked everywhere
        super().__init__()
        self.group, self.layout, self.n, self.rank = group, layout, g.size, g.rank
        self.layer_class_to_replicate = lambda: ShardedLayer(g, layout, group)

    def kv_cache(self, layer_idx: int) -> KVCache:
        """The :class:`~longattn.tree.cache.KVCache` of layer ``layer_idx``."""
        return self.layers[layer_idx].kv
