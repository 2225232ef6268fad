"""The seed's HyperAttention written again in plain torch (any device, fp32 / float64): a
benchmark and test reference, never a user path. Written from reading the seeds, no code copied:

* **fused** -- https://github.com/amirzandieh/HyperAttention (``hyper_attention.py``,
  ``src/hyper_attn_triton.py``, ``src/angular_lsh_triton.py``): the fused Triton kernel, whose
  README gives the 22x / 16x figures our targets cite. One program per tile of ``tile`` (128)
  sorted queries: an online softmax over its block of sorted keys, then over the sampled columns.
  What the kernel does with the samples:

  - the columns are *fixed*, not drawn: tile ``c`` of the ``sample_size / tile`` column tiles
    reads key rows ``c * tile * row_stride + j`` (``j < tile``) counted from the start of the
    call's key slice, where ``row_stride`` is the row stride of the key tensor (``D`` for the
    seed's contiguous ``[B, H, S, D]`` inputs): its offsets are multiplied by the stride twice.
    So 256 samples at D = 64 are the keys 0..127 and 8192..8319 of the original (unsorted)
    order, the same for every query, head and batch; past the slice the kernel reads whatever
    lies there (the next head's or segment's keys; past the tensor, memory it does not own);
  - a sampled column has weight **1**, the weight of a block key (no ``n / m``): the result is
    the softmax over "block keys plus m more keys";
  - samples that are also in the row's block are counted twice (no exclusion);
  - buckets are sorted by ``g(code)`` (the Gray code *of* the code; longattn uses ``g^-1``).

  Its causal path is the recursion below (halves viewed as extra heads; the lower-left quarter
  is a non-causal call over the first half's keys, merged by log-sum-exp). Because the column
  addresses count from the key slice, a causal call over a half of at most
  ``tile * row_stride`` keys reads keys after that half: the segment's second half (future
  keys), later segments, the next head, or (last segment of the last head) past the tensor.

* **two-pass** -- https://github.com/insuhan/hyper-attn (``models/attention/hyper_attn.py``):
  block attention and a sampled attention as two FlashAttention calls merged by log-sum-exp;
  samples uniform with replacement (``torch.randint``) with weight ``n / m``
  (``lse + log(n / m)``); in-block samples masked by an additive bias on its bf16 / fp16
  Triton path, not on its fp32 torch path (which ignores the bias); order ``g(code)``.

Both are the same computation with different rules (:class:`SeedRules`); longattn's rules give
longattn's function exactly (``hyper/tests/test_hyper_seed_reference.py`` checks this against
``hyper_attention(backend="torch")`` in float64), so each rule can be switched alone.

Not reproduced: the seeds' bf16 / fp16 arithmetic (this computes in the input dtype, fp32 or
float64: rounding is far below the errors compared here) and the zero row the seeds pad odd
causal segments with (lengths must split evenly down to ``min_seq_len``; block and sample sizes
multiples of ``tile``, and the query length a multiple of ``tile``, as the seed requires).
Memory the fused kernel reads past the tensor is NaN here (on a GPU: whatever lies there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

ORDERS = ("g", "ginv")
SAMPLES = ("fixed", "first", "uniform")
WEIGHTS = ("one", "n/m")


@dataclass(frozen=True)
class SeedRules:
    """How the sampled part and the bucket order work.

    ``order``: ``"g"`` sorts by the Gray code of the LSH code (the seeds), ``"ginv"`` by its
    position in the Gray sequence (longattn). ``samples``: ``"fixed"`` the fused kernel's
    column addresses (stride bug included), ``"first"`` the first ``m`` keys of the call's key
    slice in the original order (what the kernel reads for one column tile, and its own unit
    test's reference), ``"uniform"`` positions drawn uniformly with replacement in the sorted
    key order, one set per (call, batch, head) (longattn, and the two-pass seed).
    ``weight``: ``"one"`` (fused seed) or ``"n/m"`` (longattn, two-pass seed) per sampled column.
    ``exclude``: drop a sample that lies in the row's block (longattn; the two-pass seed on its
    half-precision path) instead of counting it a second time.
    """

    order: str = "g"
    samples: str = "fixed"
    weight: str = "one"
    exclude: bool = False

    def __post_init__(self):
        for name, allowed in (("order", ORDERS), ("samples", SAMPLES), ("weight", WEIGHTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def but(self, **changes) -> SeedRules:
        return replace(self, **changes)


FUSED = SeedRules()  # amirzandieh/HyperAttention, the fused Triton kernel
TWO_PASS_GPU = SeedRules("g", "uniform", "n/m", True)  # insuhan/hyper-attn, bf16 / fp16
TWO_PASS_CPU = SeedRules("g", "uniform", "n/m", False)  # insuhan/hyper-attn, fp32 torch path
LONGATTN = SeedRules("ginv", "uniform", "n/m", True)  # longattn.hyper's rules


# ----------------------------------------------------------------------------- hashing
def lsh_codes(x, projections):
    """``x [B, S, H, D]`` -> int64 codes ``[B, H, S]``: bit t is ``x . projections[:, t] > 0``
    (computed in float64, as longattn does on a CPU)."""
    bits = torch.matmul(x.double(), projections.to(x.device, torch.float64)) > 0
    pow2 = 1 << torch.arange(projections.shape[1], device=x.device)
    return (bits.long() * pow2).sum(-1).transpose(1, 2)


def bucket_rank(code, order):
    """Sort key of a code: ``g(code) = code ^ (code >> 1)`` (the seeds' lookup table
    ``perm[code]``: its table lists the reflected Gray sequence) or ``g^-1(code)``."""
    if order == "g":
        return code ^ (code >> 1)
    r, shift = code.clone(), code >> 1
    while bool((shift > 0).any()):
        r = r ^ shift
        shift = shift >> 1
    return r


# ----------------------------------------------------------------------------- one call
def _windows(nq, nk, tile, bs, smooth, device):
    """Sorted key positions ``[n_tiles, bs]`` of each query tile's block and their validity.
    Blocks: tile t sees ``[b * bs, min((b + 1) * bs, nk))`` with ``b = t // (bs / tile)``.
    Smooth (fused seed): the same count of keys shifted by ``(t % bt) * tile - (bt - 1) * tile
    // 2`` and wrapped modulo ``nk``."""
    bt = bs // tile
    t = torch.arange(nq // tile, device=device)
    j = torch.arange(bs, device=device)
    lin = (t // bt * bs).view(-1, 1) + j  # the block's positions
    valid = lin < nk
    if smooth:
        shift = (t % bt) * tile - (bt - 1) * tile // 2
        pos = (lin + nk + shift.view(-1, 1)) % nk
    else:
        pos = lin.clamp(max=nk - 1)
    return pos, valid


CHUNK = 1 << 26  # scores per group of heads in a call (memory bound on a GPU at S = 131k)


def _core(q, k, v, rq, rk, cols, *, rules, scale, tile, bs, smooth):
    """One non-causal call on ``q [B, H, nq, D]``, ``k [B, H, nk, D]``, ``v [B, H, nk, Dv]``
    with ranks ``rq [B, H, nq]``, ``rk [B, H, nk]``. ``cols`` = (sampled keys ``[B, H, m, D]``,
    their values, their sorted position in this call's keys ``[B, H, m]`` or -1 when they are
    not keys of this call) or None. Returns ``out [B, H, nq, Dv]``, ``lse [B, H, nq]``; heads
    run in groups of about ``CHUNK`` scores."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    nt = nq // tile
    pos, valid = _windows(nq, nk, tile, bs, smooth, q.device)
    inwin = None
    if cols is not None and rules.exclude:  # [nt, nk + 1]: sorted key position in tile's block
        inwin = torch.zeros(nt, nk + 1, dtype=torch.bool, device=q.device)
        inwin.scatter_(1, torch.where(valid, pos, nk), True)
        inwin[:, nk] = False  # "not a key of this call" and the invalid slots
    m = 0 if cols is None else cols[0].shape[2]
    step = max(1, CHUNK // max(1, b * nq * (bs + m)))
    outs, lses = [], []
    for h0 in range(0, h, step):
        sl = slice(h0, h0 + step)
        hc = len(range(h)[sl])
        pq = torch.sort(rq[:, sl], dim=-1, stable=True).indices
        pk = torch.sort(rk[:, sl], dim=-1, stable=True).indices
        qs = q[:, sl].gather(2, pq.unsqueeze(-1).expand(-1, -1, -1, d)).view(b, hc, nt, tile, d)
        ks = k[:, sl].gather(2, pk.unsqueeze(-1).expand(-1, -1, -1, d))
        vs = v[:, sl].gather(2, pk.unsqueeze(-1).expand(-1, -1, -1, dv))
        kw, vw = ks[:, :, pos], vs[:, :, pos]  # [B, hc, nt, bs, D]
        s = torch.einsum("bhtid,bhtjd->bhtij", qs, kw) * scale
        s = s.masked_fill(~valid.view(1, 1, nt, 1, bs), float("-inf"))
        if cols is not None:
            kc, vc, spos = (x[:, sl] for x in cols)
            ss = torch.einsum("bhtid,bhmd->bhtim", qs, kc) * scale
            if rules.weight == "n/m":
                ss = ss + math.log(nk / m)
            if inwin is not None:
                sp = torch.where(spos < 0, nk, spos)  # [B, hc, m]
                hit = inwin[:, sp].permute(1, 2, 0, 3)  # [B, hc, nt, m]
                ss = ss.masked_fill(hit.unsqueeze(3), float("-inf"))
            s = torch.cat([s, ss], -1)
        lse = torch.logsumexp(s, -1)  # [B, hc, nt, tile]
        safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        p = torch.exp(s - safe.unsqueeze(-1))
        out = torch.einsum("bhtij,bhtjd->bhtid", p[..., :bs], vw)
        if cols is not None:
            out = out + torch.einsum("bhtim,bhmd->bhtid", p[..., bs:], vc)
        inv = torch.argsort(pq, dim=-1)
        outs.append(out.reshape(b, hc, nq, dv).gather(2, inv.unsqueeze(-1).expand(-1, -1, -1,
                                                                                  dv)))
        lses.append(lse.reshape(b, hc, nq).gather(2, inv))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _exact(q, k, v, scale, causal):
    """Exact attention on ``[B, H, n, D]`` tensors with lse (dense; segments are short)."""
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1),
                          float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def _merge(o1, l1, o2, l2):
    """The seeds' merge of two normalised partials ([B, H, n, D] layout): a row neither part
    saw comes out NaN, as in the seeds (``common.merge`` gives such rows 0 / -inf)."""
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).unsqueeze(-1)
    w2 = torch.exp(l2 - lse).unsqueeze(-1)
    return w1 * o1 + w2 * o2, lse


# ----------------------------------------------------------------------------- entry point
def seed_attention(q, k, v, *, projections, rules=FUSED, causal=False, block_size=256,
                   sample_size=256, min_seq_len=2048, tile=128, smooth_block=False,
                   softmax_scale=None, row_stride=None, samples=None, generator=None):
    """The seed's HyperAttention under ``rules``. Tensors BSHD as longattn's: ``q, k [B, S, H,
    D]``, ``v [B, S, H, Dv]`` (no GQA; ``Sq == Sk``). ``projections [D, r]`` are the LSH
    hyperplanes. ``samples``: for ``rules.samples == "uniform"``, a function ``(q0, nq, k0, nk)
    -> int [B, H, m]`` giving a call's sorted key positions (longattn's plan numbers the same
    calls); else they are drawn from ``generator``. ``row_stride`` (default D): the key rows'
    stride the fused kernel multiplies its column offsets by. Returns ``(out [B, S, H, Dv],
    lse [B, H, S])``.

    Plan (the seeds'): non-causal, exact attention if ``min_seq_len > S``, else one call.
    Causal: a segment of ``n <= min_seq_len`` rows is exact causal attention, else its halves
    recurse and the second half's queries get a non-causal call over the first half's keys
    (itself exact when ``min_seq_len > n / 2``), merged by log-sum-exp.
    """
    bsz, s, h, d = q.shape
    if k.shape[1] != s:
        raise ValueError("the seeds need Sq == Sk")
    if block_size % tile or sample_size % tile or s % tile:
        raise ValueError(f"block_size, sample_size and S must be multiples of tile={tile}")
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    row_stride = d if row_stride is None else row_stride
    rank_q = bucket_rank(lsh_codes(q, projections), rules.order)
    rank_k = bucket_rank(lsh_codes(k, projections), rules.order)
    dt = torch.promote_types(q.dtype, torch.float32)  # half inputs computed in fp32
    qh, kh, vh = (t.transpose(1, 2).to(dt) for t in (q, k, v))  # [B, H, S, *]
    # the fused kernel's view of memory: the contiguous [B, H, S, D] keys as one row list
    flat_k = kh.reshape(bsz * h * s, d)
    flat_v = vh.reshape(bsz * h * s, vh.shape[-1])
    head_base = (torch.arange(bsz * h, device=q.device) * s).view(bsz, h)

    def columns(q0, nq, k0, nk, pk):
        """(keys, values, sorted position or -1) of a call's sampled columns; ``pk`` is the
        call's key sort order (sorted position -> row of the slice)."""
        if sample_size == 0:
            return None
        if rules.samples == "uniform":
            if samples is not None:
                pos = samples(q0, nq, k0, nk).to(q.device, torch.int64)
            else:
                pos = torch.randint(0, nk, (bsz, h, sample_size), generator=generator,
                                    device="cpu" if generator is None else generator.device)
                pos = pos.to(q.device)
            idx = head_base.unsqueeze(-1) + k0 + pk.gather(2, pos)
            return flat_k[idx], flat_v[idx], pos
        if rules.samples == "fixed":
            j = torch.arange(tile, device=q.device)
            c = torch.arange(sample_size // tile, device=q.device)
            off = (c.view(-1, 1) * tile * row_stride + j).reshape(-1)
        else:
            off = torch.arange(sample_size, device=q.device)
        idx = head_base.unsqueeze(-1) + k0 + off  # [B, H, m] rows of the flat memory
        inside = idx < flat_k.shape[0]
        safe = torch.where(inside, idx, 0)
        kc = torch.where(inside.unsqueeze(-1), flat_k[safe], float("nan"))
        vc = torch.where(inside.unsqueeze(-1), flat_v[safe], float("nan"))
        # the sorted position of a column that is a key of this call (-1: it is not)
        inv = torch.argsort(pk, dim=-1)
        pos = inv.gather(2, off.clamp(max=nk - 1).expand(bsz, h, -1))
        return kc, vc, torch.where(off < nk, pos, -1)

    def call(q0, nq, k0, nk):
        if min_seq_len > nq:
            return _exact(qh[:, :, q0:q0 + nq], kh[:, :, k0:k0 + nk], vh[:, :, k0:k0 + nk],
                          scale, False)
        rk = rank_k[:, :, k0:k0 + nk]
        cols = columns(q0, nq, k0, nk, torch.sort(rk, dim=-1, stable=True).indices)
        return _core(qh[:, :, q0:q0 + nq], kh[:, :, k0:k0 + nk], vh[:, :, k0:k0 + nk],
                     rank_q[:, :, q0:q0 + nq], rk, cols, rules=rules, scale=scale, tile=tile,
                     bs=block_size, smooth=smooth_block)

    def rec(a, n):
        if n <= min_seq_len:
            return _exact(qh[:, :, a:a + n], kh[:, :, a:a + n], vh[:, :, a:a + n], scale, True)
        if n % 2:
            raise ValueError(f"odd causal segment of {n} rows (the seeds pad it; not here)")
        half = n // 2
        o1, l1 = rec(a, half)
        o2, l2 = rec(a + half, half)
        oc, lc = call(a + half, half, a, half)
        o2, l2 = _merge(o2, l2, oc, lc)
        return torch.cat([o1, o2], 2), torch.cat([l1, l2], 2)

    out, lse = rec(0, s) if causal else call(0, s, 0, s)
    return out.transpose(1, 2).to(q.dtype), lse
