"""Demo rows: stock transformers models with the sequence sharded over a CPU world of 4 ranks.

``rows(run_world)`` (entry point group ``longattn.demo``) trains one step of a tiny randomly
initialised Llama (hamilton, zigzag) and Qwen2 (one full and one sliding-window layer:
hamilton + ring_swa, contiguous) and decodes with a sharded KV cache (tree), each against the
same model run on the full sequence in one process. ``rel_err`` is the largest relative error
over logits and parameter gradients (tolerance 1e-10), in a second row that of the loss
(transformers computes it in float32: 1e-6); decode: the logits of every step. Without
transformers installed there are no rows.
"""

from __future__ import annotations

import time

import torch

VOCAB = 97
WORLD = 4


def tiny_config(kind: str, attn: str = "sdpa"):
    """A two-layer config: ``llama`` (full attention, GQA 4/2), ``llama-bidirectional`` (the
    same with ``is_causal=False``), ``mistral`` (every layer a sliding window of 11 keys),
    ``qwen2`` (layer 0 full, layer 1 a sliding window of 5)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=256, attn_implementation=attn,
                  tie_word_embeddings=False)
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if kind == "llama-bidirectional":
        from transformers import LlamaConfig

        return LlamaConfig(is_causal=False, **common)
    if kind == "mistral":
        from transformers import MistralConfig

        return MistralConfig(sliding_window=11, **common)
    if kind == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                           **common)
    raise ValueError(f"kind must be 'llama', 'mistral' or 'qwen2', got {kind!r}")


def tiny_model(kind: str, attn: str = "sdpa", dtype=torch.float64, seed: int = 0, *,
               exact_norms: bool = False):
    """Randomly initialised (the same weights for the same ``kind`` and ``seed`` anywhere).

    ``exact_norms``: the RMSNorm layers compute in the model's dtype. transformers' own compute
    in float32 (a downcast in a float64 model), so a 1e-16 difference of the attention (the
    summation order across ranks) that crosses a float32 rounding there comes out as ~1e-8 in
    the gradients; with exact norms a float64 model is float64 throughout (but its loss, which
    transformers computes in float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, attn)).to(dtype)
    if exact_norms:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = _exact_rms_norm.__get__(m)
    return model


def _exact_rms_norm(self, x):
    """transformers' RMSNorm (``weight * x / sqrt(mean(x^2) + eps)``) in ``x``'s dtype."""
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def tiny_batch(batch: int, seq: int, seed: int = 0):
    """``(input_ids, labels)``; about 15% of the labels are ignored (-100)."""
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g) < 0.15] = -100
    return ids, labels


def tiny_padded_batch(batch: int, seq: int, seed: int = 0):
    """``(input_ids, labels, attention_mask)``: :func:`tiny_batch` with padded rows, in turn
    left-padded, right-padded and not padded (1 to ``seq // 3`` padding tokens, labels -100
    there)."""
    ids, labels = tiny_batch(batch, seq, seed)
    g = torch.Generator().manual_seed(2000 + seed)
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = int(torch.randint(1, seq // 3 + 1, (1,), generator=g))
        if row % 3 == 0:
            mask[row, :pad] = 0
        elif row % 3 == 1:
            mask[row, seq - pad:] = 0
    return ids, labels.masked_fill(mask == 0, -100), mask


def tiny_packed_batch(lengths, seed: int = 0):
    """``(input_ids [1, T], labels, position_ids)`` of documents of ``lengths`` packed into one
    row the way transformers' ``DataCollatorWithFlattening`` does: positions restart at 0 and
    each document's first label is -100."""
    g = torch.Generator().manual_seed(3000 + seed)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.masked_fill(pos == 0, -100)
    return ids, labels, pos


def shifted_labels(labels, attention_mask=None, ignore_index=-100):
    """The labels one process's loss counts for :func:`shard_inputs`' rule: shifted by one,
    and padding tokens predict nothing (pass as ``shift_labels`` to the unsharded model)."""
    shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], 1)
    if attention_mask is not None:
        shifted = shifted.masked_fill(attention_mask == 0, ignore_index)
    return shifted


def train_step(model, ids, labels, *, layout=None, group=None):
    """One forward/backward; sharded over ``group`` (``layout`` given) or not. Returns the full
    logits, the loss and the parameter gradients (summed over the ranks when sharded)."""
    from longattn.integrations.transformers import (
        all_reduce_grads,
        reduce_loss,
        shard_inputs,
        unshard,
    )

    if layout is None:
        out = model(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
        logits, loss = out.logits.detach(), out.loss.detach()
    else:
        out = model(**shard_inputs(ids, labels, layout=layout, group=group), use_cache=False)
        out.loss.backward()
        all_reduce_grads(model, group)
        logits = unshard(out.logits, group=group, layout=layout)
        loss = reduce_loss(out.loss, group)
    return logits, loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def _train_on_rank(rank, world, kind, layout):
    import torch.distributed as dist

    from longattn.common import comm
    from longattn.integrations.transformers import register

    torch.set_num_threads(1)
    model = tiny_model(kind, register())
    ids, labels = tiny_batch(2, 64)
    t0 = time.perf_counter()
    with comm.counting() as c:
        got = train_step(model, ids, labels, layout=layout, group=dist.group.WORLD)
    return got, (time.perf_counter() - t0) * 1e3, c.bytes_sent


def _decode_on_rank(rank, world, kind, layout, steps):
    import torch.distributed as dist

    from longattn.integrations.cache import ShardedCache
    from longattn.integrations.transformers import register, shard_inputs, unshard

    torch.set_num_threads(1)
    model = tiny_model(kind, register()).eval()
    ids, _ = tiny_batch(1, 32)
    cp = dist.group.WORLD
    cache = ShardedCache(group=cp, layout=layout)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**shard_inputs(ids, group=cp, layout=layout), cache=cache, use_cache=True)
        logits = [unshard(out.logits, group=cp, layout=layout)[:, -1:]]
        for _ in range(steps):
            new = logits[-1][:, -1].argmax(-1, keepdim=True)
            logits.append(model(input_ids=new, cache=cache, use_cache=True).logits)
            ids = torch.cat([ids, new], dim=1)
    return ids, torch.cat(logits, 1), (time.perf_counter() - t0) * 1e3


# (row, model, layout, how, data): padding and packing through shard_inputs, and the gradient
# convention under DDP / FSDP2 (4 ranks: DDP over them, FSDP2 on a 2 x 2 dp x cp mesh)
TRAINING = (
    ("Llama padded batch (left/right), hamilton", "llama", "zigzag", "all_reduce", "padded"),
    ("Llama packed batch, hamilton cu_seqlens", "llama", "zigzag", "all_reduce", "packed"),
    ("Qwen2 packed batch, hamilton+ring_swa varlen", "qwen2", "contiguous", "all_reduce",
     "packed"),
    ("Llama DDP over the cp ranks: grads, AdamW step", "llama", "zigzag", "ddp", "padded"),
    ("Llama FSDP2 on a 2x2 dp x cp mesh: grads, AdamW step", "llama", "zigzag", "fsdp",
     "padded4"),
)
TRAIN_SEQ = 64


def _training_on_rank(rank, world):
    import torch.distributed as dist

    from longattn.common import comm
    from longattn.integrations import steps

    out = []
    for seed, (_, kind, layout, how, what) in enumerate(TRAINING):
        data = steps.training_data(what, seed, TRAIN_SEQ)
        t0 = time.perf_counter()
        with comm.counting() as c:
            got = steps.sharded_step(kind, layout, how, data, dist.group.WORLD)
        out.append((got, (time.perf_counter() - t0) * 1e3, c.bytes_sent))
    return out


def training_rows(run_world):
    """The padded / packed / DDP / FSDP2 rows: logits (real tokens), every parameter gradient
    and (DDP, FSDP2) the whole model after one AdamW step against one process."""
    from longattn.common.testing import rel_error
    from longattn.integrations import steps

    res = run_world(WORLD, _training_on_rank)[0]
    out = []
    for seed, ((what, kind, _, how, data_kind), (got, ms, nbytes)) in enumerate(
            zip(TRAINING, res)):
        data = steps.training_data(data_kind, seed, TRAIN_SEQ)
        ref = steps.reference_step(kind, data)
        logits = ref["logits"][:2] if how == "fsdp" else ref["logits"]  # rank 0's replica
        real = torch.ones(logits.shape[:2], dtype=torch.bool) if data[3] is None else (
            data[3][:2] if how == "fsdp" else data[3]).bool()
        err = max([rel_error(got["logits"][real], logits[real])]
                  + [rel_error(got["grads"][n], g) for n, g in ref["grads"].items()])
        if how in ("ddp", "fsdp"):
            names = sorted(ref["params"])
            err = max(err, rel_error(torch.cat([got["params"][n].reshape(-1) for n in names]),
                                     torch.cat([ref["params"][n].reshape(-1) for n in names])))
        rows = 4 if data_kind == "padded4" else 3 if data_kind == "padded" else 1
        shape = f"B{rows} S{TRAIN_SEQ - (data_kind == 'packed')} L2 H4/2 D8 fp64"
        out.append({"method": "integrations", "what": f"transformers {what}", "shape": shape,
                    "rel_err": err, "tol": 1e-10, "time_ms": ms, "bytes": nbytes})
    return out


def rows(run_world):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("  integrations: transformers is not installed; no rows")
        return []
    from longattn.common.testing import rel_error

    out = []
    for kind, layout, what in (("llama", "zigzag", "Llama train step, hamilton"),
                               ("qwen2", "contiguous", "Qwen2 train step, hamilton+ring_swa")):
        res = run_world(WORLD, _train_on_rank, kind, layout)
        (logits, loss, grads), ms, nbytes = res[0]
        ref = train_step(tiny_model(kind), *tiny_batch(2, 64))
        err = max(rel_error(logits, ref[0]), max(rel_error(grads[n], ref[2][n]) for n in grads))
        shape = "B2 S64 L2 H4/2 D8 fp64"
        out.append({"method": "integrations", "what": f"transformers {what}: logits, grads",
                    "shape": shape, "rel_err": err, "tol": 1e-10, "time_ms": ms,
                    "bytes": nbytes})
        # transformers computes the loss in float32 (logits.float()) even for float64 models
        out.append({"method": "integrations", "what": f"transformers {what}: fp32 loss",
                    "shape": shape, "rel_err": rel_error(loss, ref[1]), "tol": 1e-6,
                    "time_ms": None, "bytes": None})
    steps = 4
    ids, logits, ms = run_world(WORLD, _decode_on_rank, "qwen2", "contiguous", steps)[0]
    with torch.no_grad():
        ref = tiny_model("qwen2")(input_ids=ids, use_cache=False).logits[:, -steps - 1:]
    out.append({"method": "integrations", "what": "transformers Qwen2 decode, tree",
                "shape": f"B1 S32+{steps} L2 fp64", "rel_err": rel_error(logits, ref),
                "tol": 1e-10, "time_ms": ms, "bytes": None})
    return out + training_rows(run_world)
