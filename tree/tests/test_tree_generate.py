"""The sharded KV cache (balanced-block placement, positions, ``attend``) and an end-to-end
generation loop on a CPU world."""

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
        if q.shape[1] == 1:  # one new token sees every cached key: any placement
            return fn(q, c.local_k, c.local_v, group=world_group, shard_lens=list(c.lens))
        return c.attend(q)  # a causal mask among new tokens reads the keys' positions

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
    assert max(lens) - min(lens) <= 1  # balanced: block 1
    if capacity is not None:
        assert all(n <= capacity for n in lens)
    if world > 1:  # the prefill (Lq > 1 new tokens) spread over every rank
        assert sorted({r for r, _, _ in res[0][3][0]}) == list(range(world))


def generate_logits_all(model, seq):
    """Logits at every position of ``seq`` (single process, full causal attention)."""
    from longattn.common.kernels import attention_forward

    return forward(model, seq, 0,
                   lambda i, q, k, v: attention_forward(q, k, v, causal=True,
                                                        backend="torch")[0])


def test_cache_placement_and_errors():
    from longattn.tree import KVCache

    # rank 1 of 3, capacity 3, blocks of 2 tokens; rank 0 holds positions 0-2, rank 1 position 3
    c = KVCache(torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), [3, 1, 0], 1, 3, block=2)
    assert c.local_positions.tolist() == [3]
    assert c.tail_rank() == 2  # position 4 starts a block: the shortest rank takes it
    # block 4-5: rank 2 (the shortest), block 6-7: rank 1 (now the shortest with room)
    assert c.placement(4) == [(2, 0, 2), (1, 2, 2)]
    c.append(torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 1, 2),
             torch.ones(1, 4, 1, 2))
    assert c.lens == [3, 3, 2] and c.local_k.shape == (1, 3, 1, 2) and c.tail == 1
    assert c.local_positions.tolist() == [3, 6, 7] and c.local_k[0, 1, 0, 0] == 2.0
    assert c.placement(1) == [(2, 0, 1)]  # rank 2 has the last free slot
    with pytest.raises(ValueError, match="full"):
        c.append(torch.ones(1, 2, 1, 2), torch.ones(1, 2, 1, 2))
    with pytest.raises(ValueError, match="k_new"):
        c.append(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    # v_new is checked as strictly as k_new, and nothing is written or counted on a failure
    before = (c.k.clone(), c.v.clone(), list(c.lens), c.local_positions.clone())
    for bad_v, cls, word in ((torch.ones(1, 1, 1, 3), ValueError, "v_new"),
                             (torch.ones(1, 1, 1, 2, dtype=torch.float64), TypeError, "v_new"),
                             (torch.ones(1, 2, 1, 2), ValueError, "same number"),
                             ([[1.0]], TypeError, "v_new")):
        with pytest.raises(cls, match=word):
            c.append(torch.ones(1, 1, 1, 2), bad_v)
        assert torch.equal(c.k, before[0]) and torch.equal(c.v, before[1])
        assert c.lens == before[2] and torch.equal(c.local_positions, before[3])
    with pytest.raises(TypeError, match="k_new dtype"):
        c.append(torch.ones(1, 1, 1, 2, dtype=torch.float16), torch.ones(1, 1, 1, 2))
    g = KVCache(torch.zeros(1, 0, 1, 2), torch.zeros(1, 0, 1, 2), [0, 0], 0, None)
    g.append(torch.ones(1, 5, 1, 2), torch.ones(1, 5, 1, 2))  # block 1: round robin
    assert g.lens == [3, 2] and g.local_positions.tolist() == [0, 2, 4]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="block"):
            KVCache(torch.zeros(1, 0, 1, 2), torch.zeros(1, 0, 1, 2), [0], 0, block=bad)


BLOCK = 3


def test_balanced_placement_after_1000_appends_on_4_ranks():
    """The four ranks' caches of a 4-rank world, side by side in one process (``LOCAL``: each
    computes the placement alone, as every rank does after the agreement): 1,000 single-token
    appends with blocks of 3; after every one each rank's length is within one block of the
    others', and at the end every token is on exactly one rank, under its position."""
    from longattn.tree import KVCache

    caches = [KVCache(torch.zeros(1, 0, 1, 1), torch.zeros(1, 0, 1, 1), [0] * 4, r,
                      block=BLOCK) for r in range(4)]
    for p in range(1000):
        t = torch.full((1, 1, 1, 1), float(p))
        for c in caches:
            c.append(t, t)
        lens = caches[0].lens
        assert max(lens) - min(lens) <= BLOCK, (p, lens)
        assert all(c.lens == lens for c in caches)
    assert sum(caches[0].lens) == 1000
    assert sorted(p for c in caches for p in c.local_positions.tolist()) == list(range(1000))
    for c in caches:
        assert torch.equal(c.local_k.flatten(), c.local_positions.float())


def _attend_world(rank, world):
    """40 appends (a 21-token prefill, then single tokens) with blocks of 3 on a real world;
    then the exact attention of the 3 newest tokens, causal, with and without a sliding window,
    against dense float64 attention over the cache rebuilt from the same draws."""
    import torch.distributed as dist

    from longattn.common.kernels import attention_forward
    from longattn.tree import empty_cache

    cache = empty_cache(1, 2, 4, block=BLOCK, group=dist.group.WORLD, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)  # the same draws on every rank
    keys, values = [], []
    for n in [21] + [1] * 19:
        k, v = (torch.randn(1, n, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
        keys.append(k)
        values.append(v)
        cache.append(k, v)
    k_all, v_all = torch.cat(keys, 1), torch.cat(values, 1)
    stored_right = torch.equal(cache.local_k, k_all[:, cache.local_positions])
    q = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    errs = []
    for left in (-1, 7):
        got = cache.attend(q, window_size=(left, 0))
        want, _ = attention_forward(q, k_all, v_all, causal=True, window_size=(left, 0),
                                    backend="torch")
        errs.append(rel_error(got, want))
    return list(cache.lens), stored_right, errs, got


def test_attend_reads_positions_on_4_ranks():
    res = run_world(4, _attend_world, timeout=240)
    lens = res[0][0]
    assert sum(lens) == 40 and max(lens) - min(lens) <= BLOCK, lens
    for lens_r, stored_right, errs, out in res:
        assert lens_r == lens and stored_right
        assert max(errs) <= 1e-12, errs
        assert torch.equal(out, res[0][3])  # identical on every rank


def _attend_checks_world(rank, world):
    """What attend must agree on before it picks a rank's keys: each case returns the error
    every rank raised (type and message), or the relative error of a call that must run."""
    import torch.distributed as dist

    from longattn.common.kernels import attention_forward
    from longattn.tree import KVCache, empty_cache

    cache = empty_cache(1, 2, 4, block=2, group=dist.group.WORLD, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, 11, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    cache.append(k, v)
    q = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)

    def raised(fn):
        try:
            fn()
        except (TypeError, ValueError) as e:
            return type(e).__name__, str(e)
        return None

    out = {
        # a window that differs between ranks would pick keys no single call sees
        "window differs": raised(lambda: cache.attend(q, window_size=(3 if rank else -1, 0))),
        "causal differs": raised(lambda: cache.attend(q, causal=rank == 0,
                                                      window_size=(4, 0))),
        # a bad argument on one rank only: raised on every rank, nothing hangs
        "bad window on one rank": raised(
            lambda: cache.attend(q, window_size=(-2, 0) if rank == world - 1 else (2, 0))),
        "bad q on one rank": raised(lambda: cache.attend(q[0] if rank == 0 else q)),
        # a cache built by hand keeps group LOCAL: every lens entry beyond this process raises
        "hand-built": raised(lambda: KVCache(cache.local_k, cache.local_v, list(cache.lens),
                                             rank).attend(q, window_size=(5, 0))),
    }
    # causal caps right at 0 (flash-attn's rule): (4, 3) is (4, 0)
    got = cache.attend(q, window_size=(4, 3))
    want, _ = attention_forward(q, k, v, causal=True, window_size=(4, 0), backend="torch")
    out["capped"] = rel_error(got, want)
    return out


def test_attend_agrees_before_picking_keys():
    res = run_world(2, _attend_checks_world, timeout=120)
    for name, word in (("window differs", "window_size"), ("causal differs", "causal"),
                       ("bad window on one rank", "window_size"), ("bad q on one rank", "q "),
                       ("hand-built", "lens")):
        errs = [r[name] for r in res]
        assert all(e is not None and e[0] in ("ValueError", "TypeError") for e in errs), (
            name, errs)
        assert all(word in e[1] for e in errs), (name, errs)
    assert all(r["capped"] <= 1e-12 for r in res), [r["capped"] for r in res]
