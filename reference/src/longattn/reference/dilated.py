"""LongNet dilated attention (arXiv 2307.02486, section 2), float64, written out literally.

For every branch ``(w, r)`` (segment length, dilation rate) the sequence is cut into segments
``[i*w, min((i+1)*w, S))`` (the last one may be shorter: any length works, padding keys never
count). Query head ``h`` uses offset ``o = h mod r`` and keeps, in each segment, the rows
``start + o, start + o + r, ...``; dense softmax attention runs inside each sparsified segment
(``causal``: inside the sparsified segment, which keeps its order) and the result is scattered
back; rows a branch does not keep get ``out = 0`` and ``lse = -inf`` for that branch. Branches
are mixed by their softmax denominators (Eq. 10): ``alpha_b = s_b / sum_j s_j`` with
``s_b = exp(lse_b)``, i.e. ``out = sum_b exp(lse_b - lse) * out_b`` with
``lse = logsumexp_b lse_b``.

Mixing by denominators equals one softmax over the multiset union of the keys each branch
selects (a key chosen by two branches counts twice); :func:`dilated_attention_backward` uses
that form, with :func:`~longattn.reference.attention.attention_backward` over the keys repeated
once per branch. GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)`` at the positions of
its own offset.
"""

from __future__ import annotations

import numpy as np

from longattn.reference.attention import _check, attention, attention_backward
from longattn.reference.masks import causal_mask


def _check_schedule(segment_lengths, dilation_rates):
    seg, rates = list(segment_lengths), list(dilation_rates)
    if len(seg) == 0 or len(seg) != len(rates):
        raise ValueError(
            f"segment_lengths {seg} and dilation_rates {rates} must be non-empty and equally long"
        )
    for name, vals in (("segment_lengths", seg), ("dilation_rates", rates)):
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
                raise ValueError(f"{name} must hold positive ints, got {vals}")
    return [int(x) for x in seg], [int(x) for x in rates]


def _check_inputs(q, k, v):
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    _check(q, k, v, None)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"dilated attention needs one sequence: q length {q.shape[1]} != k length {k.shape[1]}"
        )
    return q, k, v


def branch_positions(seq_len, segment_length, dilation_rate, offset):
    """The sparsified segments of one branch for one offset: a list of index arrays."""
    out = []
    for start in range(0, seq_len, segment_length):
        idx = np.arange(start + offset, min(start + segment_length, seq_len), dilation_rate)
        if idx.size:
            out.append(idx)
    return out


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False, scale=None):
    """Dilated attention, literally: per branch, per head, per segment, then mixed.

    q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]``. Returns ``out
    [B, S, Hq, Dv]`` and ``lse [B, Hq, S]`` (the log of the summed denominators; ``-inf``
    and ``out = 0`` where no branch keeps the row).
    """
    seg, rates = _check_schedule(segment_lengths, dilation_rates)
    q, k, v = _check_inputs(q, k, v)
    b, s, hq, _ = q.shape
    g = hq // k.shape[2]
    outs, lses = [], []
    for w, r in zip(seg, rates):
        out_b = np.zeros((b, s, hq, v.shape[3]))
        lse_b = np.full((b, hq, s), -np.inf)
        for h in range(hq):
            for idx in branch_positions(s, w, r, h % r):
                mask = causal_mask(idx.size) if causal else None
                o, lse = attention(q[:, idx, h:h + 1], k[:, idx, h // g:h // g + 1],
                                   v[:, idx, h // g:h // g + 1], mask=mask, scale=scale)
                out_b[:, idx, h] = o[:, :, 0]
                lse_b[:, h, idx] = lse[:, 0]
        outs.append(out_b)
        lses.append(lse_b)
    lses = np.stack(lses)  # [nb, B, H, S]
    mx = lses.max(axis=0)
    mx_safe = np.where(np.isfinite(mx), mx, 0.0)
    den = np.exp(lses - mx_safe).sum(axis=0)  # exp(-inf) = 0: uncovered branches add nothing
    some = den != 0  # True for NaN: a row a NaN reached stays NaN, in lse as in out
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(some, mx_safe + np.log(np.where(some, den, 1.0)), -np.inf)
    lse_safe = np.where(np.isneginf(lse), np.inf, lse)
    out = np.zeros_like(outs[0])
    for o, l in zip(outs, lses):
        alpha = np.exp(l - lse_safe)  # [B, H, S]; 0 where the branch or the row is empty
        out += alpha.transpose(0, 2, 1)[..., None] * o
    return out, lse


def dilated_masks(seq_len, num_heads, segment_lengths, dilation_rates, *, causal=False):
    """Per-branch visibility ``[nb, H, S, S]`` (True: query i sees key j in that branch)."""
    seg, rates = _check_schedule(segment_lengths, dilation_rates)
    m = np.zeros((len(seg), num_heads, seq_len, seq_len), dtype=bool)
    for bi, (w, r) in enumerate(zip(seg, rates)):
        for h in range(num_heads):
            for idx in branch_positions(seq_len, w, r, h % r):
                blk = causal_mask(idx.size) if causal else np.ones((idx.size, idx.size), bool)
                m[bi, h, idx[:, None], idx[None, :]] = blk
    return m


def _union(q, k, v, segment_lengths, dilation_rates, causal):
    """Keys and values repeated once per branch, and the matching ``[B?, H, S, nb*S]`` mask."""
    m = dilated_masks(q.shape[1], q.shape[2], segment_lengths, dilation_rates, causal=causal)
    nb = m.shape[0]
    mask = np.concatenate(list(m), axis=-1)[None]  # [1, H, S, nb*S]
    return np.concatenate([k] * nb, axis=1), np.concatenate([v] * nb, axis=1), mask, nb


def dilated_attention_union(q, k, v, segment_lengths, dilation_rates, *, causal=False, scale=None):
    """The same result as :func:`dilated_attention`, computed as one softmax over the multiset
    union of the branches' keys (an independent formulation, for tests)."""
    q, k, v = _check_inputs(q, k, v)
    ku, vu, mask, _ = _union(q, k, v, segment_lengths, dilation_rates, causal)
    return attention(q, ku, vu, mask=mask, scale=scale)


def dilated_attention_backward(dout, q, k, v, segment_lengths, dilation_rates, *, causal=False,
                               scale=None, dlse=None):
    """Exact gradients ``(dq, dk, dv)`` of :func:`dilated_attention` (the mixing weights are
    differentiated too). ``dlse`` (optional) is the gradient of the returned ``lse``."""
    q, k, v = _check_inputs(q, k, v)
    ku, vu, mask, nb = _union(q, k, v, segment_lengths, dilation_rates, causal)
    dq, dku, dvu = attention_backward(dout, q, ku, vu, mask=mask, scale=scale, dlse=dlse)
    s = k.shape[1]
    dk = dku.reshape(k.shape[0], nb, s, *k.shape[2:]).sum(axis=1)
    dv = dvu.reshape(v.shape[0], nb, s, *v.shape[2:]).sum(axis=1)
    return dq, dk, dv
