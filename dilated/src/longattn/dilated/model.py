"""LongNet modules: multi-head dilated attention, MAGNETO layers, LongNet and LongNetLM.

Argument names follow dilated-attention-pytorch (``MultiheadDilatedAttention``, ``LongNet``,
``LongNetLM``), with these corrections of its faults:

* every layer has its residual connections (``x + Attn(LN(x))``, ``x + FFN(LN(x))``);
* the MAGNETO initialisation is actually applied (xavier-normal, gain ``gamma_init`` on
  ``v_proj``, ``out_proj`` and both FFN weights; gain 1 on ``q_proj`` / ``k_proj``);
* positions (rotary or xPos) act on q and k inside attention, not added to the embeddings;
* a decoder-only stack (``num_encoder_layers=0``, the LongNet paper's LM) has no unused
  cross-attention weights; MAGNETO's gamma for it is ``sqrt(log(2 * num_decoder_layers))``.

MAGNETO's sub-LayerNorm: a LayerNorm on the attention output before ``out_proj``
(``layer_norm=True``) and one between the FFN's activation and its second linear layer.
"""

from __future__ import annotations

from math import log

import torch
import torch.nn.functional as F
from torch import nn

from longattn.common.checks import check_bool
from longattn.common.dist import agree, resolve_group
from longattn.dilated.attention import DilatedAttention, check_schedule
from longattn.dilated.position import apply_position

LONGNET_SEGMENTS = (2048, 4096, 8192, 16384, 32768)
LONGNET_RATES = (1, 2, 4, 6, 12)


def _check_features(name, t, features, like, dim_name="embed_dim"):
    """``t`` must be a ``[batch, seq, features]`` tensor on ``like``'s device, in its dtype
    (any dtype under autocast)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 3 or t.shape[-1] != features:
        raise ValueError(f"{name} must be [batch, seq, {dim_name}={features}] (batch first), got "
                         f"shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, the module's parameters on {like.device}")
    if t.dtype != like.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} dtype {t.dtype} must be the module's parameter dtype "
                        f"{like.dtype} (or run under autocast)")


def _check_attention_inputs(query, key, value, embed_dim, like, is_causal):
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_features(name, t, embed_dim, like)
    for name, t in (("key", key), ("value", value)):
        if t.shape[:2] != query.shape[:2]:
            raise ValueError(f"{name} [batch, seq] {tuple(t.shape[:2])} must equal query's "
                             f"{tuple(query.shape[:2])} (dilated attention runs over one "
                             "sequence)")
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must be query's dtype {query.dtype}")
    check_bool("is_causal", is_causal)
    return None, {"query.shape": tuple(query.shape), "query.dtype": query.dtype,
                  "is_causal": is_causal}


def _check_x(x, d_model, like, is_causal):
    _check_features("x", x, d_model, like, "d_model")
    check_bool("is_causal", is_causal)
    return None, {"x.shape": tuple(x.shape), "x.dtype": x.dtype, "is_causal": is_causal}


def _check_tokens(x, num_tokens, like, is_causal):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"x must hold integer token ids (int64 or int32), got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be [batch, seq] token ids, got shape {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"x is on {x.device}, the module's parameters on {like.device}")
    if x.numel():
        lo, hi = torch.aminmax(x)
        lo, hi = int(lo), int(hi)  # one sync: an out-of-range id is a device assert on CUDA
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"x holds token ids in [{lo}, {hi}], outside [0, num_tokens = "
                             f"{num_tokens})")
    check_bool("is_causal", is_causal)
    return None, {"x.shape": tuple(x.shape), "is_causal": is_causal}


def _activation(activation):
    if callable(activation):
        return activation
    table = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
    if activation not in table:
        raise ValueError(f"activation must be a callable or one of {sorted(table)}, "
                         f"got {activation!r}")
    return table[activation]


class MultiheadDilatedAttention(nn.Module):
    """Projections + :class:`DilatedAttention` + MAGNETO sub-LN + output projection.

    ``forward(query, key, value, is_causal=False) -> (out, None)`` on ``[B, S, embed_dim]``
    (batch first; the ``None`` mirrors ``nn.MultiheadAttention``'s attention weights).
    ``dropout`` applies to the attention output (attention-probability dropout has no exact
    form on the lse kernels). Extras: ``num_kv_heads`` (GQA), ``pos_emb`` (None, "rotary",
    "xpos") with ``xpos_scale_base``, ``group`` and ``config`` (as in
    :func:`~longattn.dilated.dilated_attention`). ``group`` shards the sequence: inputs are this
    rank's contiguous chunk, positions are offset accordingly. ``group=None`` is this process
    alone only outside a multi-rank ``torch.distributed`` world; in one it raises: a model
    trained with data parallelism (DDP, FSDP) passes ``group=longattn.common.dist.LOCAL``.
    """

    def __init__(self, embed_dim, num_heads, segment_lengths, dilation_rates, dropout=0.0,
                 bias=True, layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, device=None,
                 dtype=None, *, num_kv_heads=None, pos_emb=None, xpos_scale_base=512.0,
                 group=None, config=None):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or \
                num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads ({num_heads}), "
                             f"got {num_kv_heads!r}")
        if pos_emb not in (None, "rotary", "xpos"):
            raise ValueError(f"pos_emb must be None, 'rotary' or 'xpos', got {pos_emb!r}")
        if pos_emb == "xpos" and (isinstance(xpos_scale_base, bool)
                                  or not isinstance(xpos_scale_base, (int, float))
                                  or not 0 < xpos_scale_base < float("inf")):
            raise ValueError(f"xpos_scale_base must be a finite positive number, got "
                             f"{xpos_scale_base!r}")
        self.head_dim = embed_dim // num_heads
        if pos_emb is not None and self.head_dim % 2:
            raise ValueError(f"pos_emb needs an even head_dim, got {self.head_dim}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.gamma_init, self.pos_emb, self.xpos_scale_base = gamma_init, pos_emb, xpos_scale_base
        self.group = group
        kw = dict(bias=bias, device=device, dtype=dtype)
        kv_dim = self.head_dim * num_kv_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, kv_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, kv_dim, **kw)
        self.attention = DilatedAttention(segment_lengths, dilation_rates, group=group,
                                          config=config)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = layer_norm
        self.norm = (nn.LayerNorm(embed_dim, eps=layer_norm_eps, device=device, dtype=dtype)
                     if layer_norm else None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self._reset_parameters()

    def _reset_parameters(self):
        # MAGNETO (arXiv 2210.06423, Fig. 2): gain gamma on v / out projections only.
        for lin, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gamma_init),
                          (self.out_proj, self.gamma_init)):
            nn.init.xavier_normal_(lin.weight, gain=gain)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, query, key, value, is_causal=False):
        """``query``, ``key``, ``value``: ``[batch, seq, embed_dim]``, one sequence (equal
        lengths). ``is_causal`` (the seed's name) is ``causal`` of :func:`dilated_attention`.
        Bad inputs raise ``ValueError`` / ``TypeError`` naming them, on every rank of
        ``group``."""
        g = resolve_group(self.group)
        agree("MultiheadDilatedAttention", g, lambda: _check_attention_inputs(
            query, key, value, self.embed_dim, self.q_proj.weight, is_causal))
        rank = g.rank
        b, s, _ = query.shape
        q = self.q_proj(query).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(b, key.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(b, value.shape[1], self.num_kv_heads, self.head_dim)
        if self.pos_emb is not None:
            q, k = apply_position(self.pos_emb, q, k, rank * s, self.attention.segment_lengths,
                                  scale_base=self.xpos_scale_base, total=g.size * s)
        x = self.attention(q, k, v, is_causal=is_causal).reshape(b, s, self.embed_dim)
        x = self.dropout(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x), None


class _FeedForward(nn.Module):
    """MAGNETO FFN: ``W2(LN(act(W1 x)))``."""

    def __init__(self, d_model, dim_feedforward, activation, layer_norm_eps, gamma_init, dropout,
                 device, dtype):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward, device=device, dtype=dtype)
        self.norm = nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, device=device, dtype=dtype)
        self.linear2 = nn.Linear(dim_feedforward, d_model, device=device, dtype=dtype)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_normal_(lin.weight, gain=gamma_init)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        x = self.dropout(self.activation(self.linear1(x)))
        return self.linear2(self.norm(x))


class DilatedTransformerEncoderLayer(nn.Module):
    """``x + Attn(LN(x))`` then ``x + FFN(LN(x))`` (pre-LN with MAGNETO sub-LN)."""

    def __init__(self, d_model, nhead, segment_lengths, dilation_rates, dim_feedforward=2048,
                 dropout=0.1, activation="relu", layer_norm_eps=1e-5, gamma_init=1.0,
                 device=None, dtype=None, **attn_kw):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.self_attn = MultiheadDilatedAttention(
            d_model, nhead, segment_lengths, dilation_rates, dropout=dropout,
            layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, **kw, **attn_kw)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.ffn = _FeedForward(d_model, dim_feedforward, activation, layer_norm_eps,
                                gamma_init, dropout, device, dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, is_causal=False):
        x = src
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, h, is_causal=is_causal)[0])
        return x + self.dropout(self.ffn(self.norm2(x)))


class DilatedTransformerDecoderLayer(nn.Module):
    """Self-attention, cross-attention over ``memory`` (if ``cross_attention``), FFN; each
    as a pre-LN residual block."""

    def __init__(self, d_model, nhead, segment_lengths, dilation_rates, dim_feedforward=2048,
                 dropout=0.1, activation="relu", layer_norm_eps=1e-5, gamma_init=1.0,
                 device=None, dtype=None, *, cross_attention=True, **attn_kw):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        mk = lambda: MultiheadDilatedAttention(  # noqa: E731
            d_model, nhead, segment_lengths, dilation_rates, dropout=dropout,
            layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, **kw, **attn_kw)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.self_attn = mk()
        self.norm2 = self.multihead_attn = None
        if cross_attention:
            self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
            self.multihead_attn = mk()
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.ffn = _FeedForward(d_model, dim_feedforward, activation, layer_norm_eps,
                                gamma_init, dropout, device, dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, h, is_causal=tgt_is_causal)[0])
        if self.multihead_attn is not None:
            if memory is None:
                raise ValueError("this decoder layer has cross-attention: pass memory")
            h = self.norm2(x)
            x = x + self.dropout(
                self.multihead_attn(h, memory, memory, is_causal=memory_is_causal)[0])
        return x + self.dropout(self.ffn(self.norm3(x)))


def magneto_gammas(num_encoder_layers, num_decoder_layers):
    """(encoder gamma, decoder gamma) of MAGNETO's initialisation."""
    n, m = num_encoder_layers, num_decoder_layers
    if n and m:
        return (log(3 * m) * log(2 * n) / 3) ** 0.5, log(3 * m) ** 0.5
    return (log(2 * n) ** 0.5 if n else 1.0), (log(2 * m) ** 0.5 if m else 1.0)


class LongNet(nn.Module):
    """LongNet encoder-decoder (base configuration of the paper by default).

    ``forward(x, is_causal=True)``: ``x [B, S, d_model]`` goes through the encoder (its final
    LayerNorm output is the memory) and, as the target, through the decoder; ``is_causal``
    applies to self- and cross-attention. ``num_encoder_layers=0`` gives a decoder-only stack.
    Extras: ``pos_emb`` ("xpos" as in the paper, "rotary" or None), ``num_kv_heads``, ``group``
    and ``config`` (as in :class:`MultiheadDilatedAttention`: under DDP pass
    ``group=longattn.common.dist.LOCAL``).
    """

    def __init__(self, d_model=768, nhead=12, num_encoder_layers=12, num_decoder_layers=12,
                 dim_feedforward=3072, segment_lengths=LONGNET_SEGMENTS,
                 dilation_rates=LONGNET_RATES, dropout=0.0, activation="relu",
                 layer_norm_eps=1e-5, device=None, dtype=None, *, pos_emb="xpos",
                 num_kv_heads=None, group=None, config=None):
        super().__init__()
        check_schedule(segment_lengths, dilation_rates)
        for name, val in (("num_encoder_layers", num_encoder_layers),
                          ("num_decoder_layers", num_decoder_layers)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be a non-negative int, got {val!r}")
        if num_encoder_layers + num_decoder_layers == 0:
            raise ValueError("LongNet needs at least one encoder or decoder layer")
        self.d_model, self.group = d_model, group
        g_enc, g_dec = magneto_gammas(num_encoder_layers, num_decoder_layers)
        common = dict(d_model=d_model, nhead=nhead, segment_lengths=segment_lengths,
                      dilation_rates=dilation_rates, dim_feedforward=dim_feedforward,
                      dropout=dropout, activation=activation, layer_norm_eps=layer_norm_eps,
                      device=device, dtype=dtype, pos_emb=pos_emb, num_kv_heads=num_kv_heads,
                      group=group, config=config)
        self.encoder_layers = nn.ModuleList(
            DilatedTransformerEncoderLayer(gamma_init=g_enc, **common)
            for _ in range(num_encoder_layers))
        self.encoder_norm = (nn.LayerNorm(d_model, eps=layer_norm_eps, device=device,
                                          dtype=dtype) if num_encoder_layers else None)
        self.decoder_layers = nn.ModuleList(
            DilatedTransformerDecoderLayer(gamma_init=g_dec, cross_attention=bool(
                num_encoder_layers), **common)
            for _ in range(num_decoder_layers))

    def forward(self, x, is_causal=True):
        """``x [batch, seq, d_model]``; bad inputs raise naming ``x``, on every rank of
        ``group``."""
        like = next(self.parameters())
        agree("LongNet", resolve_group(self.group), lambda: _check_x(x, self.d_model, like,
                                                                      is_causal))
        tgt = x
        if not self.encoder_layers:
            memory = None
        else:
            for layer in self.encoder_layers:
                x = layer(x, is_causal=is_causal)
            memory = self.encoder_norm(x)
            if not self.decoder_layers:
                return memory
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, tgt_is_causal=is_causal, memory_is_causal=is_causal)
        return tgt


class LongNetLM(nn.Module):
    """Token embedding -> :class:`LongNet` -> LayerNorm -> vocabulary projection.

    ``forward(x, is_causal=True)``: ``x [B, S]`` token ids -> logits ``[B, S, num_tokens]``.
    Defaults to the paper's language model: decoder-only (``num_encoder_layers=0``), 12 layers,
    xPos on q/k. ``group`` and ``config`` as in :class:`LongNet`.
    """

    def __init__(self, num_tokens, d_model=768, nhead=12, num_encoder_layers=0,
                 num_decoder_layers=12, dim_feedforward=3072, segment_lengths=LONGNET_SEGMENTS,
                 dilation_rates=LONGNET_RATES, dropout=0.0, activation="relu",
                 layer_norm_eps=1e-5, device=None, dtype=None, *, pos_emb="xpos",
                 num_kv_heads=None, group=None, config=None):
        super().__init__()
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        self.token_embedding = nn.Embedding(num_tokens, d_model, device=device, dtype=dtype)
        self.long_net = LongNet(d_model, nhead, num_encoder_layers, num_decoder_layers,
                                dim_feedforward, segment_lengths, dilation_rates, dropout,
                                activation, layer_norm_eps, device, dtype, pos_emb=pos_emb,
                                num_kv_heads=num_kv_heads, group=group, config=config)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, device=device, dtype=dtype)
        self.out = nn.Linear(d_model, num_tokens, device=device, dtype=dtype)

    def forward(self, x, is_causal=True):
        """``x [batch, seq]`` int64 / int32 token ids in ``[0, num_tokens)``; bad inputs raise
        naming ``x``, on every rank of ``group``."""
        emb = self.token_embedding.weight
        agree("LongNetLM", resolve_group(self.long_net.group), lambda: _check_tokens(
            x, emb.shape[0], emb, is_causal))
        h = self.long_net(self.token_embedding(x), is_causal=is_causal)
        return self.out(self.norm(h))
