"""Context-parallel attention for Hugging Face transformers models.

    from longattn.integrations.transformers import register, shard_inputs, reduce_loss
    register()                                                  # adds "longattn_cp"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longattn_cp")
    batch = shard_inputs(input_ids, labels, layout=layout_for(model.config))
    loss = model(**batch).loss                                  # this rank's share
    loss.backward(); all_reduce_grads(model)                    # exact full-sequence grads

Every rank holds a shard of the sequence (``shard_inputs``); every attention layer then runs
one longattn method over the ranks of the process group:

* full attention (``sliding_window`` None): :func:`longattn.hamilton.hamilton_attn`, causal
  in the zigzag layout (balanced causal work), non-causal in any layout;
* sliding-window attention (``sliding_window=W``, HF's convention: ``W`` keys including the
  query's own): :func:`longattn.ring_swa.ring_sliding_window_attn` with ``window_size=W-1``
  (its ``w`` means ``w + 1`` keys) in the contiguous layout;
* decoding with a :class:`~longattn.integrations.cache.ShardedCache` (new tokens replicated,
  KV cache sharded): :func:`longattn.tree.tree_decode`.

A model keeps one layout for its hidden states (:func:`layout_for`: ``contiguous`` when it has
sliding-window layers, else ``zigzag``); a layer whose method wants the other layout moves
q/k/v there and the output back (:mod:`longattn.integrations.relayout`, one all-to-all step
each way). The attention function reads the layout from the ``position_ids`` the model passes
down (they are the global positions of this rank's tokens, which RoPE needs anyway) and checks
it on every rank once per forward, so a wrong sharding raises everywhere instead of hanging.

What transformers hands an attention function (5.x): ``module`` (has ``is_causal``,
``layer_idx``, ``config``), ``query`` ``[B, Hq, S, D]``, ``key``/``value`` ``[B, Hkv, S, D]``
(BHSD; transposed to longattn's BSHD here), ``attention_mask`` (None with this
implementation: see :func:`_mask`), ``dropout``, ``scaling``, and in ``**kwargs``
``sliding_window``, ``is_causal``, ``position_ids`` and anything the caller passed to the
model's forward (``cp_group``: the process group, default the world). It expects back
``(attn_output [B, S, Hq, D], attn_weights or None)``.

Not supported (ValueError): padding masks / custom 4D masks (pack full sequences instead),
attention dropout during training, ``softcap``, attention sinks (``s_aux``), sliding windows
without causality. Without an initialised process group the layers run as plain local
attention on the full sequence.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from longattn.common import layout as _layout
from longattn.integrations.relayout import relayout

NAME = "longattn_cp"

__all__ = [
    "NAME", "register", "attention", "layout_for", "shard_inputs", "unshard", "reduce_loss",
    "all_reduce_grads",
]


# ---------------------------------------------------------------------------------------------
# registration


def register(name: str = NAME) -> str:
    """Register the attention function (and a mask function) under ``name``; returns ``name``.

    Afterwards ``attn_implementation=name`` works at model construction, or set
    ``model.config._attn_implementation = name`` (or ``model.set_attn_implementation(name)``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _mask)
    return name


def _mask(batch_size=None, q_length=None, kv_length=None, *args, attention_mask=None, **kwargs):
    """Mask builder for transformers' ``create_causal_mask``: the methods apply causality and
    windows themselves, so no mask is built. A 2-D padding mask that hides tokens is refused:
    the sequence is sharded, and padding would need a per-token mask across ranks."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"attention_mask with padding is not supported by {NAME!r}: pack full sequences "
            "(no padding) or pass attention_mask=None")
    return None


# ---------------------------------------------------------------------------------------------
# the attention function


def attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
              sliding_window=None, is_causal=None, cp_group=None, **kwargs):
    """transformers attention function: this rank's shard of the sequence attends to all of
    it. ``query [B, Hq, S_local, D]``, ``key``/``value [B, Hkv, S_local, D]`` (BHSD, as
    transformers passes them). Returns ``(out [B, S_local, Hq, D], None)``."""
    if is_causal is None:  # decoder modules say is_causal; a config may turn it off
        is_causal = getattr(module, "is_causal", True) and getattr(
            getattr(module, "config", None), "is_causal", True)
    causal = bool(is_causal)
    window = _check_call(attention_mask, dropout, sliding_window, causal, kwargs)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    state = getattr(key, "_longattn_state", None)
    if state is not None and state.decoding:
        out = _decode(q, k, v, state, causal, window, scaling, cp_group)
    elif q.shape[1] != k.shape[1]:
        raise ValueError(
            f"key length {k.shape[1]} != query length {q.shape[1]}: for decoding with a KV cache "
            "pass past_key_values=longattn.integrations.cache.ShardedCache(...)")
    elif not dist.is_available() or not dist.is_initialized():
        out = _local(q, k, v, causal, window, scaling)
    else:
        lay = _check_positions(kwargs.get("position_ids"), q.shape[1], cp_group)
        out = _sharded(q, k, v, lay, causal, window, scaling, cp_group)
    return out, None


def _check_call(attention_mask, dropout, sliding_window, causal, kwargs):
    """Everything here depends on the model and its config only, so it is the same on every
    rank and raises everywhere before any communication. Returns the window's ``left`` (keys
    before the query) or None."""
    if attention_mask is not None:
        raise ValueError(
            f"{NAME!r} builds no attention mask; got a {tuple(attention_mask.shape)} "
            "attention_mask (custom 4-D masks and padding are not supported)")
    if dropout:
        raise ValueError(f"{NAME!r} does not support attention dropout (dropout={dropout}); "
                         "set config.attention_dropout = 0")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{NAME!r} does not support {name}={kwargs[name]!r}")
    if sliding_window is None:
        return None
    w = sliding_window
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"sliding_window must be a positive int (keys seen, including the "
                         f"query's own), got {sliding_window!r}")
    if not causal:
        raise ValueError(f"{NAME!r} supports sliding windows only in causal attention")
    return sliding_window - 1


# The model passes the same position_ids tensor to every layer: check it once per forward.
_CHECKED: dict = {"ref": None, "layout": None}


def _check_positions(position_ids, s_local, group):
    """The layout this rank's tokens are in, read from their global positions; raises on every
    rank if any rank's positions match no layout (one all-reduce of a flag)."""
    seen = _CHECKED["ref"]
    if position_ids is not None and seen is not None and seen() is position_ids:
        return _CHECKED["layout"]
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    found, why = None, None
    if position_ids is None:
        why = "the model did not pass position_ids to the attention function"
    else:
        pos = position_ids.reshape(-1, position_ids.shape[-1]).cpu()
        if pos.shape[-1] != s_local:
            why = f"position_ids have {pos.shape[-1]} positions for {s_local} tokens"
        elif bool((pos != pos[:1]).any()):
            why = "position_ids differ between batch rows (packed sequences are not supported)"
        else:
            for lay in ("zigzag", "contiguous", "striped"):
                if (s_local * n) % (2 * n if lay == "zigzag" else n):
                    continue
                if torch.equal(pos[0], _layout.positions(s_local * n, rank, n, lay)):
                    found = lay
                    break
            if found is None:
                why = (f"position_ids {pos[0].tolist()[:8]}... on rank {rank} are not this "
                       f"rank's global positions in any layout {_layout.LAYOUTS}")
    flag = torch.tensor([0 if found else 1], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag.item()):
        raise ValueError(
            f"{NAME}: {why or 'another rank got inconsistent position_ids'}. Shard the inputs "
            "with longattn.integrations.transformers.shard_inputs (it returns the global "
            "position_ids) and pass them to the model.")
    if position_ids is not None:
        _CHECKED["ref"], _CHECKED["layout"] = weakref.ref(position_ids), found
    return found


def _sharded(q, k, v, lay, causal, window, scale, group):
    if window is not None:
        from longattn.ring_swa import ring_sliding_window_attn

        q, k, v = (relayout(t, lay, "contiguous", group) for t in (q, k, v))
        cp_group = group if group is not None else dist.group.WORLD
        out = ring_sliding_window_attn(q, k, v, window, cp_group=cp_group, softmax_scale=scale)
        return relayout(out, "contiguous", lay, group)
    from longattn.hamilton import hamilton_attn

    want = "zigzag" if causal else lay  # non-causal full attention works in any layout
    q, k, v = (relayout(t, lay, want, group) for t in (q, k, v))
    out = hamilton_attn(q, k, v, group=group, causal=causal, scale=scale)
    return relayout(out, want, lay, group)


def _local(q, k, v, causal, window, scale):
    from longattn.common.kernels import attention as local_attention

    win = (-1, -1) if window is None else (window, 0)
    return local_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=scale,
                           causal=causal, window=win)


def _decode(q, k, v, state, causal, window, scale, group):
    """New tokens (replicated) against the sharded KV cache: one tree reduction per call.

    ``state.positions`` are the global positions of this rank's cached keys (the new tokens
    sit at the end of the last rank's shard), ``state.query_positions`` those of the queries.
    """
    from longattn.tree import tree_decode

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if window is None:
        return tree_decode(q, k, v, group=group, scale=scale, causal=causal)
    # Sliding window: each new token sees its own key range; select it on every rank.
    outs = []
    for t, p in enumerate(state.query_positions.tolist()):
        sel = ((state.positions >= p - window) & (state.positions <= p)).nonzero()[:, 0]
        sel = sel.to(k.device)
        outs.append(tree_decode(q[:, t:t + 1], k.index_select(1, sel), v.index_select(1, sel),
                                group=group, scale=scale, causal=False))
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


def _world(group):
    if not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_inputs(input_ids, labels=None, position_ids=None, *, group=None, layout="zigzag",
                 ignore_index=-100):
    """This rank's part of a batch, as keyword arguments for the model's forward.

    Args:
        input_ids: ``[B, S]`` the full batch (the same on every rank); ``S`` divisible by
            ``2n`` (zigzag) or ``n`` (contiguous / striped) for ``n`` ranks.
        labels: ``[B, S]`` or None. Shifted here, *before* sharding (token ``i`` predicts
            label ``i+1``; the last gets ``ignore_index``), so each rank's loss is local.
        position_ids: ``[B or 1, S]`` or None (``0..S-1``): sharded as they are, so every rank
            keeps its tokens' *global* positions (RoPE and the layout check need them).
        group: the context-parallel process group (None: the world).
        layout: ``zigzag``, ``contiguous`` or ``striped``; :func:`layout_for` picks the
            cheapest for a model.

    Returns a dict with ``input_ids``, ``position_ids`` and, with labels, ``labels`` and
    ``shift_labels`` (the shifted local labels: transformers' loss then skips its own shift)
    and ``num_items_in_batch`` (the number of counted tokens of the whole batch, so each
    rank's ``loss`` is its token-loss sum over the global count and the ranks' losses add up
    to the mean: :func:`reduce_loss`). Pass ``group`` to the model as ``cp_group=`` if it is
    not the world.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    b, s = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0)
    if position_ids.ndim != 2 or position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
        raise ValueError(f"position_ids must be [1 or {b}, {s}], got {tuple(position_ids.shape)}")
    n, rank = _world(group)

    def cut(x):
        return _layout.shard(x, rank, n, layout=layout, dim=1)

    batch = {"input_ids": cut(input_ids), "position_ids": cut(position_ids)}
    if group is not None:
        batch["cp_group"] = group
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must be {tuple(input_ids.shape)} like input_ids, got "
                             f"{tuple(labels.shape)}")
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), ignore_index)], dim=1)
        local = cut(shifted)
        batch.update(labels=local, shift_labels=local,
                     num_items_in_batch=(shifted != ignore_index).sum())
    return batch


def unshard(x, *, group=None, layout="zigzag", dim=1):
    """Gather every rank's shard (e.g. logits ``[B, S_local, V]``) into the full tensor on
    every rank (no gradient). For tests and inspection, not for training."""
    n, _ = _world(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return _layout.unshard(parts, layout=layout, dim=dim)


def reduce_loss(loss, group=None):
    """The loss of the whole batch: the sum of the ranks' losses (each rank's loss is its
    token-loss sum over the global token count, see :func:`shard_inputs`). Detached; for
    logging. Backpropagate each rank's own ``loss`` and call :func:`all_reduce_grads`."""
    total = loss.detach().clone()
    if _world(group)[0] > 1:
        dist.all_reduce(total, group=group)
    return total


def all_reduce_grads(model, group=None):
    """Sum the parameter gradients over the ranks: each rank's backward of its own loss gives
    its tokens' contribution to every parameter's gradient (attention already sent the
    key/value gradients home), so the sum is the full-sequence gradient. (With data
    parallelism on top, let DDP / FSDP reduce over the combined group instead.)"""
    if _world(group)[0] == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
