"""KV-cache helper and an end-to-end generation loop on a CPU world."""

from __future__ import annotations

import pytest
import torch

from longattn.common.testing import rel_error, run_world

VOCAB, DM, HQ, HKV, HD, LAYERS = 37, 24, 4, 2, 6, 2


def tiny_model(seed=0):
    """Weights of a 2-layer GQA transformer (float64)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * shape[0] ** -0.5

    layers = [dict(wq=w(DM, HQ * HD), wk=w(DM, HKV * HD), wv=w(DM, HKV * HD),
                   wo=w(HQ * HD, DM), w1=w(DM, 2 * DM), w2=w(2 * DM, DM)) for _ in range(LAYERS)]
    return dict(emb=w(VOCAB, DM), pos=w(64, DM), out=w(DM, VOCAB), layers=layers)


def forward(model, tokens, start, attend):
    """Logits of ``tokens [B, n]`` at positions ``start..start+n-1``; ``attend(layer, q, k, v)``
    stores the new k / v and returns the attention output ``[B, n, HQ, HD]``."""
    b, n = tokens.shape
    x = model["emb"][tokens] + model["pos"][start:start + n]
    for i, p in enumerate(model["layers"]):
        q = (x @ p["wq"]).reshape(b, n, HQ, HD)
        k = (x @ p["wk"]).reshape(b, n, HKV, HD)
        v = (x @ p["wv"]).reshape(b, n, HKV, HD)
        x = x + attend(i, q, k, v).reshape(b, n, HQ * HD) @ p["wo"]
        x = x + torch.relu(x @ p["w1"]) @ p["w2"]
    return x @ model["out"]


def generate_single(model, prompt, steps):
    """Single-process greedy decoding with a plain (unsharded) KV cache."""
    from longattn.common.kernels import attention_forward

    cache = [None] * LAYERS

    def attend(i, q, k, v):
        if cache[i] is not None:
            k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)
        cache[i] = (k, v)
        return attention_forward(q, k, v, causal=True, backend="torch")[0]

    logits = [forward(model, prompt, 0, attend)[:, -1]]
    toks = [logits[-1].argmax(-1)]
    pos = prompt.shape[1]
    for _ in range(steps - 1):
        logits.append(forward(model, toks[-1][:, None], pos, attend)[:, -1])
        toks.append(logits[-1].argmax(-1))
        pos += 1
    return torch.stack(toks, 1), torch.stack(logits, 1)


def _generate_world(rank, world, model, prompt, steps, capacity, method, chunk):
    """Distributed greedy decoding: prefill as ``Lq = prompt`` new tokens, then one token per
    step; with ``chunk`` > 1 the last steps are verified ``chunk`` tokens at a time (the
    speculative-decoding pattern) from the tokens decoded so far."""
    import torch.distributed as dist

    from longattn.tree import empty_cache, ring_decode, tree_decode

    fn = tree_decode if method == "tree" else ring_decode
    b = prompt.shape[0]
    world_group = dist.group.WORLD
    caches = [empty_cache(b, HKV, HD, capacity=capacity, group=world_group,
                          dtype=torch.float64) for _ in range(LAYERS)]
    placements = []

    def attend(i, q, k, v):
        c = caches[i]
        if i == 0:
            placements.append(c.placement(k.shape[1]))
        c.append(k, v)
        return fn(q, c.local_k, c.local_v, group=world_group, shard_lens=list(c.lens))

    logits = [forward(model, prompt, 0, attend)[:, -1]]
    toks = [logits[-1].argmax(-1)]
    pos = prompt.shape[1]
    for _ in range(steps - 1):
        logits.append(forward(model, toks[-1][:, None], pos, attend)[:, -1])
        toks.append(logits[-1].argmax(-1))
        pos += 1
    verify, gen_lens = None, list(caches[0].lens)
    if chunk > 1:  # re-run the last `chunk` tokens' logits in one Lq = chunk call on a fresh cache
        fresh = [empty_cache(b, HKV, HD, capacity=capacity, group=world_group,
                             dtype=torch.float64) for _ in range(LAYERS)]
        seq = torch.cat([prompt, torch.stack(toks, 1)], 1)
        head = seq.shape[1] - chunk
        caches[:] = fresh
        forward(model, seq[:, :head], 0, attend)
        verify = forward(model, seq[:, head:], head, attend)
    return torch.stack(toks, 1), torch.stack(logits, 1), gen_lens, placements, verify


@pytest.mark.parametrize("world,capacity,method", [(1, None, "tree"), (3, 6, "tree"),
                                                    (4, 4, "ring"), (4, None, "tree")])
def test_generation_equals_single_process(world, capacity, method):
    model = tiny_model()
    prompt = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    steps = 8
    ref_tok, ref_logits = generate_single(model, prompt, steps)
    res = run_world(world, _generate_world, model, prompt, steps, capacity, method, 3)
    for toks, logits, lens_r, _placements, verify in res:
        assert lens_r == res[0][2]  # every rank tracks the same lengths
        assert torch.equal(toks, ref_tok)
        assert rel_error(logits, ref_logits) <= 1e-10
        # chunked / speculative step: the logits of 3 new tokens at once
        ref_chunk_tok = torch.cat([prompt, ref_tok], 1)
        want = generate_logits_all(model, ref_chunk_tok)[:, -3:]
        assert rel_error(verify, want) <= 1e-10
    lens = res[0][2]
    assert sum(lens) == prompt.shape[1] + steps - 1  # the last token is not yet appended
    if capacity is not None:
        # the tail moved through the ranks: filled ranks in order, then the tail, then empty
        assert all(n <= capacity for n in lens)
        live = [r for r, n in enumerate(lens) if n]
        assert all(lens[r] == capacity for r in live[:-1])
        assert len(live) > 1
        # the prefill spilled over ranks (Lq > 1 new tokens spanning two shards)
        assert len(res[0][3][0]) > 1


def generate_logits_all(model, seq):
    """Logits at every position of ``seq`` (single process, full causal attention)."""
    from longattn.common.kernels import attention_forward

    return forward(model, seq, 0,
                   lambda i, q, k, v: attention_forward(q, k, v, causal=True,
                                                        backend="torch")[0])


def test_cache_placement_and_errors():
    from longattn.tree import KVCache

    c = KVCache(torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), [3, 1, 0], 1, 3)
    assert c.tail_rank() == 1
    assert c.placement(4) == [(1, 0, 2), (2, 2, 2)]
    c.append(torch.ones(1, 4, 1, 2), torch.ones(1, 4, 1, 2))
    assert c.lens == [3, 3, 2] and c.local_k.shape == (1, 3, 1, 2)
    assert torch.equal(c.local_k[:, 1:], torch.ones(1, 2, 1, 2))
    with pytest.raises(ValueError, match="full"):
        c.append(torch.ones(1, 2, 1, 2), torch.ones(1, 2, 1, 2))
    with pytest.raises(ValueError, match="k_new"):
        c.append(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    # v_new is checked as strictly as k_new, and nothing is written or counted on a failure
    before = (c.k.clone(), c.v.clone(), list(c.lens))
    for bad_v, cls, word in ((torch.ones(1, 1, 1, 3), ValueError, "v_new"),
                             (torch.ones(1, 1, 1, 2, dtype=torch.float64), TypeError, "v_new"),
                             (torch.ones(1, 2, 1, 2), ValueError, "same number"),
                             ([[1.0]], TypeError, "v_new")):
        with pytest.raises(cls, match=word):
            c.append(torch.ones(1, 1, 1, 2), bad_v)
        assert torch.equal(c.k, before[0]) and torch.equal(c.v, before[1])
        assert c.lens == before[2]
    with pytest.raises(TypeError, match="k_new dtype"):
        c.append(torch.ones(1, 1, 1, 2, dtype=torch.float16), torch.ones(1, 1, 1, 2))
    g = KVCache(torch.zeros(1, 0, 1, 2), torch.zeros(1, 0, 1, 2), [0, 0], 0, None)
    g.append(torch.ones(1, 5, 1, 2), torch.ones(1, 5, 1, 2))
    assert g.lens == [5, 0] and g.local_k.shape == (1, 5, 1, 2)
