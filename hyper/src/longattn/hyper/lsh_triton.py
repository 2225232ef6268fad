"""Fused LSH ranks on GPUs: one Triton pass from ``x [B, S, H, D]`` to Gray ranks ``[B, H, S]``.

Its slow twin is the torch implementation in :func:`longattn.hyper.lsh.lsh_rank` (same bits,
same ranks); ``tests/test_hyper_lsh_triton.py`` compares the two under ``TRITON_INTERPRET=1``.

The torch implementation (:func:`longattn.hyper.lsh.lsh_rank`) takes a cuBLAS matmul, a
compare, a multiply and an int reduction over the bits, a table gather and a transposing copy:
six passes over ``[B, S, H, r]``-sized intermediates. :func:`_lsh_rank` loads a tile of rows
once, projects them with ``tl.dot`` (fp32 accumulation), packs the sign bits, takes the inverse
Gray code (``g^-1(c) = c ^ c >> 1 ^ c >> 2 ^ ...`` as four xor-shifts) and stores the ranks
transposed, optionally already in the narrow dtype the sorts use (uint8 for ``r <= 8``).

Semantics equal ``lsh_rank``'s GPU path: the projections are rounded to the input dtype (fp16 /
bf16; fp32 stays fp32 with IEEE fp32 dots), bit ``t`` is ``x . projections[:, t] > 0``. Rows whose
projection is within rounding of 0 may get the other bit than a differently ordered sum would
give, as between any two matmul kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_s(dtype: torch.dtype) -> int:
    """Rows per program: 128 for fp16 / bf16, 64 for fp32 (IEEE fp32 dots hold more registers;
    ``bench/compile_sm90.py`` reports the kernel's registers and spills)."""
    return 64 if dtype == torch.float32 else 128


@triton.jit
def _lsh_rank(X, W, R, S, H, BH, sxb, sxs, sxh, D, NPROJ,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
              EVEN_D: tl.constexpr, PREC: tl.constexpr):
    """One program per (tile of BLOCK_S rows, batch * head), batch * head fastest (neighbouring
    programs read the other heads of the same rows). ``W`` is ``[BLOCK_D, BLOCK_R]``,
    zero-padded."""
    pid = tl.program_id(0)
    bh = pid % BH
    tile = pid // BH
    b = bh // H
    h = bh % H
    offs_s = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = offs_s < S
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    ptrs = (X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
            + offs_s.to(tl.int64)[:, None] * sxs + offs_d[None, :])
    if EVEN_D:
        x = tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    w = tl.load(W + offs_d[:, None] * BLOCK_R + offs_r[None, :])
    if PREC == "ieee":  # fp32, and every dtype interpreted: fp32 operands (exact widening)
        proj = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    else:
        proj = tl.dot(x, w, input_precision=PREC)  # [BLOCK_S, BLOCK_R], fp32 accumulation
    bits = (proj > 0) & (offs_r < NPROJ)[None, :]
    code = tl.sum(tl.where(bits, 1 << offs_r[None, :], 0), axis=1)
    g = code ^ (code >> 1)  # inverse Gray code of up to 16 bits
    g = g ^ (g >> 2)
    g = g ^ (g >> 4)
    g = g ^ (g >> 8)
    tl.store(R + bh.to(tl.int64) * S + offs_s, g.to(R.dtype.element_ty), mask=ok)


def rank_dtype(r_bits: int, narrow: bool) -> torch.dtype:
    """int32, or with ``narrow`` the narrowest sortable dtype for ranks < 2^r."""
    if not narrow or r_bits > 15:
        return torch.int32
    return torch.uint8 if r_bits <= 8 else torch.int16


def lsh_rank_fused(x: torch.Tensor, projections: torch.Tensor, *,
                   narrow: bool = False) -> torch.Tensor:
    """Gray ranks of the rows of ``x [B, S, H, D]`` (fp16 / bf16 / fp32, any strides) as
    ``[B, H, S]``: int32, or with ``narrow`` uint8 (r <= 8) / int16 (r <= 15) / int32."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"lsh_rank_fused takes fp16 / bf16 / fp32, got {x.dtype}")
    b, s, h, d = x.shape
    r = projections.shape[1]
    out = torch.empty(b, h, s, dtype=rank_dtype(r, narrow), device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    bd = max(16, triton.next_power_of_2(d))
    br = max(16, triton.next_power_of_2(r))
    # [BLOCK_D, BLOCK_R], zero-padded, in x's dtype (as the torch path rounds them)
    w = torch.zeros(bd, br, dtype=x.dtype, device=x.device)
    w[:d, :r] = projections.to(device=x.device, dtype=x.dtype)
    # fp32: IEEE dots, as torch's fp32 matmul. Interpreted (TRITON_INTERPRET=1): every dtype
    # goes through fp32 operands, exactly widened, since the interpreter multiplies bf16 dot
    # operands as their raw 16-bit patterns
    prec = "ieee" if x.dtype == torch.float32 or _INTERPRET else "tf32"
    bs = block_s(x.dtype)
    _lsh_rank[(triton.cdiv(s, bs) * b * h,)](
        x, w, out, s, h, b * h, x.stride(0), x.stride(1), x.stride(2), d, r,
        BLOCK_S=bs, BLOCK_D=bd, BLOCK_R=br, EVEN_D=d == bd, PREC=prec, num_warps=4)
    return out
