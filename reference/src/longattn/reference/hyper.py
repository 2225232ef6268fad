"""HyperAttention (Han et al., ICLR 2024) replayed exactly in float64, with its randomness given.

The approximation is a softmax over *weighted* keys. For one query row ``i`` every key ``j``
gets a multiplicity ``W[i, j] >= 0`` and

    lse_i = log sum_j W[i, j] exp(s_ij),    out_i = sum_j W[i, j] exp(s_ij - lse_i) v_j,

with ``s_ij = scale * q_i . k_j``. :func:`hyper_weights` builds ``W`` by replaying the
algorithm; :func:`hyper_attention` and :func:`hyper_attention_backward` are dense weighted
attention on it (``W = 0`` means "not seen"). This is the same function as the blockwise
algorithm with its partials merged by the log-sum-exp rule, written so it is easy to check.

The algorithm (tensors BSHD: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``, GQA allowed):

* **Plan** (:func:`hyper_plan`). Non-causal: exact attention if ``Sk <= min_seq_len``, else one
  *core call* over all queries and keys. Causal (``Sq == Sk``): a segment of ``n`` rows is exact
  causal attention if ``n <= min_seq_len``; otherwise it splits into a first half of
  ``ceil(n / 2)`` rows and a second half of ``floor(n / 2)``, both recurse, and the second
  half's queries get a core call over the first half's keys. Core calls are numbered in
  breadth-first order (level by level, left to right).
* **LSH** (:func:`lsh_rank`). ``r`` hyperplanes ``projections [D, r]`` shared by all batches and
  heads; bit ``t`` of a row's code is ``x . projections[:, t] > 0``; the row's rank is the
  code's position in the reflected Gray sequence ``g(n) = n ^ (n >> 1)``, i.e. ``g^-1(code)``,
  so neighbouring ranks differ in exactly one hyperplane.
* **Core call** (:func:`_core_weights`) of ``nq`` queries and ``nk`` keys, for each batch and
  query head ``h`` (kv head ``h // (Hq // Hkv)``): queries and keys are stably sorted by rank.
  Sorted query ``i`` has a window of sorted keys ``[start(i), min(start(i) + block_size, nk))``
  with ``start(i) = (i // block_size) * block_size`` (block diagonal) or, with
  ``smooth_block``, ``start(i) = clip(i - block_size // 2, 0, max(nk - block_size, 0))`` (a band
  of ``block_size`` keys centred on the row, shifted inwards at the ends). Window keys get
  weight 1. ``sample_indices[c, b, hkv]`` are ``m`` positions in the sorted key order (uniform
  with replacement, shared by the kv head's query heads); each sample outside the row's window
  adds ``nk / m`` to its key's weight (samples inside the window are dropped: no double count).
"""

from __future__ import annotations

import numpy as np

from longattn.reference.attention import _softmax, backward_from_probs

__all__ = [
    "gray_rank",
    "hyper_attention",
    "hyper_attention_backward",
    "hyper_plan",
    "hyper_weights",
    "lsh_rank",
    "window_start",
]


def hyper_plan(sq, sk, causal, min_seq_len):
    """Return ``(leaves, calls)``.

    ``leaves``: ``(start, length)`` segments computed as exact causal attention (causal only).
    ``calls``: ``(q0, nq, k0, nk)`` core calls in breadth-first order. A non-causal call with
    ``Sk <= min_seq_len`` returns ``([], [])`` and means exact attention over everything.
    """
    if min_seq_len < 1:
        raise ValueError(f"min_seq_len must be >= 1, got {min_seq_len}")
    if not causal:
        return [], ([] if sk <= min_seq_len else [(0, sq, 0, sk)])
    if sq != sk:
        raise ValueError(f"causal hyper attention needs Sq == Sk, got {sq} and {sk}")
    leaves, calls, level = [], [], [(0, sq)]
    while level:
        nxt = []
        for a, n in level:
            if n <= min_seq_len:
                leaves.append((a, n))
                continue
            n1 = n - n // 2
            calls.append((a + n1, n // 2, a, n1))
            nxt += [(a, n1), (a + n1, n // 2)]
        level = nxt
    return leaves, calls


def gray_rank(code):
    """Position of ``code`` in the reflected Gray sequence: ``g^-1(c) = c ^ c>>1 ^ c>>2 ^ ...``."""
    c = np.asarray(code, dtype=np.int64)
    r = c.copy()
    shift = c >> 1
    while np.any(shift):
        r ^= shift
        shift >>= 1
    return r


def lsh_rank(x, projections):
    """Gray rank of each row of ``x [..., D]`` under the hyperplanes ``projections [D, r]``."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(projections, dtype=np.float64)
    bits = (x @ w) > 0
    code = (bits.astype(np.int64) << np.arange(w.shape[1], dtype=np.int64)).sum(-1)
    return gray_rank(code)


def window_start(i, nk, block_size, smooth_block):
    """First sorted key of sorted query ``i``'s window (see the module docstring)."""
    i = np.asarray(i, dtype=np.int64)
    if smooth_block:
        return np.clip(i - block_size // 2, 0, max(nk - block_size, 0))
    return (i // block_size) * block_size


def _core_weights(qc, kc, projections, samples, block_size, smooth_block):
    """Weights ``[nq, nk]`` of one core call for one (batch, head) in original row order.

    ``qc [nq, D]``, ``kc [nk, D]``, ``samples`` int ``[m]`` (sorted key positions) or None.
    """
    nq, nk = qc.shape[0], kc.shape[0]
    pq = np.argsort(lsh_rank(qc, projections), kind="stable")  # sorted pos -> row
    pk = np.argsort(lsh_rank(kc, projections), kind="stable")
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    lo = window_start(i, nk, block_size, smooth_block)
    inwin = (j >= lo) & (j < lo + block_size)  # [nq, nk] in sorted coordinates
    w = inwin.astype(np.float64)
    if samples is not None and len(samples):
        m = len(samples)
        counts = np.bincount(np.asarray(samples, dtype=np.int64), minlength=nk)[None, :]
        w += np.where(inwin, 0.0, counts * (nk / m))
    out = np.zeros((nq, nk))
    out[np.ix_(pq, pk)] = w  # sorted (i, j) -> original (pq[i], pk[j])
    return out


def _check(q, k, v, projections, sample_indices, block_size, min_seq_len, causal):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q{q.shape} k{k.shape} v{v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    p = np.asarray(projections)
    if p.ndim != 2 or p.shape[0] != q.shape[3]:
        raise ValueError(f"projections must be [D={q.shape[3]}, r], got shape {p.shape}")
    _, calls = hyper_plan(q.shape[1], k.shape[1], causal, min_seq_len)
    if sample_indices is None:
        return calls, None
    s = np.asarray(sample_indices)
    want = (len(calls), q.shape[0], k.shape[2])
    if s.ndim != 4 or s.shape[:3] != want:
        raise ValueError(
            f"sample_indices must be [calls, B, Hkv, m] = {want + ('m',)}, got {s.shape}"
        )
    for c, (_, _, _, nk) in enumerate(calls):
        if s.shape[3] and (s[c].min() < 0 or s[c].max() >= nk):
            raise ValueError(f"sample_indices[{c}] must lie in [0, {nk})")
    return calls, s


def hyper_weights(q, k, projections, sample_indices, *, block_size, min_seq_len, causal,
                  smooth_block=False, num_kv_heads=None):
    """Multiplicities ``W [B, Hq, Sq, Sk]`` of the approximation (see the module docstring).

    ``sample_indices`` is int ``[n_calls, B, Hkv, m]`` (``n_calls = len(hyper_plan(...)[1])``)
    or None for no samples.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    calls, s = _check(q, k, k, projections, sample_indices, block_size, min_seq_len, causal)
    b, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    leaves, _ = hyper_plan(sq, sk, causal, min_seq_len)
    if not causal and not calls:
        return np.ones((b, hq, sq, sk))
    w = np.zeros((b, hq, sq, sk))
    for a, n in leaves:
        w[:, :, a:a + n, a:a + n] = np.tril(np.ones((n, n)))
    for c, (q0, nq, k0, nk) in enumerate(calls):
        for bi in range(b):
            for h in range(hq):
                samp = None if s is None else s[c, bi, h // g]
                w[bi, h, q0:q0 + nq, k0:k0 + nk] = _core_weights(
                    q[bi, q0:q0 + nq, h], k[bi, k0:k0 + nk, h // g], projections, samp,
                    int(block_size), smooth_block)
    return w


def _weighted_softmax(q, k, w, scale):
    """p ``[B, Hq, Sq, Sk]`` and lse ``[B, Hq, Sq]`` of scores with multiplicities ``w``."""
    g = q.shape[2] // k.shape[2]
    s = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, g, axis=2)) * scale
    with np.errstate(divide="ignore"):
        s = np.where(w > 0, s + np.log(np.where(w > 0, w, 1.0)), -np.inf)
    return _softmax(s)


def hyper_attention(q, k, v, *, projections, sample_indices, block_size, min_seq_len, causal,
                    smooth_block=False, scale=None):
    """HyperAttention forward in float64 with the given randomness.

    q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]``; ``projections [D, r]``;
    ``sample_indices`` int ``[n_calls, B, Hkv, m]`` (or None: no samples). Returns
    ``out [B, Sq, Hq, Dv]`` and ``lse [B, Hq, Sq]`` (float64; ``-inf`` for a row that sees
    nothing, with ``out = 0``).
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    _check(q, k, v, projections, sample_indices, block_size, min_seq_len, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    w = hyper_weights(q, k, projections, sample_indices, block_size=block_size,
                      min_seq_len=min_seq_len, causal=causal, smooth_block=smooth_block)
    p, lse = _weighted_softmax(q, k, w, scale)
    g = q.shape[2] // k.shape[2]
    out = np.einsum("bhqk,bkhd->bqhd", p, np.repeat(v, g, axis=2))
    return out, lse


def hyper_attention_backward(dout, q, k, v, *, projections, sample_indices, block_size,
                             min_seq_len, causal, smooth_block=False, scale=None, dlse=None):
    """Exact gradients ``(dq, dk, dv)`` of :func:`hyper_attention` (float64).

    ``dout [B, Sq, Hq, Dv]``, optional ``dlse [B, Hq, Sq]``. The hashes, sort orders and samples
    are piecewise constant in q and k, so they contribute no gradient; everything else (the
    weights ``nk / m``, the merge of the partials, ``lse``) is differentiated exactly.
    """
    dout, q, k, v = (np.asarray(t, dtype=np.float64) for t in (dout, q, k, v))
    _check(q, k, v, projections, sample_indices, block_size, min_seq_len, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    w = hyper_weights(q, k, projections, sample_indices, block_size=block_size,
                      min_seq_len=min_seq_len, causal=causal, smooth_block=smooth_block)
    p, _ = _weighted_softmax(q, k, w, scale)
    return backward_from_probs(p, dout, q, k, v, scale, dlse)
