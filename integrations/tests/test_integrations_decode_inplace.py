"""Decoding reads the sharded cache in place: each new token's visible keys on a rank are at
most two ranges of its slots per row (a left-padded batch's padding sits after the sharded
prefill's real tokens; the causal bound and a sliding window cut the rest), attended where they
lie, then one exact combine over the ranks.

* ``visible_slots`` (the ranges) against ``real_positions`` (the selection it replaces), on
  random paddings, prefixes, windows and lengths;
* a 3-rank decode, left-padded (Llama, and Qwen2 with sliding-window layers) and not padded
  (Qwen2), with one step of two tokens, equals its selecting twin (``_decode_selected``: the
  keys gathered, then ``tree_decode``) and sdpa on one process, and makes exactly four
  collectives per layer and step: the cache update's agreement, the attention's agreement, and
  the combine's MAX and SUM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import rel_error, run_world
from longattn.integrations.demo import VOCAB
from longattn.integrations.demo import tiny_batch as data
from longattn.integrations.demo import tiny_model as build

PROMPT = 18  # a multiple of the 3 ranks
PADS = [0, 5, 13]
STEPS = [1, 2, 1]  # new tokens per decode call
COLLECTIVES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "gather",
               "all_to_all_single", "batch_isend_irecv", "reduce_scatter_tensor")


@pytest.mark.parametrize("seed", range(40))
def test_visible_slots_equal_the_real_positions_selection(seed):
    from longattn.integrations.cache import real_positions, visible_slots

    rng = np.random.default_rng(seed)
    b, prefix = int(rng.integers(1, 5)), int(rng.integers(0, 30))
    total = prefix + int(rng.integers(1, 20))
    pads = torch.tensor(rng.integers(0, prefix + 1, size=b) if prefix else [0] * b)
    window = None if rng.random() < 0.4 else int(rng.integers(0, 12))
    causal = window is not None or bool(rng.random() < 0.7)
    lq = int(rng.integers(1, 4))
    qs = torch.arange(total - lq, total)
    got = visible_slots(qs, pads, prefix, window=window, causal=causal, total=total)
    keys = real_positions(torch.arange(total), pads, prefix)  # [B, total]
    queries = real_positions(qs, pads, prefix)  # [B, L]
    j = torch.arange(total)
    for r in range(b):
        for t in range(lq):
            p = int(queries[r, t])
            want = (keys[r] >= 0) & (p >= 0)
            if causal:
                want &= keys[r] <= p
            if window is not None:
                want &= keys[r] >= p - window
            have = torch.zeros(total, dtype=torch.bool)
            for a, e in got[r, t].tolist():
                have |= (j >= a) & (j < e)
            assert torch.equal(have, want), (seed, r, t, got[r, t].tolist())


def _count_collectives(monkeypatch_like):
    counts = {}

    def wrap(name, fn):
        def counted(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **k)
        return counted

    for name in COLLECTIVES:
        monkeypatch_like.append((name, getattr(dist, name)))
        setattr(dist, name, wrap(name, getattr(dist, name)))
    return counts


def _padded_decode(rank, world, kind, selecting, padded=True):
    """The ranks live on between calls (``run_world``'s worlds are reused): the patch goes."""
    from longattn.integrations import transformers as T

    fast = T._decode
    if selecting:
        T._decode = T._decode_selected
    try:
        return _padded_decode_run(kind, T, padded)
    finally:
        T._decode = fast


def _padded_decode_run(kind, T, padded):
    """Prefill 18 tokens of 3 rows (left-padded by PADS, or not padded: no mask at all), then
    the STEPS calls; the collectives of each call, per layer."""
    from longattn.integrations.cache import ShardedCache

    torch.set_num_threads(1)
    model = build(kind, T.register()).eval()
    layers = model.config.num_hidden_layers
    ids, _ = data(3, PROMPT, 5)
    pads = torch.tensor(PADS if padded else [0, 0, 0])
    mask = (torch.arange(PROMPT)[None] >= pads[:, None]).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cp = dist.group.WORLD
    cache = ShardedCache(group=cp, layout="contiguous")
    if padded:
        cache.left_pad(pads)
    saved, logits, per_layer = [], [], []
    with torch.no_grad():
        model(**T.shard_inputs(ids, position_ids=pos, attention_mask=mask if padded else None,
                               group=cp, layout="contiguous"), cache=cache, use_cache=True)
        g = torch.Generator().manual_seed(9)
        full_mask = mask
        for n in STEPS:
            new = torch.randint(0, VOCAB, (3, n), generator=g)
            full_mask = torch.cat([full_mask, torch.ones(3, n, dtype=torch.long)], 1)
            counts = _count_collectives(saved)
            try:
                out = model(input_ids=new, attention_mask=full_mask if padded else None,
                            position_ids=full_mask.sum(-1, keepdim=True) - n + torch.arange(n),
                            cache=cache, use_cache=True)
            finally:
                for name, fn in reversed(saved):
                    setattr(dist, name, fn)
                saved.clear()
            per_layer.append({k: v / layers for k, v in counts.items()})
            logits.append(out.logits)
            ids = torch.cat([ids, new], 1)
    return ids, full_mask, torch.cat(logits, 1), per_layer


@pytest.mark.parametrize("kind,padded", [("llama", True), ("qwen2", True), ("qwen2", False)])
def test_decode_in_place_equals_its_twin_and_one_process(kind, padded):
    fast = run_world(3, _padded_decode, kind, False, padded, timeout=240)
    slow = run_world(3, _padded_decode, kind, True, padded, timeout=240)
    ids, full_mask, logits, per_layer = fast[0]
    for r in range(3):
        assert torch.equal(fast[r][2], logits)  # replicated
        assert rel_error(slow[r][2], logits) <= 1e-12
    ref = build(kind, "sdpa").eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=full_mask,
                   position_ids=full_mask.cumsum(-1).clamp_min(1) - 1).logits[:, PROMPT:]
    assert rel_error(logits, want) <= 1e-10
    # per layer and decode call: two agreements (cache update, attention), MAX and SUM
    for counts in per_layer:
        assert counts == {"all_gather": 2, "all_reduce": 2}, counts
    # the selecting twin makes two more: tree_decode's agreement and its per-row lengths
    for counts in slow[0][3]:
        assert counts["all_gather"] > 2, counts


def test_the_padding_mask_is_compared_once_per_tensor_and_again_after_a_change():
    """Every layer gets the same mask tensor: the first compares it (a host copy), the rest
    see the mark; an in-place change (a new version) is compared again and refused."""
    from types import SimpleNamespace

    from longattn.integrations.transformers import _check_padding_mask

    state = SimpleNamespace(pads=torch.tensor([0, 2]))
    mask = (torch.arange(5)[None] >= state.pads[:, None]).long()
    _check_padding_mask(mask, state, 5)
    assert mask._longattn_checked[0] == 5
    _check_padding_mask(mask, state, 5)  # marked: no comparison
    mask[1, 0] = 1  # in place: the version moves on
    with pytest.raises(ValueError, match="attention_mask"):
        _check_padding_mask(mask, state, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        _check_padding_mask(mask[:, :4], state, 5)  # another tensor, another length
