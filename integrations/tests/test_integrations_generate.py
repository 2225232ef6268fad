"""``generate()`` on 2, 3 and 4 gloo ranks: the tokens of every rank equal one process's
``model.generate`` with sdpa (float64 Llama, and Qwen2 with a sliding-window layer; greedy and
sampling after the same seed; a 37-token prompt, and a left-padded batch of 37, 20 and 3
tokens; 16 new tokens), with no warning raised; the
calls it cannot serve raise on every rank; the transformers cache stays balanced.

The prompt's sharded prefix is a multiple of 2n tokens (36 on 2 and 3 ranks, 32 on 4; then 1
or 5 prompt tokens replicated), so both the one-token and the several-token replicated steps
run."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from longattn.common.testing import run_world
from longattn.integrations.demo import tiny_batch as data
from longattn.integrations.demo import tiny_model as build

PROMPT, NEW = 37, 16
# (model, sampling, seed, prompts in the batch); the batch of 3 (same length) runs on 3 ranks
CASES = [("llama", False, 0, 1), ("llama", True, 1, 1), ("qwen2", False, 2, 1),
         ("qwen2", True, 3, 1)]
BATCH = ("qwen2", True, 4, 3)
# a batch of 3 prompts of these lengths, left-padded with PAD (transformers' convention)
LENGTHS, PAD = (37, 20, 3), 0
PADDED = [("llama", False, 5, LENGTHS), ("llama", True, 6, LENGTHS), ("qwen2", False, 7, LENGTHS),
          ("qwen2", True, 8, LENGTHS)]


def _kwargs(sample):
    return dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=sample)


def _prompts(batch, seed):
    """``(input_ids, attention_mask)``: ``batch`` prompts of PROMPT tokens, or a tuple of
    lengths: that many prompts left-padded to the longest (the last token never PAD, so
    transformers sees no right padding)."""
    if isinstance(batch, int):
        ids, _ = data(batch, PROMPT, seed)
        return ids, torch.ones_like(ids)
    ids, _ = data(len(batch), max(batch), seed)
    ids[:, -1] = ids[:, -1].clamp_min(PAD + 1)
    mask = torch.ones_like(ids)
    for row, n in enumerate(batch):
        mask[row, :max(batch) - n] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _generate_cases(rank, world, extra, cases):
    from longattn.integrations.transformers import generate, register

    torch.set_num_threads(1)
    name = register()
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind, sample, seed, batch in cases:
            model = build(kind, name).eval()
            ids, mask = _prompts(batch, seed)
            torch.manual_seed(100 + seed)  # the same seed on every rank
            out.append(generate(model, ids, group=dist.group.WORLD, attention_mask=mask,
                                pad_token_id=PAD, **_kwargs(sample)))
    said = [f"{w.category.__name__}: {w.message}" for w in caught]
    more = _refusals(rank, name) if extra else None
    return out, said, more


def _refusals(rank, name):
    """Each call longattn cannot serve exactly, bad on this rank or on the last one only: the
    error every rank raised (None: it returned)."""
    from transformers import GenerationConfig

    from longattn.integrations.transformers import generate

    model = build("llama", name).eval()
    ids, _ = data(1, PROMPT, 0)
    last = rank == dist.get_world_size() - 1
    right_padded = torch.ones(1, PROMPT, dtype=torch.long)
    right_padded[:, -3:] = 0
    left_padded_here = torch.ones(1, PROMPT, dtype=torch.long)
    left_padded_here[:, :3 if last else 0] = 0
    calls = {
        "right padding": lambda: generate(model, ids, group=dist.group.WORLD,
                                          attention_mask=right_padded, max_new_tokens=2),
        "mask differs": lambda: generate(model, ids, group=dist.group.WORLD,
                                         attention_mask=left_padded_here, max_new_tokens=2),
        "beams": lambda: generate(model, ids, group=dist.group.WORLD, num_beams=2,
                                  max_new_tokens=2),
        "sdpa model": lambda: generate(build("llama", "sdpa") if last else model, ids,
                                       group=dist.group.WORLD, max_new_tokens=2),
        "prompt differs": lambda: generate(model, ids + int(last), group=dist.group.WORLD,
                                           max_new_tokens=2),
        "seed differs": lambda: (torch.manual_seed(int(last)), generate(
            model, ids, group=dist.group.WORLD, max_new_tokens=2, do_sample=True)),
        "own cache": lambda: generate(model, ids, group=dist.group.WORLD, cache=object(),
                                      max_new_tokens=2),
        # hidden states of the last tokens only, and no attention weights, before
        "hidden states": lambda: generate(model, ids, group=dist.group.WORLD,
                                          output_hidden_states=True,
                                          return_dict_in_generate=True, max_new_tokens=2),
        "attention weights": lambda: generate(model, ids, group=dist.group.WORLD,
                                              output_attentions=True,
                                              return_dict_in_generate=True, max_new_tokens=2),
        # compared by value (compared by type name before: one rank generated 4 tokens alone)
        "generation config differs": lambda: generate(
            model, ids, group=dist.group.WORLD,
            generation_config=GenerationConfig(max_new_tokens=2 + 3 * int(last),
                                               pad_token_id=PAD)),
    }
    errs = {}
    for what, call in calls.items():
        try:
            call()
            errs[what] = None
        except ValueError as e:
            errs[what] = str(e)
    torch.manual_seed(0)
    ok = generate(model, ids, group=dist.group.WORLD, max_new_tokens=2)  # the world still works
    return errs, ok


def _reference(kind, sample, seed, batch):
    model = build(kind, "sdpa").eval()
    ids, mask = _prompts(batch, seed)
    torch.manual_seed(100 + seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, pad_token_id=PAD, **_kwargs(sample))


@pytest.mark.parametrize("world,extra", [(2, True), (3, False), (4, False)])
def test_generate_on_every_rank_equals_one_process(world, extra):
    """Also a batch of 3 left-padded prompts (37, 20 and 3 tokens) on every world size: its
    prefill is reordered and sharded, its decode steps mask each row's padding. The 3-token
    prompt has 2 real tokens in the sharded prefix of 36 (2 and 3 ranks); on 4 ranks its
    prefix of 32 is all padding and the 5 replicated prompt tokens start with 2 padding
    tokens (queries that see no key)."""
    cases = CASES + [BATCH] * (world == 3) + PADDED
    res = run_world(world, _generate_cases, extra, cases, timeout=300)
    for i, case in enumerate(cases):
        want = _reference(*case)
        rows = case[3] if isinstance(case[3], int) else len(case[3])
        assert want.shape == (rows, PROMPT + NEW)
        for r in range(world):
            assert torch.equal(res[r][0][i], want), (case, r, res[r][0][i], want)
    for r in range(world):
        assert res[r][1] == [], res[r][1]  # no FutureWarning (or any other warning)
    if extra:
        _check_refusals(res)


def _check_refusals(res):
    words = {"right padding": "left padding", "mask differs": "arguments",
             "beams": "num_beams", "sdpa model": "longattn's",
             "prompt differs": "input_ids", "seed differs": "random generator state",
             "own cache": "cache", "hidden states": "output_hidden_states",
             "attention weights": "output_attentions",
             "generation config differs": "generation_config must be the same"}
    for what, word in words.items():
        errs = [r[2][0][what] for r in res]
        assert errs[0] is not None and word in errs[0], (what, errs[0])
        assert len(set(errs)) == 1, (what, errs)  # the same error on every rank
    assert all(torch.equal(r[2][1], res[0][2][1]) for r in res)


def test_sharded_cache_stays_balanced_over_1000_updates(monkeypatch):
    """The four ranks' ShardedCache layers of a 4-rank world side by side in one process (the
    agreement replaced by each rank's own check, which is what every rank runs): a zigzag
    prefill of 8 tokens, then 1,000 single-token updates with blocks of 4; after every update
    each rank's length is within one block of the others', and every token is kept by exactly
    one rank, under its global position."""
    from longattn.common.dist import Group
    from longattn.integrations import cache as cache_mod

    monkeypatch.setattr(cache_mod, "agree", lambda op, g, check: check())
    cpu = torch.device("cpu")
    layers = [cache_mod.ShardedLayer(Group(None, 4, r, cpu), "zigzag", block=4)
              for r in range(4)]
    prefill = torch.arange(8.0, dtype=torch.float64).view(1, 1, 8, 1)
    for r, layer in enumerate(layers):  # each rank's zigzag shard: positions r and 7 - r
        mine = prefill[:, :, [r, 7 - r]]
        layer.update(mine, mine)
    for p in range(8, 1008):
        t = torch.full((1, 1, 1, 1), float(p), dtype=torch.float64)
        for layer in layers:
            layer.update(t, t)
        lens = layers[0].kv.lens
        assert max(lens) - min(lens) <= 4, (p, lens)
        assert all(layer.kv.lens == lens and layer.get_seq_length() == p + 1 for layer in layers)
    assert sorted(p for layer in layers for p in layer.positions.tolist()) == list(range(1008))
    for layer in layers:
        assert torch.equal(layer.keys.flatten(), layer.positions.double())
