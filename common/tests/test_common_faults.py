"""Fault injection for common's own distributed functions: ``dist.agree`` and the exchanges of
``comm`` with ``agree=True`` (``exchange``, ``ring_exchange``, ``all_to_all_step``). Each case
puts a bad value on ONE rank of a gloo world of 2, 3 or 4 ranks (every rank in turn is the bad
one) and checks that every rank raises the same error (class and message), none returns and
none hangs (the world's timeout), nothing was posted or counted, and the world still works
afterwards. (``group`` and ``agree`` themselves decide whether and where the ranks agree, so
they must be the same on every rank; they are not injected here. ``common.layout`` is local
index arithmetic with no group.)

One world per size runs every case (worlds are expensive to start); each (function, check,
world) is its own test id, asserting on the recorded results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn.common import comm
from longattn.common import dist as D
from longattn.common.testing import run_world

pytestmark = pytest.mark.faults
WORLDS = (2, 3, 4)


def _w():
    return dist.group.WORLD


# --------------------------------------------------------------------------------------------
# the cases: (rank, n, bad) -> None; ``bad`` is the one rank that gets the bad value


def _ex(rank, n, bad, **bad_call):
    """exchange with a ring pattern (send to next, receive from previous); the bad rank's call
    is changed by ``bad_call`` (sends / recvs replaced)."""
    t, r = torch.zeros(4), torch.empty(4)
    sends, recvs = [(t, (rank + 1) % n)], [(r, (rank - 1) % n)]
    if rank == bad:
        sends = bad_call.get("sends", lambda: sends)()
        recvs = bad_call.get("recvs", lambda: recvs)()
    comm.exchange(sends, recvs, _w(), agree=True).wait()


def _nxt(rank, n):
    return (rank + 1) % n


def _ring(rank, n, bad, send=None, recv=None, shift=1):
    s, r = torch.zeros(3, 2), torch.empty(3, 2)
    if rank == bad:
        s = s if send is None else send
        r = r if recv is None else recv
    comm.ring_exchange(s, r, _w(), shift=shift if rank == bad else 1, agree=True).wait()


def _a2a(rank, n, bad, sends=None, recvs=None):
    s = [torch.full((2,), float(rank)) for _ in range(n)]
    r = [torch.empty(2) for _ in range(n)]
    if rank == bad:
        s = s if sends is None else sends(s)
        r = r if recvs is None else recvs(r)
    comm.all_to_all_step(s, r, _w(), agree=True).wait()


CASES = {
    # name: (minimum world, function, words every rank's message must hold)
    "exchange/peer_out_of_range": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(4), n + 3)]), ["peer", "[0,"]),
    "exchange/peer_negative": (2, lambda rank, n, bad: _ex(
        rank, n, bad, recvs=lambda: [(torch.empty(4), -1)]), ["peer", "-1"]),
    "exchange/peer_not_int": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(4), float(_nxt(rank, n)))]), ["peer"]),
    "exchange/send_to_self": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(4), rank)]), ["self"]),
    "exchange/noncontiguous": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(4, 4).t(), _nxt(rank, n))]), ["contiguous"]),
    "exchange/not_a_tensor": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [([0.0] * 4, _nxt(rank, n))]), ["tensors"]),
    "exchange/size_differs": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(5), _nxt(rank, n))]),
        ["do not pair up", "20 bytes", "16 bytes"]),
    "exchange/extra_message": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(4), _nxt(rank, n))] * 2),
        ["do not pair up", "2 message(s)"]),
    # the same 16 bytes as float64: the byte totals pair up, the receiver would reinterpret
    "exchange/dtype_differs": (2, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(2, dtype=torch.float64), _nxt(rank, n))]),
        ["do not pair up", "order, dtype or element count"]),
    "exchange/missing_recv": (2, lambda rank, n, bad: _ex(
        rank, n, bad, recvs=lambda: []), ["do not pair up", "0 message(s)"]),
    "exchange/wrong_peer": (3, lambda rank, n, bad: _ex(
        rank, n, bad, sends=lambda: [(torch.zeros(4), (rank + 2) % n)]), ["do not pair up"]),
    "ring_exchange/shift_zero": (2, lambda rank, n, bad: _ring(rank, n, bad, shift=0),
                                 ["needs a peer"]),
    "ring_exchange/shift_not_int": (2, lambda rank, n, bad: _ring(rank, n, bad, shift=1.0),
                                    ["shift must be an int"]),
    "ring_exchange/shift_differs": (3, lambda rank, n, bad: _ring(rank, n, bad, shift=2),
                                    ["shift must be the same on every rank"]),
    "ring_exchange/recv_dtype": (2, lambda rank, n, bad: _ring(
        rank, n, bad, recv=torch.empty(3, 2, dtype=torch.float64)), ["recv_buf", "dtype"]),
    "ring_exchange/shape_differs": (2, lambda rank, n, bad: _ring(
        rank, n, bad, send=torch.zeros(4, 2), recv=torch.empty(4, 2)),
        ["shape must be the same on every rank"]),
    "ring_exchange/dtype_differs": (2, lambda rank, n, bad: _ring(
        rank, n, bad, send=torch.zeros(3, 2, dtype=torch.float64),
        recv=torch.empty(3, 2, dtype=torch.float64)), ["dtype must be the same on every rank"]),
    "ring_exchange/not_a_tensor": (2, lambda rank, n, bad: _ring(rank, n, bad, send=[0.0]),
                                   ["send_buf must be a tensor"]),
    "all_to_all_step/too_few_chunks": (2, lambda rank, n, bad: _a2a(
        rank, n, bad, sends=lambda s: s[:-1]), ["one entry per rank"]),
    "all_to_all_step/chunk_not_a_tensor": (2, lambda rank, n, bad: _a2a(
        rank, n, bad, sends=lambda s: [[1.0]] * n), ["send_chunks[", "tensor or None"]),
    "all_to_all_step/chunk_size_differs": (2, lambda rank, n, bad: _a2a(
        rank, n, bad, sends=lambda s: [torch.zeros(3)] * n), ["do not pair up", "12 bytes"]),
    "all_to_all_step/recv_missing": (2, lambda rank, n, bad: _a2a(
        rank, n, bad, recvs=lambda r: [None] * n), ["do not pair up", "0 message(s)"]),
    "all_to_all_step/noncontiguous": (2, lambda rank, n, bad: _a2a(
        rank, n, bad, recvs=lambda r: [torch.empty(2, 2).t()[0] for _ in range(n)]),
        ["contiguous"]),
}


def _agree_case(kind):
    def run(rank, n, bad):
        g = D.resolve_group(_w())

        def check():
            fields = {"q.shape": (2, 8, 4, 16), "dtype": torch.float32, "causal": True,
                      "softmax_scale": 0.25, "backend": "torch", "kv_len": 10 + rank}
            if rank == bad:
                if kind == "value_error":
                    raise ValueError("window_size must be a pair of ints, got (1,)")
                if kind == "type_error":
                    raise TypeError("causal must be a bool, got 'no'")
                if kind == "int_differs":
                    fields["q.shape"] = (2, 8, 4, 32)
                if kind == "float_differs":
                    fields["softmax_scale"] = 0.5
                if kind == "bool_differs":
                    fields["causal"] = False
                if kind == "dtype_differs":
                    fields["dtype"] = torch.float64
                if kind == "str_differs":
                    fields["backend"] = "aten"
                if kind == "tuple_length_differs":
                    fields["q.shape"] = (2, 8, 4)
                if kind == "out_of_int64":
                    fields["kv_len"] = 2**63
                if kind == "unencodable":
                    fields["backend"] = object()
            return "ok", fields

        D.agree("op", g, check, vary=("kv_len",))

    return run


AGREE = {
    "value_error": (ValueError, ["window_size must be a pair", "bad argument on rank(s) [{bad}]"]),
    "type_error": (TypeError, ["causal must be a bool", "bad argument on rank(s) [{bad}]"]),
    "int_differs": (ValueError, ["q.shape must be the same on every rank"]),
    "float_differs": (ValueError, ["softmax_scale must be the same on every rank", "0.5"]),
    "bool_differs": (ValueError, ["causal must be the same on every rank"]),
    "dtype_differs": (ValueError, ["dtype must be the same on every rank"]),
    "str_differs": (ValueError, ["backend must be the same on every rank"]),
    "tuple_length_differs": (ValueError, ["q.shape must be the same on every rank"]),
    "out_of_int64": (ValueError, ["kv_len", "out of range", "rank(s) [{bad}]"]),
    "unencodable": (TypeError, ["cannot agree on backend", "rank(s) [{bad}]"]),
}
for _k, (_cls, _words) in AGREE.items():
    CASES[f"agree/{_k}"] = (2, _agree_case(_k), _words)


def _all_cases(rank, n):
    """Every applicable case with every rank as the bad one: {(case, bad): (error, calls)}."""
    res = {}
    for name, (least, fn, _) in CASES.items():
        if n < least:
            continue
        for bad in range(n):
            with comm.counting() as c:
                try:
                    fn(rank, n, bad)
                    err = "returned"
                except (ValueError, TypeError) as e:
                    err = f"{type(e).__name__}: {e}"
            res[(name, bad)] = (err, c.calls, dict(c.sent), dict(c.recv))
    # the world still works: one agreed ring step
    s, r = torch.full((2,), float(rank)), torch.empty(2)
    comm.ring_exchange(s, r, _w(), agree=True).wait()
    res["after"] = float(r[0]) == float((rank - 1) % n)
    return res


_RESULTS: dict = {}


def _results(n):
    if n not in _RESULTS:
        _RESULTS[n] = run_world(n, _all_cases, timeout=240)
    return _RESULTS[n]


@pytest.mark.parametrize("case,world", [(c, w) for c in CASES for w in WORLDS
                                        if w >= CASES[c][0]])  # wrong_peer, shift_differs: 3+
def test_bad_value_on_one_rank_raises_the_same_error_on_every_rank(case, world):
    _, _, words = CASES[case]
    per_rank = _results(world)
    for bad in range(world):
        got = [r[(case, bad)] for r in per_rank]
        errs = {e for e, *_ in got}
        assert len(errs) == 1, f"{case}, bad rank {bad}: ranks differ: {errs}"
        (err,) = errs
        assert err.startswith(("ValueError", "TypeError")), f"{case}, bad rank {bad}: {err}"
        if case.startswith("agree/"):
            assert err.startswith(AGREE[case.split("/")[1]][0].__name__), err
        for w in words:
            assert w.format(bad=bad) in err, f"{case}, bad rank {bad}: {w!r} not in {err}"
        assert all(calls == 0 and sent == {} and recv == {} for _, calls, sent, recv in got), (
            f"{case}, bad rank {bad}: a rejected call posted or counted messages: {got}")


@pytest.mark.parametrize("world", WORLDS)
def test_the_world_works_after_every_fault(world):
    assert all(r["after"] for r in _results(world))


def _good_calls(rank, n):
    t, r = torch.full((4,), float(rank)), torch.empty(4)
    with comm.counting() as c:
        comm.exchange([(t, (rank + 1) % n)], [(r, (rank - 1) % n)], _w(), agree=True).wait()
        got = [float(r[0])]
        s = [torch.full((2,), float(rank)) for _ in range(n)]
        rr = [torch.empty(2) for _ in range(n)]
        comm.all_to_all_step(s, rr, _w(), agree=True).wait()
        got.append([float(x[0]) for p, x in enumerate(rr) if p != rank])
    return got, c.calls, c.bytes_sent


@pytest.mark.parametrize("world", WORLDS)
def test_agreed_exchanges_deliver_and_count_like_the_plain_ones(world):
    for rank, (got, calls, sent) in enumerate(run_world(world, _good_calls)):
        assert got[0] == float((rank - 1) % world)
        assert got[1] == [float(p) for p in range(world) if p != rank]
        assert calls == 2 and sent == 16 + 8 * (world - 1)  # the agreement is not a message


def test_agree_must_be_a_bool():
    with pytest.raises(TypeError, match="agree must be a bool"):
        comm.exchange([], [], D.LOCAL, agree=1)
