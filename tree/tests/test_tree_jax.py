"""longattn.tree.jax on 8 CPU devices (conftest.py sets the XLA flag) against the oracle."""

from __future__ import annotations

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

from longattn.common.testing import rel_error, run_world  # noqa: E402
from longattn.reference import attention, causal_mask  # noqa: E402
from longattn.tree.jax import (  # noqa: E402
    collective_bytes,
    finish_rows,
    local_attention,
    lower,
    merge_stacked,
    ring_decode,
    tree_decode,
)

P_DEV = 8


def meshes():
    devs = np.array(jax.devices()[:P_DEV])
    assert devs.size == P_DEV, "conftest.py must force 8 host devices before jax loads"
    return [(Mesh(devs, ("i",)), "i"), (Mesh(devs.reshape(2, 4), ("node", "gpu")),
                                         ("node", "gpu"))]


def make(seed, b, lq, hq, hkv, d, cap, lens, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, hq, d))
    k = rng.standard_normal((b, P_DEV * cap, hkv, d))
    v = rng.standard_normal((b, P_DEV * cap, hkv, d))
    if dtype != np.float64:  # round once so the oracle sees the same inputs
        q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float64)) for x in (q, k, v))
    return q, k, v, np.asarray(lens, np.int32)


def gather(x, lens, cap):
    return np.concatenate([x[:, i * cap:i * cap + n] for i, n in enumerate(lens)], 1)


def oracle(q, k, v, lens, cap, causal):
    kf, vf = gather(k, lens, cap), gather(v, lens, cap)
    mask = causal_mask(q.shape[1], kf.shape[1]) if causal else None
    return attention(q, kf, vf, mask=mask)


LENS = [[6, 0, 3, 2, 0, 5, 1, 4], [0, 0, 0, 0, 0, 0, 0, 2], [6] * 8, [1, 6, 0, 0, 6, 0, 0, 0]]
SHAPES = [(1, 1, 4, 2), (3, 4, 4, 2), (3, 4, 3, 3)]  # (B, Lq, Hq, Hkv)


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.bfloat16, 2e-2)])
def test_jax_tree_and_ring_match_oracle(dtype, tol):
    cap, d = 6, 8
    # every (mesh, shape) for the tree in float64; fewer compiles for the rest (CPU time)
    runs = []
    for mi, (mesh, axis) in enumerate(meshes()):
        for si, shape in enumerate(SHAPES):
            if dtype == jnp.float64 or (mi == 0 and si < 2):
                runs.append((tree_decode, mesh, axis, si, shape))
            if mi == 0 and (si < 2 if dtype == jnp.float64 else si == 1):
                runs.append((ring_decode, mesh, axis, si, shape))
    for fn, mesh, axis, si, (b, lq, hq, hkv) in runs:
        for li, lens in enumerate(LENS):
            causal = (si + li) % 4 != 3
            q, k, v, ln = make(10 * si + li, b, lq, hq, hkv, d, cap, lens, dtype)
            ref_out, ref_lse = oracle(q, k, v, ln, cap, causal)
            args = [jnp.asarray(x, dtype) for x in (q, k, v)]
            out, lse = fn(*args, mesh=mesh, axis_name=axis, shard_lens=ln, causal=causal,
                          return_lse=True)
            assert out.dtype == dtype and out.shape == q.shape
            assert lse.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
            e = max(rel_error(np.asarray(out, np.float64), ref_out),
                    rel_error(np.asarray(lse, np.float64), ref_lse))
            assert e <= tol, (fn.__name__, axis, b, lq, hq, hkv, lens, e)


@pytest.mark.parametrize("backend,dtype,tol", [("xla_reduce", jnp.float64, 1e-10),
                                            # float64 is interpreted only; it accumulated in
                                            # float32 (1e-7 off) before
                                            ("pallas", jnp.float64, 1e-10),
                                            ("pallas", jnp.float32, 1e-5),
                                            ("pallas", jnp.bfloat16, 2e-2),
                                            ("dpa", jnp.float32, 1e-5)])
def test_jax_local_backends(backend, dtype, tol):
    """The other local kernels (Pallas runs interpreted on the CPU) inside tree_decode."""
    mesh, axis = meshes()[0]
    cap, d = 32, 16
    for b, lq, hq, hkv in SHAPES[:2]:
        if backend == "dpa" and lq > 1:
            continue
        for lens in ([32, 0, 17, 5, 0, 32, 1, 9], [0] * 7 + [3]):
            q, k, v, ln = make(3, b, lq, hq, hkv, d, cap, lens, dtype)
            ref_out, _ = oracle(q, k, v, ln, cap, True)
            out = tree_decode(*(jnp.asarray(x, dtype) for x in (q, k, v)), mesh=mesh,
                              axis_name=axis, shard_lens=ln, backend=backend,
                              splits=2 if backend != "dpa" else None)
            assert rel_error(np.asarray(out, np.float64), ref_out) <= tol


_local_jit = jax.jit(local_attention, static_argnames=("softmax_scale", "splits", "backend"))


def test_jax_local_splits_match_oracle():
    rng = np.random.default_rng(1)
    b, lq, hq, hkv, d, s = 2, 3, 4, 2, 8, 24
    q, k, v = (rng.standard_normal(sh) for sh in ((b, lq, hq, d), (b, s, hkv, d),
                                                  (b, s, hkv, d)))
    for valid, limit in ((24, None), (17, 10), (0, None), (9, -2)):
        vis = np.arange(s)[None, :] < valid
        if limit is not None:
            vis = vis & (np.arange(s)[None, :] <= limit + np.arange(lq)[:, None])
        ref_out, ref_lse = attention(q, k, v, mask=np.broadcast_to(vis, (lq, s)))
        for splits in (1, 3, 8):
            out, lse = _local_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                  softmax_scale=d ** -0.5, valid_len=valid, limit=limit,
                                  splits=splits)
            assert rel_error(np.asarray(out), ref_out) <= 1e-12
            assert rel_error(np.asarray(lse), ref_lse) <= 1e-12


def test_jax_under_jit_with_traced_lengths():
    mesh, axis = meshes()[1]
    cap, d = 6, 8
    q, k, v, _ = make(5, 3, 4, 4, 2, d, cap, [6] * 8)
    step = jax.jit(lambda q, k, v, ln: tree_decode(q, k, v, mesh=mesh, axis_name=axis,
                                                   shard_lens=ln))
    for lens in LENS:
        ln = np.asarray(lens, np.int32)
        ref_out, _ = oracle(q, k, v, ln, cap, True)
        out = step(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(ln))
        assert rel_error(np.asarray(out), ref_out) <= 1e-10


def test_jax_collective_bytes_exact():
    """tree: one all-reduce of lse (B*Hq*Lq) and one of [num | den] (B*Lq*Hq*(D+1)) per
    reduction axis, whatever the cache length; ring: 2 (p - 1) KV-block permutes."""
    b, lq, hq, hkv, d = 3, 2, 4, 2, 8
    for mesh, axis in meshes():
        naxes = 1 if isinstance(axis, str) else len(axis)
        seen = []
        for cap in (4, 512):
            q = jnp.zeros((b, lq, hq, d))
            k = jnp.zeros((b, P_DEV * cap, hkv, d))
            tree = collective_bytes(lower("tree", q, k, k, mesh=mesh, axis_name=axis)
                                    .compile().as_text())
            assert sorted(tree) == ["all-reduce"]
            assert sorted(tree["all-reduce"]) == sorted([b * hq * lq * 8] * naxes
                                                        + [b * lq * hq * (d + 1) * 8] * naxes)
            seen.append(tree)
            if naxes == 1:
                ring = collective_bytes(lower("ring", q, k, k, mesh=mesh, axis_name=axis)
                                        .compile().as_text())
                assert ring["collective-permute"] == [b * cap * hkv * d * 8] * (2 * (P_DEV - 1))
        assert seen[0] == seen[1]


def _torch_world(rank, world, q, k, v, lens, cap):
    import torch
    import torch.distributed as dist

    from longattn.tree import tree_decode as torch_tree

    off = rank * cap
    kk = torch.from_numpy(k[:, off:off + lens[rank]].copy())
    vv = torch.from_numpy(v[:, off:off + lens[rank]].copy())
    return torch_tree(torch.from_numpy(q), kk, vv, group=dist.group.WORLD, return_lse=True)


def test_jax_and_torch_agree():
    cap, d = 6, 8
    mesh, axis = meshes()[0]
    for seed, lens in enumerate(LENS[:2]):
        q, k, v, ln = make(40 + seed, 3, 4, 4, 2, d, cap, lens)
        jo, jl = tree_decode(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mesh=mesh,
                             axis_name=axis, shard_lens=ln, return_lse=True)
        to, tl = run_world(P_DEV, _torch_world, q, k, v, [int(x) for x in ln], cap)[0]
        assert rel_error(np.asarray(jo), to.numpy()) <= 1e-12
        assert rel_error(np.asarray(jl), tl.numpy()) <= 1e-12


@pytest.mark.parametrize("change,word", [
    (dict(seq=47), "divisible"), (dict(lens=[7] + [0] * 7), "shard_lens"),
    (dict(lens=[1, 2]), "shard_lens"), (dict(hkv=4), "heads"), (dict(axis="x"), "axis"),
    (dict(scale=float("inf")), "softmax_scale"), (dict(backend="flash"), "backend"),
    (dict(lq=0), "Lq"), (dict(dtype=True), "dtype"), (dict(causal=1), "causal"),
    (dict(splits=0), "splits"), (dict(splits="a"), "splits"), (dict(splits=True), "splits"),
    (dict(splits=4), "splits"),  # does not divide the block length 6
])
def test_jax_bad_input(change, word):
    mesh, _ = meshes()[0]
    b, lq, hq, d = 2, change.get("lq", 1), 6, 8
    hkv = change.get("hkv", 2)
    seq = change.get("seq", 48)
    q = jnp.zeros((b, lq, hq, d), jnp.float32)
    k = jnp.zeros((b, seq, hkv, d), jnp.float64 if change.get("dtype") else jnp.float32)
    v = jnp.zeros((b, seq, hkv, d), k.dtype)
    kw = dict(mesh=mesh, axis_name=change.get("axis", "i"), shard_lens=change.get("lens"),
              softmax_scale=change.get("scale"), backend=change.get("backend", "xla"),
              causal=change.get("causal", True), splits=change.get("splits"))
    for fn in (tree_decode, ring_decode):
        with pytest.raises((ValueError, TypeError), match=word):
            fn(q, k, v, **kw)


def test_jax_merge_twin_matches_common_merge():
    """tree.jax.merge_stacked / finish_rows against longattn.common.merge (the torch rules):
    equal values, dead sides ignored (even a NaN out), empty rows 0 / -inf, NaN stays NaN."""
    import torch

    from longattn.common import merge as tm

    rng = np.random.default_rng(2)
    outs = rng.standard_normal((3, 2, 5, 4, 8))
    lses = rng.standard_normal((3, 2, 5, 4)) * 3
    lses[0, 0, 0] = -np.inf  # one side dead
    outs[0, 0, 0] = np.nan  # ... whatever its out holds
    lses[:, 0, 1] = -np.inf  # every side dead: an empty row
    lses[1, 1, 2, 3] = np.nan  # a NaN side
    jo, jl = merge_stacked(jnp.asarray(outs), jnp.asarray(lses))
    to, tl = tm.merge_stacked(torch.from_numpy(outs), torch.from_numpy(lses))
    np.testing.assert_allclose(np.asarray(jo), to.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(jl), tl.numpy(), rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(jo)[0, 1] == 0) and np.all(np.isneginf(np.asarray(jl)[0, 1]))
    assert np.all(np.isnan(np.asarray(jo)[1, 2, 3])) and np.isnan(np.asarray(jl)[1, 2, 3])
    assert np.isfinite(np.asarray(jo)[0, 0]).all()
    den = np.abs(lses[2])
    den[0, 0] = 0.0  # empty rows
    fo, fl = finish_rows(jnp.asarray(outs[0]), jnp.asarray(den), jnp.asarray(lses[1]))
    to, tl = tm.finish_rows(*(torch.from_numpy(x) for x in (outs[0], den, lses[1])))
    np.testing.assert_allclose(np.asarray(fo), to.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(fl), tl.numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend,dtype", [("xla", jnp.float64), ("xla_reduce", jnp.float64),
                                           ("pallas", jnp.float32)])
def test_jax_nan_key_makes_the_rows_that_see_it_nan(backend, dtype):
    """A NaN in one key of one block: exactly the rows that see it are NaN in out and lse
    (tree and ring); the others match the oracle."""
    mesh, axis = meshes()[0]
    cap, d = 16, 16
    lens = [16, 3, 0, 16, 9, 0, 16, 4]  # N = 64
    q, k, v, ln = make(8, 2, 3, 4, 2, d, cap, lens, dtype)
    ref_out, ref_lse = oracle(q, k, v, ln, cap, True)
    k = k.copy()
    k[0, 4 * cap + 6, 0, 1] = np.nan  # block 4 slot 6: global key 16 + 3 + 16 + 6 = 41
    want = np.zeros((2, 3, 4), bool)  # [B, Lq, Hq]; token t sees keys <= 61 + t: all
    want[0, :, :2] = True  # batch 0, the q heads of KV head 0
    for fn in (tree_decode, ring_decode):
        out, lse = fn(*(jnp.asarray(x, dtype) for x in (q, k, v)), mesh=mesh, axis_name=axis,
                      shard_lens=ln, backend=backend, splits=2, return_lse=True)
        out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64).transpose(0, 2, 1)
        assert np.array_equal(np.isnan(out).any(-1), want), (fn.__name__, backend)
        assert np.array_equal(np.isnan(out).all(-1), want), (fn.__name__, backend)
        assert np.array_equal(np.isnan(lse), want), (fn.__name__, backend)
        tol = 1e-10 if dtype == jnp.float64 else 1e-5
        assert rel_error(out[~want], ref_out[~want]) <= tol
        assert rel_error(lse[~want], ref_lse.transpose(0, 2, 1)[~want]) <= tol
