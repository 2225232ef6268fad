"""``torch.compile`` of a transformers model whose attention is longattn's context parallelism.

    from longattn.integrations import compile as cpc
    from longattn.integrations.transformers import shard_inputs
    model.set_attn_implementation(cpc.register())            # "longattn_cp_compiled"
    compiled = torch.compile(model, fullgraph=True)
    logits = compiled(**shard_inputs(ids, group=cp, layout=lay), use_cache=False).logits

The attention of every layer is one ``torch.library`` custom op,
``longattn_integrations::cp_attention``: dynamo and AOTAutograd see an opaque op with a fake
(meta) implementation (the output's shape), while its real implementation is the eager
:func:`longattn.integrations.transformers.attention` -- the agreement all-gather of its checks,
hamilton's or ring_swa's communication, the relayouts -- run as it is. Its gradient
(``register_autograd``) is a second custom op, ``cp_attention_backward``, which recomputes that
forward under autograd and differentiates it: the forward's communication runs again in the
backward (activation recomputation), and nothing distributed is traced.

So ``torch.compile(model, fullgraph=True)`` traces a whole forward without labels (the logits:
forward and backward), padded and packed batches of ``shard_inputs`` included, and the compiled
model's logits and gradients equal the eager ones. The causal-LM loss that ``register()`` of the
transformers module wraps sums the ranks' shares on the host (``float(loss)``), which dynamo
cannot trace: a forward with ``labels`` compiles with ``fullgraph=False`` (one graph break at the
loss) or computes the loss from the compiled logits. Decoding with a
:class:`~longattn.integrations.cache.ShardedCache` runs the eager attention (not compiled).

The process group reaches the op by name (``ProcessGroup.group_name``, ``""`` for this process
alone), since a custom op's arguments are tensors and plain values.
"""


import torch

from longattn.common.dist import LOCAL, resolve_group

NAME = "longattn_cp_compiled"
OP = "longattn_integrations::cp_attention"

__all__ = ["NAME", "OP", "register", "attention"]

_UNSUPPORTED = ("softcap", "s_aux", "position_bias")


# ---------------------------------------------------------------------------------------------
# the custom ops


def _group(name: str):
    """The process group of ``name`` (``""``: this process alone)."""
    if name == "":
        return LOCAL
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _run(query, key, value, mask, dropout, position_ids, batch_positions, group, causal,
         scaling, sliding_window, backend, layout, padded, cu_seqlens, total):
    """The eager attention (checks, agreement and communication included)."""
    from longattn.integrations.training import ShardedBatch
    from longattn.integrations.transformers import attention as eager

    kwargs = {"position_ids": position_ids}
    if layout:
        kwargs["cp_batch"] = ShardedBatch(
            layout=layout, positions=batch_positions, padded=padded, order=None, grad_scale=1,
            loss_groups=(), num_items=0,
            cu_seqlens=None if cu_seqlens is None else tuple(cu_seqlens), total=total)
    out, _ = eager(None, query, key, value, mask, dropout, scaling, sliding_window, causal,
                   cp_group=_group(group), backend=backend, **kwargs)
    return out.contiguous()


@torch.library.custom_op(OP, mutates_args=())
def cp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, dropout: float,
                 position_ids: torch.Tensor | None, batch_positions: torch.Tensor | None,
                 group: str, causal: bool, scaling: float | None,
                 sliding_window: int | None, backend: str, layout: str, padded: bool,
                 cu_seqlens: list[int] | None, total: int) -> torch.Tensor:
    """``out [B, S_local, Hq, Dv]`` of the eager attention (query/key/value BHSD, as
    transformers passes them); ``layout`` ``""`` when the batch has no ``cp_batch``."""
    with torch.no_grad():
        return _run(query, key, value, mask, dropout, position_ids, batch_positions, group,
                    causal, scaling, sliding_window, backend, layout, padded, cu_seqlens, total)


@cp_attention.register_fake
def _(query, key, value, mask, dropout, position_ids, batch_positions, group, causal, scaling,
      sliding_window, backend, layout, padded, cu_seqlens, total):
    b, hq, s, _ = query.shape
    return query.new_empty(b, s, hq, value.shape[-1])


def _autograd_on():
    """Autograd back on inside an op's implementation (the dispatcher runs it below autograd:
    the autograd keys are excluded on this thread), so the backward can differentiate the
    recomputed forward."""
    C = torch._C
    keep = C._dispatch_tls_local_exclude_set() & C._after_autograd_keyset
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), keep)


@torch.library.custom_op(OP + "_backward", mutates_args=())
def cp_attention_backward(
        grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        position_ids: torch.Tensor | None, batch_positions: torch.Tensor | None,
        group: str, causal: bool, scaling: float | None, sliding_window: int | None,
        backend: str, layout: str, padded: bool, cu_seqlens: list[int] | None,
        total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` (contiguous, in the shapes of query/key/value): the forward recomputed
    under autograd (its communication runs again) and differentiated."""
    with torch.enable_grad(), _autograd_on():
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        out = _run(q, k, v, None, 0.0, position_ids, batch_positions, group, causal, scaling,
                   sliding_window, backend, layout, padded, cu_seqlens, total)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    return tuple(g.contiguous() for g in grads)


@cp_attention_backward.register_fake
def _(grad, query, key, value, position_ids, batch_positions, group, causal, scaling,
      sliding_window, backend, layout, padded, cu_seqlens, total):
    return tuple(t.new_empty(t.shape) for t in (query, key, value))


def _setup_context(ctx, inputs, output):
    query, key, value, _mask, _dropout, position_ids, batch_positions, *rest = inputs
    ctx.save_for_backward(query, key, value, position_ids, batch_positions)
    ctx.rest = rest


def _backward(ctx, grad):
    query, key, value, position_ids, batch_positions = ctx.saved_tensors
    dq, dk, dv = cp_attention_backward(grad.contiguous(), query, key, value, position_ids,
                                       batch_positions, *ctx.rest)
    return (dq, dk, dv) + (None,) * 13


cp_attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the attention function transformers calls (traced by dynamo)


@torch.compiler.assume_constant_result
def _group_name(group) -> str:
    """``group``'s name for the op (``""``: this process alone); longattn's group rule
    (``None`` in a world of several ranks raises ``ValueError`` naming ``cp_group``)."""
    g = resolve_group(group, name="cp_group")
    return g.pg.group_name if g.distributed else ""


def attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
              sliding_window=None, is_causal=None, cp_group=None, backend="auto", **kwargs):
    """The transformers attention function of :func:`register`: the arguments of
    :func:`longattn.integrations.transformers.attention`, the work done by the custom op
    ``cp_attention`` (the same checks, errors and results). Decoding with a
    ``ShardedCache`` and the unsupported arguments (``softcap``, ``s_aux``,
    ``position_bias``) go to the eager function, which serves or refuses them as always."""
    if getattr(key, "_longattn_state", None) is not None or any(
            kwargs.get(n) is not None for n in _UNSUPPORTED):
        from longattn.integrations.transformers import attention as eager

        return eager(module, query, key, value, attention_mask, dropout, scaling,
                     sliding_window, is_causal, cp_group=cp_group, backend=backend, **kwargs)
    if is_causal is None:  # as the eager function decides it
        is_causal = bool(getattr(module, "is_causal", True) and getattr(
            getattr(module, "config", None), "is_causal", True))
    info = kwargs.get("cp_batch")
    batch = ("", None, False, None, 0) if info is None else (
        info.layout, info.positions, info.padded,
        None if info.cu_seqlens is None else list(info.cu_seqlens), info.total)
    layout, positions, padded, cu, total = batch
    out = cp_attention(query, key, value, attention_mask, float(dropout),
                       kwargs.get("position_ids"), positions, _group_name(cp_group), is_causal,
                       scaling, sliding_window, backend, layout, padded, cu, total)
    return out, None


def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register :func:`attention` (and longattn's mask function and causal-LM loss wrapper,
    through :func:`longattn.integrations.transformers.register`) under ``name``; returns
    ``name``. Use it as ``attn_implementation=name`` or ``model.set_attn_implementation(name)``
    and compile the model; it runs eagerly too, with the eager function's results."""
    from transformers import AttentionInterface

    from longattn.integrations.transformers import register as register_eager

    register_eager(name, backend=backend)  # checks backend; the mask and the loss wrapper

    def attention_with_backend(module, query, key, value, attention_mask=None, **kw):
        kw.setdefault("backend", backend)
        return attention(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register(name, attention if backend == "auto" else attention_with_backend)
    return name
