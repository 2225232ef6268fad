"""Pure-PyTorch backend: any device, any dtype, any window, GQA, ``dlse``.

Queries are processed in row blocks; each block only touches the key range its window can see,
so memory stays O(block * Sk) instead of O(Sq * Sk). Math in float32 (float64 for float64
inputs); ``lse`` in :func:`~longattn.common.dtypes.lse_dtype` (float64 for float32 inputs: the
float32 row max plus the float64 log of the row sum; the backward subtracts it from float32
scores as a float32 high part and low residual, :func:`~longattn.common.dtypes.split_lse`). Used
on CPUs and as the fallback everywhere; not tuned for speed on GPUs. The block size is
:class:`TorchConfig`'s ``score_block_elems`` (``config=TorchConfig(...)``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.common.checks import config_or_default
from longattn.common.dtypes import acc_dtype, lse_dtype, split_lse
from longattn.common.kernels import Backend
from longattn.common.merge import finish_rows


@dataclass(frozen=True)
class TorchConfig:
    """The torch backend's knob (``config=`` of the kernels' entry points).

    ``score_block_elems``: elements of one score block ``[B, Hq, rows, keys]``. Default 2**22
    (16 MiB in fp32; blocks are updated in place, so about three are alive at once): a memory
    bound, not a measured speed optimum. Smaller values change only the summation order."""

    score_block_elems: int = 1 << 22

    def __post_init__(self):
        n = self.score_block_elems
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"TorchConfig.score_block_elems must be an int >= 1, got {n!r}")


_DEFAULT = TorchConfig()


def _config(config) -> TorchConfig:
    return config_or_default(config, TorchConfig, _DEFAULT,
                             expected="the torch backend takes config=TorchConfig(...)")


def _blocks(b, sq, sk, hq, window, block_elems):
    """Yield (q0, q1, lo, hi): row block and the key range [lo, hi) it can see."""
    left, right = window
    off = sk - sq
    width = sk if left < 0 or right < 0 else min(sk, left + right + 1)
    rows = max(1, min(sq, block_elems // max(1, b * hq * max(width, 1))))
    for q0 in range(0, sq, rows):
        q1 = min(sq, q0 + rows)
        lo = 0 if left < 0 else max(0, q0 + off - left)
        hi = sk if right < 0 else min(sk, q1 - 1 + off + right + 1)
        yield q0, q1, lo, max(lo, hi)


def _mask(q0, q1, lo, hi, off, window, device):
    """Visible-key mask [rows, keys] for the block, or None if every pair is visible."""
    left, right = window
    need_left = left >= 0 and lo < q1 - 1 + off - left  # last row's lower bound is tightest
    need_right = right >= 0 and hi - 1 > q0 + off + right  # first row's upper bound
    if not (need_left or need_right):
        return None
    qi = torch.arange(q0, q1, device=device)[:, None] + off
    kj = torch.arange(lo, hi, device=device)[None, :]
    m = torch.ones(q1 - q0, hi - lo, dtype=torch.bool, device=device)
    if need_left:
        m &= kj >= qi - left
    if need_right:
        m &= kj <= qi + right
    return m


def _scores(qb, kb, mask):
    """qb [B, r, Hkv, G, D] (already scaled), kb [B, n, Hkv, D] -> masked scores
    [B, Hkv, G, r, n] (a fresh tensor the caller may overwrite)."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", qb, kb)
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return s


def forward(q, k, v, *, softmax_scale, window_size, config=None):
    block_elems = _config(config).score_block_elems
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    acc, ldt = acc_dtype(q.dtype), lse_dtype(q.dtype)
    out = torch.zeros(b, sq, hq, dv, dtype=acc, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=ldt, device=q.device)
    for q0, q1, lo, hi in _blocks(b, sq, sk, hq, window_size, block_elems):
        if hi <= lo:
            continue
        r = q1 - q0
        qb = (q[:, q0:q1].to(acc) * softmax_scale).reshape(b, r, hkv, g, d)
        kb, vb = k[:, lo:hi].to(acc), v[:, lo:hi].to(acc)
        p = _scores(qb, kb, _mask(q0, q1, lo, hi, sk - sq, window_size, q.device))
        m = p.amax(dim=-1, keepdim=True)  # NaN if a score is NaN
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p.sub_(m).exp_()
        den = p.sum(dim=-1)  # [B, Hkv, G, r]
        o = torch.einsum("bhgqk,bkhd->bqhgd", p, vb)  # [B, r, Hkv, G, Dv]
        # rows that see no key: out 0, lse -inf; a NaN row stays NaN. lse = m + log(den) in
        # lse_dtype (m is the exact acc-dtype row max)
        o, blk = finish_rows(o, den.permute(0, 3, 1, 2),
                             m[..., 0].permute(0, 3, 1, 2).to(ldt))
        out[:, q0:q1] = o.reshape(b, r, hq, dv)
        lse[:, :, q0:q1] = blk.permute(0, 2, 3, 1).reshape(b, hq, r)
    return out.to(q.dtype), lse


def backward(dout, q, k, v, out, lse, *, softmax_scale, window_size, dlse=None, config=None):
    block_elems = _config(config).score_block_elems
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(b, sq, hq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, sk, hkv, d, dtype=acc, device=q.device)
    dvv = torch.zeros(b, sk, hkv, dv, dtype=acc, device=q.device)
    # p = exp(s - lse); a row with lse = -inf sees nothing: exp(s - inf) = 0.
    # A float64 lse (float32 inputs) goes in as a float32 high part and low residual.
    lse_hi, lse_lo = split_lse(
        torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse), acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, Hq, Sq]
    if dlse is not None:
        delta = delta - dlse.to(acc)
    for q0, q1, lo, hi in _blocks(b, sq, sk, hq, window_size, block_elems):
        if hi <= lo:
            continue
        r = q1 - q0
        qb = (q[:, q0:q1].to(acc) * softmax_scale).reshape(b, r, hkv, g, d)
        kb, vb = k[:, lo:hi].to(acc), v[:, lo:hi].to(acc)
        mask = _mask(q0, q1, lo, hi, sk - sq, window_size, q.device)
        p = _scores(qb, kb, mask)
        p.sub_(lse_hi[:, :, q0:q1].reshape(b, hkv, g, r, 1))
        if lse_lo is not None:
            p.sub_(lse_lo[:, :, q0:q1].reshape(b, hkv, g, r, 1))
        p.exp_()
        if mask is not None:  # exp(-inf - NaN) is NaN: a NaN row must not reach unseen keys
            p.masked_fill_(~mask, 0.0)
        dob = dout[:, q0:q1].to(acc).reshape(b, r, hkv, g, dv)
        ds = torch.einsum("bqhgd,bkhd->bhgqk", dob, vb)
        ds.sub_(delta[:, :, q0:q1].reshape(b, hkv, g, r, 1)).mul_(p)
        dqb = torch.einsum("bhgqk,bkhd->bqhgd", ds, kb) * softmax_scale
        dq[:, q0:q1] = dqb.reshape(b, r, hq, d)
        dk[:, lo:hi] += torch.einsum("bhgqk,bqhgd->bkhd", ds, qb)  # qb carries the scale
        dvv[:, lo:hi] += torch.einsum("bhgqk,bqhgd->bkhd", p, dob)
    return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype)


def supports(req):
    return None  # every device, dtype, window and dlse


BACKEND = Backend(forward=forward, backward=backward, supports=supports, config_type=TorchConfig)
