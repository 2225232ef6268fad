"""The canonical ``ring_swa_attn``: its window rule, ``return_lse``, and the one rule of
``group=None`` / ``cp_group=None`` (this process alone, or an error on every rank of a
multi-rank world); a 1-D DeviceMesh as the group; ``LOCAL``."""

from __future__ import annotations

import pytest
import torch

from longattn.common.dist import LOCAL
from longattn.common.testing import rel_error, run_world
from longattn.ring_swa import (
    ring_sliding_window_attn,
    ring_streaming_llm_attn_varlen,
    ring_swa_attn,
)
from longattn.ring_swa.cases import cu_seqlens, errors, global_inputs, run_case, shard


def _qkv(s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, s, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2)]


def test_window_pairs():
    q, k, v = _qkv()
    ref = ring_sliding_window_attn(q, k, v, 3)
    # causal=True caps right at 0 (flash-attn's rule): (3, -1), (3, 0) and (3, 5) are one window
    for right in (-1, 0, 5):
        out = ring_swa_attn(q, k, v, window_size=(3, right))
        assert rel_error(out, ref) == 0.0, right
    assert rel_error(ring_swa_attn(q, k, v, window_size=(3, 0), causal=False), ref) == 0.0
    # left = -1 (or any left >= the sequence) is plain causal attention
    full = ring_sliding_window_attn(q, k, v, 11)
    for left in (-1, 11, 10**15):
        assert rel_error(ring_swa_attn(q, k, v, window_size=(left, 0)), full) <= 1e-15, left
    for bad in ((3, -1), (3, 2)):
        with pytest.raises(ValueError, match="window_size"):
            ring_swa_attn(q, k, v, window_size=bad, causal=False)
    for bad, err in ((3, TypeError), ((3,), TypeError), ((-2, 0), ValueError),
                     ((2.0, 0), TypeError), (None, TypeError)):
        with pytest.raises(err, match="window_size"):
            ring_swa_attn(q, k, v, window_size=bad)
    with pytest.raises(TypeError, match="causal"):
        ring_swa_attn(q, k, v, window_size=(3, 0), causal=1)
    with pytest.raises(TypeError, match="return_lse"):
        ring_swa_attn(q, k, v, window_size=(3, 0), return_lse="yes")
    with pytest.raises(ValueError, match="softmax_scale"):
        ring_swa_attn(q, k, v, window_size=(3, 0), softmax_scale=float("inf"))
    with pytest.raises(ValueError, match="num_sink_tokens"):
        ring_swa_attn(q, k, v, window_size=(3, 0), num_sink_tokens=-1)
    with pytest.raises(ValueError, match="backend"):
        ring_swa_attn(q, k, v, window_size=(3, 0), backend="no-such-kernel")
    with pytest.raises(ValueError, match="backend 'aten'"):  # a CUDA kernel on CPU tensors
        ring_swa_attn(q, k, v, window_size=(3, 0), backend="aten")


def test_return_lse_matches_oracle():
    from longattn.reference import attention, causal_mask, document_mask, sink_mask, window_mask

    q, k, v = _qkv(s=16, seed=3)
    out, lse = ring_swa_attn(q, k, v, window_size=(5, 0), num_sink_tokens=2,
                             softmax_scale=0.3, return_lse=True)
    m = window_mask(16, 16, (5, 0)) & causal_mask(16) | sink_mask(16, 16, 2)
    ro, rl = attention(*(t.numpy() for t in (q, k, v)), mask=m, scale=0.3)
    assert out.shape == q.shape and lse.shape == (2, 4, 16) and lse.dtype == torch.float64
    assert rel_error(out, ro) <= 1e-12 and rel_error(lse, rl) <= 1e-12
    # varlen: lse is [Hq, T]
    cu = torch.tensor([0, 5, 6, 16], dtype=torch.int32)
    out, lse = ring_swa_attn(q[0], k[0], v[0], window_size=(5, 0), cu_seqlens=cu,
                             num_sink_tokens=2, softmax_scale=0.3, return_lse=True)
    m = document_mask(cu.numpy(), cu.numpy(), causal=True, window=(5, 0), num_sink_tokens=2)
    ro, rl = attention(*(t[:1].numpy() for t in (q, k, v)), mask=m, scale=0.3)
    assert out.shape == q[0].shape and lse.shape == (4, 16)
    assert rel_error(out, ro[0]) <= 1e-12 and rel_error(lse, rl[0]) <= 1e-12
    assert not lse.requires_grad


def none_group_worker(rank, world):
    """Every rank passes group=None / cp_group=None: each raises at once (no collective)."""
    q, k, v = _qkv(seed=rank)
    cu = torch.tensor([0, 3, 12 * world], dtype=torch.int32)
    got = []
    for call in (lambda: ring_swa_attn(q, k, v, window_size=(3, 0)),
                 lambda: ring_swa_attn(q, k, v, window_size=(3, 0), group=None),
                 lambda: ring_sliding_window_attn(q, k, v, 3),
                 lambda: ring_streaming_llm_attn_varlen(q[0], k[0], v[0], 3, cu)):
        try:
            call()
            got.append(None)
        except ValueError as e:
            got.append(str(e))
    # LOCAL runs this process alone, whatever the world: the single-process result
    local = ring_swa_attn(q, k, v, window_size=(3, 0), group=LOCAL)
    seed_local = ring_sliding_window_attn(q, k, v, 3, cp_group=LOCAL)
    return got, local, seed_local


def test_none_group_raises_on_every_rank():
    world = 2
    res = run_world(world, none_group_worker, timeout=60)
    for rank, (got, local, seed_local) in enumerate(res):
        for i, msg in enumerate(got):
            name = "group" if i < 2 else "cp_group"
            assert msg is not None, f"rank {rank}, call {i}: no error"
            assert f"{name}=None" in msg and "torch.distributed.group.WORLD" in msg, msg
            assert "LOCAL" in msg, msg
        q, k, v = _qkv(seed=rank)
        ref = ring_swa_attn(q, k, v, window_size=(3, 0))  # no torch.distributed here
        assert rel_error(local, ref) == 0.0 and rel_error(seed_local, ref) == 0.0


def mesh_worker(rank, world, case):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    res = run_case(rank, world, case, group=mesh, api="canonical")
    mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
    q, k, v = (shard(t, case, rank) for t in global_inputs(case)[:3])
    try:
        ring_swa_attn(q, k, v, window_size=(3, 0), group=mesh2,
                      cu_seqlens=cu_seqlens(case))
        res["mesh2"] = None
    except ValueError as e:
        res["mesh2"] = str(e)
    # one dimension of the 2-D mesh is a 1-D mesh: the seed functions take it too
    sub = mesh2["cp"]
    n = world // 2
    sub_case = dict(case, lengths=[5, 1, 6], counts=[12 // n] * n, n=n)
    res["sub"] = run_case(sub.get_local_rank(), n, sub_case, group=sub, api="seed")
    return res


def test_device_mesh_group():
    case = dict(kind="varlen", n=4, lengths=[7, 1, 9, 5, 2], counts=[6, 6, 6, 6], hq=2, hkv=1,
                d=8, window=5, ns=2, dtype="float64", seed=9)
    res = run_world(4, mesh_worker, case, timeout=120)
    for key, e in errors(res, case).items():
        assert e <= 1e-10, key
    for r in res:
        assert "1-D DeviceMesh" in r["mesh2"] and "mesh['cp']" in r["mesh2"], r["mesh2"]
    sub_case = dict(case, lengths=[5, 1, 6], counts=[6, 6], n=2)
    for half in (res[:2], res[2:]):  # mesh2 rows are [0, 1] and [2, 3]
        sub = [r["sub"] for r in half]
        for key, e in errors(sub, sub_case).items():
            assert e <= 1e-10, key
