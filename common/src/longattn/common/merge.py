"""Merge attention partials computed over disjoint key sets (the log-sum-exp rule).

``out`` is BSHD ``[B, S, H, D]``, ``lse`` is ``[B, H, S]``. ``out`` is merged in the
accumulation dtype (float32, float64 for float64 ``out``); ``lse`` and the merge weights in the
widest of the two ``lse`` dtypes and that accumulation dtype (a float64 ``lse``, what float32
inputs get, stays float64: see :func:`~longattn.common.dtypes.lse_dtype`). The sigmoid form
``out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)`` never overflows; rows where one side is
``-inf`` take the other side exactly, and rows where both are ``-inf`` stay ``out = 0, lse =
-inf`` (no NaN). A NaN ``lse`` on either side makes the row's ``out`` and ``lse`` NaN: a NaN
never disappears in a merge. So does a ``+inf`` ``lse``, which no partial has (a row that sees
no key has ``-inf``; flash-attn's kernels write ``+inf`` for rows whose sum was 0 or NaN): every
merge, eager or Triton, two-way or stacked, gives such a row NaN. ``merge_slots`` merges ``n``
partials kept in the slots of a stacked buffer (the front rows from the first ``n_front`` slots
only, the others never read) in one pass, same rules."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from longattn.common.dtypes import acc_dtype


def _dead(lse):
    """[B, H, S] -> [B, S, H, 1] mask of rows with lse = -inf."""
    return torch.isneginf(lse).transpose(1, 2).unsqueeze(-1)


def _bad_lse(lse_a, lse_b):
    """[B, H, S] mask of rows whose lse is NaN or +inf on either side (the row comes out NaN)."""
    return torch.isnan(lse_a) | torch.isnan(lse_b) | torch.isposinf(lse_a) | torch.isposinf(lse_b)


def _nan_rows(lse_a, lse_b):
    """[B, H, S] x 2 -> [B, S, H, 1] mask of :func:`_bad_lse` rows, in out's layout."""
    return _bad_lse(lse_a, lse_b).transpose(1, 2).unsqueeze(-1)


def _weights(lse_a: torch.Tensor, lse_b: torch.Tensor):
    """(w_b [B,H,S], new_lse) with w_b = exp(lse_b - new_lse), exact at -inf."""
    a_dead = torch.isneginf(lse_a)
    b_dead = torch.isneginf(lse_b)
    diff = torch.where(a_dead | b_dead, torch.zeros_like(lse_a), lse_b - lse_a)
    w_b = torch.sigmoid(diff)
    w_b = torch.where(a_dead, torch.ones_like(w_b), w_b)
    w_b = torch.where(b_dead, torch.zeros_like(w_b), w_b)
    # lse_a - logsigmoid(lse_a - lse_b) == logaddexp(lse_a, lse_b), stable for finite values
    new = lse_a - F.logsigmoid(-diff)
    new = torch.where(a_dead, lse_b, new)
    new = torch.where(b_dead, lse_a, new)
    return w_b, new


def _lse_dtype(acc, *lses):
    """The widest of ``acc`` and the ``lse`` tensors' dtypes."""
    dt = acc
    for t in lses:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _check(out_a, lse_a, out_b, lse_b, names=("out_a", "lse_a", "out_b", "lse_b")):
    for name, t in zip(names, (out_a, lse_a, out_b, lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out_a.ndim != 4:
        raise ValueError(f"{names[0]} must be [B, S, H, D], got {tuple(out_a.shape)}")
    want = (out_a.shape[0], out_a.shape[2], out_a.shape[1])
    if out_b.shape != out_a.shape:
        raise ValueError(f"{names[2]} shape {tuple(out_b.shape)} must match {names[0]} shape "
                         f"{tuple(out_a.shape)}")
    for name, t in ((names[1], lse_a), (names[3], lse_b)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be [B, H, S] = {want} for out [B, S, H, D] = "
                             f"{tuple(out_a.shape)}, got {tuple(t.shape)}")


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Return ``(out, lse)`` of attention over the union of the two partials' keys.

    Differentiable (autograd flows through both sides). ``out`` is returned in the
    accumulation dtype (float32, or float64 for float64 inputs), ``lse`` in the wider of the
    two ``lse`` dtypes (at least that accumulation dtype).
    """
    _check(out_a, lse_a, out_b, lse_b)
    # both sides' outs: the result must not depend on the order of the arguments
    acc = acc_dtype(torch.promote_types(out_a.dtype, out_b.dtype))
    ldt = _lse_dtype(acc, lse_a, lse_b)
    lse_a, lse_b = lse_a.to(ldt), lse_b.to(ldt)
    w_b, lse = _weights(lse_a, lse_b)
    w = w_b.transpose(1, 2).unsqueeze(-1).to(acc)  # [B, S, H, 1]
    a_dead, b_dead = _dead(lse_a), _dead(lse_b)
    # A dead side (lse = -inf) contributes nothing, whatever its out holds (even NaN): zero it
    # before the arithmetic, then select exactly.
    oa = torch.where(a_dead, 0.0, out_a.to(acc))
    ob = torch.where(b_dead, 0.0, out_b.to(acc))
    out = torch.where(a_dead, ob, oa - w * (oa - ob))
    out = torch.where(b_dead, oa, out)
    out = torch.where(_nan_rows(lse_a, lse_b), float("nan"), out)
    return out, torch.where(_bad_lse(lse_a, lse_b), float("nan"), lse)


@torch.no_grad()
def merge_partials_(out, lse, out_b, lse_b, *, backend: str = "auto"):
    """In-place merge of ``(out_b, lse_b)`` into the accumulators ``out`` / ``lse``.

    ``out`` and ``lse`` must already be accumulators (float32 or float64 each; a float64 ``lse``
    beside a float32 ``out`` is what float32 inputs use); they may be views (e.g. the back half
    of the rows, as zigzag ring attention needs). ``lse_b`` is taken in ``lse``'s dtype, the
    weights are computed in it. Returns ``(out, lse)``.
    ``backend``: ``"auto"`` uses the one-pass Triton kernel (:mod:`longattn.common.merge_triton`)
    for CUDA fp32 ``out`` and ``lse`` accumulators and eager torch otherwise (also for a float64
    ``lse``); ``"torch"`` / ``"triton"`` force one.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    _check(out, lse, out_b, lse_b, ("out", "lse", "out_b", "lse_b"))
    for name, t in (("out", out), ("lse", lse)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"accumulator {name} must be float32 or float64, got {t.dtype}")
    if backend == "triton" or (backend == "auto" and out.is_cuda):
        refusal = _triton_refusal(out, lse, out_b, lse_b)
        if refusal is None:
            from longattn.common import merge_triton

            return merge_triton.merge_(out, lse, out_b, lse_b)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot serve this merge: {refusal}")
    w_b, new = _weights(lse, lse_b.to(lse.dtype))
    w = w_b.transpose(1, 2).unsqueeze(-1).to(out.dtype)
    a_dead, b_dead, nan = _dead(lse), _dead(lse_b), _nan_rows(lse, lse_b)
    ob = torch.where(b_dead, 0.0, out_b.to(out.dtype))
    oa = out.masked_fill_(a_dead, 0.0)
    res = torch.where(a_dead, ob, oa - w * (oa - ob))
    out.copy_(torch.where(nan, float("nan"), torch.where(b_dead, oa, res)))
    lse.copy_(torch.where(_bad_lse(lse, lse_b), float("nan"), new))
    return out, lse


def _triton_refusal(out, lse, out_b, lse_b):
    """Why the one-pass Triton merge cannot serve this call, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from longattn.common import merge_triton

    return merge_triton.refusal(out, lse, out_b, lse_b)


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor):
    """Merge ``n`` partials stacked on dim 0 (the multi-way / split-K merge).

    ``outs [n, *rows, D]`` and ``lses [n, *rows]`` where ``rows`` is ``out``'s row shape in
    ``lse``'s order (BSHD partials stack as ``outs [n, B, S, H, D]`` with ``lses [n, B, S, H]``;
    pass ``lse.transpose(-1, -2)`` for ``[B, H, S]`` statistics). Returns ``(out, lse)`` with
    ``out [*rows, D]`` in the accumulation dtype and ``lse [*rows]`` in the wider of ``lses``'s
    dtype and the accumulation dtype (weights are computed in that dtype).

    A side with ``lse = -inf`` contributes nothing (its ``out`` is ignored); rows every side
    misses give ``out = 0``, ``lse = -inf``; a NaN ``lse`` makes the row's ``out`` and ``lse``
    NaN (a NaN never disappears in a merge).
    """
    _check_stacked(outs, lses)
    acc = acc_dtype(outs.dtype)
    lses = lses.to(_lse_dtype(acc, lses))
    dead = torch.isneginf(lses)
    m = lses.amax(0)
    m0 = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - m0)  # 0 for dead sides, NaN for NaN sides
    o = torch.where(dead.unsqueeze(-1), 0.0, outs.to(acc))
    num = (o * w.to(acc).unsqueeze(-1)).sum(0)
    den = w.sum(0)
    return finish_rows(num, den, m)


def _check_stacked(outs, lses):
    for name, t in (("outs", outs), ("lses", lses)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if outs.ndim < 2 or outs.shape[0] < 1:
        raise ValueError(f"outs must be [n >= 1, *rows, D], got {tuple(outs.shape)}")
    if lses.shape != outs.shape[:-1]:
        raise ValueError(f"lses must be [n, *rows] = {tuple(outs.shape[:-1])} for outs "
                         f"{tuple(outs.shape)}, got {tuple(lses.shape)}")


def finish_rows(num: torch.Tensor, den: torch.Tensor, m: torch.Tensor):
    """``out = num / den`` and ``lse = m + log(den)`` from a max-shifted weighted sum, with the
    empty-row rule: ``den = 0`` gives ``out = 0``, ``lse = -inf``; a NaN stays NaN.

    ``num [*rows, D]``, ``den`` and ``m [*rows]`` (``m`` the shift, possibly ``-inf``). ``out``
    comes back in ``num``'s dtype, ``lse`` in the wider of ``den``'s and ``m``'s (the log is
    taken in it: a float32 row max ``m`` cast to float64 gives a float64 ``lse``)."""
    ldt = torch.promote_types(den.dtype, m.dtype)
    empty = den == 0  # False for NaN: NaN rows stay NaN
    safe = torch.where(empty, torch.ones_like(den), den)
    out = torch.where(empty.unsqueeze(-1), 0.0, num / safe.to(num.dtype).unsqueeze(-1))
    m0 = torch.where(torch.isneginf(m), torch.zeros_like(m), m).to(ldt)
    lse = torch.where(empty, torch.full_like(m0, float("-inf")),
                      m0 + torch.log(safe.to(ldt)))
    return out, lse


@torch.no_grad()
def merge_slots(outs, lses, *, n_front=None, split: int = 0, out_dtype=None,
                backend: str = "auto"):
    """Merge ``n`` partials kept in slots: ``outs [n, B, S, H, D]``, ``lses [n, B, H, S]``;
    returns ``(out [B, S, H, D], lse [B, H, S])``.

    Rows ``s < split`` merge only the first ``n_front`` slots (default ``n``), rows
    ``s >= split`` all ``n``: zigzag ring attention keeps each step's partial in a slot and puts
    the steps that cover only the back half of the query rows last; their slots' front rows are
    never read (they may hold anything, NaN included). Dead sides, empty rows and NaN as in
    :func:`merge_stacked`. The math is done in the accumulation dtype (float32, float64 for
    float64 ``outs``) and rounded once into ``out_dtype`` (default: that accumulation dtype);
    ``lse`` comes back in the wider of ``lses``'s dtype and the accumulation dtype.
    ``backend``: ``"auto"`` uses the one-pass Triton kernel
    (:func:`longattn.common.merge_triton.merge_slots`) for CUDA ``outs`` with float32 ``lses``
    and the eager twin otherwise; ``"torch"`` / ``"triton"`` force one.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    n_front, split = _check_slots(outs, lses, n_front, split)
    acc = acc_dtype(outs.dtype)
    out_dtype = acc if out_dtype is None else out_dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    if backend == "triton" or (backend == "auto" and outs.is_cuda):
        refusal = _slots_refusal(outs, lses)
        if refusal is None:
            from longattn.common import merge_triton

            _, b, s, h, d = outs.shape
            out = torch.empty((b, s, h, d), dtype=out_dtype, device=outs.device)
            lse = torch.empty((b, h, s), dtype=torch.float32, device=outs.device)
            return merge_triton.merge_slots(outs, lses, n_front, split, out, lse)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot serve this merge: {refusal}")
    return _merge_slots_torch(outs, lses, n_front, split, out_dtype)


def _index(name, v, hi, hi_name):
    """``v`` as an int in ``[0, hi]``, else an error naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 0 <= v <= hi:
        raise ValueError(f"{name} must be in [0, {hi_name} = {hi}], got {v}")
    return v


def _check_slots(outs, lses, n_front, split):
    """Validate :func:`merge_slots`'s arguments; returns ``(n_front, split)`` as ints."""
    for name, t in (("outs", outs), ("lses", lses)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if outs.ndim != 5:
        raise ValueError(f"outs must be [n, B, S, H, D], got {tuple(outs.shape)}")
    n, b, s, h, _ = outs.shape
    if tuple(lses.shape) != (n, b, h, s):
        raise ValueError(f"lses must be [n, B, H, S] = {(n, b, h, s)} for outs [n, B, S, H, D] "
                         f"= {tuple(outs.shape)}, got {tuple(lses.shape)}")
    if not outs.is_floating_point():
        raise TypeError(f"outs must be a floating tensor, got {outs.dtype}")
    if lses.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lses must be float32 or float64, got {lses.dtype}")
    if lses.device != outs.device:
        raise ValueError(f"lses is on {lses.device}, outs on {outs.device}")
    n_front = n if n_front is None else _index("n_front", n_front, n, "n")
    return n_front, _index("split", split, s, "S")


def _slots_refusal(outs, lses):
    """Why the one-pass Triton slots merge cannot serve this call, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from longattn.common import merge_triton

    return merge_triton.slots_refusal(outs, lses)


def _merge_slots_torch(outs, lses, n_front, split, out_dtype):
    """The eager twin of :func:`merge_slots`: :func:`merge_stacked` on the front rows' first
    ``n_front`` slots and on the back rows' ``n`` slots."""
    front = _merge_rows(outs[:n_front, :, :split], lses[:n_front, :, :, :split])
    back = _merge_rows(outs[:, :, split:], lses[:, :, :, split:])
    out = torch.cat([front[0], back[0]], dim=1).to(out_dtype)
    return out, torch.cat([front[1], back[1]], dim=2)


def _merge_rows(outs, lses):
    """:func:`merge_stacked` of ``outs [k, B, S, H, D]``, ``lses [k, B, H, S]`` (BSHD
    ``[B, H, S]`` lse back), also for ``k = 0`` or no rows: ``out = 0``, ``lse = -inf``."""
    _, b, s, h, d = outs.shape
    acc = acc_dtype(outs.dtype)
    if outs.shape[0] == 0 or lses.numel() == 0:
        out = torch.zeros((b, s, h, d), dtype=acc, device=outs.device)
        lse = torch.full((b, h, s), float("-inf"), dtype=_lse_dtype(acc, lses),
                         device=outs.device)
        return out, lse
    out, lse = merge_stacked(outs, lses.transpose(-1, -2))
    return out, lse.transpose(-1, -2)
