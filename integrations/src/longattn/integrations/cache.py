"""A KV cache sharded over the sequence, for decoding with :func:`longattn.tree.tree_decode`.

    cp = torch.distributed.group.WORLD                    # the context-parallel group
    cache = ShardedCache(group=cp, layout=lay)            # lay: the prefill's layout
    out = model(**shard_inputs(prompt, group=cp, layout=lay), cache=cache, use_cache=True)
    out = model(input_ids=next_ids, cache=cache, use_cache=True)   # replicated new tokens

(:func:`longattn.integrations.transformers.generate` runs ``model.generate`` this way.)

Each layer's keys and values live in a :class:`longattn.tree.cache.KVCache` (tree's
sequence-sharded cache, the one home of its storage and placement rules), wrapped as a
transformers cache layer:

* The first call (the prefill) stores each rank's shard of the prompt: rank ``r`` keeps the
  keys/values of the tokens ``layout.positions(S, r, n, layout)`` (``KVCache.lens`` is
  ``[S/n] * n``). With ``sharded_prefill=False`` the first call is replicated like the later
  ones.
* Every later call brings new tokens that are the same on every rank (decoding):
  ``KVCache.append``'s balanced-block placement spreads them over the ranks (every rank's
  length stays within ``block`` tokens of every other's), and every rank records the global
  position of each key it keeps.
* ``get_seq_length()`` is the *global* length (``KVCache.seq_len``), so the model's default
  ``position_ids`` for the new tokens are their global positions (RoPE).

The returned key tensor carries a small record (``_longattn_state``: decoding or not, the
global positions of this rank's cached keys and of the new tokens, every rank's cached length,
the group) that the attention function reads: :func:`longattn.tree.cache.attend` selects each
new token's keys (causal among the new tokens, sliding windows) from the positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from longattn.common import checks
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
    # a left-padded batch (ShardedCache.left_pad): the pad count of every row, the tokens of
    # the sharded prefill, and each row's real position of this rank's keys [B, n_r] and of
    # this call's tokens [B, L] (-1: a padding token), which decode attention selects keys by
    pads: torch.Tensor | None = None
    prefix: int = 0
    # this rank's key positions ascend (so a token's visible keys are at most two ranges of
    # its slots, read in place); every layout's prefill and every append keep them so
    ascending: bool = True


class ShardedLayer(DynamicLayer):
    """One layer of a :class:`ShardedCache`: a :class:`~longattn.tree.cache.KVCache` (BSHD
    buffers, this rank's shard) seen by transformers as BHSD ``keys`` / ``values``."""

    is_croppable = False

    def __init__(self, g: Group, layout: str, group=None, block: int = 1,
                 sharded_prefill: bool = True):
        super().__init__()
        self.g, self.layout, self.group = g, layout, group
        self.block, self.sharded_prefill = block, sharded_prefill
        self.kv: KVCache | None = None
        self.pads: torch.Tensor | None = None  # a left-padded batch's pad counts, or None
        self.prefix = 0  # tokens of the sharded prefill (0: none yet, or replicated)
        self.ascending = True  # this rank's key positions ascend (appends keep it)

    def update(self, key_states, value_states, *args, **kwargs):
        """Store this call's keys/values ``[B, Hkv, S, D]``; returns this rank's cached keys and
        values (BHSD views of the KVCache buffers), the key tensor carrying the state.

        Checked on every rank before any rank writes (:func:`longattn.common.dist.agree`, one
        small all-gather): 4-D tensors, the cache's batch / heads / head dim / dtype when
        decoding, and the same shapes, dtype, device type, phase (prefill or decoding) and
        cache lengths on every rank; a bad call on any rank raises the same error on every
        rank and leaves every rank's cache as it was."""
        where, _ = agree("ShardedCache.update", self.g,
                         lambda: self._check(key_states, value_states))
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # BSHD
        n, rank, length = self.g.size, self.g.rank, k.shape[1]
        if where is None:  # the prefill: every rank stores its shard
            pos = _layout.positions(length * n, rank, n, self.layout)
            self.kv = KVCache(k.contiguous(), v.contiguous(), [length] * n, rank,
                              block=self.block, positions=pos)
            new, decoding, self.prefix = pos, False, length * n
            self.ascending = bool((pos[1:] > pos[:-1]).all())
        else:  # decoding: the same new tokens on every rank, placed in balanced blocks
            if self.kv is None:  # a replicated first call
                self.kv = self._empty(key_states, value_states)
            start = self.kv.seq_len
            new = torch.arange(start, start + length)
            self.kv.place(k, v, where)  # checked and agreed above
            decoding = True
        self.keys = self.kv.local_k.transpose(1, 2)
        self.values = self.kv.local_v.transpose(1, 2)
        keys = self.keys.view_as(self.keys)  # a fresh tensor object to carry this call's state
        keys._longattn_state = CacheState(decoding, self.kv.local_positions, new,
                                          list(self.kv.lens), self.group, self.pads,
                                          self.prefix, self.ascending)
        return keys, self.values

    @property
    def positions(self):
        """Global positions of this rank's cached keys (int64, CPU), or None before the
        first call."""
        return None if self.kv is None else self.kv.local_positions

    def _empty(self, key_states, value_states):
        """An empty KVCache for tokens like ``key_states`` / ``value_states`` (BHSD)."""
        b, h, _, d = key_states.shape
        return KVCache(key_states.new_empty((b, 0, h, d)),
                       value_states.new_empty((b, 0, h, value_states.shape[3])),
                       [0] * self.g.size, self.g.rank, block=self.block)

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
        if self.pads is not None and key_states.shape[0] != self.pads.shape[0]:
            raise ValueError(f"key_states has {key_states.shape[0]} rows, the cache's padding "
                             f"(left_pad) {self.pads.shape[0]}")
        decoding = self.kv is not None or not self.sharded_prefill
        where = None
        if self.kv is not None:
            for name, t, buf in (("key_states", key_states, self.kv.k),
                                 ("value_states", value_states, self.kv.v)):
                check_new_tokens(name, t, buf, seq_dim=2)
            where = self.kv.placement(key_states.shape[2])
        elif decoding:  # a replicated first call: placed as in an empty cache
            where = self._empty(key_states, value_states).placement(key_states.shape[2])
        elif self.g.distributed:
            _layout.positions(key_states.shape[2] * self.g.size, self.g.rank, self.g.size,
                              self.layout)  # the prefill's shards must split in the layout
        lens = "" if self.kv is None else ",".join(map(str, self.kv.lens))
        return where, {"decoding": decoding, "key_states.shape": tuple(key_states.shape),
                       "value_states.shape": tuple(value_states.shape),
                       "dtype": key_states.dtype, "device type": key_states.device.type,
                       "layout": self.layout, "lens": lens,
                       "tail": -1 if self.kv is None or self.kv.tail is None else self.kv.tail}

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


def real_positions(slots: torch.Tensor, pads: torch.Tensor, prefix: int) -> torch.Tensor:
    """Each row's real position (transformers' ``cumsum(mask) - 1``) of the tokens in the cache
    slots ``slots [n]`` of a left-padded batch, ``[B, n]``, -1 for a padding token. Row ``b``
    has ``pads[b]`` padding tokens on its left; the first ``prefix`` slots hold the sharded
    prefill, whose rows ``shard_inputs`` reordered real tokens first (slot ``j`` of row ``b``
    is real position ``j`` if ``j < prefix - pads[b]``, else padding); every later slot ``j``
    is the row's column ``j`` (real position ``j - pads[b]`` from ``pads[b]`` on)."""
    j, pb = slots.to(torch.int64).cpu()[None, :], pads[:, None]
    prefill = torch.where(j < prefix - pb, j, -1)
    later = torch.where(j >= pb, j - pb, -1)
    return torch.where(j < prefix, prefill, later)


def visible_slots(query_slots, pads, prefix: int, *, window=None, causal: bool = True,
                  total: int) -> torch.Tensor:
    """The cache slots each new token's query sees, as two half-open ranges of global slots per
    row and token: ``[B, L, 2, 2]`` int64, ``[..., 0, :]`` the sharded prefill's real tokens it
    sees and ``[..., 1, :]`` the later ones (an empty range has ``start >= end``). The fast form
    of selecting by :func:`real_positions` (its slow twin; the tests compare them).

    ``query_slots [L]``: the tokens' global slots (every row alike); ``pads [B]``: each row's
    left padding (zeros for none); ``prefix``: the sharded prefill's tokens (0: none);
    ``window``: keys before the query it still sees (None: unbounded); ``causal``: a token sees
    no later key; ``total``: the cache's length. A padding token (real position < 0) sees
    nothing. Slot ``j`` of row ``b`` is real position ``j`` for ``j < prefix - pads[b]``,
    padding for ``prefix - pads[b] <= j < prefix`` and ``j - pads[b]`` from ``prefix`` on, so the
    real positions ``[lo, p]`` a token sees are the slots ``[lo, min(p + 1, prefix - pads[b]))``
    and ``[max(prefix, lo + pads[b]), p + pads[b] + 1)``."""
    pb = pads.to(torch.int64).cpu()[:, None]  # [B, 1]
    qs = query_slots.to(torch.int64).cpu()[None, :]  # [1, L]
    later = qs >= prefix
    p = torch.where(later, qs - pb, torch.where(qs < prefix - pb, qs, -1))  # real positions
    lo = torch.zeros_like(p) if window is None else (p - window).clamp(min=0)
    end = p + 1 if causal else torch.full_like(p, total)  # real positions end (non-causal: all)
    first = torch.stack([lo, torch.minimum(end, prefix - pb).expand_as(p)], -1)
    second = torch.stack([torch.maximum(lo + pb, torch.full_like(p, prefix)),
                          torch.minimum(end + pb, torch.full_like(p, total))], -1)
    out = torch.stack([first, second], -2)  # [B, L, 2, 2]
    return torch.where((p >= 0)[..., None, None], out, torch.zeros_like(out))


class ShardedCache(DynamicCache):
    """Sequence-sharded :class:`transformers.DynamicCache` (see the module docstring); its layers
    are :class:`ShardedLayer` s (one :class:`~longattn.tree.cache.KVCache` each).

    Args:
        group: the context-parallel group: a ``ProcessGroup``, a 1-D ``DeviceMesh``,
            ``LOCAL`` or None (this process alone; an error in a world of several ranks).
        layout: the layout of the prefill's shards (``shard_inputs``' ``layout``).
        block: tokens per placement block of the decoded tokens (``KVCache.block``).
        sharded_prefill: True: the first call brings this rank's shard of the prompt; False:
            every call, the first included, brings replicated new tokens.

    ``layout``, ``block`` and ``sharded_prefill`` must be the same on every rank (checked on
    every rank: one small all-gather).
    """

    def __init__(self, *, group=None, layout: str = "zigzag", block: int = 1,
                 sharded_prefill: bool = True):
        g = resolve_group(group)

        def check():
            if not isinstance(layout, str) or layout not in _layout.LAYOUTS:
                raise ValueError(f"layout must be one of {_layout.LAYOUTS}, got {layout!r}")
            if isinstance(block, bool) or not isinstance(block, int) or block < 1:
                raise ValueError(f"block must be a positive int, got {block!r}")
            checks.check_bool("sharded_prefill", sharded_prefill)
            return None, {"layout": layout, "block": block, "sharded_prefill": sharded_prefill}

        agree("ShardedCache", g, check)  # the same settings on every rank, checked everywhere
        super().__init__()
        self.group, self.layout, self.n, self.rank = group, layout, g.size, g.rank
        self.block = block
        self.pads: torch.Tensor | None = None
        self.layer_class_to_replicate = lambda: self._layer(g, sharded_prefill)

    def _layer(self, g, sharded_prefill):
        layer = ShardedLayer(g, self.layout, self.group, self.block, sharded_prefill)
        layer.pads = self.pads
        return layer

    def left_pad(self, pads) -> None:
        """Declare a left-padded batch before the first call: row ``b`` starts with
        ``pads[b]`` padding tokens (a ``[B]`` int tensor, the same on every rank; no
        communication). The sharded prefill then comes from ``shard_inputs(...,
        attention_mask=)`` (each row's real tokens moved to its front) and every later call
        from transformers with the 2-D padding mask; decode attention lets no real token see a
        padding key and counts causality and sliding windows in the rows' real positions
        (:func:`real_positions`), as transformers' masks do for left padding."""
        if self.layers:
            raise ValueError("left_pad must be called before the cache's first update")
        if not isinstance(pads, torch.Tensor) or pads.ndim != 1 or pads.dtype.is_floating_point \
                or bool((pads < 0).any()):
            raise ValueError(f"pads must be a [batch] tensor of padding counts >= 0, got {pads!r}")
        self.pads = pads.detach().to("cpu", torch.int64).clone()

    def kv_cache(self, layer_idx: int) -> KVCache:
        """The :class:`~longattn.tree.cache.KVCache` of layer ``layer_idx``."""
        return self.layers[layer_idx].kv
