"""One-pass in-place LSE merge on the GPU (Triton), used by ``merge_partials_`` for CUDA fp32
accumulators: one read of each side and one write, where the eager version makes about ten
elementwise passes over the fp32 accumulator.

Slow twin: the eager branch of :func:`longattn.common.merge.merge_partials_`
(``backend="torch"``); a CPU test runs both under ``TRITON_INTERPRET=1`` and compares them.

Each program merges ``ROWS`` (batch, seq, head) rows: ``w_a = exp(lse_a - m) / den``,
``w_b = exp(lse_b - m) / den`` with ``m = max(lse_a, lse_b)``, so a dead side (``-inf``) gets
weight exactly 0 and its ``out`` is never read into the result (even NaN). A NaN ``lse`` on
either side makes the row's ``out`` and ``lse`` NaN (explicitly: ``tl.maximum`` need not
propagate NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, ob_ptr, lb_ptr, n_rows, S, H,
                  so_b, so_s, so_h, sl_b, sl_h, sl_s,
                  sob_b, sob_s, sob_h, slb_b, slb_h, slb_s,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    live = rows < n_rows
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    la = tl.load(lse_ptr + b * sl_b + h * sl_h + s * sl_s, mask=live, other=float("-inf"))
    lb = tl.load(lb_ptr + b * slb_b + h * slb_h + s * slb_s, mask=live, other=float("-inf"))
    la = la.to(tl.float32)
    lb = lb.to(tl.float32)
    a_dead = la == float("-inf")
    b_dead = lb == float("-inf")
    mx = tl.maximum(la, lb)
    mx = tl.where(a_dead & b_dead, 0.0, mx)
    ea = tl.where(a_dead, 0.0, tl.exp(la - mx))
    eb = tl.where(b_dead, 0.0, tl.exp(lb - mx))
    den = ea + eb
    alive = den > 0
    inv = tl.where(alive, 1.0 / tl.where(alive, den, 1.0), 0.0)
    wa = ea * inv
    wb = eb * inv
    new = tl.where(alive, mx + tl.log(tl.where(alive, den, 1.0)), float("-inf"))
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m2 = live[:, None] & dm[None, :]
    po = out_ptr + (b * so_b + s * so_s + h * so_h)[:, None] + d[None, :]
    pb = ob_ptr + (b * sob_b + s * sob_s + h * sob_h)[:, None] + d[None, :]
    oa = tl.load(po, mask=m2 & ~a_dead[:, None], other=0.0).to(tl.float32)
    ob = tl.load(pb, mask=m2 & ~b_dead[:, None], other=0.0).to(tl.float32)
    nan = (la != la) | (lb != lb)
    res = tl.where(nan[:, None], float("nan"), wa[:, None] * oa + wb[:, None] * ob)
    tl.store(po, res, mask=m2)
    tl.store(lse_ptr + b * sl_b + h * sl_h + s * sl_s, tl.where(nan, float("nan"), new),
             mask=live)


def refusal(out, lse, out_b, lse_b) -> str | None:
    """Why the kernel cannot serve these tensors, or None: it takes fp32 accumulators whose
    head_dim (at most 512) is the contiguous (last) axis."""
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        return f"it takes float32 accumulators, got out {out.dtype}, lse {lse.dtype}"
    if out.stride(-1) != 1 or out_b.stride(-1) != 1:
        return "out and out_b need a contiguous head_dim (stride 1 in the last dim)"
    if out.shape[-1] > 512:
        return f"head_dim {out.shape[-1]} > 512"
    return None


def merge_(out, lse, out_b, lse_b, rows: int = 16):
    """In place: ``(out, lse) <- merge((out, lse), (out_b, lse_b))``. Shapes as in
    :func:`longattn.common.merge.merge_partials_`; call only where :func:`refusal` is None."""
    b, s, h, d = out.shape
    n = b * s * h
    if n == 0:
        return out, lse
    grid = (triton.cdiv(n, rows),)
    _merge_kernel[grid](out, lse, out_b, lse_b, n, s, h,
                        out.stride(0), out.stride(1), out.stride(2),
                        lse.stride(0), lse.stride(1), lse.stride(2),
                        out_b.stride(0), out_b.stride(1), out_b.stride(2),
                        lse_b.stride(0), lse_b.stride(1), lse_b.stride(2),
                        D=d, BLOCK_D=triton.next_power_of_2(d), ROWS=rows)
    return out, lse
