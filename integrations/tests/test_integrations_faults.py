"""Fault injection: one rank of a 2-, 3- or 4-rank gloo world makes one bad or different call of
an integrations entry point -- the transformers attention (through a tiny float64 Llama built
from a config with the longattn attention registered, or called directly with one of its
modules), ``shard_inputs``, ``unshard``, ``reduce_loss``, ``all_reduce_grads``, ``relayout``,
``ShardedCache`` and its ``update`` -- and every rank must raise the same clear error: the same
class and the same message, naming the argument, and naming the bad rank when the error is
that rank's own check. None may return or hang (the world's timeout), a failed cache update
must leave every rank's cache unchanged, and the world must work afterwards (a sum over it).

Each (entry point, check, world) is one test id; the bad rank moves with the check
(``check index % world``), so every rank is the bad one somewhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from longattn.common.testing import run_world
from longattn.integrations.demo import tiny_batch, tiny_model

pytestmark = pytest.mark.faults

FAULTS: dict = {}  # "entry/check" -> (fn(ctx, bad), error class, words, names the bad rank)
SAME = "must be the same on every rank"


def fault(entry, name, cls, *words, own=True):
    def register(fn):
        FAULTS[f"{entry}/{name}"] = (fn, cls, words, own)
        return fn
    return register


class _Ctx:
    """What a rank's fault needs: its rank, the world size, the group, a registered float64
    Llama (built once per worker process and never changed: faults that change a model build
    their own) and its sharded batch."""

    _models: dict = {}

    def __init__(self, rank, n):
        self.rank, self.n, self.cp = rank, n, tdist.group.WORLD
        self.seq = 4 * n

    @property
    def model(self):
        if "llama" not in self._models:
            self._models["llama"] = self.fresh()
        return self._models["llama"]

    def fresh(self, dtype=torch.float64):
        from longattn.integrations.transformers import register

        return tiny_model("llama", register(), dtype=dtype).eval()

    def ids(self, seed=0):
        return tiny_batch(1, self.seq, seed)

    def batch(self, layout="zigzag"):
        from longattn.integrations.transformers import shard_inputs

        ids, labels = self.ids()
        return shard_inputs(ids, labels, group=self.cp, layout=layout)

    def qkv(self, s=None, dtype=torch.float64):
        s = self.seq // self.n if s is None else s
        g = torch.Generator().manual_seed(self.rank)
        return [torch.randn(1, h, s, 8, generator=g, dtype=torch.float64).to(dtype)
                for h in (4, 2, 2)]


# ------------------------------------------------------------------ the transformers attention


def _forward(ctx, model=None, batch=None, **kw):
    with torch.no_grad():
        return (model or ctx.model)(**(batch or ctx.batch()), use_cache=False, **kw)


def _direct(ctx, bad, *, q=None, k=None, v=None, **change):
    """The registered attention function called as a Llama layer calls it."""
    from longattn.integrations.transformers import attention

    module = ctx.model.model.layers[0].self_attn
    q0, k0, v0 = ctx.qkv()
    kw = {"scaling": module.scaling, "cp_group": ctx.cp,
          "position_ids": ctx.batch()["position_ids"]}
    if bad:
        kw.update(change)
        q0, k0, v0 = (x if x is not None else y for x, y in ((q, q0), (k, k0), (v, v0)))
    with torch.no_grad():
        return attention(module, q0, k0, v0, kw.pop("attention_mask", None), **kw)


@fault("attention", "3-D query", ValueError, "query must be a 4-D [batch, heads, seq, head_dim]")
def _(ctx, bad):
    _direct(ctx, bad, q=ctx.qkv()[0][0])


@fault("attention", "3-D value", ValueError, "value must be a 4-D")
def _(ctx, bad):
    _direct(ctx, bad, v=ctx.qkv()[2][0])


@fault("attention", "heads differ", ValueError, f"query.shape {SAME}", own=False)
def _(ctx, bad):
    q, _, _ = ctx.qkv()
    _direct(ctx, bad, q=q[:, :2])


@fault("attention", "key shorter than query", ValueError, "key length 2 != query length")
def _(ctx, bad):
    _, k, v = ctx.qkv(s=2)
    _direct(ctx, bad, k=k, v=v)


@fault("attention", "model dtype differs", ValueError, f"dtype {SAME}", own=False)
def _(ctx, bad):
    _forward(ctx, ctx.fresh(torch.float32) if bad else None)


@fault("attention", "output_attentions", ValueError, "output_attentions=True is not supported")
def _(ctx, bad):  # transformers returned an empty tuple of weights, without a word
    _forward(ctx, output_attentions=bad)


@fault("attention", "is_causal not a bool", TypeError, "is_causal must be a bool")
def _(ctx, bad):
    _direct(ctx, bad, is_causal=1)


@fault("attention", "is_causal differs", ValueError, f"causal {SAME}", own=False)
def _(ctx, bad):
    _direct(ctx, bad, is_causal=False)


@fault("attention", "bidirectional config on one rank", ValueError, f"causal {SAME}", own=False)
def _(ctx, bad):
    model = None
    if bad:
        model = ctx.fresh()
        for layer in model.model.layers:
            layer.self_attn.is_causal = False
    _forward(ctx, model)


@fault("attention", "scaling differs", ValueError, f"softmax_scale {SAME}", own=False)
def _(ctx, bad):
    _direct(ctx, bad, scaling=0.5)


@fault("attention", "scaling not finite", ValueError, "softmax_scale must be finite")
def _(ctx, bad):
    _direct(ctx, bad, scaling=float("nan"))


@fault("attention", "sliding_window differs", ValueError, f"sliding_window {SAME}", own=False)
def _(ctx, bad):
    _forward(ctx, **({"sliding_window": 3} if bad else {}))


@fault("attention", "sliding_window not positive", ValueError,
       "sliding_window must be a positive int")
def _(ctx, bad):
    _direct(ctx, bad, sliding_window=0)


@fault("attention", "sliding window without causality", ValueError,
       "sliding windows only in causal attention")
def _(ctx, bad):
    _direct(ctx, bad, sliding_window=3, is_causal=False)


@fault("attention", "padding mask", ValueError,
       "takes padding through shard_inputs(..., attention_mask=mask)")
def _(ctx, bad):
    mask = torch.ones(1, ctx.seq // ctx.n, dtype=torch.bool)
    mask[0, 0] = False
    _direct(ctx, bad, attention_mask=mask)


@fault("attention", "4-D mask", ValueError, "builds no attention mask")
def _(ctx, bad):
    s = ctx.seq // ctx.n
    _direct(ctx, bad, attention_mask=torch.zeros(1, 1, s, s))


@fault("attention", "dropout in training", ValueError, "does not support attention dropout")
def _(ctx, bad):
    model = None
    if bad:
        model = ctx.fresh().train()
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
    _forward(ctx, model)


@fault("attention", "softcap", ValueError, "does not support softcap")
def _(ctx, bad):
    _forward(ctx, **({"softcap": 30.0} if bad else {}))


@fault("attention", "backend not a str", TypeError, "backend must be a str")
def _(ctx, bad):
    _forward(ctx, **({"backend": 3} if bad else {}))


@fault("attention", "backend differs", ValueError, f"backend {SAME}", own=False)
def _(ctx, bad):
    _forward(ctx, **({"backend": "torch"} if bad else {}))


@fault("attention", "position_ids missing", ValueError, "did not pass position_ids")
def _(ctx, bad):
    _direct(ctx, bad, position_ids=None)


@fault("attention", "position_ids float", TypeError, "position_ids must be an integer tensor")
def _(ctx, bad):
    _direct(ctx, bad, position_ids=ctx.batch()["position_ids"].double())


@fault("attention", "position_ids of another rank", ValueError,
       "are not those shard_inputs returned")
def _(ctx, bad):
    batch = ctx.batch()
    if bad:
        batch["position_ids"] = batch["position_ids"] + 1
    _forward(ctx, batch=batch)


@fault("attention", "position_ids of another rank, sharded by hand", ValueError,
       "are not this rank's global positions")
def _(ctx, bad):
    batch = {k: v for k, v in ctx.batch().items() if k in ("input_ids", "position_ids",
                                                            "cp_group")}
    if bad:
        batch["position_ids"] = batch["position_ids"] + 1
    _forward(ctx, batch=batch)


@fault("attention", "padded batch, bidirectional model", ValueError, "needs causal attention")
def _(ctx, bad):
    from longattn.integrations.transformers import shard_inputs

    ids, labels = ctx.ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    batch = shard_inputs(ids, labels, attention_mask=mask, group=ctx.cp, layout="zigzag")
    model = None
    if bad:
        model = ctx.fresh()
        for layer in model.model.layers:
            layer.self_attn.is_causal = False
    _forward(ctx, model, batch=batch)


@fault("attention", "cp_batch not a ShardedBatch", TypeError, "cp_batch must be the ShardedBatch")
def _(ctx, bad):
    batch = ctx.batch()
    if bad:
        batch["cp_batch"] = {"layout": "zigzag"}
    _forward(ctx, batch=batch)


@fault("attention", "position_ids too short", ValueError, "position_ids have 1 positions")
def _(ctx, bad):
    _direct(ctx, bad, position_ids=ctx.batch()["position_ids"][:, :1])


@fault("attention", "position_ids rows differ", ValueError, "differ between batch rows")
def _(ctx, bad):
    pos = ctx.batch()["position_ids"]
    _direct(ctx, bad, position_ids=torch.cat([pos, pos.flip(1)]))


@fault("attention", "position_ids in another layout", ValueError,
       f"position_ids layout {SAME}", own=False)
def _(ctx, bad):
    from longattn.common.layout import take_shard

    batch = ctx.batch()
    if bad:
        ids, _ = ctx.ids()
        pos = torch.arange(ctx.seq).unsqueeze(0)
        batch = {"input_ids": take_shard(ids, ctx.rank, ctx.n, layout="striped"),
                 "position_ids": take_shard(pos, ctx.rank, ctx.n, layout="striped"),
                 "cp_group": ctx.cp}
    else:
        batch = {k: batch[k] for k in ("input_ids", "position_ids", "cp_group")}
    _forward(ctx, batch=batch)


# ---------------------------------------------------------------------------- shard_inputs


def _shard(ctx, bad, **change):
    from longattn.integrations.transformers import shard_inputs

    ids, labels = ctx.ids()
    kw = {"labels": labels, "position_ids": None, "layout": "zigzag", "ignore_index": -100}
    if bad:
        kw.update(change)
        ids = kw.pop("input_ids", ids)
    kw.pop("input_ids", None)
    return shard_inputs(ids, kw.pop("labels"), kw.pop("position_ids"), group=ctx.cp, **kw)


@fault("shard_inputs", "float input_ids", TypeError, "input_ids must be an integer tensor")
def _(ctx, bad):
    _shard(ctx, bad, input_ids=ctx.ids()[0].double())


@fault("shard_inputs", "1-D input_ids", ValueError, "input_ids must be a [batch, seq] tensor")
def _(ctx, bad):
    _shard(ctx, bad, input_ids=ctx.ids()[0][0])


@fault("shard_inputs", "another batch", ValueError, f"input_ids values {SAME}", own=False)
def _(ctx, bad):
    _shard(ctx, bad, input_ids=ctx.ids(seed=5)[0])


@fault("shard_inputs", "length differs", ValueError, f"input_ids.shape {SAME}", own=False)
def _(ctx, bad):
    _shard(ctx, bad, input_ids=tiny_batch(1, 2 * ctx.seq)[0],
           labels=tiny_batch(1, 2 * ctx.seq)[1])


@fault("shard_inputs", "length the layout cannot split", ValueError,
       "must be divisible by")
def _(ctx, bad):
    ids, labels = tiny_batch(1, ctx.seq + 1)
    _shard(ctx, bad, input_ids=ids, labels=labels)


@fault("shard_inputs", "labels shape", ValueError, "labels must be")
def _(ctx, bad):
    _shard(ctx, bad, labels=ctx.ids()[1][:, 1:])


@fault("shard_inputs", "float labels", TypeError, "labels must be an integer tensor")
def _(ctx, bad):
    _shard(ctx, bad, labels=ctx.ids()[1].float())


@fault("shard_inputs", "labels on one rank only", ValueError, f"labels given {SAME}",
       own=False)
def _(ctx, bad):
    _shard(ctx, bad, labels=None)


@fault("shard_inputs", "position_ids shape", ValueError, "position_ids must be [1 or 1,")
def _(ctx, bad):
    _shard(ctx, bad, position_ids=torch.arange(ctx.seq - 1).unsqueeze(0))


@fault("shard_inputs", "position_ids differ", ValueError, f"position_ids values {SAME}",
       own=False)
def _(ctx, bad):
    _shard(ctx, bad, position_ids=torch.arange(ctx.seq).unsqueeze(0) + 3)


@fault("shard_inputs", "unknown layout", ValueError, "layout must be one of")
def _(ctx, bad):
    _shard(ctx, bad, layout="spiral")


@fault("shard_inputs", "layout differs", ValueError, f"layout {SAME}", own=False)
def _(ctx, bad):
    _shard(ctx, bad, layout="striped")


@fault("shard_inputs", "ignore_index not an int", TypeError, "ignore_index must be an int")
def _(ctx, bad):
    _shard(ctx, bad, ignore_index=-100.0)


@fault("shard_inputs", "id outside the vocabulary", ValueError,
       "input_ids holds ids outside [0, vocab_size")
def _(ctx, bad):
    ids = ctx.ids()[0].clone()
    ids[0, -1] = ctx.model.config.vocab_size + 3  # failed in the embedding of one rank only
    _shard(ctx, bad, input_ids=ids, vocab_size=ctx.model.config.vocab_size)


def _mask(ctx, *zeros):
    mask = torch.ones(1, ctx.seq, dtype=torch.long)
    mask[0, list(zeros)] = 0
    return mask


@fault("shard_inputs", "padding in the middle", ValueError, "neither left- nor right-padded")
def _(ctx, bad):
    _shard(ctx, bad, attention_mask=_mask(ctx, 2))


@fault("shard_inputs", "mask not 0/1", ValueError, "0 (padding) and 1 (token) only")
def _(ctx, bad):
    _shard(ctx, bad, attention_mask=_mask(ctx) * 2)


@fault("shard_inputs", "float mask", TypeError, "attention_mask must be an integer or bool")
def _(ctx, bad):
    _shard(ctx, bad, attention_mask=_mask(ctx, 0).double())


@fault("shard_inputs", "mask shape", ValueError, "attention_mask must be (1,")
def _(ctx, bad):
    _shard(ctx, bad, attention_mask=_mask(ctx)[:, 1:])


@fault("shard_inputs", "padding on one rank only", ValueError,
       f"attention_mask values {SAME}", own=False)
def _(ctx, bad):
    _shard(ctx, bad, attention_mask=_mask(ctx, 0, 1))


def _restarting(ctx):
    half = ctx.seq // 2
    return torch.cat([torch.arange(half), torch.arange(ctx.seq - half)]).unsqueeze(0)


@fault("shard_inputs", "packed batch of 2 rows", ValueError, "must be one row [1, T]")
def _(ctx, bad):
    ids, labels = tiny_batch(2, ctx.seq)
    _shard(ctx, bad, input_ids=ids, labels=labels, position_ids=_restarting(ctx))


@fault("shard_inputs", "packed batch, striped", ValueError,
       "layout must be 'zigzag' or 'contiguous' for a packed batch")
def _(ctx, bad):
    _shard(ctx, bad, position_ids=_restarting(ctx), layout="striped")


@fault("shard_inputs", "dp_group None", ValueError, "dp_group=None is ambiguous")
def _(ctx, bad):
    _shard(ctx, bad, dp_group=None)


# ------------------------------------------------------------------- unshard, reduce_loss


def _unshard(ctx, bad, x=None, **change):
    from longattn.integrations.transformers import unshard

    kw = {"layout": "zigzag", "dim": 1}
    x0 = torch.randn(1, ctx.seq // ctx.n, 5, dtype=torch.float64)
    if bad:
        kw.update(change)
        x0 = x0 if x is None else x
    return unshard(x0, group=ctx.cp, **kw)


@fault("unshard", "x not a tensor", TypeError, "x must be a torch.Tensor")
def _(ctx, bad):
    _unshard(ctx, bad, x=[1.0])


@fault("unshard", "dim out of range", ValueError, "dim must be an int in [-3, 3)")
def _(ctx, bad):
    _unshard(ctx, bad, dim=3)


@fault("unshard", "unknown layout", ValueError, "layout must be one of")
def _(ctx, bad):
    _unshard(ctx, bad, layout="spiral")


@fault("unshard", "layout differs", ValueError, f"layout {SAME}", own=False)
def _(ctx, bad):
    _unshard(ctx, bad, layout="contiguous")


@fault("unshard", "dim differs", ValueError, f"dim {SAME}", own=False)
def _(ctx, bad):
    _unshard(ctx, bad, dim=2)


@fault("unshard", "shape differs", ValueError, f"x.shape {SAME}", own=False)
def _(ctx, bad):
    _unshard(ctx, bad, x=torch.zeros(1, ctx.seq // ctx.n, 6, dtype=torch.float64))


@fault("unshard", "ndim differs", ValueError, f"x.shape {SAME}", own=False)
def _(ctx, bad):
    _unshard(ctx, bad, x=torch.zeros(1, ctx.seq // ctx.n, dtype=torch.float64))


@fault("unshard", "dtype differs", ValueError, f"x.dtype {SAME}", own=False)
def _(ctx, bad):
    _unshard(ctx, bad, x=torch.zeros(1, ctx.seq // ctx.n, 5))


def _reduce(ctx, bad, loss):
    from longattn.integrations.transformers import reduce_loss

    return reduce_loss(loss if bad else torch.tensor(0.5, dtype=torch.float64), ctx.cp)


@fault("reduce_loss", "loss not a tensor", TypeError, "loss must be a torch.Tensor")
def _(ctx, bad):
    _reduce(ctx, bad, 0.5)


@fault("reduce_loss", "integer loss", TypeError, "loss must be a floating-point tensor")
def _(ctx, bad):
    _reduce(ctx, bad, torch.tensor(1))


@fault("reduce_loss", "shape differs", ValueError, f"loss.shape {SAME}", own=False)
def _(ctx, bad):
    _reduce(ctx, bad, torch.tensor([0.5], dtype=torch.float64))


@fault("reduce_loss", "dtype differs", ValueError, f"loss.dtype {SAME}", own=False)
def _(ctx, bad):
    _reduce(ctx, bad, torch.tensor(0.5))


# ------------------------------------------------------------------------ all_reduce_grads


def _grads(ctx, bad, drop=(), dtype=torch.float64):
    from longattn.integrations.transformers import all_reduce_grads

    model = ctx.fresh(dtype if bad else torch.float64)
    for name, p in model.named_parameters():
        p.grad = None if bad and name in drop else torch.ones_like(p)
    if not bad:
        model.model.layers[0].self_attn.k_proj.weight.grad = None  # the good ranks' own gap
    return all_reduce_grads(model, ctx.cp)


@fault("all_reduce_grads", "model not a Module", TypeError, "model must be a torch.nn.Module")
def _(ctx, bad):
    from longattn.integrations.transformers import all_reduce_grads

    all_reduce_grads(ctx.model.state_dict() if bad else ctx.fresh(), ctx.cp)


@fault("all_reduce_grads", "one gradient fewer", ValueError,
       f"parameters with a gradient {SAME}", own=False)
def _(ctx, bad):
    _grads(ctx, bad, drop=("model.layers.0.self_attn.k_proj.weight",
                           "model.layers.0.self_attn.v_proj.weight"))


@fault("all_reduce_grads", "another parameter's gradient", ValueError,
       f"gradient names and shapes {SAME}", own=False)
def _(ctx, bad):
    _grads(ctx, bad, drop=("model.layers.0.self_attn.v_proj.weight",))  # same shape as k_proj


@fault("all_reduce_grads", "gradient dtype differs", ValueError, f"gradient dtypes {SAME}",
       own=False)
def _(ctx, bad):
    _grads(ctx, bad, drop=("model.layers.0.self_attn.k_proj.weight",), dtype=torch.float32)


# -------------------------------------------------------------------------------- relayout


def _relayout(ctx, bad, x=None, **change):
    from longattn.integrations.relayout import relayout

    kw = {"src": "zigzag", "dst": "contiguous", "dim": 1}
    x0 = torch.randn(1, ctx.seq // ctx.n, 2, 3, dtype=torch.float64)
    if bad:
        kw.update(change)
        x0 = x0 if x is None else x
    return relayout(x0, kw.pop("src"), kw.pop("dst"), group=ctx.cp, **kw)


@fault("relayout", "unknown src", ValueError, "src must be one of")
def _(ctx, bad):
    _relayout(ctx, bad, src="spiral")


@fault("relayout", "dst differs", ValueError, f"dst {SAME}", own=False)
def _(ctx, bad):
    _relayout(ctx, bad, dst="striped")


@fault("relayout", "x not a tensor", TypeError, "x must be a torch.Tensor")
def _(ctx, bad):
    _relayout(ctx, bad, x=[0.0])


@fault("relayout", "dim out of range", ValueError, "dim must be an int in [0, 4)")
def _(ctx, bad):
    _relayout(ctx, bad, dim=4)


@fault("relayout", "length the layout cannot split", ValueError, "must be divisible by")
def _(ctx, bad):
    _relayout(ctx, bad, x=torch.zeros(1, 3, 2, 3, dtype=torch.float64))


@fault("relayout", "shape differs", ValueError, f"x.shape {SAME}", own=False)
def _(ctx, bad):
    _relayout(ctx, bad, x=torch.zeros(1, 2 * ctx.seq // ctx.n, 2, 3, dtype=torch.float64))


@fault("relayout", "ndim differs", ValueError, f"x.shape {SAME}", own=False)
def _(ctx, bad):
    _relayout(ctx, bad, x=torch.zeros(1, ctx.seq // ctx.n, 6, dtype=torch.float64))


@fault("relayout", "dtype differs", ValueError, f"x.dtype {SAME}", own=False)
def _(ctx, bad):
    _relayout(ctx, bad, x=torch.zeros(1, ctx.seq // ctx.n, 2, 3))


# ---------------------------------------------------------------------------- ShardedCache


def _state(cache):
    return {i: (layer.kv.lens[:], layer.kv.local_k.clone(), layer.positions.clone())
            for i, layer in enumerate(cache.layers) if layer.kv is not None}


def _untouched(cache, call):
    """Run ``call``; if it raises, every layer of ``cache`` must be as it was before."""
    before = _state(cache)
    try:
        call()
    except Exception:
        after = _state(cache)
        same = before.keys() == after.keys() and all(
            before[i][0] == after[i][0] and torch.equal(before[i][1], after[i][1])
            and torch.equal(before[i][2], after[i][2]) for i in before)
        if not same:
            raise AssertionError("a failed update wrote to the cache") from None
        raise


def _prefilled(ctx, layout="zigzag"):
    from longattn.integrations.cache import ShardedCache
    from longattn.integrations.transformers import shard_inputs

    cache = ShardedCache(group=ctx.cp, layout=layout)
    with torch.no_grad():
        ctx.model(**shard_inputs(ctx.ids()[0], group=ctx.cp, layout=layout),
                  past_key_values=cache, use_cache=True)
    return cache


def _update(ctx, bad, prefill, k=None, v=None):
    """``ShardedCache.update`` of layer 0 as a model layer calls it (BHSD)."""
    from longattn.integrations.cache import ShardedCache

    cache = _prefilled(ctx) if prefill else ShardedCache(group=ctx.cp, layout="zigzag")
    _, k0, v0 = ctx.qkv(s=ctx.seq // ctx.n if not prefill else 1)
    if bad:
        k0, v0 = (x if x is not None else y for x, y in ((k, k0), (v, v0)))
    _untouched(cache, lambda: cache.update(k0, v0, 0))


@fault("ShardedCache", "unknown layout", ValueError, "layout must be one of")
def _(ctx, bad):
    from longattn.integrations.cache import ShardedCache

    ShardedCache(group=ctx.cp, layout="spiral" if bad else "zigzag")


@fault("ShardedCache", "layout differs", ValueError, f"layout {SAME}", own=False)
def _(ctx, bad):
    from longattn.integrations.cache import ShardedCache

    ShardedCache(group=ctx.cp, layout="striped" if bad else "zigzag")


@fault("ShardedCache.update", "3-D key_states", ValueError, "key_states must be a 4-D")
def _(ctx, bad):
    _update(ctx, bad, False, k=ctx.qkv()[1][0])


@fault("ShardedCache.update", "value not a tensor", TypeError,
       "value_states must be a torch.Tensor")
def _(ctx, bad):
    _update(ctx, bad, True, v=0.0)


@fault("ShardedCache.update", "key and value lengths differ", ValueError,
       "must have the batch, heads and length of key_states")
def _(ctx, bad):
    _update(ctx, bad, True, v=ctx.qkv(s=2)[2])


@fault("ShardedCache.update", "prefill length differs", ValueError,
       f"key_states.shape {SAME}", own=False)
def _(ctx, bad):
    _, k, v = ctx.qkv(s=2 * ctx.seq // ctx.n)
    _update(ctx, bad, False, k=k, v=v)


@fault("ShardedCache.update", "prefill the layout cannot split", ValueError,
       "must be divisible by")
def _(ctx, bad):
    _, k, v = ctx.qkv(s=1)
    _update(ctx, bad, False, k=k, v=v)


@fault("ShardedCache.update", "prefill dtype differs", ValueError, f"dtype {SAME}", own=False)
def _(ctx, bad):
    _, k, v = ctx.qkv(dtype=torch.float32)
    _update(ctx, bad, False, k=k, v=v)


@fault("ShardedCache.update", "decode heads differ from the cache", ValueError,
       "does not match the cache's [batch, kv_heads, *, head_dim] = [1, 2, *, 8]")
def _(ctx, bad):
    q, _, _ = ctx.qkv(s=1)
    _update(ctx, bad, True, k=q, v=q)


@fault("ShardedCache.update", "decode dtype differs from the cache", TypeError,
       "dtype torch.float32 must be the cache's torch.float64")
def _(ctx, bad):
    _, k, v = ctx.qkv(s=1, dtype=torch.float32)
    _update(ctx, bad, True, k=k, v=v)


@fault("ShardedCache.update", "decode length differs (through the model)", ValueError,
       f"key_states.shape {SAME}", own=False)
def _(ctx, bad):
    cache = _prefilled(ctx)
    new = torch.tensor([[3, 5]]) if bad else torch.tensor([[3]])
    with torch.no_grad():
        _untouched(cache, lambda: ctx.model(input_ids=new, past_key_values=cache,
                                            use_cache=True))


@fault("attention", "decode token differs (through the model)", ValueError,
       f"query values (float64 checksum) {SAME}", own=False)
def _(ctx, bad):
    cache = _prefilled(ctx)
    new = torch.tensor([[4]]) if bad else torch.tensor([[3]])  # e.g. a per-rank sampling seed
    with torch.no_grad():  # every rank gave logits of its own token, all wrong, before
        ctx.model(input_ids=new, past_key_values=cache, use_cache=True)


@fault("ShardedCache.update", "prefill on one rank, decode on the others", ValueError,
       f"decoding {SAME}", own=False)
def _(ctx, bad):
    from longattn.integrations.cache import ShardedCache

    # contiguous: a one-token prefill is a shard the layout can split, so the phase is the
    # first thing that differs
    prefilled, fresh = _prefilled(ctx, "contiguous"), ShardedCache(group=ctx.cp,
                                                                    layout="contiguous")
    cache = fresh if bad else prefilled
    new = torch.tensor([[3]])
    with torch.no_grad():
        if bad:  # the same new token, but the rank lost its cache: a prefill of one token
            _untouched(cache, lambda: ctx.model(input_ids=new, position_ids=torch.tensor(
                [[ctx.seq]]), past_key_values=cache, use_cache=True))
        else:
            _untouched(cache, lambda: ctx.model(input_ids=new, past_key_values=cache,
                                                use_cache=True))


@fault("loss", "label outside the vocabulary on one rank", ValueError,
       "longattn_cp loss: the loss failed on", "of the cp group")
def _(ctx, bad):
    batch = ctx.batch()
    if bad:  # the loss raised on this rank alone while the others waited in its agreement
        labels = batch["labels"].clone()
        labels[0, 0] = ctx.model.config.vocab_size + 5
        batch = {**batch, "labels": labels, "shift_labels": labels}
    _forward(ctx, batch=batch)


# ------------------------------------------------------------------------------- the tests


def _inject(rank, n, fid, bad_rank):
    torch.set_num_threads(1)
    ctx = _Ctx(rank, n)
    try:
        FAULTS[fid][0](ctx, rank == bad_rank)
        got = (None, "returned")
    except Exception as e:  # noqa: BLE001 - the test records whatever was raised
        got = (type(e).__name__, str(e))
    alive = torch.ones(1)
    tdist.all_reduce(alive)  # the world still works (and no collective is left pending)
    return got, int(alive.item())


CASES = [pytest.param(fid, n, i % n, id=f"{fid}-{n}ranks")
         for i, fid in enumerate(FAULTS) for n in (2, 3, 4)]


@pytest.mark.parametrize("fid,n,bad_rank", CASES)
def test_one_bad_rank_raises_the_same_error_everywhere(fid, n, bad_rank):
    _, cls, words, own = FAULTS[fid]
    per_rank = run_world(n, _inject, fid, bad_rank, timeout=300)  # cold: imports
    got = [r[0] for r in per_rank]
    assert all(r[1] == n for r in per_rank), (fid, n, per_rank)
    assert all(c == cls.__name__ for c, _ in got), (fid, n, bad_rank, got)
    msgs = {m for _, m in got}
    assert len(msgs) == 1, (fid, n, bad_rank, msgs)  # the same message on every rank
    msg = msgs.pop()
    assert all(w in msg for w in words), (fid, n, bad_rank, msg)
    if own:
        assert f"rank(s) [{bad_rank}] of {n}" in msg, (fid, n, bad_rank, msg)


def _equal_copy(rank, n, bad_rank):
    """The bad rank passes a fresh equal copy of its position_ids on every call (the others
    the same object), then changes its object in place: the check runs on every call of every
    rank (nothing is cached by tensor identity), so the copies work and the change raises."""
    torch.set_num_threads(1)
    ctx = _Ctx(rank, n)
    batch = ctx.batch()
    outs = []
    for _ in range(2):
        if rank == bad_rank:
            batch = {**batch, "position_ids": batch["position_ids"].clone()}
        outs.append(_forward(ctx, batch=batch).logits)
    if rank == bad_rank:
        batch["position_ids"].add_(1)
    try:
        _forward(ctx, batch=batch)
        err = None
    except ValueError as e:
        err = str(e)
    return torch.equal(outs[0], outs[1]), err


@pytest.mark.parametrize("n", [2, 3, 4])
def test_position_check_with_an_equal_copy_on_one_rank(n):
    bad = n - 1
    results = run_world(n, _equal_copy, bad, timeout=300)
    assert all(same for same, _ in results)
    errs = {err for _, err in results}
    assert len(errs) == 1, errs
    err = errs.pop()
    assert err is not None and "position_ids" in err and f"rank(s) [{bad}] of {n}" in err, err
