"""longattn.common.comm on gloo worlds of 2, 3, 4 and 8 ranks: payloads and exact byte
counters of ring_exchange and all_to_all_step, group ranks, nested counters, bad input.

Each world runs all of its checks in one ``run_world`` call (worlds are expensive to start);
the checks inside return plain data and the assertions are made here, so a failure names the
rank and the case.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn.common import comm
from longattn.common.dist import LOCAL, resolve_group
from longattn.common.testing import RankError, run_world


def _w():
    """The one rule: a distributed call names its group (looked up per call, on the ranks)."""
    return dist.group.WORLD


SIZES = [2, 3, 4, 8]
DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.float64]


def _payload(src, dst, numel, dtype):
    """A message whose content says who sent it to whom."""
    return (torch.arange(numel) + 1000 * src + 100000 * dst).to(dtype)


def _ring_cases(rank, n):
    """ring_exchange for several shifts, shapes and dtypes; returns one record per case."""
    shifts = sorted({1, -1, 2, n - 1, n + 1} - {s for s in range(-n, 2 * n) if s % n == 0})
    out = []
    for shift in shifts:
        for shape, dtype in (((3, 5), torch.float32), ((7,), torch.bfloat16),
                             ((2, 3, 4), torch.int64)):
            dst, src = (rank + shift) % n, (rank - shift) % n
            numel = 1
            for s in shape:
                numel *= s
            send = _payload(rank, dst, numel, dtype).reshape(shape)
            recv = torch.empty(shape, dtype=dtype)
            with comm.counting() as c:
                h = comm.ring_exchange(send, recv, _w(), shift=shift)
                h.wait()
            out.append({
                "shift": shift, "dtype": str(dtype), "dst": dst, "src": src,
                "nbytes": send.numel() * send.element_size(),
                "sent": dict(c.sent), "recv": dict(c.recv), "messages": list(c.messages),
                "calls": c.calls, "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received,
                "payload_ok": torch.equal(recv, _payload(src, rank, numel, dtype).reshape(shape)),
            })
    return out


def _full_ring(rank, n):
    """n - 1 double-buffered ring steps: every rank sees every other rank's block once."""
    block = torch.full((4, 2), float(rank), dtype=torch.float32)
    bufs = [block.clone(), torch.empty_like(block)]
    seen = [rank]
    with comm.counting() as c:
        for step in range(n - 1):
            h = comm.ring_exchange(bufs[step % 2], bufs[(step + 1) % 2], _w())
            h.wait()
            seen.append(int(bufs[(step + 1) % 2][0, 0].item()))
    return {"seen": seen, "sent": dict(c.sent), "recv": dict(c.recv), "calls": c.calls,
            "messages": len(c.messages)}


def _numel(src, dst):
    """Different sizes for every (src, dst) pair, some empty."""
    return 0 if (src + 2 * dst) % 5 == 4 else 1 + src + 3 * dst


def _a2a(rank, n, dtype):
    sends = [_payload(rank, p, _numel(rank, p), dtype) for p in range(n)]
    sends[rank] = torch.full((3,), 7).to(dtype)  # own entry: ignored, never sent
    recvs = [torch.empty(_numel(p, rank), dtype=dtype) for p in range(n)]
    mine = torch.empty(3, dtype=dtype)
    recvs[rank] = mine
    with comm.counting() as c:
        comm.all_to_all_step(sends, recvs, _w()).wait()
    return {
        "sent": dict(c.sent), "recv": dict(c.recv), "messages": list(c.messages),
        "calls": c.calls, "elem": sends[0].element_size(),
        "payload_ok": all(torch.equal(recvs[p], _payload(p, rank, _numel(p, rank), dtype))
                          for p in range(n) if p != rank),
        "own_untouched": mine.data_ptr() == recvs[rank].data_ptr(),
    }


def _a2a_none(rank, n):
    """None entries send / receive nothing."""
    sends = [None if p % 2 else _payload(rank, p, 4, torch.float32) for p in range(n)]
    recvs = [None if rank % 2 else torch.empty(4) for p in range(n)]
    with comm.counting() as c:
        comm.all_to_all_step(sends, recvs, _w()).wait()
    return {"sent": dict(c.sent), "recv": dict(c.recv),
            "ok": all(recvs[p] is None or p == rank
                      or torch.equal(recvs[p], _payload(p, rank, 4, torch.float32))
                      for p in range(n))}


def _nested_and_record(rank, n):
    peer = (rank + 1) % n
    src = (rank - 1) % n
    x, y = torch.zeros(5), torch.empty(5)
    with comm.counting() as outer:
        comm.ring_exchange(x, y, _w()).wait()
        with comm.counting() as inner:
            comm.ring_exchange(x, y, _w()).wait()
            comm.record("send", peer, 123)  # a collective issued by the caller
        comm.record("recv", src, 7)
    comm.ring_exchange(x, y, _w()).wait()  # outside every counter: not counted
    return {"outer_sent": dict(outer.sent), "outer_recv": dict(outer.recv),
            "inner_sent": dict(inner.sent), "inner_recv": dict(inner.recv),
            "outer_calls": outer.calls, "inner_calls": inner.calls, "peer": peer, "src": src}


def _subgroup(rank, n):
    """Counters and peers are group ranks: a ring over the odd global ranks."""
    members = [r for r in range(n) if r % 2 == 1]
    group = dist.new_group(members)
    if rank not in members:
        return None
    gr, gn = dist.get_rank(group), len(members)
    send = torch.full((6,), float(rank))
    recv = torch.empty(6)
    with comm.counting() as c:
        comm.ring_exchange(send, recv, resolve_group(group)).wait()  # a resolved Group too
    return {"group_rank": gr, "group_size": gn, "sent": dict(c.sent), "recv": dict(c.recv),
            "got_from_global": int(recv[0].item()),
            "expected_global": members[(gr - 1) % gn]}


def _everything(rank, n):
    res = {"ring": _ring_cases(rank, n), "full_ring": _full_ring(rank, n),
           "a2a": {str(dt): _a2a(rank, n, dt) for dt in DTYPES},
           "a2a_none": _a2a_none(rank, n), "nested": _nested_and_record(rank, n)}
    if n >= 4:
        res["subgroup"] = _subgroup(rank, n)
    return res


@pytest.fixture(scope="module", params=SIZES, ids=[f"world{n}" for n in SIZES])
def world(request):
    n = request.param
    return n, run_world(n, _everything, timeout=120)


def test_ring_exchange_payload_and_exact_bytes(world):
    n, results = world
    for rank, r in enumerate(results):
        assert r["ring"], "no ring cases"
        for case in r["ring"]:
            where = f"rank {rank}/{n} {case['shift']} {case['dtype']}"
            assert case["payload_ok"], where
            nb, dst, src = case["nbytes"], case["dst"], case["src"]
            assert case["messages"] == [("send", dst, nb), ("recv", src, nb)], where
            assert case["sent"] == {dst: nb} and case["recv"] == {src: nb}, where
            assert case["bytes_sent"] == nb and case["bytes_received"] == nb, where
            assert case["calls"] == 1, where


def test_full_ring_visits_every_rank_and_counts_every_step(world):
    n, results = world
    block = 4 * 2 * 4
    for rank, r in enumerate(results):
        fr = r["full_ring"]
        assert fr["seen"] == [(rank - s) % n for s in range(n)]
        assert fr["sent"] == {(rank + 1) % n: (n - 1) * block}
        assert fr["recv"] == {(rank - 1) % n: (n - 1) * block}
        assert fr["calls"] == n - 1 and fr["messages"] == 2 * (n - 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_to_all_step_payload_and_exact_bytes(world, dtype):
    n, results = world
    for rank, r in enumerate(results):
        a = r["a2a"][str(dtype)]
        assert a["payload_ok"] and a["own_untouched"]
        e = a["elem"]
        want_sent = {p: _numel(rank, p) * e for p in range(n) if p != rank and _numel(rank, p)}
        want_recv = {p: _numel(p, rank) * e for p in range(n) if p != rank and _numel(p, rank)}
        assert a["sent"] == want_sent
        assert a["recv"] == want_recv
        assert sorted(a["messages"]) == sorted(
            [("send", p, b) for p, b in want_sent.items()]
            + [("recv", p, b) for p, b in want_recv.items()])
        assert a["calls"] == 1
    # what one rank sent to another is what the other counted as received
    for s in range(n):
        for d in range(n):
            if s != d:
                assert (results[s]["a2a"][str(dtype)]["sent"].get(d, 0)
                        == results[d]["a2a"][str(dtype)]["recv"].get(s, 0))


def test_all_to_all_none_entries(world):
    n, results = world
    for rank, r in enumerate(results):
        a = r["a2a_none"]
        assert a["ok"]
        want_sent = {p: 16 for p in range(n) if p != rank and p % 2 == 0}
        assert a["sent"] == want_sent
        assert a["recv"] == ({} if rank % 2 else {p: 16 for p in range(n) if p != rank})


def test_nested_counters_and_record(world):
    n, results = world
    for r in results:
        x = r["nested"]
        peer, src = x["peer"], x["src"]
        assert x["inner_sent"] == {peer: 20 + 123} and x["inner_recv"] == {src: 20}
        assert x["outer_sent"] == {peer: 40 + 123} and x["outer_recv"] == {src: 40 + 7}
        assert x["inner_calls"] == 1 and x["outer_calls"] == 2


def test_group_ranks(world):
    n, results = world
    if n < 4:  # a ring of the odd ranks needs >= 2 of them
        assert all("subgroup" not in r for r in results)
        return
    members = [r for r in range(n) if r % 2 == 1]
    for rank, r in enumerate(results):
        g = r["subgroup"]
        if rank not in members:
            assert g is None
            continue
        gn = len(members)
        gr = members.index(rank)
        assert g["group_rank"] == gr and g["group_size"] == gn
        assert g["got_from_global"] == g["expected_global"]
        assert g["sent"] == {(gr + 1) % gn: 24} and g["recv"] == {(gr - 1) % gn: 24}


# --------------------------------------------------------------------------------------------
# bad input: raised on every rank, before any communication (no hang)


def _catch(f):
    try:
        f()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - wrong exception type: report it
        return f"WRONG {type(e).__name__}: {e}"
    return "no error"


def _bad_calls(rank, n):
    t = torch.zeros(4)
    me = rank
    other = (rank + 1) % n
    res = {}
    with comm.counting() as c:
        res["send_self"] = _catch(lambda: comm.exchange([(t, me)], [], _w()))
        res["recv_self"] = _catch(lambda: comm.exchange([], [(torch.empty(4), me)], _w()))
        res["noncontig_send"] = _catch(
            lambda: comm.exchange([(torch.zeros(4, 4).t(), other)], [], _w()))
        res["noncontig_recv"] = _catch(
            lambda: comm.exchange([], [(torch.zeros(4, 4).t(), other)], _w()))
        res["ring_shift_0"] = _catch(lambda: comm.ring_exchange(t, torch.empty(4), _w(), shift=0))
        res["ring_shift_n"] = _catch(lambda: comm.ring_exchange(t, torch.empty(4), _w(), shift=n))
        # a valid send followed by an invalid receive: nothing may be posted or counted
        res["half_bad"] = _catch(lambda: comm.exchange([(t, other)], [(torch.empty(4), me)], _w()))
        res["not_tensor"] = _catch(lambda: comm.exchange([([1, 2], other)], [], _w()))
        # the one rule of group=None: an error in a world of more than one rank
        res["group_none"] = _catch(lambda: comm.ring_exchange(t, torch.empty(4)))
        res["a2a_group_none"] = _catch(lambda: comm.all_to_all_step([t] * n, [t] * n))
        res["exchange_group_none"] = _catch(lambda: comm.exchange([(t, other)], []))
        res["local"] = _catch(lambda: comm.ring_exchange(t, torch.empty(4), LOCAL))
    res["counted"] = (dict(c.sent), dict(c.recv), c.calls)
    dist.barrier()  # every rank got here: nothing hung
    return res


BAD = {  # case -> words the message must contain
    "send_self": ["self"], "recv_self": ["self"], "noncontig_send": ["contiguous"],
    "noncontig_recv": ["contiguous"], "ring_shift_0": ["shift"], "ring_shift_n": ["shift"],
    "half_bad": ["self"], "not_tensor": ["tensor"], "group_none": ["group=None", "WORLD"],
    "a2a_group_none": ["group=None"], "exchange_group_none": ["group=None"],
    "local": ["world size 1"],
}


def _risky(rank, n, case):
    """Bad calls that, when not rejected, post a message nobody can match: they hang or abort
    the rank. Each runs in its own short call so one hang costs one timeout, not the file."""
    t = torch.zeros(4)
    other = (rank + 1) % n
    with comm.counting() as c:
        f = {
            "peer_out_of_range": lambda: comm.exchange([(t, n + 3)], [], _w()),
            "peer_negative": lambda: comm.exchange([], [(torch.empty(4), -1)], _w()),
            "a2a_list_too_short": lambda: comm.all_to_all_step([t], [torch.empty(4)], _w()),
            "a2a_list_too_long": lambda: comm.all_to_all_step([t] * (n + 1),
                                                              [torch.empty(4)] * (n + 1), _w()),
            "ring_recv_dtype_differs": lambda: comm.ring_exchange(
                t, torch.empty(4, dtype=torch.float64), _w()),
            "ring_recv_shape_differs": lambda: comm.ring_exchange(t, torch.empty(5), _w()),
            "exchange_peer_not_int": lambda: comm.exchange([(t, float(other))], [], _w()),
        }[case]
        msg = _catch(f)
    dist.barrier()
    return msg, c.calls


RISKY = {"peer_out_of_range": "rank", "peer_negative": "rank", "a2a_list_too_short": "send_chunks",
         "a2a_list_too_long": "send_chunks", "ring_recv_dtype_differs": "dtype",
         "ring_recv_shape_differs": "shape", "exchange_peer_not_int": "rank"}


@pytest.mark.parametrize("case", list(RISKY))
def test_bad_peers_and_chunk_lists_raise_instead_of_hanging(case):
    res = run_world(2, _risky, case, timeout=8)
    for rank, (msg, calls) in enumerate(res):
        assert msg.startswith(("ValueError", "TypeError")), f"rank {rank}: {msg}"
        assert RISKY[case] in msg, f"rank {rank}: {msg}"
        assert calls == 0


@pytest.fixture(scope="module")
def bad_results():
    return {n: run_world(n, _bad_calls, timeout=60) for n in (2, 3)}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_on_every_rank(bad_results, case):
    for n, results in bad_results.items():
        for rank, r in enumerate(results):
            msg = r[case]
            assert msg.startswith(("ValueError", "TypeError")), f"{case} n={n} rank={rank}: {msg}"
            for word in BAD[case]:
                assert word in msg, f"{case} n={n} rank={rank}: {msg}"


def test_rejected_calls_count_nothing(bad_results):
    for n, results in bad_results.items():
        for rank, r in enumerate(results):
            assert r["counted"] == ({}, {}, 0), f"n={n} rank={rank}: {r['counted']}"


def _ring_world_of_one(rank, n):
    return _catch(lambda: comm.ring_exchange(torch.zeros(2), torch.empty(2)))


def test_ring_exchange_on_one_rank_raises():
    (msg,) = run_world(1, _ring_world_of_one)
    assert msg.startswith("ValueError") and "world size 1" in msg


def test_exchange_needs_an_initialised_group():
    # the pytest process never joins a world (run_world's ranks are child processes)
    assert not dist.is_initialized()
    with pytest.raises((ValueError, RuntimeError)):
        comm.ring_exchange(torch.zeros(2), torch.empty(2))


def test_counting_outside_a_world_and_record():
    with comm.counting() as c:
        comm.record("send", 3, 10)
        comm.record("recv", 1, 4)
        comm.record("send", 3, 5)
    comm.record("send", 3, 1000)  # no active counter: dropped
    assert c.sent == {3: 15} and c.recv == {1: 4}
    assert c.bytes_sent == 15 and c.bytes_received == 4
    assert c.messages == [("send", 3, 10), ("recv", 1, 4), ("send", 3, 5)]
    assert comm.nbytes(torch.zeros(3, 4, dtype=torch.bfloat16)) == 24


def test_record_rejects_bad_kind():
    with comm.counting(), pytest.raises(ValueError, match="kind"):
        comm.record("sned", 0, 4)


def test_rank_error_type_is_importable():
    assert issubclass(RankError, RuntimeError)


def test_nested_counters_equal_when_opened():
    """Two counters opened before any message are equal dataclasses: closing the inner one must
    remove it, not the outer (which then missed every later message and failed to close)."""
    with comm.counting() as outer:
        with comm.counting() as inner:
            pass
        comm.record("send", 1, 100)
    assert outer.bytes_sent == 100 and inner.bytes_sent == 0
    assert not comm._COUNTERS  # nothing left counting


def _order_differs(rank, n):
    """Rank 0 sends 1 then 3 floats to rank 1, which receives 3 then 1: the byte totals pair
    up, the messages do not (gloo aborted the receiver before the agreement saw order)."""
    peer = 1 - rank
    if rank == 0:
        sends, recvs = [(torch.zeros(1), peer), (torch.zeros(3), peer)], []
    else:
        sends, recvs = [], [(torch.empty(3), peer), (torch.empty(1), peer)]
    try:
        comm.exchange(sends, recvs, dist.group.WORLD, agree=True).wait()
    except ValueError as e:
        return str(e)
    return None


def test_agreed_exchange_sees_the_order_of_messages():
    res = run_world(2, _order_differs, timeout=60)
    assert all(r is not None and "order, dtype or element count" in r for r in res), res
