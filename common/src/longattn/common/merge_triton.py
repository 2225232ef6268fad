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
    # a NaN or +inf lse (no partial has +inf: merge.py's module docstring) makes the row NaN
    nan = (la != la) | (lb != lb) | (la == float("inf")) | (lb == float("inf"))
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


@triton.jit
def _slots_kernel(outs_ptr, lses_ptr, out_ptr, lse_ptr, n, n_front, split, n_rows, S, H,
                  so_n, so_b, so_s, so_h, sl_n, sl_b, sl_h, sl_s,
                  sd_b, sd_s, sd_h, sm_b, sm_h, sm_s,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    live = rows < n_rows
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    k = tl.where(s < split, n_front, n)  # the row merges slots 0 .. k-1
    d = tl.arange(0, BLOCK_D)
    m2 = live[:, None] & (d < D)[None, :]
    # pass 1 over the lses: the row max and the NaN flag (tl.maximum need not propagate NaN)
    pl = lses_ptr + b * sl_b + h * sl_h + s * sl_s
    mx = tl.full((ROWS,), float("-inf"), tl.float32)
    nan = rows < 0  # all False
    for i in range(n):
        lv = tl.load(pl, mask=live & (i < k), other=float("-inf")).to(tl.float32)
        nan = nan | (lv != lv)
        mx = tl.maximum(mx, tl.where(lv != lv, float("-inf"), lv))
        pl += sl_n
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    # pass 2: the weights and one read of each used, live slot's out
    pl = lses_ptr + b * sl_b + h * sl_h + s * sl_s
    po = outs_ptr + (b * so_b + s * so_s + h * so_h)[:, None] + d[None, :]
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    den = tl.zeros((ROWS,), tl.float32)
    for i in range(n):
        use = live & (i < k)
        lv = tl.load(pl, mask=use, other=float("-inf")).to(tl.float32)
        use = use & (lv != float("-inf")) & (lv == lv)
        e = tl.where(use, tl.exp(lv - mx), 0.0)
        o = tl.load(po, mask=m2 & use[:, None], other=0.0).to(tl.float32)
        acc += e[:, None] * o
        den += e
        pl += sl_n
        po += so_n
    empty = den == 0  # False for a NaN den (a +inf lse): that row stays NaN
    safe = tl.where(empty, 1.0, den)
    res = tl.where(empty[:, None], 0.0, acc / safe[:, None])
    res = tl.where(nan[:, None], float("nan"), res)
    new = tl.where(empty, float("-inf"), mx + tl.log(safe))
    new = tl.where(nan, float("nan"), new)
    pd = out_ptr + (b * sd_b + s * sd_s + h * sd_h)[:, None] + d[None, :]
    tl.store(pd, res.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(lse_ptr + b * sm_b + h * sm_h + s * sm_s, new, mask=live)


def slots_refusal(outs, lses) -> str | None:
    """Why :func:`merge_slots` cannot serve these tensors, or None: it merges in float32 (float32
    ``lses``, ``outs`` not float64) with head_dim (at most 512) the contiguous (last) axis."""
    if lses.dtype != torch.float32 or outs.dtype == torch.float64:
        return f"it merges in float32: float32 lses, outs not float64, got outs {outs.dtype}, " \
               f"lses {lses.dtype}"
    if outs.shape[-1] > 1 and outs.stride(-1) != 1:
        return "outs needs a contiguous head_dim (stride 1 in the last dim)"
    if outs.shape[-1] > 512:
        return f"head_dim {outs.shape[-1]} > 512"
    return None


def merge_slots(outs, lses, n_front: int, split: int, out, lse, rows: int = 16):
    """``(out, lse) <- merge`` of the slots ``outs [n, B, S, H, D]``, ``lses [n, B, H, S]``: rows
    ``s < split`` from the first ``n_front`` slots, the others from all ``n`` (the slots a row
    does not use are never read). Writes ``out [B, S, H, D]`` (any float dtype, head_dim
    contiguous; rounded once from float32) and ``lse [B, H, S]`` (float32); returns them.
    Arguments as in :func:`longattn.common.merge.merge_slots`; call only where
    :func:`slots_refusal` is None."""
    n, b, s, h, d = outs.shape
    n_rows = b * s * h
    if n_rows == 0:
        return out, lse
    block_d = max(triton.next_power_of_2(d), 1)
    grid = (triton.cdiv(n_rows, rows),)
    _slots_kernel[grid](outs, lses, out, lse, n, n_front, split, n_rows, s, h,
                        *outs.stride()[:4], *lses.stride(),
                        *out.stride()[:3], *lse.stride(),
                        D=d, BLOCK_D=block_d, ROWS=rows)
    return out, lse
