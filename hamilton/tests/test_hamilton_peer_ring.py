"""hamilton/bench/bench_peer_ring.py on the CPU: the whole script (--smoke) and its gloo check
(--check) with a minimal ring peer written here, which reaches its kernels through the
flash-attn shim and its messages through a ``RingComm`` in its own namespace, as
ring-flash-attention does; and with ring-flash-attention itself where ``.peers/`` holds it
(``common/bench/fetch_peers.sh``; CI has no copy, so there the in-test peer stands in)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from longattn.common.testing import flash_shim_removed_after

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROOT = BENCH.parents[1]
if str(BENCH) not in sys.path:  # gloo ranks import the script by name (sys.path travels)
    sys.path.insert(0, str(BENCH))

import bench_peer_ring  # noqa: E402

FAKE = {"ring": {"module": __name__, "func": "fake_ring_func", "forward": "fake_ring_forward",
                 "backward": "fake_ring_backward", "layout": "contiguous"}}
WRONG = {"ring": dict(FAKE["ring"], func="fake_ring_func_first_block_only",
                      forward="fake_ring_forward_first_block_only")}
REAL = (ROOT / ".peers" / "ring_flash_attn").is_dir()
PEERS = [FAKE] + ([None] if REAL else [])  # None: the published peer


@pytest.fixture(autouse=True)
def _no_shim_left_behind():
    with flash_shim_removed_after():
        yield


# ---------------------------------------------------------------------------------------------
# the in-test peer: a causal ring over the contiguous layout (rank r holds tokens [rL, (r+1)L))


class RingComm:
    """Send to rank + 1 and receive from rank - 1 (``send_recv`` / ``commit`` / ``wait`` /
    ``send_recv_kv``); the benchmark replaces it in this module's namespace."""

    def __init__(self, process_group):
        import torch.distributed as dist

        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.send_rank = (self.rank + 1) % self.world_size
        self.recv_rank = (self.rank - 1) % self.world_size
        self._ops, self._reqs = [], None

    def send_recv(self, to_send, recv_tensor=None):
        import torch.distributed as dist

        res = torch.empty_like(to_send) if recv_tensor is None else recv_tensor
        self._ops += [dist.P2POp(dist.isend, to_send, self.send_rank, group=self.group),
                      dist.P2POp(dist.irecv, res, self.recv_rank, group=self.group)]
        return res

    def commit(self):
        import torch.distributed as dist

        self._reqs = dist.batch_isend_irecv(self._ops)

    def wait(self):
        for req in self._reqs:
            req.wait()
        self._ops, self._reqs = [], None

    def send_recv_kv(self, k, v, k_buffer=None, v_buffer=None):
        out = self.send_recv(k, k_buffer), self.send_recv(v, v_buffer)
        self.commit()
        return out


def _merge(out, lse, o, lse_b):
    new = torch.logaddexp(lse, lse_b)
    w_a = torch.exp(lse - new).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b - new).transpose(1, 2)[..., None]
    return out * w_a + o.float() * w_b, new


def _forward(process_group, q, k, v, softmax_scale, steps):
    from flash_attn.flash_attn_interface import _flash_attn_forward

    comm = RingComm(process_group)
    out = lse = None
    for step in range(comm.world_size):
        if step + 1 < comm.world_size:
            next_k, next_v = comm.send_recv_kv(k, v)
        if step <= min(comm.rank, steps):
            o, lse_b, _, _ = _flash_attn_forward(q, k, v, 0.0, softmax_scale, step == 0, -1, -1,
                                                 0.0, None, False)
            out, lse = (o.float(), lse_b) if out is None else _merge(out, lse, o, lse_b)
        if step + 1 < comm.world_size:
            comm.wait()
            k, v = next_k, next_v
    return out.to(q.dtype), lse


def fake_ring_forward(process_group, q, k, v, softmax_scale, causal=True):
    return _forward(process_group, q, k, v, softmax_scale, steps=10 ** 9)


def fake_ring_forward_first_block_only(process_group, q, k, v, softmax_scale, causal=True):
    """Wrong on purpose: every rank attends only to its own block."""
    return _forward(process_group, q, k, v, softmax_scale, steps=0)


def fake_ring_backward(process_group, dout, q, k, v, out, softmax_lse, softmax_scale,
                       causal=True):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    kv_comm, d_comm = RingComm(process_group), RingComm(process_group)
    n, rank = kv_comm.world_size, kv_comm.rank
    dq = torch.zeros(q.shape, dtype=torch.float32)
    bq, bk, bv = (torch.empty_like(t) for t in (q, k, v))
    got_k = got_v = None  # the dK/dV accumulators received from rank - 1
    for step in range(n):
        if step + 1 < n:
            next_k, next_v = kv_comm.send_recv_kv(k, v)
        grads = None
        if step <= rank:
            _flash_attn_backward(dout, q, k, v, out, softmax_lse, bq, bk, bv, 0.0, softmax_scale,
                                 step == 0, -1, -1, 0.0, None, False)
            dq += bq
            grads = (bk.to(torch.float32, copy=True), bv.to(torch.float32, copy=True))
        if step == 0:
            dk, dv = grads
        else:  # the accumulators of the block held now, from rank - 1, plus this rank's part
            d_comm.wait()
            dk, dv = got_k, got_v
            if grads is not None:
                dk, dv = dk + grads[0], dv + grads[1]
        if step + 1 < n:
            kv_comm.wait()
            k, v = next_k, next_v
        got_k, got_v = d_comm.send_recv_kv(dk, dv)
    d_comm.wait()
    return dq.to(q.dtype), got_k.to(q.dtype), got_v.to(q.dtype)


class _FakeRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, forward):
        out, lse = forward(group, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group = scale, group
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _):
        q, k, v, out, lse = ctx.saved_tensors
        grads = fake_ring_backward(ctx.group, dout.contiguous(), q, k, v, out, lse, ctx.scale)
        return (*grads, None, None, None)


def _func(forward, q, k, v, dropout_p, softmax_scale, causal, return_attn_probs, group):
    assert causal and dropout_p == 0.0
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = _FakeRing.apply(q, k, v, scale, group, forward)
    return (out, lse, None) if return_attn_probs else out


def fake_ring_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                   alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
    return _func(fake_ring_forward, q, k, v, dropout_p, softmax_scale, causal,
                 return_attn_probs, group)


def fake_ring_func_first_block_only(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False, group=None):
    return _func(fake_ring_forward_first_block_only, q, k, v, dropout_p, softmax_scale, causal,
                 return_attn_probs, group)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: "in-test peer" if p else "ring-flash-attn")
def test_smoke(tmp_path, capsys, peer):
    assert bench_peer_ring.main(["--smoke", "--out", str(tmp_path)], peer=peer) == 0
    data = json.loads((tmp_path / "bench_peer_ring.json").read_text())
    names = ["ring"] if peer is FAKE else ["ring", "zigzag"]
    checks = [r for r in data if r["what"].startswith("correctness")]
    assert len(checks) == len(names) + 1 and all(r["extra"]["ok"] for r in checks), checks
    stand = [r for r in data if r["what"].endswith("stand-in vs thread world")]
    assert len(stand) == 3 * len(names)  # ranks 0, 2, 3
    assert all(max(r["extra"]["rel_diff"].values()) == 0.0 for r in stand), stand  # CPU: exact
    timed = {r["what"] for r in data if r["median_ms"] is not None}
    for d in ("fwd", "fwd+bwd"):
        assert f"{d} dense(torch)" in timed
        for rank in (0, 2, 3):
            assert f"{d} rank{rank} longattn ring +merge" in timed, timed
            for name in names:
                assert f"{d} rank{rank} ring-flash-attn {name}" in timed, timed
    assert {"shim cost fwd", "shim cost bwd"} <= timed
    out = capsys.readouterr().out
    assert "correctness and stand-in: PASS" in out


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: "in-test peer" if p else "ring-flash-attn")
def test_check_in_a_gloo_world(tmp_path, capsys, peer):
    assert bench_peer_ring.run_check(str(tmp_path), spec=peer, worlds=(2,))
    data = json.loads((tmp_path / "peer_ring_check.json").read_text())
    stand = [r for r in data if "stand-in" in r["what"]]
    assert stand and all(r["extra"]["ok"] and r["extra"]["thread_world_max_diff"] == 0.0
                         for r in stand)
    assert any("longattn hamilton ring float64" in r["what"] and r["extra"]["ok"] for r in data)
    assert "check: PASS" in capsys.readouterr().out


def test_check_fails_for_a_wrong_peer(tmp_path, capsys):
    """The oracle comparison can fail: a ring that attends only to its own block."""
    assert not bench_peer_ring.run_check(str(tmp_path), spec=WRONG, worlds=(2,))
    data = json.loads((tmp_path / "peer_ring_check.json").read_text())
    rows = {r["what"]: r["extra"]["ok"] for r in data}
    assert rows["check n=2 ring-flash-attn ring vs oracle"] is False
    assert rows["check n=2 longattn hamilton ring vs oracle"] is True
    assert rows["check n=2 stand-in ring"] is True  # the stand-in still reproduces the ranks
    assert "check: FAIL" in capsys.readouterr().out


def test_the_replay_depends_on_what_is_received():
    """A stand-in fed one wrong message gives other results: the replay comparison can fail."""
    peers = bench_peer_ring.load_peer(FAKE)
    peer = peers["ring"]
    glob = bench_peer_ring.random_global(3, 8, 2, 8, torch.bfloat16, "cpu", seed=4)
    scale = 8 ** -0.5
    with bench_peer_ring.standin(peers):
        tw, recs = bench_peer_ring.thread_world(peer, glob, 3, scale=scale, record=[2])
        q, k, v, do = (bench_peer_ring.take_shard(t, 2, 3, layout="contiguous", dim=1)
                       for t in glob)
        keys = ("out", "dq", "dk", "dv")
        rec = {key: t.clone() for key, t in recs[2].items()}
        same = bench_peer_ring.peer_call(peer, q, k, v, do,
                                         bench_peer_ring.ReplayGroup(2, 3, rec, (0, 1, 2)))
        assert bench_peer_ring.max_diff(same, tw[2], keys) == 0.0
        rec[(0, 0)] = rec[(0, 0)] + 1  # the first K received
        other = bench_peer_ring.peer_call(peer, q, k, v, do,
                                          bench_peer_ring.ReplayGroup(2, 3, rec, (0, 1, 2)))
        assert bench_peer_ring.max_diff(other, tw[2], keys) > 1e-3
        del rec[(0, 0)]
        with pytest.raises(RuntimeError, match="nothing recorded"):
            bench_peer_ring.peer_call(peer, q, k, v, do,
                                      bench_peer_ring.ReplayGroup(2, 3, rec, (0, 1, 2)))
        with pytest.raises(TypeError, match="SimGroup"):
            bench_peer_ring.StandInRingComm(None)
