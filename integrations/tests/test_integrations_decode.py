"""Decoding with a sequence-sharded KV cache (ShardedCache + tree_decode) equals one process.

The prompt is prefilled sharded over the ranks; then greedy decoding runs with the new tokens
replicated and the cache sharded (the new tokens placed in balanced blocks). The tokens must be the
same as the single-process model's, and every step's logits must equal the single-process
logits of the full sequence at that position (float64; tolerance as in
test_integrations_models.py). Qwen2's sliding-window layer (window 5) makes each new token
select its window out of the shards; one step feeds two tokens at once (causal among them).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import rel_error, run_world
from longattn.integrations.demo import tiny_batch as data
from longattn.integrations.demo import tiny_model as build

TOL = 1e-10
PROMPT, STEPS = 16, 4


def _decode(rank, world, kind, layout, seed):
    from longattn.integrations.cache import ShardedCache
    from longattn.integrations.transformers import register, shard_inputs, unshard

    torch.set_num_threads(1)
    model = build(kind, register()).eval()
    ids, _ = data(1, PROMPT, seed)
    cp = dist.group.WORLD
    cache = ShardedCache(group=cp, layout=layout)
    with torch.no_grad():
        out = model(**shard_inputs(ids, group=cp, layout=layout), cache=cache,
                    use_cache=True)
        last = unshard(out.logits, group=cp, layout=layout)[:, -1:]
        tokens, logits = [], [last]
        for step in range(STEPS):
            new = logits[-1][:, -1].argmax(-1, keepdim=True)
            if step == 1:  # two tokens in one call: the greedy one and a fixed one
                new = torch.cat([new, torch.tensor([[7]])], dim=1)
            tokens.append(new)
            out = model(input_ids=new, cache=cache, use_cache=True)
            logits.append(out.logits)
    return (torch.cat(tokens, 1), torch.cat(logits, 1), cache.get_seq_length(),
            [cache.kv_cache(i).lens for i in range(len(cache.layers))])


def _cases(rank, world, cases):
    return [_decode(rank, world, *c) for c in cases]


CASES = [("llama", "zigzag", 0), ("qwen2", "contiguous", 1), ("mistral", "zigzag", 2)]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_decode_matches_single_process(world):
    results = run_world(world, _cases, CASES, timeout=240)
    for i, (kind, _, seed) in enumerate(CASES):
        tokens, logits, length, lens = results[0][i]
        ids, _ = data(1, PROMPT, seed)
        full = torch.cat([ids, tokens], dim=1)
        assert length == full.shape[1]
        # tree's KVCache holds every layer: the prompt's shards, then the new tokens balanced
        assert all(sum(n) == full.shape[1] and max(n) - min(n) <= 1 for n in lens), lens
        assert lens[0] == lens[1], lens
        ref_model = build(kind, "sdpa").eval()
        with torch.no_grad():
            ref = ref_model(input_ids=full, use_cache=False).logits[:, PROMPT - 1:]
        # greedy tokens agree (the fixed token at step 1 is not predicted)
        greedy = ref[:, :-1].argmax(-1)
        pred = torch.cat([t[:, :1] for t in tokens.split([1, 2, 1, 1], 1)], 1)
        pos = torch.tensor([0, 1, 3, 4])
        assert torch.equal(pred, greedy[:, pos]), (kind, pred, greedy)
        err = rel_error(logits, ref)
        assert err <= TOL, f"{kind} decode on {world} ranks: relative error {err:.2e}"
        for r in range(1, world):  # replicated outputs on every rank
            assert torch.equal(results[r][i][1], logits)


def test_sharded_cache_in_one_process_and_what_it_refuses():
    from longattn.common.dist import LOCAL
    from longattn.integrations.cache import ShardedCache
    from longattn.integrations.transformers import register, shard_inputs
    from longattn.tree.cache import KVCache

    model = build("qwen2", register()).eval()
    ids, _ = data(1, PROMPT, 1)
    cache = ShardedCache(group=LOCAL, layout="contiguous")
    with torch.no_grad():
        model(**shard_inputs(ids, group=LOCAL, layout="contiguous"), cache=cache,
              use_cache=True)
        new = torch.tensor([[3, 5]])
        got = model(input_ids=new, cache=cache, use_cache=True).logits
        ref = build("qwen2", "sdpa").eval()(input_ids=torch.cat([ids, new], 1)).logits[:, -2:]
    assert rel_error(got, ref) <= TOL
    assert isinstance(cache.kv_cache(1), KVCache) and cache.kv_cache(1).lens == [PROMPT + 2]
    assert cache.get_seq_length() == PROMPT + 2
    with pytest.raises(NotImplementedError, match="sharded"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="layout must be one of"):
        ShardedCache(layout="spiral")


def test_left_padded_cache_in_one_process_and_what_it_refuses():
    """A left-padded batch (pads 0, 5, 13 of 16) in one process: the sharded prefill through
    shard_inputs' reordering, then two new tokens per row, equal sdpa's logits on every real
    position; a prefill that is not the told padding, and a decode mask that differs, raise."""
    from longattn.common.dist import LOCAL
    from longattn.integrations.cache import ShardedCache, real_positions
    from longattn.integrations.transformers import register, shard_inputs

    name = register()
    model, ref_model = build("qwen2", name).eval(), build("qwen2", "sdpa").eval()
    ids, _ = data(3, PROMPT, 3)
    pads = torch.tensor([0, 5, 13])
    mask = (torch.arange(PROMPT)[None] >= pads[:, None]).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    new = torch.tensor([[3, 5], [7, 11], [13, 17]])
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    assert real_positions(torch.tensor([0, 3, 16]), pads, 4).tolist() == [
        [0, 3, 16], [-1, -1, 11], [-1, -1, 3]]
    cache = ShardedCache(group=LOCAL, layout="contiguous")
    cache.left_pad(pads)
    with torch.no_grad():
        model(**shard_inputs(ids, position_ids=pos, attention_mask=mask, group=LOCAL,
                             layout="contiguous"), cache=cache, use_cache=True)
        got = model(input_ids=new, attention_mask=full_mask, position_ids=pos[:, -1:] + 1
                    + torch.arange(2), cache=cache, use_cache=True).logits
        ref = ref_model(input_ids=torch.cat([ids, new], 1), attention_mask=full_mask,
                        position_ids=full_mask.cumsum(-1).clamp_min(1) - 1).logits[:, -2:]
        assert rel_error(got, ref) <= TOL
        with pytest.raises(ValueError, match="attention_mask"):
            model(input_ids=new[:, :1], attention_mask=torch.ones(3, PROMPT + 3,
                  dtype=torch.long), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="before the cache's first update"):
            cache.left_pad(pads)
        told = ShardedCache(group=LOCAL, layout="contiguous")
        told.left_pad(pads)
        with pytest.raises(ValueError, match="shard_inputs"):
            model(input_ids=ids, position_ids=pos, cache=told, use_cache=True)
