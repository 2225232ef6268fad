"""The JAX twin of :mod:`longattn.common.merge` and :mod:`longattn.common.dtypes`: the one
merge rule and the one accumulation-dtype rule of every JAX function in longattn.

* :func:`acc_dtype` -- float64 for float64 inputs, float32 for everything else.
* :func:`merge_stacked` -- merge ``n`` partials stacked on axis 0 (multi-way / split-K).
* :func:`finish_rows` -- ``num / den`` and ``m + log(den)`` of a max-shifted weighted sum.

Same conventions and rules as the torch functions: ``outs [n, *rows, D]``, ``lses [n, *rows]``;
a side with ``lse = -inf`` contributes nothing (its ``out`` is ignored, even a NaN); rows every
side misses give ``out = 0``, ``lse = -inf``; a NaN ``lse`` makes the row's ``out`` and ``lse``
NaN (``den == 0`` marks an empty row, which is False for NaN).
"""

from __future__ import annotations

import jax.numpy as jnp


def acc_dtype(dtype):
    """float64 for float64, float32 for everything else."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _shift(m):
    """The max-shift, 0 where the max is -inf (so ``exp(-inf - 0) = 0``, never NaN)."""
    return jnp.where(jnp.isneginf(m), 0.0, m)


def finish_rows(num, den, m):
    """``out = num / den`` and ``lse = m + log(den)`` with the empty-row rule: ``den == 0``
    gives ``out = 0``, ``lse = -inf``; a NaN stays NaN. ``num [*rows, D]``, ``den`` and
    ``m [*rows]`` (``m`` the shift, possibly ``-inf``)."""
    empty = den == 0
    safe = jnp.where(empty, 1.0, den)
    out = jnp.where(empty[..., None], 0.0, num / safe[..., None])
    lse = jnp.where(empty, -jnp.inf, _shift(m) + jnp.log(safe))
    return out, lse


def merge_stacked(outs, lses):
    """Merge the ``n`` partials ``outs [n, *rows, D]``, ``lses [n, *rows]`` stacked on axis 0.
    Returns ``(out [*rows, D], lse [*rows])`` in the accumulation dtype."""
    acc = acc_dtype(outs.dtype)
    lses = lses.astype(acc)
    dead = jnp.isneginf(lses)
    m = jnp.max(lses, axis=0)  # NaN if any side is NaN
    w = jnp.exp(lses - _shift(m))  # 0 for dead sides, NaN for NaN sides
    o = jnp.where(dead[..., None], 0.0, outs.astype(acc))
    return finish_rows(jnp.sum(o * w[..., None], axis=0), jnp.sum(w, axis=0), m)


__all__ = ["acc_dtype", "finish_rows", "merge_stacked"]
