"""A KV cache sharded over the sequence, for decoding with :func:`longattn.tree.tree_decode`.

    cache = ShardedCache(layout=lay)                      # lay: the prefill's layout
    out = model(**shard_inputs(prompt, layout=lay), past_key_values=cache, use_cache=True)
    ... logits of the last prompt token: on the rank holding it (see ``unshard``) ...
    out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)   # replicated

* The first call (the prefill) stores each rank's shard of the prompt: rank ``r`` keeps the
  keys/values of the tokens ``layout.positions(S, r, n, layout)``.
* Every later call brings new tokens that are the same on every rank (decoding); only the last
  rank stores them, so the global cache is the union of the shards with no duplicates, and
  the new tokens are the last keys of the last rank's shard -- :func:`tree_decode`'s contract.
* ``get_seq_length()`` is the *global* length, so the model's default ``position_ids`` for the
  new tokens are their global positions.

The returned key tensor carries a small record (``_longattn_state``: decoding or not, the
global positions of this rank's cached keys and of the new tokens) that the attention
function reads: sliding-window layers select each new token's window from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from longattn.common import layout as _layout
from longattn.common.dist import resolve_group


@dataclass
class CacheState:
    decoding: bool
    positions: torch.Tensor  # global positions of this rank's cached keys (int64, CPU)
    query_positions: torch.Tensor  # global positions of the tokens of this call
    lens: list  # every rank's number of cached keys
    group: object  # the cache's group, as given


class ShardedCache(DynamicCache):
    """Sequence-sharded :class:`transformers.DynamicCache` (see the module docstring).

    Args:
        group: the context-parallel group: a ``ProcessGroup``, a 1-D ``DeviceMesh``,
            ``LOCAL`` or None (this process alone; an error in a world of several ranks).
        layout: the layout of the prefill's shards (``shard_inputs``' ``layout``).
    """

    def __init__(self, *, group=None, layout: str = "zigzag"):
        if layout not in _layout.LAYOUTS:
            raise ValueError(f"layout must be one of {_layout.LAYOUTS}, got {layout!r}")
        super().__init__()
        g = resolve_group(group)
        self.group, self.layout, self.n, self.rank = group, layout, g.size, g.rank
        self._positions: dict[int, torch.Tensor] = {}  # layer -> positions of the local keys
        self._global: dict[int, int] = {}  # layer -> global number of cached tokens
        self._lens: dict[int, list] = {}  # layer -> every rank's number of cached tokens

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        length = key_states.shape[-2]
        if layer_idx not in self._positions:  # the prefill: every rank stores its shard
            total = length * self.n
            pos = _layout.positions(total, self.rank, self.n, self.layout)
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            self._positions[layer_idx], self._global[layer_idx] = pos, total
            self._lens[layer_idx] = [length] * self.n
            state = CacheState(False, pos, pos, [length] * self.n, self.group)
        else:  # decoding: the new tokens are replicated; the last rank keeps them
            start = self._global[layer_idx]
            new = torch.arange(start, start + length)
            if self.rank == self.n - 1:
                keys, values = super().update(key_states, value_states, layer_idx, *args,
                                              **kwargs)
                self._positions[layer_idx] = torch.cat([self._positions[layer_idx], new])
            else:
                keys, values = self.layers[layer_idx].keys, self.layers[layer_idx].values
            self._global[layer_idx] = start + length
            self._lens[layer_idx][-1] += length
            state = CacheState(True, self._positions[layer_idx], new, list(self._lens[layer_idx]),
                               self.group)
        keys._longattn_state = state
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Global number of cached tokens (all ranks together)."""
        return self._global.get(layer_idx, 0)
