"""Training with the sequence sharded: this rank's batch, the loss and the gradient convention.

    batch = shard_inputs(input_ids, labels, attention_mask=mask, group=cp, layout=lay)
    loss = model(**batch).loss   # the whole batch's mean token loss, the same on every rank
    loss.backward()              # this rank's gradient, meant to be AVERAGED over the cp ranks
    # DDP / FSDP2 over the cp (or dp x cp) ranks average it; without them: all_reduce_grads

**The convention** (the one of DDP, FSDP, TorchTitan and Megatron context parallelism): each
rank's gradient is its tokens' share of the batch's gradient times the number of ranks the
gradients are averaged over, so the average over those ranks is the gradient of the whole
batch's mean token loss, exactly, whatever each rank's number of counted tokens (padding,
ignored labels). The loss value every rank reports is the whole batch's loss. Both come from
one wrapper around transformers' causal-LM loss (the loss a model's ``loss_function`` gives,
installed by :func:`longattn.integrations.transformers.register`; ``LOSS_MAPPING`` itself is
left as it is), which acts only on a batch made by :func:`shard_inputs` (it carries a
:class:`ShardedBatch` as ``cp_batch``):

* it scales the gradient reaching the logits by ``grad_scale`` (the cp size, times the dp size
  with ``dp_group``) in the logits' own dtype, after transformers' float32 loss: the float32
  part is then the same computation as one process's (scaling a float32 value by 3 and
  averaging would round differently; scaling a float64 one by 3 and dividing by 3 does not);
* the value is the sum of the ranks' shares (one small all-gather through
  :func:`longattn.common.dist.agree`, summed with ``math.fsum`` in the same order everywhere,
  so every rank reports the same number).

Padding (``attention_mask``, left or right padded rows): each row's real tokens are moved to
its front, in order, with their position ids, before sharding. Causal attention then never
reaches a padding key from a real query, so full and sliding-window layers run unmasked and
exactly; padding tokens predict nothing (their shifted labels become ``ignore_index``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from longattn.common import comm
from longattn.common import layout as _layout
from longattn.common.dist import LOCAL, agree, resolve_group

__all__ = ["ShardedBatch", "shard_inputs", "unshard", "reduce_loss", "all_reduce_grads",
           "causal_lm_loss"]


@dataclass(frozen=True, eq=False)
class ShardedBatch:
    """What :func:`shard_inputs` tells the attention layers and the loss (``batch["cp_batch"]``).

    ``layout``: the layout of this rank's tokens; ``positions``: a private CPU copy of this rank's
    ``position_ids`` (the attention checks the model passed these); ``padded``: rows were
    reordered (real tokens first); ``order [B, S]``: the original index of each token of the
    reordered rows (None when not padded); ``grad_scale``: the number of ranks the gradients
    are averaged over; ``loss_groups``: the resolved groups the loss value is summed over (cp,
    then dp); ``num_items``: the counted labels of the whole batch (over dp too);
    ``cu_seqlens``: a packed batch's documents (global cumulative lengths, a tuple, padded with
    one-token documents to a multiple of the group size) or None; ``total``: the tokens of a
    row before that padding."""

    layout: str
    positions: torch.Tensor
    padded: bool
    order: torch.Tensor | None
    grad_scale: int
    loss_groups: tuple
    num_items: int
    cu_seqlens: tuple | None = None
    total: int = 0


# ---------------------------------------------------------------------------------------------
# shard_inputs


def shard_inputs(input_ids, labels=None, position_ids=None, attention_mask=None, *, group=None,
                 layout="zigzag", ignore_index=-100, dp_group=LOCAL, vocab_size=None):
    """This rank's part of a batch, as keyword arguments for the model's forward.

    Args:
        input_ids: ``[B, S]`` the full batch (the same on every rank of ``group``); ``S``
            divisible by ``2n`` (zigzag) or ``n`` (contiguous / striped) for ``n`` ranks.
        labels: ``[B, S]`` or None. Shifted here, *before* sharding (token ``i`` predicts
            label ``i+1``; the last gets ``ignore_index``), so each rank's loss is local.
        position_ids: ``[B or 1, S]`` or None (``0..S-1`` in every row): every rank keeps its
            tokens' *global* positions (RoPE needs them).
        attention_mask: ``[B, S]`` of 0/1 (or bool) or None: a padding mask, each row left- or
            right-padded (``0..01..1`` or ``1..10..0``; an all-zero row is allowed). Padding
            tokens predict nothing. Needs causal attention.
        group: the context-parallel group: a ``ProcessGroup``, a 1-D ``DeviceMesh``, ``LOCAL``
            or None (this process alone; an error in a world of several ranks).
        layout: ``zigzag``, ``contiguous`` or ``striped``
            (:func:`longattn.integrations.transformers.layout_for` picks a model's).
        dp_group: the data-parallel group the gradients are averaged over as well (DDP /
            FSDP2 over data-parallel x context-parallel ranks), or ``LOCAL`` (none). With it,
            the labels are counted over every data-parallel replica's batch, so the averaged
            gradient is that of the mean token loss of the global batch (each replica passes
            its own batch); without it, the mean over replicas of each replica's token mean.
        vocab_size: None, or the model's vocabulary size (``model.config.vocab_size``): every
            token id and label (but ``ignore_index``) must lie in ``[0, vocab_size)``, checked
            with the rest. Pass it: an id outside the embedding fails on the one rank holding
            it, inside the model, while the others wait in the first attention layer.
            ``LongattnTrainer`` and ``generate`` pass it.

    Returns a dict with ``input_ids``, ``position_ids``, ``cp_group`` (the group, for the
    attention layers), ``cp_batch`` (a :class:`ShardedBatch`) and, with labels, ``labels`` and
    ``shift_labels`` (the shifted local labels: transformers' loss then skips its own shift)
    and ``num_items_in_batch`` (the counted labels of the whole batch), and ``ignore_index``
    when it is not transformers' -100 (the loss must skip what was filled with it).
    ``model(**batch)`` takes it as it is.

    Every argument is checked on every rank first (:func:`longattn.common.dist.agree`, one
    small all-gather over ``group``, and one over ``dp_group`` when given): integer tensors,
    shapes, the mask's form, ``layout`` and its divisibility, and the same batch on every rank
    of ``group`` (a checksum of the values); a bad argument on any rank raises the same error
    on every rank of both groups.
    """
    g = resolve_group(group)

    def check():
        return _check_inputs(input_ids, labels, position_ids, attention_mask, layout,
                             ignore_index, dp_group, g, vocab_size)

    try:
        prep, _ = agree("shard_inputs", g, check)
    except (ValueError, TypeError) as e:
        _tell_dp(dp_group, g, e)
        raise
    num_items = _count_over_dp(prep["count"], prep["dp"], g)
    return _batch(prep, g, group, layout, num_items, ignore_index)


def _batch(prep, g, group, layout, num_items, ignore_index=-100):
    """The dict of :func:`shard_inputs` from the checked, reordered full-batch tensors."""
    cu = prep["cu_seqlens"]

    def cut(x):
        if cu is None:
            return _layout.take_shard(x, g.rank, g.size, layout=layout, dim=1)
        return x.index_select(1, packed_positions(cu, g.size, layout)[g.rank].to(x.device))

    pos = cut(prep["position_ids"])
    dp = prep["dp"]
    # positions kept on the CPU: every layer compares the model's position_ids with them, and a
    # host copy made once here saves one device-to-host copy per layer
    info = ShardedBatch(layout=layout, positions=pos.to("cpu", copy=True),
                        padded=prep["order"] is not None,
                        order=prep["order"], grad_scale=g.size * dp.size,
                        loss_groups=(g, dp) if dp.distributed else (g,), num_items=num_items,
                        cu_seqlens=cu, total=prep["total"])
    batch = {"input_ids": cut(prep["input_ids"]), "position_ids": pos,
             "cp_group": LOCAL if group is None else group, "cp_batch": info}
    if prep["shifted"] is not None:
        local = cut(prep["shifted"])
        batch.update(labels=local, shift_labels=local,
                     num_items_in_batch=torch.tensor(num_items, device=local.device))
        if ignore_index != -100:  # the loss must skip the labels filled with it here
            batch["ignore_index"] = ignore_index
    return batch


def _tell_dp(dp_group, g, err):
    """shard_inputs failed on this cp group: make the data-parallel peers (waiting in the
    count's agreement) raise too, then let the caller raise ``err``."""
    try:
        dp = resolve_group(dp_group, name="dp_group")
    except (ValueError, TypeError):
        return
    if dp.distributed:
        def check():
            raise err
        agree("shard_inputs", dp, check)


def _count_over_dp(count, dp, g):
    """The counted labels of the global batch: this replica's, summed over ``dp``."""
    def check():
        return None, {"cp size": g.size, "counted labels": count}

    _, views = agree("shard_inputs", dp, check, vary=("counted labels",))
    return sum(views["counted labels"])


def _digest(x: torch.Tensor) -> int:
    """An int64 checksum of an integer tensor's values and their order (equal tensors give
    equal digests on every rank; int64 arithmetic wraps the same way everywhere)."""
    flat = x.detach().reshape(-1).to(torch.int64).cpu()
    weights = torch.arange(flat.numel(), dtype=torch.int64) * 2654435761 + 97
    return int((flat * weights).sum())


def _check_ids(name, x, shape=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (token ids / positions), got "
                        f"{x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must be {shape} like input_ids, got {tuple(x.shape)}")


def _check_vocab(vocab_size, input_ids, labels, ignore_index):
    if vocab_size is None:
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be None or a positive int, got {vocab_size!r}")
    for name, x, skip in (("input_ids", input_ids, None), ("labels", labels, ignore_index)):
        if x is None or x.numel() == 0:
            continue
        y = x if skip is None else x[x != skip]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= vocab_size):
            raise ValueError(f"{name} holds ids outside [0, vocab_size = {vocab_size}): min "
                             f"{int(y.min())}, max {int(y.max())}")


def _check_mask(mask, shape):
    """A padding mask: ``[B, S]`` of 0/1, every row ``0..01..1`` or ``1..10..0``. Returns it
    as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got "
                        f"{mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"attention_mask must be {shape} like input_ids (a 2-D padding mask), "
                         f"got {tuple(mask.shape)}")
    m = mask.detach().cpu()
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    m = m.bool()
    changes = (m[:, 1:] != m[:, :-1]).sum(dim=1)
    if bool((changes > 1).any()):
        row = int((changes > 1).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} is neither left- nor right-padded "
                         "(its tokens must be one contiguous run at an end of the row)")
    return m


def _check_positions(position_ids, b, s, device):
    if position_ids is None:
        return torch.arange(s, device=device).unsqueeze(0)
    _check_ids("position_ids", position_ids)
    if position_ids.ndim != 2 or position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
        raise ValueError(f"position_ids must be [1 or {b}, {s}], got {tuple(position_ids.shape)}")
    return position_ids


def _packed_cu(position_ids, mask, b, layout, n):
    """The documents of a packed batch: positions that restart within the row (transformers'
    rule, only without a mask) start a document. Returns the global cumulative lengths as a
    tuple, with one-token padding documents up to a multiple of ``n``; None when not packed."""
    starts = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if mask is not None or not bool(starts.any()):
        return None
    if b != 1:
        raise ValueError(f"position_ids restart within a row (a packed batch), so input_ids must "
                         f"be one row [1, T] (DataCollatorWithFlattening's format), got {b} rows")
    if layout not in ("zigzag", "contiguous"):
        raise ValueError(f"layout must be 'zigzag' or 'contiguous' for a packed batch, got "
                         f"{layout!r}")
    s = position_ids.shape[1]
    cuts = (starts[0].nonzero()[:, 0] + 1).tolist()
    return tuple([0, *cuts, s] + [s + i for i in range(1, -s % n + 1)])


@functools.lru_cache(maxsize=64)
def packed_positions(cu: tuple, n: int, layout: str) -> tuple:
    """Every rank's global token indices of a packed sequence: ``contiguous`` (equal parts),
    ``zigzag`` (hamilton's balanced causal layout) or ``full`` (its non-causal one)."""
    if layout == "contiguous":
        m = cu[-1] // n
        return tuple(torch.arange(r * m, (r + 1) * m) for r in range(n))
    from longattn.hamilton.packing import packed_layout

    lay = packed_layout(cu, n, causal=layout == "zigzag")
    return tuple(torch.from_numpy(lay.positions(r)).long() for r in range(n))


def _check_scalars(ignore_index, layout, s, g, dp_group, packed):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(layout, str) or layout not in _layout.LAYOUTS:
        raise ValueError(f"layout must be one of {_layout.LAYOUTS}, got {layout!r}")
    if g.distributed and not packed:
        _layout.positions(s, g.rank, g.size, layout)  # raises unless S splits in this layout
    return resolve_group(dp_group, name="dp_group")


def _check_inputs(input_ids, labels, position_ids, attention_mask, layout, ignore_index,
                  dp_group, g, vocab_size=None):
    """shard_inputs' checks (inside ``agree``): every rank must shard the same batch the same
    way, so the values themselves are agreed (by checksum), not only their shapes. Returns the
    full-batch tensors, reordered when padded, and the fields."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    _check_ids("input_ids", input_ids)
    b, s = input_ids.shape
    position_ids = _check_positions(position_ids, b, s, input_ids.device)
    if labels is not None:
        _check_ids("labels", labels, (b, s))
    _check_vocab(vocab_size, input_ids, labels, ignore_index)
    mask = None if attention_mask is None else _check_mask(attention_mask, (b, s))
    cu = _packed_cu(position_ids, mask, b, layout, g.size)
    dp = _check_scalars(ignore_index, layout, s, g, dp_group, cu is not None)
    prep = _prepare(input_ids, labels, position_ids, mask, ignore_index)
    if cu is not None:
        prep = _pad_packed(prep, cu[-1] - s, ignore_index)
    prep.update(dp=dp, cu_seqlens=cu, total=s)
    fields = {"input_ids.shape": (b, s), "input_ids.dtype": input_ids.dtype,
              "input_ids values": _digest(input_ids),
              "position_ids.shape": tuple(position_ids.shape),
              "position_ids values": _digest(position_ids),
              "labels given": labels is not None,
              "labels values": 0 if labels is None else _digest(labels),
              "attention_mask values": -1 if mask is None else _digest(mask),
              "ignore_index": ignore_index, "layout": layout,
              "device type": input_ids.device.type, "dp_group size": dp.size}
    return prep, fields


def _prepare(input_ids, labels, position_ids, mask, ignore_index):
    """Shift the labels (padding tokens predict nothing), count them, and move each padded
    row's tokens to its front (``order``: the original index of each new slot)."""
    b = input_ids.shape[0]
    shifted, count = None, 0
    if labels is not None:
        shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), ignore_index)], dim=1)
        if mask is not None:
            shifted = shifted.masked_fill(~mask.to(shifted.device), ignore_index)
        count = int((shifted != ignore_index).sum())
    order = None
    if mask is not None and not bool(mask.all()):
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        pos = position_ids.expand(b, -1)
        input_ids, position_ids = (x.gather(1, order.to(x.device)) for x in (input_ids, pos))
        if shifted is not None:
            shifted = shifted.gather(1, order.to(shifted.device))
    return {"input_ids": input_ids, "position_ids": position_ids, "shifted": shifted,
            "count": count, "order": order}


def _pad_packed(prep, pad, ignore_index):
    """Append ``pad`` one-token documents (token 0 at position 0, predicting nothing)."""
    if pad == 0:
        return prep
    ids, pos, shifted = prep["input_ids"], prep["position_ids"], prep["shifted"]
    prep["input_ids"] = torch.cat([ids, ids.new_zeros((1, pad))], dim=1)
    prep["position_ids"] = torch.cat([pos, pos.new_zeros((1, pad))], dim=1)
    if shifted is not None:
        prep["shifted"] = torch.cat([shifted, shifted.new_full((1, pad), ignore_index)], dim=1)
    return prep


# ---------------------------------------------------------------------------------------------
# the loss


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``k`` (in its own dtype)."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.k, None


class _Reported(torch.autograd.Function):
    """Forward: ``total`` (the whole batch's loss) in ``local``'s shape and dtype; backward:
    the gradient of ``local`` (this rank's share)."""

    @staticmethod
    def forward(ctx, local, total):
        return torch.full_like(local, total)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@torch.compiler.disable  # host-side agreement: torch.compile must not trace into it
def _sum_over(value: float, groups, err=None) -> float:
    """The sum of every rank's ``value`` over each group in turn (cp, then dp), the same on
    every rank (``math.fsum`` of the gathered values). ``err``: this rank's loss failed (e.g. a
    label outside the vocabulary on the rank holding it); every group still agrees, carrying
    the failure, and every rank of every group raises instead of the others waiting."""
    failed, where = err is not None, None
    for i, grp in enumerate(groups):
        def check(v=value, f=failed):
            return None, {"loss": 0.0 if f else v, "failed": int(f)}

        _, views = agree("longattn_cp loss", grp, check, vary=("loss", "failed"))
        if any(views["failed"]) and where is None:
            bad = [r for r, f in enumerate(views["failed"]) if f]
            where = f"rank(s) {bad} of {grp.size} of the {('cp', 'dp')[i]} group"
        failed = failed or any(views["failed"])
        got = views["loss"]  # fsum refuses inf - inf; a NaN or inf loss stays one
        value = math.fsum(got) if all(map(math.isfinite, got)) else sum(got)
    if failed:  # the failing rank's own error is chained (its traceback shows it)
        raise ValueError(f"longattn_cp loss: the loss failed on {where} (e.g. a label outside "
                         "the vocabulary, or an ignore_index the loss was not given) [raised "
                         "on every rank]") from err
    return value


def causal_lm_loss(original):
    """Wrap transformers' causal-LM loss function: unchanged unless the model's keyword
    arguments carry a :class:`ShardedBatch` (``cp_batch``, from :func:`shard_inputs`); then
    the gradient reaching the logits is scaled by ``grad_scale`` and the value is the whole
    batch's loss (see the module docstring)."""
    if getattr(original, "_longattn_original", None) is not None:
        return original

    def loss(logits, labels, vocab_size, **kwargs):
        info = kwargs.get("cp_batch")
        if info is None:
            return original(logits, labels, vocab_size, **kwargs)
        if not isinstance(info, ShardedBatch):
            raise TypeError(f"cp_batch must be the ShardedBatch shard_inputs made, got "
                            f"{type(info).__name__}")
        if info.grad_scale != 1:
            logits = _ScaleGrad.apply(logits, info.grad_scale)
        try:
            local = original(logits, labels, vocab_size, **kwargs)
        except Exception as e:  # noqa: BLE001 - agreed, so no rank waits for this one
            _sum_over(0.0, info.loss_groups, err=e)  # raises on every rank
        return _Reported.apply(local, _sum_over(float(local.detach()), info.loss_groups))

    loss._longattn_original = original
    loss.__doc__ = original.__doc__
    return loss


def _install_causal_lm_loss():
    """Make every model's causal-LM loss the :func:`causal_lm_loss` wrapper (once per process)
    through ``PreTrainedModel.loss_function``, leaving ``LOSS_MAPPING`` as transformers made
    it: its ``Trainer`` tests ``LOSS_MAPPING[loss_type] is ForCausalLMLoss`` to count
    ``num_items_in_batch`` over the shifted labels, so a replaced entry made every stock
    ``Trainer`` of the process count each row's first label too (a wrong loss and gradient
    for right-padded rows). The wrapper serves the model whose loss is ``ForCausalLMLoss`` or
    whatever ``LOSS_MAPPING["ForCausalLM"]`` holds (a user's replacement); other losses take
    other arguments and stay as they are."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    prop = PreTrainedModel.__dict__["loss_function"]
    if getattr(prop.fget, "_longattn", False):
        return
    wrapped = {}  # function -> its wrapper (the function held, so no identity is reused)

    def loss_function(self):
        fn = prop.fget(self)
        if fn is not ForCausalLMLoss and fn is not LOSS_MAPPING.get("ForCausalLM"):
            return fn
        if fn not in wrapped:
            wrapped[fn] = causal_lm_loss(fn)
        return wrapped[fn]

    loss_function._longattn = True
    PreTrainedModel.loss_function = property(loss_function, prop.fset, prop.fdel, prop.__doc__)


# ---------------------------------------------------------------------------------------------
# gathering, loss and gradient reductions


def unshard(x, *, group=None, layout=None, dim=1, batch=None):
    """Gather every rank's shard (e.g. logits ``[B, S_local, V]``) into the full tensor on
    every rank (no gradient). ``batch``: the dict :func:`shard_inputs` returned; its layout is
    used and padded rows go back to their original token order (what the model computed at
    padding positions is meaningless). ``layout`` (default ``zigzag``) when no batch is given.
    For tests and inspection, not for training."""
    g = resolve_group(group)
    info = None if batch is None else batch.get("cp_batch") if isinstance(batch, dict) else batch

    def check():
        return _check_unshard(x, dim, layout, batch, info)

    lay = agree("unshard", g, check)[0]
    cu = None if info is None else info.cu_seqlens
    if g.distributed:
        mine = x.detach().contiguous()
        parts = [torch.empty_like(mine) for _ in range(g.size)]
        comm.all_gather(parts, mine, group=g.pg)
        x = (_layout.join_shards(parts, layout=lay, dim=dim) if cu is None
             else _join_packed(parts, packed_positions(cu, g.size, lay), dim))
    if cu is not None:
        x = x.narrow(dim, 0, info.total)
    if info is not None and info.order is not None:
        inv = torch.argsort(info.order, dim=1).to(x.device)
        x = x.gather(1, inv.view(inv.shape + (1,) * (x.ndim - 2)).expand_as(x))
    return x


def _join_packed(parts, positions, dim):
    idx = torch.cat(positions).to(parts[0].device)
    cat = torch.cat(parts, dim=dim)
    return torch.empty_like(cat).index_copy_(dim, idx, cat)


def _check_unshard(x, dim, layout, batch, info):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.ndim <= dim < x.ndim:
        raise ValueError(f"dim must be an int in [-{x.ndim}, {x.ndim}) for x of shape "
                         f"{tuple(x.shape)}, got {dim!r}")
    if batch is not None and not isinstance(info, ShardedBatch):
        raise TypeError("batch must be the dict shard_inputs returned")
    lay = layout or (info.layout if info is not None else "zigzag")
    if not isinstance(lay, str) or lay not in _layout.LAYOUTS:
        raise ValueError(f"layout must be one of {_layout.LAYOUTS}, got {layout!r}")
    if info is not None and lay != info.layout:
        raise ValueError(f"layout {layout!r} is not the batch's layout {info.layout!r}")
    if info is not None and (info.padded or info.cu_seqlens) and dim % x.ndim != 1:
        raise ValueError(f"dim must be 1 (the sequence) to restore a padded or packed batch, "
                         f"got {dim}")
    # shapes as strings: a tensor of another ndim must read "x.shape must be the same",
    # not "different calls" (agree expands tuples into one field per element)
    return lay, {"x.shape": str(tuple(x.shape)), "x.dtype": x.dtype, "dim": dim % x.ndim,
                 "layout": lay, "device type": x.device.type}


def reduce_loss(loss, group=None):
    """The mean of the ranks' ``loss`` over ``group`` (detached; for logging). The loss of a
    batch from :func:`shard_inputs` is already the whole batch's on every rank of its cp
    group; over a data-parallel group this gives the mean of the replicas' losses."""
    g = resolve_group(group)

    def check():
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
        if not loss.dtype.is_floating_point:
            raise TypeError(f"loss must be a floating-point tensor, got {loss.dtype}")
        return None, {"loss.shape": str(tuple(loss.shape)), "loss.dtype": loss.dtype,
                      "device type": loss.device.type}

    agree("reduce_loss", g, check)
    total = loss.detach().clone()
    if g.distributed:
        comm.all_reduce(total, group=g.pg)
        total /= g.size
    return total


def all_reduce_grads(model, group=None):
    """Average the parameter gradients over the ranks of ``group`` (what DDP and FSDP do):
    with the context-parallel group, the gradient of the whole batch's mean token loss on
    every rank (see the module docstring for the convention). Every rank must hold the same
    parameters with gradients (checked on every rank first)."""
    g = resolve_group(group)
    grads, _ = agree("all_reduce_grads", g, lambda: _grads_and_fields(model))
    if not g.distributed:
        return
    for t in grads:
        # FSDP2's gradients are DTensors sharded over its own mesh: every rank of a cp group
        # holds the same shard, so the local shards average like whole gradients
        t = t.to_local() if hasattr(t, "to_local") else t
        comm.all_reduce(t, group=g.pg)  # staged where the group needs another device
        t.div_(g.size)


def _grads_and_fields(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    layout = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in named)
    grads = [t for _, t in named]
    return grads, {"parameters with a gradient": len(grads),
                   "gradient elements": sum(t.numel() for t in grads),
                   "gradient dtypes": ",".join(sorted({str(t.dtype) for t in grads})),
                   "gradient names and shapes": layout}

