"""Context-parallel attention for Hugging Face transformers models.

    import torch.distributed as dist
    from longattn.integrations.transformers import register, shard_inputs, reduce_loss
    register()                                                  # adds "longattn_cp"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longattn_cp")
    batch = shard_inputs(input_ids, labels, group=dist.group.WORLD, layout=layout_for(cfg))
    loss = model(**batch).loss                                  # this rank's share
    loss.backward(); all_reduce_grads(model, dist.group.WORLD)  # exact full-sequence grads

Every rank holds a shard of the sequence (``shard_inputs``); every attention layer then runs
one longattn method over the ranks of the process group:

* full attention (``sliding_window`` None): :func:`longattn.hamilton.hamilton_attn`, causal
  in the zigzag layout (balanced causal work), non-causal in any layout;
* sliding-window attention (``sliding_window=W``, HF's convention: ``W`` keys including the
  query's own): :func:`longattn.ring_swa.ring_swa_attn` with ``window_size=(W-1, 0)`` in the
  contiguous layout;
* decoding with a :class:`~longattn.integrations.cache.ShardedCache` (new tokens replicated,
  KV cache sharded): :func:`longattn.tree.tree_decode` (through
  :func:`longattn.tree.cache.attend`, which reads the cached keys' positions);
  :func:`generate` runs ``model.generate`` that way: the same tokens on every rank.

A model keeps one layout for its hidden states (:func:`layout_for`: ``contiguous`` when it has
sliding-window layers, else ``zigzag``); a layer whose method wants the other layout moves
q/k/v there and the output back (:mod:`longattn.integrations.relayout`, one all-to-all step
each way). The attention function reads the layout from the ``position_ids`` the model passes
down (they are the global positions of this rank's tokens, which RoPE needs anyway).

Every call of the attention function first runs its checks inside
:func:`longattn.common.dist.agree` (one small all-gather): shapes, dtype, device type,
``causal``, the softmax scale, the window, the backend, decoding or not, and the layout each
rank's ``position_ids`` are in. A bad argument on any rank raises the same ``ValueError`` on
every rank, before any attention communication; nothing is cached between calls, so every rank
makes the same collectives whatever tensors it was given.

What transformers hands an attention function (5.x): ``module`` (has ``is_causal``,
``layer_idx``, ``config``), ``query`` ``[B, Hq, S, D]``, ``key``/``value`` ``[B, Hkv, S, D]``
(BHSD; transposed to longattn's BSHD here), ``attention_mask`` (None with this
implementation: see :func:`_mask`), ``dropout``, ``scaling``, and in ``**kwargs``
``sliding_window``, ``is_causal``, ``position_ids`` and anything the caller passed to the
model's forward (``cp_group``: the process group, which :func:`shard_inputs` adds to the
batch). It expects back ``(attn_output [B, S, Hq, D], attn_weights or None)``.

Groups (``cp_group`` here, ``group`` in the helpers) follow longattn's one rule: a
``ProcessGroup``, a 1-D ``DeviceMesh``, :data:`longattn.common.dist.LOCAL`, or ``None``, which
means this process alone without torch.distributed or in a world of one rank, and is a
``ValueError`` in an initialised world of more ranks.

Padding masks go to :func:`shard_inputs` (``attention_mask=``), which moves each row's real
tokens to its front, so causal layers need no mask (``longattn.integrations.training``).

Not supported (ValueError): a padding mask passed to the model itself, custom 4D masks,
attention dropout during training, ``softcap``, attention sinks (``s_aux``), position biases,
sliding windows without causality.
"""

from __future__ import annotations

import torch

from longattn.common import checks
from longattn.common import layout as _layout
from longattn.common.dist import LOCAL, agree, resolve_group
from longattn.integrations.cache import real_positions, visible_slots
from longattn.integrations.generate import generate
from longattn.integrations.relayout import moved, moved_between
from longattn.integrations.training import (
    ShardedBatch,
    _install_causal_lm_loss,
    all_reduce_grads,
    packed_positions,
    reduce_loss,
    shard_inputs,
    unshard,
)
from longattn.tree._args import q_checksum

NAME = "longattn_cp"

__all__ = [
    "NAME", "register", "attention", "layout_for", "shard_inputs", "unshard", "reduce_loss",
    "all_reduce_grads", "ShardedBatch", "generate",
]

_UNSUPPORTED = ("softcap", "s_aux", "position_bias")


# ---------------------------------------------------------------------------------------------
# registration


def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register the attention function (and a mask function) under ``name``; returns ``name``.

    Also wraps every model's causal-LM loss (``PreTrainedModel.loss_function``, once;
    ``LOSS_MAPPING`` stays as transformers made it, which its ``Trainer`` relies on): a batch
    from :func:`shard_inputs` then reports the whole batch's loss on every rank and gives
    gradients meant to be averaged over the ranks (see ``longattn.integrations.training``);
    any other call of the loss is unchanged.

    Afterwards ``attn_implementation=name`` works at model construction, or set
    ``model.config._attn_implementation = name`` (or ``model.set_attn_implementation(name)``).
    ``backend`` is the local-kernel choice every layer passes to the methods
    (``longattn.common.kernels``; ``"auto"``: the fastest that serves the request); a model's
    forward may override it per call with ``backend=...``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")

    def attention_with_backend(module, query, key, value, attention_mask=None, **kwargs):
        kwargs.setdefault("backend", backend)
        return attention(module, query, key, value, attention_mask, **kwargs)

    attention_with_backend._longattn = True  # generate() checks a model uses longattn
    AttentionInterface.register(name, attention if backend == "auto" else attention_with_backend)
    AttentionMaskInterface.register(name, _mask)
    _install_causal_lm_loss()
    return name


def _mask(batch_size=None, q_length=None, kv_length=None, *args, attention_mask=None, **kwargs):
    """Mask builder for transformers' ``create_causal_mask``: the methods apply causality and
    windows themselves, so no mask is built. A 2-D padding mask that hides tokens is passed on
    as it is, so that the attention function refuses it on every rank at once (the sequence is
    sharded; padding would need a per-token mask across ranks)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask
    return None


# ---------------------------------------------------------------------------------------------
# the attention function


def attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
              sliding_window=None, is_causal=None, cp_group=None, backend="auto", **kwargs):
    """transformers attention function: this rank's shard of the sequence attends to all of
    it. ``query [B, Hq, S_local, D]``, ``key``/``value [B, Hkv, S_local, D]`` (BHSD, as
    transformers passes them). ``scaling`` is the softmax scale (None: ``D ** -0.5``),
    ``sliding_window`` HF's window (keys seen, including the query's own), ``cp_group`` the
    context-parallel group (with a :class:`~longattn.integrations.cache.ShardedCache`, the
    cache's group), ``backend`` the local-kernel choice. Returns ``(out [B, S_local, Hq, D],
    None)``."""
    if is_causal is None:  # decoder modules say is_causal; a config may turn it off
        is_causal = bool(getattr(module, "is_causal", True) and getattr(
            getattr(module, "config", None), "is_causal", True))
    state = getattr(key, "_longattn_state", None)
    g = resolve_group(cp_group if state is None or cp_group is not None else state.group,
                      name="cp_group")
    other = state is not None and resolve_group(state.group) != g
    decoding = state is not None and state.decoding

    def check():
        if other:
            raise ValueError("cp_group is not the group of the ShardedCache passed as "
                             "past_key_values: pass the same group to both (or cp_group=None)")
        return _check_call(query, key, value, attention_mask, dropout, scaling, sliding_window,
                           is_causal, backend, state, kwargs, g,
                           first_layer=getattr(module, "layer_idx", None) in (0, None))

    (causal, window, lay), _ = agree(NAME, g, check)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    info = kwargs.get("cp_batch")
    if info is not None and info.cu_seqlens is not None:
        out = _packed(q, k, v, info, causal, window, scaling, g, backend)
    elif decoding:
        out = _decode(q, k, v, state, causal, window, scaling, g, backend)
    elif not g.distributed:
        out = _local(q, k, v, causal, window, scaling, backend)
    else:
        out = _sharded(q, k, v, lay, causal, window, scaling, g, backend)
    return out, None


attention._longattn = True  # generate() checks a model uses longattn


def _check_call(query, key, value, attention_mask, dropout, scaling, sliding_window, is_causal,
                backend, state, kwargs, g, first_layer=True):
    """This rank's checks (run inside ``agree``). Returns ``((causal, window, layout),
    fields)``: ``window`` is the window's ``left`` (keys before the query) or None, ``layout``
    the layout of this rank's tokens (sharded, not decoding) or None."""
    decoding = state is not None and state.decoding
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{NAME}: {name} must be a 4-D [batch, heads, seq, head_dim] tensor "
                             f"(transformers' layout), got {got}")
    causal = checks.check_bool("is_causal", is_causal)
    padded = state is not None and state.pads is not None
    if attention_mask is not None and not (padded and decoding):
        if attention_mask.ndim == 2:
            raise ValueError(
                f"{NAME!r} takes padding through shard_inputs(..., attention_mask=mask), not "
                "as the model's attention_mask (the rows are reordered before sharding)")
        raise ValueError(
            f"{NAME!r} builds no attention mask; got a {tuple(attention_mask.shape)} "
            "attention_mask (custom 4-D masks and padding are not supported)")
    if dropout:
        raise ValueError(f"{NAME!r} does not support attention dropout (dropout={dropout}); "
                         "set config.attention_dropout = 0")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME!r} does not support {name}={kwargs[name]!r}")
    if kwargs.get("output_attentions"):  # transformers would return an empty tuple
        raise ValueError(f"{NAME!r} computes no attention weights: output_attentions=True "
                         "is not supported")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {backend!r}")
    scale = None if scaling is None else checks.check_scale(scaling, query.shape[-1])
    window = None
    if sliding_window is not None:
        w = sliding_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"sliding_window must be a positive int (keys seen, including the "
                             f"query's own), got {sliding_window!r}")
        if not causal:
            raise ValueError(f"{NAME!r} supports sliding windows only in causal attention")
        window = w - 1
    if padded and decoding:
        _check_padding_mask(attention_mask, state, sum(state.lens))
        if not causal:
            raise ValueError(f"{NAME}: a left-padded batch needs causal attention")
    info = _check_batch(kwargs.get("cp_batch"), causal, state)
    lay = None
    if not decoding and g.distributed:
        if key.shape[2] != query.shape[2]:
            raise ValueError(
                f"key length {key.shape[2]} != query length {query.shape[2]}: for decoding with "
                "a KV cache pass cache=longattn.integrations.cache.ShardedCache(...)")
        pos = kwargs.get("position_ids")
        lay = (_layout_of(pos, query.shape[2], g) if info is None
               else _layout_of_batch(info, pos, query.shape[2]))
    elif not g.distributed and key.shape[2] < query.shape[2]:  # decoding: any count per rank
        raise ValueError(f"key length {key.shape[2]} < query length {query.shape[2]}")
    b, d = query.shape[0], query.shape[3]
    fields = {
        "query.shape": tuple(query.shape),
        # decoding: every rank holds a different number of cached keys
        "key.shape": (b, key.shape[1], d) if decoding else tuple(key.shape),
        "value.shape": (b, value.shape[1], value.shape[3]) if decoding else tuple(value.shape),
        "dtype": query.dtype, "device type": query.device.type, "causal": causal,
        # no None among numbers (a None on one rank and a number on another would decode
        # differently per rank): the effective scale, -1 for no window, "" for no layout
        "softmax_scale": d ** -0.5 if scale is None else scale,
        "sliding_window": -1 if sliding_window is None else sliding_window, "backend": backend,
        "decoding": decoding, "position_ids layout": lay or "", "padded cache": padded,
        "cp_batch given": info is not None, "padded": info is not None and info.padded,
        "packed documents": 0 if info is None or info.cu_seqlens is None else len(
            info.cu_seqlens) - 1,
        "shift_labels given": kwargs.get("shift_labels") is not None,
    }
    # the new tokens are replicated: agree on their values too, once per step (the first
    # layer's queries; the later layers' follow from them), one device sync
    if decoding and g.distributed and first_layer:
        fields["query values (float64 checksum)"] = q_checksum(query)
    return (causal, window, lay), fields


def _check_batch(info, causal, state):
    """The :class:`ShardedBatch` of :func:`shard_inputs` (or None): a padded batch needs causal
    attention (its padding keys sit after every real query) and no KV cache."""
    if info is None:
        if state is not None and not state.decoding and state.pads is not None and bool(
                state.pads.any()):
            raise ValueError(f"{NAME}: the sharded prefill of a left-padded ShardedCache must "
                             "come from shard_inputs(..., attention_mask=mask)")
        return None
    if not isinstance(info, ShardedBatch):
        raise TypeError(f"{NAME}: cp_batch must be the ShardedBatch shard_inputs made, got "
                        f"{type(info).__name__}")
    if info.padded and not causal:
        raise ValueError(f"{NAME}: a padded batch (attention_mask with padding) needs causal "
                         "attention; this layer is not causal")
    if state is not None and (info.cu_seqlens is not None or info.padded != (
            state.pads is not None and bool(state.pads.any()))):
        raise ValueError(f"{NAME}: a packed batch, or a padded batch into a ShardedCache not "
                         "told its padding, cannot fill a ShardedCache (the tokens are "
                         "reordered); call cache.left_pad(pads) first, or prefill unpadded rows")
    if info.padded and state is not None and not torch.equal(info.order, _prefill_order(state)):
        raise ValueError(f"{NAME}: the batch's attention_mask is not the left padding the "
                         "ShardedCache was told (cache.left_pad)")
    return info


def _prefill_order(state):
    """The reordering ``shard_inputs`` makes of a left-padded prefill of ``state.prefix``
    tokens (real tokens first), from the cache's pad counts."""
    cols = torch.arange(state.prefix)[None, :]
    pad = cols < state.pads[:, None]
    return torch.argsort(pad.to(torch.int8), dim=1, stable=True)


def _check_padding_mask(mask, state, total):
    """Decoding a left-padded batch: the model's 2-D ``attention_mask`` must be the cache's
    left padding over all ``total`` cached tokens (what ``generate`` passes). Every layer of a
    forward gets the same mask tensor: it is compared (a copy to the host) once, and marked
    with what it was checked against (its in-place version included) for the next layers."""
    seen = (total, id(state.pads), getattr(mask, "_version", None))
    if isinstance(mask, torch.Tensor) and getattr(mask, "_longattn_checked", None) == seen:
        return
    want = torch.arange(total)[None, :] >= state.pads[:, None]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or not torch.equal(
            mask.detach().cpu().bool(), want):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else mask
        raise ValueError(f"{NAME}: decoding a left-padded ShardedCache needs the model's "
                         f"2-D attention_mask [batch, {total}] of that left padding, got {got}")
    mask._longattn_checked = seen


def _layout_of_batch(info, position_ids, s_local):
    """The layout of a batch from :func:`shard_inputs`, after checking that the model passed
    the ``position_ids`` it returned (ValueError naming ``position_ids`` otherwise)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] != s_local or not (
            torch.equal(position_ids.cpu(), info.positions)):
        raise ValueError(
            f"{NAME}: the position_ids the model passed are not those shard_inputs returned "
            "for this rank's tokens: pass the batch to the model as it is")
    return info.layout


def _layout_of(position_ids, s_local, g):
    """The layout this rank's tokens are in, read from their global positions (ValueError
    naming ``position_ids`` when they match none)."""
    fix = ("Shard the inputs with longattn.integrations.transformers.shard_inputs (it returns "
           "the global position_ids) and pass them to the model.")
    if position_ids is None:
        raise ValueError(f"{NAME}: the model did not pass position_ids to the attention "
                         f"function. {fix}")
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        got = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(
            position_ids).__name__
        raise TypeError(f"{NAME}: position_ids must be an integer tensor, got {got}")
    pos = position_ids.reshape(-1, position_ids.shape[-1]).cpu()
    if pos.shape[-1] != s_local:
        raise ValueError(f"{NAME}: position_ids have {pos.shape[-1]} positions for {s_local} "
                         f"tokens. {fix}")
    if bool((pos != pos[:1]).any()):
        raise ValueError(f"{NAME}: position_ids differ between batch rows (packed sequences are "
                         "not supported)")
    n = g.size
    for lay in _layout.LAYOUTS:
        if (s_local * n) % (2 * n if lay == "zigzag" else n):
            continue
        if torch.equal(pos[0], _layout.positions(s_local * n, g.rank, n, lay)):
            return lay
    raise ValueError(f"{NAME}: position_ids {pos[0].tolist()[:8]}... on rank {g.rank} are not "
                     f"this rank's global positions in any layout {_layout.LAYOUTS}. {fix}")


def _sharded(q, k, v, lay, causal, window, scale, g, backend):
    """The layer's method over the group's ranks, in the layout it wants (relayout of q/k/v
    there and of the output back; the arguments were agreed on already)."""
    if window is not None:
        from longattn.ring_swa import ring_swa_attn

        q, k, v = (moved(t, lay, "contiguous", g) for t in (q, k, v))
        out = ring_swa_attn(q, k, v, window_size=(window, 0), group=g.pg, causal=True,
                            softmax_scale=scale, backend=backend)
        return moved(out, "contiguous", lay, g)
    from longattn.hamilton import hamilton_attn

    want = "zigzag" if causal else lay  # non-causal full attention works in any layout
    q, k, v = (moved(t, lay, want, g) for t in (q, k, v))
    out = hamilton_attn(q, k, v, group=g.pg, causal=causal, softmax_scale=scale,
                        backend=backend)
    return moved(out, want, lay, g)


def _packed(q, k, v, info, causal, window, scale, g, backend):
    """A packed batch (documents ``info.cu_seqlens``): hamilton's packed layout for full
    attention (causal or not), ring_swa's varlen contiguous one for a window; q/k/v move there
    from the batch's layout and the output back."""
    cu = info.cu_seqlens
    cu_t = torch.tensor(cu, dtype=torch.int32)
    group = g.pg if g.distributed else LOCAL
    want = "contiguous" if window is not None else "zigzag" if causal else "full"

    def move(t, src, dst):
        if src == dst:
            return t
        return moved_between(t, ("packed", cu, g.size, src, dst),
                             lambda: list(packed_positions(cu, g.size, src)),
                             lambda: list(packed_positions(cu, g.size, dst)), g)

    q, k, v = (move(t, info.layout, want) for t in (q, k, v))
    if window is not None:
        from longattn.ring_swa import ring_swa_attn

        out = ring_swa_attn(q[0], k[0], v[0], window_size=(window, 0), group=group, causal=True,
                            softmax_scale=scale, cu_seqlens=cu_t, backend=backend)[None]
    else:
        from longattn.hamilton import hamilton_attn

        out = hamilton_attn(q, k, v, group=group, causal=causal, softmax_scale=scale,
                            backend=backend, cu_seqlens=cu_t)
    return move(out, want, info.layout)


def _local(q, k, v, causal, window, scale, backend):
    """One process: plain attention on the keys it has (bottom-right aligned when decoding:
    the new tokens are the last keys)."""
    from longattn.common.kernels import attention as local_attention

    win = (-1, -1) if window is None else (window, 0)
    return local_attention(q.contiguous(), k.contiguous(), v.contiguous(), softmax_scale=scale,
                           causal=causal, window_size=win, backend=backend)


def _decode(q, k, v, state, causal, window, scale, g, backend):
    """New tokens (replicated) against the sharded KV cache: exact, one combine over the ranks.

    ``state.positions`` are the global slots of this rank's cached keys (placed in balanced
    blocks, so not contiguous), ``state.query_positions`` those of the new tokens; a
    left-padded batch (``state.pads``) counts positions per row, its padding slots sitting
    after the sharded prefill's real tokens. Each token's visible keys on this rank are then
    at most two ranges of its slots per row (:func:`~longattn.integrations.cache.visible_slots`,
    cut by the causal bound and the window): one local call per token reads them in place
    (:func:`longattn.tree.local.local_attention` with per-row starts, ends and skipped slots;
    no key is copied) and one exact combine over the ranks
    (:func:`longattn.tree.decode.combine_partials`: an all-reduce MAX and a SUM) finishes
    every token at once. The call was agreed on every rank before (:func:`attention`)."""
    if state.pads is None and not g.distributed:
        return _local(q, k, v, causal, window, scale, backend)
    if not state.ascending:  # no layout does this; the selecting twin keeps it exact
        return _decode_selected(q, k, v, state, causal, window, scale, g, backend)
    from longattn.tree.decode import combine_partials
    from longattn.tree.local import local_attention

    b, lq = q.shape[:2]
    pads = state.pads if state.pads is not None else torch.zeros(b, dtype=torch.int64)
    prefix = state.prefix if state.pads is not None else 0
    slots = visible_slots(state.query_positions, pads, prefix, window=window, causal=causal,
                          total=sum(state.lens))
    local = torch.searchsorted(state.positions.to(torch.int64).cpu(), slots.reshape(-1))
    local = local.reshape(slots.shape).tolist()  # [B][L][2 ranges][start, end] local slots
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for t in range(lq):
        starts, ends, skips = [], [], []
        for row in local:
            (a0, a1), (b0, b1) = row[t]
            one, two = a0 < a1, b0 < b1
            starts.append(a0 if one else b0)
            ends.append(b1 if two else (a1 if one else 0))
            skips.append((a1, b0) if one and two else (0, 0))
        o, lse = local_attention(q[:, t:t + 1], k, v, softmax_scale=scale, backend=backend,
                                 seqlens=ends, starts=starts, skips=skips)
        outs.append(o)
        lses.append(lse)
    o, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=2)
    if g.distributed:
        o, _ = combine_partials(o, lse, group=g)
    return o.to(q.dtype)


def _decode_selected(q, k, v, state, causal, window, scale, g, backend):
    """The slow twin of :func:`_decode` for any placement: per new token, each row's visible
    keys (selected by their real positions, :func:`~longattn.integrations.cache.real_positions`)
    move to the front of the row and one :func:`longattn.tree.tree_decode` with per-row
    ``cache_seqlens`` attends them."""
    from longattn.tree import tree_decode

    b = q.shape[0]
    pads = state.pads if state.pads is not None else torch.zeros(b, dtype=torch.int64)
    prefix = state.prefix if state.pads is not None else 0
    keys = real_positions(state.positions, pads, prefix)
    queries = real_positions(state.query_positions, pads, prefix)
    group = g.pg if g.distributed else LOCAL
    outs = []
    for t in range(q.shape[1]):
        p = queries[:, t:t + 1]
        seen = (keys >= 0) & (p >= 0)
        if causal:
            seen &= keys <= p
        if window is not None:
            seen &= keys >= p - window
        count = seen.sum(dim=1)
        width = int(count.max()) if count.numel() else 0
        idx = torch.argsort((~seen).to(torch.int8), dim=1, stable=True)[:, :width]
        idx = idx.to(k.device)[:, :, None, None]
        ks = k.gather(1, idx.expand(-1, -1, *k.shape[2:]))
        vs = v.gather(1, idx.expand(-1, -1, *v.shape[2:]))
        outs.append(tree_decode(q[:, t:t + 1].contiguous(), ks, vs, group=group,
                                softmax_scale=scale, causal=False, backend=backend,
                                cache_seqlens=count.to(torch.int32).to(k.device)))
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------
# inputs, loss and gradients


def layout_for(config) -> str:
    """The layout for a model: ``contiguous`` if any layer uses a sliding window (ring_swa's
    layout), else ``zigzag`` (hamilton's causal layout)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return "contiguous" if "sliding_attention" in types else "zigzag"
    return "contiguous" if getattr(config, "sliding_window", None) else "zigzag"
