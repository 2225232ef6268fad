"""``model.generate`` with the prompt sharded over the ranks and a sharded KV cache.

    register()                                              # longattn's attention
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="longattn_cp")
    torch.manual_seed(0)                                    # the same seed on every rank
    out = generate(model, input_ids, group=dist.group.WORLD, max_new_tokens=16, do_sample=True)

How it runs, on every rank of ``group``:

1. The longest prefix of the prompt that is a multiple of ``2 n`` tokens (``n`` ranks: what
   zigzag, and a full-attention layer of a contiguous-layout model, need) and leaves at least
   one prompt token over is prefilled *sharded* (``shard_inputs``: hamilton for full
   attention, ring_swa for sliding windows) into a
   :class:`~longattn.integrations.cache.ShardedCache`.
2. ``model.generate(input_ids, cache=cache, ...)`` then sees a cache holding that prefix and
   feeds only the rest: the remaining prompt tokens, then one token per step, the same tokens
   on every rank. Every layer attends them to the sharded cache with tree attention
   (:func:`longattn.tree.cache.attend`: one all-reduce MAX and one SUM), whose result is
   identical on every rank, so every rank's logits, logits processors and (from the same random
   generator state) samples are the same.

So the tokens are those of one process running ``model.generate`` on the whole prompt (greedy,
or sampling after the same ``torch.manual_seed``), up to the rounding of a different
summation order. A final one-word all-gather compares the tokens of every rank; they must be
equal (``ValueError`` otherwise, on every rank).

Checked on every rank before any communication of the model (one small all-gather, with the
error raised on every rank): the model uses longattn's attention, ``input_ids`` is the same
integer ``[B, S]`` tensor everywhere, the generate arguments are the same, the random
generator state is the same when sampling, and the call is one longattn serves exactly.

A batch of prompts of different lengths is served LEFT-padded (``attention_mask`` rows
``0..01..1``, transformers' convention for decoder-only generation): the sharded prefix comes
from ``shard_inputs(..., attention_mask=)`` (each row's real tokens first, positions
``cumsum(mask) - 1`` as transformers gives them) and ``ShardedCache.left_pad`` makes every
decode step see only its row's real keys (docs/serving.md). Not served (``ValueError``, never
tokens): right padding or an all-padding row, beam search (``num_beams > 1``),
``num_return_sequences > 1``, assisted or
prompt-lookup decoding, chunked prefill, ``use_cache=False``, and a ``cache`` /
``past_key_values`` / ``cache_implementation`` of the caller's (this function makes the cache).
"""

from __future__ import annotations

import hashlib

import torch

from longattn.common.dist import agree, resolve_group

# generate() arguments longattn cannot serve exactly, with what to do instead
_REFUSED = {
    "cache": "generate makes its own ShardedCache",
    "past_key_values": "generate makes its own ShardedCache",
    "cache_implementation": "generate makes its own ShardedCache",
    "assistant_model": "assisted decoding is not supported",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is not supported",
    "inputs_embeds": "pass input_ids",
    "position_ids": "the positions are the tokens' global positions",
}
# generation settings that must keep their one-process, one-sequence values
_ONLY = {"num_beams": 1, "num_return_sequences": 1, "use_cache": True,
         "prefill_chunk_size": None, "penalty_alpha": None,
         # the prompt's prefix is prefilled across the ranks before transformers' generate,
         # which would return hidden states of the rest only (and attention weights of none)
         "output_hidden_states": False, "output_attentions": False}


def generate(model, input_ids, *, group=None, block: int = 1, **generate_kwargs):
    """``model.generate(input_ids, **generate_kwargs)`` with the prompt sharded over ``group``
    and the KV cache sharded in balanced blocks of ``block`` tokens (see the module
    docstring). ``input_ids [B, S]`` is the same on every rank; ``group`` a
    ``ProcessGroup``, a 1-D ``DeviceMesh``, ``LOCAL`` or None (this process alone; an error in
    an initialised world of several ranks). Returns what ``model.generate`` returns, the same
    on every rank."""
    from longattn.integrations.cache import ShardedCache
    from longattn.integrations.transformers import layout_for, shard_inputs

    g = resolve_group(group)
    lay = layout_for(model.config)

    def check():
        return _check(model, input_ids, block, generate_kwargs, lay, g)

    (prefix, pads), _ = agree("generate", g, check)
    mask = generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    cache = ShardedCache(group=group, layout=lay, block=block, sharded_prefill=prefix > 0)
    padding = {}
    if pads is not None:
        cache.left_pad(pads)
        # transformers' positions of a left-padded row: its real tokens count from 0
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        padding = {"position_ids": pos[:, :prefix], "attention_mask": mask[:, :prefix]}
    with torch.no_grad():
        if prefix:
            model(**shard_inputs(input_ids[:, :prefix], group=group, layout=lay,
                                 vocab_size=getattr(model.config, "vocab_size", None),
                                 **padding),
                  cache=cache, use_cache=True)
        out = model.generate(input_ids, cache=cache, **generate_kwargs)
    tokens = getattr(out, "sequences", out)
    agree("generate", g, lambda: (None, {"generated tokens": _digest(tokens)}))
    return out


def _check(model, input_ids, block, kwargs, lay, g):
    """This rank's checks (inside the agreement); returns the length of the sharded prefix."""
    _check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or (
            input_ids.dtype.is_floating_point or input_ids.dtype.is_complex
            or input_ids.dtype == torch.bool) or input_ids.shape[1] < 1:
        got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(
            input_ids, torch.Tensor) else type(input_ids).__name__)
        raise ValueError(f"input_ids must be an integer [batch, seq] tensor with seq >= 1, "
                         f"got {got}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    for name, why in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"generate: {name} is not supported ({why})")
    config = kwargs.get("generation_config") or model.generation_config
    for name, want in _ONLY.items():
        got = kwargs.get(name, getattr(config, name, None))
        if got is not None and got != want:  # None: transformers' default, which is ``want``
            why = ("the prompt is prefilled across the ranks first, so transformers would "
                   "return them for the last tokens only" if name.startswith("output_") else
                   "longattn serves one sequence per prompt, sampled or greedy")
            raise ValueError(f"generate: {name}={got!r} is not supported (only {want!r}): "
                             f"{why}")
    pads = _left_padding(kwargs.get("attention_mask"), input_ids)
    do_sample = kwargs.get("do_sample", getattr(config, "do_sample", None)) or False
    s = input_ids.shape[1]
    # 2n: zigzag splits in 2n; a contiguous model's full-attention layers move to zigzag
    unit = 2 * g.size
    fields = {"input_ids.shape": tuple(input_ids.shape), "input_ids": _digest(input_ids),
              "block": block,
              "layout": lay, "arguments": _describe(kwargs), "do_sample": bool(do_sample),
              # by value (its JSON), not by its type's name as other objects
              "generation_config": "" if kwargs.get("generation_config") is None
              else kwargs["generation_config"].to_json_string(use_diff=False),
              "device type": input_ids.device.type,
              "random generator state": _rng_digest(input_ids.device) if do_sample else ""}
    return ((s - 1) // unit * unit, pads), fields


def _left_padding(mask, input_ids):
    """Each row's number of padding tokens (a ``[B]`` tensor), None without padding; a mask
    that is not a left padding of ``input_ids`` raises ``ValueError`` naming it."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape or (
            mask.dtype.is_floating_point or mask.dtype.is_complex):
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise ValueError(f"generate: attention_mask must be an integer or bool tensor of "
                         f"input_ids' shape {tuple(input_ids.shape)}, got {got}")
    m = mask.detach().cpu().long()
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("generate: attention_mask must hold 0 (padding) and 1 (token) only")
    if bool(m.all()):
        return None
    # left padding: 0..01..1 with at least one token, so every row's next token follows a
    # real one (right padding would feed a padding token's output to the next token)
    if bool((m[:, 1:] < m[:, :-1]).any()) or not bool(m[:, -1].all()):
        raise ValueError("generate: attention_mask must be a left padding (each row 0..01..1, "
                         "ending with a token): right padding and empty rows are not "
                         "supported; pad on the left (tokenizer.padding_side = 'left')")
    return (m == 0).sum(dim=1)


def _check_model(model):
    from transformers import AttentionInterface

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:
        fn = AttentionInterface()[impl]
    except (KeyError, TypeError):
        fn = None
    if not getattr(fn, "_longattn", False):
        raise ValueError(f"model must use longattn's attention (attn_implementation=NAME after "
                         f"longattn.integrations.transformers.register(NAME)), got {impl!r}")


def _digest(t) -> str:
    """A short exact fingerprint of a tensor's values (compared across ranks)."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy()
                          .tobytes()).hexdigest()[:16] if t.numel() else "empty"


def _rng_digest(device) -> str:
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device).cpu())
    return "".join(_digest(s) for s in state)


def _word(v) -> str:
    """A value as the same text on every rank: plain values by value, tensors by fingerprint,
    sequences item by item, other objects by their type's name (a repr may hold an address,
    e.g. a LogitsProcessorList's items)."""
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}:{v.dtype}:{_digest(v)}"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__}[{','.join(_word(x) for x in v)}]"
    if isinstance(v, (int, float, str, bool, type(None))):
        return repr(v)
    return type(v).__name__


def _describe(kwargs) -> str:
    """The generate arguments as one word: plain values by value, tensors by fingerprint."""
    parts = []
    for key in sorted(kwargs):
        v = kwargs[key]
        parts.append(f"{key}={_word(v)}")
    return ";".join(parts)
