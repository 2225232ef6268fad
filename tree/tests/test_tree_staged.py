"""tree_decode through the staged transport (longattn.common.staging): on a CPU gloo world,
``staging.SimulatedDevice`` treats the CPU tensors as device tensors, so every all-reduce,
gather and broadcast of the decode goes through pinned-buffer staging as CUDA tensors over gloo
would. The outputs must be byte-identical to the unstaged run and the byte counters equal, flat
and with ``hierarchy=(2, 2)`` (gather at the node leaders, broadcast back, group ranks), and
ring_decode (its exchanges)."""

from __future__ import annotations

import contextlib

import torch

from longattn.common.testing import run_world


def _bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _decode_staged_vs_plain(rank, world):
    import torch.distributed as dist

    from longattn.common import comm, staging
    from longattn.tree import ring_decode, tree_decode

    out = []
    for hierarchy in (None, (2, 2), "ring"):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(rank)
            q = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
            n = 5 + 3 * rank
            k = torch.randn(2, n, 2, 8, generator=g).to(dtype)
            v = torch.randn(2, n, 2, 8, generator=g).to(dtype)
            runs = []
            for staged in (False, True):
                dev = staging.SimulatedDevice()
                ctx = staging.use(dev) if staged else contextlib.nullcontext()
                with ctx, comm.counting() as c:
                    if hierarchy == "ring":
                        o, lse = ring_decode(q, k, v, group=dist.group.WORLD, return_lse=True)
                    else:
                        o, lse = tree_decode(q, k, v, group=dist.group.WORLD,
                                             hierarchy=hierarchy, return_lse=True)
                kinds = {e[0] for e in dev.log}
                runs.append((_bytes(o), _bytes(lse), dict(c.sent), dict(c.recv),
                             list(c.messages), kinds))
            out.append((hierarchy, str(dtype), runs))
    return out


def test_tree_decode_staged_equals_unstaged():
    for rank, res in enumerate(run_world(4, _decode_staged_vs_plain)):
        for hierarchy, dtype, (plain, staged) in res:
            where = f"hierarchy={hierarchy} {dtype} rank {rank}"
            assert staged[:5] == plain[:5], where
            assert {"d2h", "h2d", "sync"} <= staged[5], f"{where}: nothing was staged"
            assert not plain[5], where
