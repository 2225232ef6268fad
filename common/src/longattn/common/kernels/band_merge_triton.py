"""The band backend's fused multi-partial merge (Triton), kept apart so that importing
``longattn.common.kernels`` does not import triton unless a GPU merge runs.

Slow twin: :func:`longattn.common.kernels.band_backend._merge_torch` (the same partials merged
one at a time with :func:`longattn.common.merge.merge_partials_`); a CPU test runs both under
``TRITON_INTERPRET=1`` and compares them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(o0, l0, o1, l1, o2, l2, out, lse, R, NC, C, H, S, J1, J2,
                  FLIP1: tl.constexpr, FLIP2: tl.constexpr, HAS2: tl.constexpr,
                  DV: tl.constexpr, BLOCK: tl.constexpr):
    """Rows (b, t, a) x head h: merge up to 3 partials. Partial p covers query chunks
    t >= J_p, laid out [B * (NC - J_p), C, H, DV] (lse [B * (NC - J_p), H, C]), rows
    reversed inside each chunk when FLIP_p. Writes out [B, S, H, DV], lse [B, H, S]."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    h = tl.program_id(1)
    valid = rows < R
    a = rows % C
    bt = rows // C
    t = bt % NC
    bb = bt // NC
    col = tl.arange(0, DV)[None, :]
    ninf = float("-inf")
    lse0 = tl.load(l0 + (bt * H + h) * C + a, mask=valid, other=ninf)
    in1 = valid & (t >= J1)
    bt1 = bb * (NC - J1) + (t - J1)
    a1 = C - 1 - a if FLIP1 else a
    lse1 = tl.load(l1 + (bt1 * H + h) * C + a1, mask=in1, other=ninf)
    if HAS2:
        in2 = valid & (t >= J2)
        bt2 = bb * (NC - J2) + (t - J2)
        a2 = C - 1 - a if FLIP2 else a
        lse2 = tl.load(l2 + (bt2 * H + h) * C + a2, mask=in2, other=ninf)
    else:
        lse2 = tl.full([BLOCK], ninf, tl.float32)
    mx = tl.maximum(tl.maximum(lse0, lse1), lse2)
    mx = tl.where(mx == ninf, 0.0, mx)
    w0 = tl.exp(lse0 - mx)
    w1 = tl.exp(lse1 - mx)
    w2 = tl.exp(lse2 - mx)
    tot = w0 + w1 + w2
    inv = tl.where(tot > 0, 1.0 / tot, 0.0)
    acc = tl.load(o0 + ((bt * C + a) * H + h)[:, None] * DV + col, mask=valid[:, None],
                  other=0.0).to(tl.float32) * (w0 * inv)[:, None]
    acc += tl.load(o1 + ((bt1 * C + a1) * H + h)[:, None] * DV + col, mask=in1[:, None],
                   other=0.0).to(tl.float32) * (w1 * inv)[:, None]
    if HAS2:
        acc += tl.load(o2 + ((bt2 * C + a2) * H + h)[:, None] * DV + col,
                       mask=in2[:, None], other=0.0).to(tl.float32) * (w2 * inv)[:, None]
    nan = (lse0 != lse0) | (lse1 != lse1) | (lse2 != lse2)  # a NaN never disappears
    acc = tl.where(nan[:, None], float("nan"), acc)
    tl.store(out + (rows * H + h)[:, None] * DV + col, acc.to(out.dtype.element_ty),
             mask=valid[:, None])
    tl.store(lse + (bb * H + h) * S + t * C + a,
             tl.where(nan, float("nan"), tl.where(tot > 0, mx + tl.log(tot), ninf)),
             mask=valid)


def merge(parts, b, nc, c, h, dv, dtype, block=64):
    """Merge 2 or 3 band partials ``(out, lse, first query chunk j, flipped)`` into ``(out
    [B, S, H, Dv] in dtype, lse [B, H, S] float32)``."""
    if len(parts) not in (2, 3):
        raise ValueError(f"the fused merge takes 2 or 3 partials, got {len(parts)}")
    dev = parts[0][0].device
    out = torch.empty(b, nc * c, h, dv, dtype=dtype, device=dev)
    lse = torch.empty(b, h, nc * c, dtype=torch.float32, device=dev)
    ts = [(o.contiguous(), lp.float().contiguous(), j, f) for o, lp, j, f in parts]
    p2 = ts[2] if len(ts) == 3 else ts[1]
    rows = b * nc * c
    _merge_kernel[(triton.cdiv(rows, block), h)](
        ts[0][0], ts[0][1], ts[1][0], ts[1][1], p2[0], p2[1], out, lse, rows, nc, c, h,
        nc * c, ts[1][2], p2[2], FLIP1=ts[1][3], FLIP2=p2[3], HAS2=len(ts) == 3, DV=dv,
        BLOCK=block)
    return out, lse
