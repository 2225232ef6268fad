"""longattn.tree.jax with per-row cache lengths (``cache_seqlens``) on 8 CPU devices, and the
per-device functions inside a user's own ``shard_map``."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
try:  # besides XLA_FLAGS (conftest.py); effective until the first backend initialisation
    jax.config.update("jax_num_cpu_devices", 8)
except Exception:  # noqa: BLE001 - older JAX, or backends already up (then XLA_FLAGS decides)
    pass

import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from longattn.common.testing import rel_error  # noqa: E402
from longattn.reference import attention  # noqa: E402
from longattn.tree.jax import (  # noqa: E402
    ring_decode,
    ring_decode_per_device,
    tree_decode,
    tree_decode_per_device,
)

# the user's own shard_map, through the one shim that spans JAX versions (jax.shard_map or
# jax.experimental.shard_map)
from longattn.tree.jax.decode import _shard_map as shard_map  # noqa: E402

P_DEV, B = 8, 5


def meshes():
    devs = np.array(jax.devices()[:P_DEV])
    assert devs.size == P_DEV, "conftest.py must force 8 host devices before jax loads"
    return [(Mesh(devs, ("i",)), "i"), (Mesh(devs.reshape(2, 4), ("node", "gpu")),
                                         ("node", "gpu"))]


def row_lengths(rng, cap):
    """``[device][row]`` lengths in ``[0, cap]``: random with empty pieces, a row empty on
    every device, a row of 2 keys (fewer than Lq = 4), a full row."""
    rows = rng.integers(0, cap + 1, size=(P_DEV, B))
    rows[rng.random((P_DEV, B)) < 0.3] = 0
    rows[:, 1] = 0
    rows[:, 2] = 0
    rows[5, 2] = 2
    rows[:, 4] = cap
    return rows.astype(np.int32)


def make(seed, lq, hq, hkv, d, cap, rows, dtype=np.float64):
    """q and the global ``k, v [B, p * cap, Hkv, D]``; the slots past each row's length hold
    large finite values (a leak would show)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, lq, hq, d))
    k = rng.standard_normal((B, P_DEV * cap, hkv, d))
    v = rng.standard_normal((B, P_DEV * cap, hkv, d))
    for i in range(P_DEV):
        for b in range(B):
            k[b, i * cap + rows[i, b]:(i + 1) * cap] = 1e3
            v[b, i * cap + rows[i, b]:(i + 1) * cap] = -1e3
    if dtype != np.float64:  # round once so the oracle sees the same inputs
        q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float64)) for x in (q, k, v))
    return q, k, v


def gathered(k, rows, cap):
    """Every row's cache: ``[B, N_max, Hkv, D]`` zero-padded, and ``N [B]``."""
    total = rows.sum(0)
    out = np.zeros((B, max(int(total.max()), 1)) + k.shape[2:])
    for b in range(B):
        out[b, :total[b]] = np.concatenate([k[b, i * cap:i * cap + rows[i, b]]
                                            for i in range(P_DEV)])
    return out, total


def oracle(q, k, v, rows, cap, causal):
    kf, n = gathered(k, rows, cap)
    vf, _ = gathered(v, rows, cap)
    lq = q.shape[1]
    j, t = np.arange(kf.shape[1])[None, None, :], np.arange(lq)[None, :, None]
    mask = j < n[:, None, None]
    if causal:
        mask = mask & (j <= n[:, None, None] - lq + t)
    return attention(q, kf, vf, mask=mask[:, None])


CASES = [  # (fn, mesh index, backend, dtype, tol, Lq, causal)
    (tree_decode, 0, "xla", jnp.float64, 1e-10, 4, True),
    (tree_decode, 1, "xla", jnp.float64, 1e-10, 1, True),
    (tree_decode, 1, "xla", jnp.float64, 1e-10, 4, False),
    (tree_decode, 0, "xla", jnp.bfloat16, 2e-2, 4, True),
    (tree_decode, 0, "xla_reduce", jnp.float64, 1e-10, 4, True),
    (tree_decode, 0, "pallas", jnp.float32, 1e-5, 4, True),
    (tree_decode, 0, "dpa", jnp.float32, 1e-5, 1, True),
    (ring_decode, 0, "xla", jnp.float64, 1e-10, 4, True),  # 8 unrolled hops: slow to compile
]


@pytest.mark.parametrize("fn,mi,backend,dtype,tol,lq,causal", CASES)
def test_jax_cache_seqlens_match_oracle(fn, mi, backend, dtype, tol, lq, causal):
    """``cache_seqlens [8, 5]`` (rows empty on some devices, one on all, one shorter than Lq),
    GQA, on a flat and a 2 x 4 mesh: every row equals float64 dense attention over its own
    cache; a row empty everywhere is exactly out 0, lse -inf."""
    mesh, axis = meshes()[mi]
    cap, d = 16, 16
    rows = row_lengths(np.random.default_rng(mi + lq), cap)
    q, k, v = make(lq + 10 * mi, lq, 4, 2, d, cap, rows, dtype)
    ref_out, ref_lse = oracle(q, k, v, rows, cap, causal)
    out, lse = fn(*(jnp.asarray(x, dtype) for x in (q, k, v)), mesh=mesh, axis_name=axis,
                  cache_seqlens=rows, causal=causal, backend=backend,
                  splits=2 if backend != "dpa" else None, return_lse=True)
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert rel_error(out, ref_out) <= tol and rel_error(lse, ref_lse) <= tol
    assert (out[1] == 0).all() and np.isneginf(lse[1]).all()


def test_jax_cache_seqlens_traced_and_equal_to_torch():
    """Under jax.jit with traced lengths (no recompiling as rows grow), tree_decode on 8
    devices equals torch's tree_decode over the same rows within 1e-12 (float64)."""
    import torch

    from longattn.tree import tree_decode as torch_tree

    mesh, axis = meshes()[1]
    cap, d = 8, 8
    step = jax.jit(lambda q, k, v, s: tree_decode(q, k, v, mesh=mesh, axis_name=axis,
                                                  cache_seqlens=s, return_lse=True))
    for seed in range(2):
        rows = row_lengths(np.random.default_rng(40 + seed), cap)
        q, k, v = make(40 + seed, 4, 4, 2, d, cap, rows)
        jo, jl = step(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(rows))
        kf, n = gathered(k, rows, cap)  # torch: one process holding every row
        vf, _ = gathered(v, rows, cap)
        to, tl = torch_tree(torch.from_numpy(q), torch.from_numpy(kf), torch.from_numpy(vf),
                            cache_seqlens=torch.from_numpy(n.astype(np.int32)),
                            return_lse=True)
        assert rel_error(np.asarray(jo), to.numpy()) <= 1e-12
        assert rel_error(np.asarray(jl), tl.numpy()) <= 1e-12
    assert step._cache_size() == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_per_device_inside_a_user_shard_map_equals_dot_product_attention(dtype):
    """The user writes the shard_map (here around their own step: a scale of q, the decode,
    a residual add); tree_decode_per_device / ring_decode_per_device inside it equal
    ``jax.nn.dot_product_attention`` over the whole cache (causal, bottom-right aligned, the
    per-row lengths in its mask) within 1e-5 (float32) and 1e-6 (float64: JAX computes that
    softmax in float32 whatever the input dtype), and in float64 the float64 oracle within
    1e-12."""
    devs = np.array(jax.devices()[:P_DEV])
    mesh = Mesh(devs, ("sp",))
    cap, d, lq, hq, hkv = 8, 16, 4, 4, 2
    rng = np.random.default_rng(7)
    rows = rng.integers(1, cap + 1, size=(P_DEV, B)).astype(np.int32)
    q, k, v = make(7, lq, hq, hkv, d, cap, rows)
    ref_out, _ = oracle(q * 0.5, k, v, rows, cap, True)
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    kf, n = gathered(np.asarray(k, np.float64), rows, cap)
    vf, _ = gathered(np.asarray(v, np.float64), rows, cap)
    j, t = np.arange(kf.shape[1])[None, None, :], np.arange(lq)[None, :, None]
    mask = (j <= n[:, None, None] - lq + t) & (j < n[:, None, None])
    want = jax.nn.dot_product_attention(q * 0.5, jnp.asarray(kf, dtype), jnp.asarray(vf, dtype),
                                        mask=jnp.asarray(mask[:, None])) + q

    def user_step(q, k, v, seqlens, *, decode):
        o = decode(q * 0.5, k, v, axis_name="sp", cache_seqlens=seqlens[0])
        return o + q

    kv = P(None, "sp")
    # the ring's out is the same on every device only up to rounding: no replication check;
    # its 8 unrolled hops compile slowly, so float32 only (the oracle test covers float64)
    runs = [(tree_decode_per_device, True)]
    if dtype == jnp.float32:
        runs.append((ring_decode_per_device, False))
    for decode, check in runs:
        f = jax.jit(shard_map(functools.partial(user_step, decode=decode), mesh,
                              (P(), kv, kv, P("sp")), P(), check))
        got = f(q, k, v, jnp.asarray(rows))
        assert got.dtype == dtype
        tol = 1e-5 if dtype == jnp.float32 else 1e-6
        assert rel_error(np.asarray(got, np.float64), np.asarray(want, np.float64)) <= tol
        if dtype == jnp.float64:
            exact = np.asarray(got, np.float64) - np.asarray(q, np.float64)
            assert rel_error(exact, ref_out) <= 1e-12


def test_per_device_outside_shard_map_names_the_axis():
    q = jnp.zeros((1, 1, 2, 8))
    k = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="axis_name 'sp' is not bound"):
        tree_decode_per_device(q, k, k, axis_name="sp")


@pytest.mark.parametrize("lens,word", [
    (np.zeros((P_DEV, B + 1), np.int32), "cache_seqlens must be integers of shape"),
    (np.zeros((P_DEV, B), np.float32), "cache_seqlens must be integers"),
    (np.full((P_DEV, B), 7, np.int32), r"cache_seqlens must lie in \[0, 6\]"),
    (np.full((P_DEV, B), -1, np.int32), r"cache_seqlens must lie in \[0, 6\]"),
    ("both", "not both"),
])
def test_jax_bad_cache_seqlens(lens, word):
    mesh, _ = meshes()[0]
    q = jnp.zeros((B, 1, 4, 8))
    k = jnp.zeros((B, P_DEV * 6, 2, 8))
    kw = dict(cache_seqlens=lens)
    if isinstance(lens, str):
        kw = dict(cache_seqlens=np.zeros((P_DEV, B), np.int32), shard_lens=[6] * P_DEV)
    for fn in (tree_decode, ring_decode):
        with pytest.raises(ValueError, match=word):
            fn(q, k, k, mesh=mesh, axis_name="i", **kw)
