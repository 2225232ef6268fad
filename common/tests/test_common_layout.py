"""longattn.common.layout: positions semantics, take_shard / join_shards round trips for every
layout, dense and varlen, world sizes 1..8, divisibility errors and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.common import layout as L

LAYOUTS = ["contiguous", "zigzag", "striped"]
WORLDS = list(range(1, 9))
HYP = settings(max_examples=60, deadline=None, derandomize=True)


def _unit(layout, n):
    return 2 * n if layout == "zigzag" else n


# --------------------------------------------------------------------------------------------
# positions


def test_positions_by_hand():
    assert L.positions(8, 1, 4).tolist() == [2, 3]
    assert L.positions(8, 1, 4, "striped").tolist() == [1, 5]
    assert L.positions(16, 0, 4, "zigzag").tolist() == [0, 1, 14, 15]
    assert L.positions(16, 3, 4, "zigzag").tolist() == [6, 7, 8, 9]
    assert L.positions(4, 0, 2, "zigzag").tolist() == [0, 3]
    assert L.positions(4, 1, 2, "zigzag").tolist() == [1, 2]
    assert L.positions(5, 0, 1).tolist() == [0, 1, 2, 3, 4]
    assert L.positions(0, 2, 3).tolist() == []
    assert L.positions(8, 0, 2).dtype == torch.int64


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", WORLDS)
def test_positions_partition_the_sequence(layout, n):
    for mult in (1, 2, 3):
        s = _unit(layout, n) * mult
        parts = [L.positions(s, r, n, layout) for r in range(n)]
        assert all(len(p) == s // n for p in parts)  # balanced
        assert sorted(torch.cat(parts).tolist()) == list(range(s))  # a permutation
        for r, p in enumerate(parts):
            p = p.tolist()
            if layout == "contiguous":
                assert p == list(range(r * s // n, (r + 1) * s // n))
            elif layout == "striped":
                assert p == list(range(r, s, n))
            else:  # blocks r and 2n-1-r, in that order, each contiguous
                b = s // (2 * n)
                assert p == list(range(r * b, (r + 1) * b)) + list(
                    range((2 * n - 1 - r) * b, (2 * n - r) * b))


@pytest.mark.parametrize("n", WORLDS)
def test_zigzag_balances_causal_work(n):
    """Every rank's causal work (sum over its queries of visible keys) is the same."""
    s = 2 * n * 3
    work = [int((L.positions(s, r, n, "zigzag") + 1).sum()) for r in range(n)]
    assert len(set(work)) == 1


# --------------------------------------------------------------------------------------------
# dense round trips


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", WORLDS)
def test_dense_round_trip_every_world_size(layout, n):
    s = _unit(layout, n) * 3
    x = torch.randn(2, s, 3, 4)
    chunks = [L.take_shard(x, r, n, layout=layout) for r in range(n)]
    for r, c in enumerate(chunks):
        assert c.shape == (2, s // n, 3, 4) and c.is_contiguous()
        assert torch.equal(c, x[:, L.positions(s, r, n, layout)])
    assert torch.equal(L.join_shards(chunks, layout=layout), x)


@HYP
@given(st.sampled_from(LAYOUTS), st.integers(1, 8), st.integers(0, 4), st.integers(0, 3),
       st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]))
def test_dense_round_trip_any_dim_and_dtype(layout, n, mult, dim, dtype):
    s = _unit(layout, n) * mult
    shape = [2, 3, 2, 2]
    shape[dim] = s
    x = (torch.randn(*shape) * 10).to(dtype)
    for d in (dim, dim - 4):  # negative dims too
        chunks = [L.take_shard(x, r, n, layout=layout, dim=d) for r in range(n)]
        assert all(c.dtype == dtype and c.shape[dim] == s // n for c in chunks)
        assert torch.equal(L.join_shards(chunks, layout=layout, dim=d), x)


def test_take_shard_is_a_copy_and_preserves_autograd():
    x = torch.randn(1, 8, 2, 2, requires_grad=True)
    c = L.take_shard(x, 1, 2, layout="zigzag")
    c.sum().backward()
    want = torch.zeros_like(x)
    want[:, L.positions(8, 1, 2, "zigzag")] = 1
    assert torch.equal(x.grad, want)
    y = torch.zeros(1, 4, 1, 1)
    c = L.take_shard(y, 0, 2)
    c += 1
    assert (y == 0).all()


# --------------------------------------------------------------------------------------------
# varlen


@st.composite
def varlen_cases(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    n = draw(st.integers(1, 8))
    k = draw(st.integers(1, 5))
    if layout == "contiguous":  # only the total must divide; sequences may cross ranks
        lens = draw(st.lists(st.integers(0, 9), min_size=k, max_size=k))
        total = sum(lens)
        pad = (-total) % n
        lens[-1] += pad
    else:
        unit = _unit(layout, n)
        lens = [unit * m for m in draw(st.lists(st.integers(0, 3), min_size=k, max_size=k))]
    cu = [0]
    for x in lens:
        cu.append(cu[-1] + x)
    return layout, n, cu


@HYP
@given(varlen_cases(), st.sampled_from([torch.int32, torch.int64, "list"]))
def test_varlen_round_trip(case, cu_kind):
    layout, n, cu = case
    cu_seqlens = cu if cu_kind == "list" else torch.tensor(cu, dtype=cu_kind)
    total = cu[-1]
    x = torch.randn(total, 2, 3)
    parts = [L.take_shard_varlen(x, cu_seqlens, r, n, layout=layout) for r in range(n)]
    for r, (xr, cur) in enumerate(parts):
        assert cur.dtype == torch.int32 and cur[0] == 0 and int(cur[-1]) == xr.shape[0]
        assert (cur[1:] >= cur[:-1]).all()
        idx, cu_local = L.varlen_positions(cu_seqlens, r, n, layout)
        assert torch.equal(xr, x[idx]) and torch.equal(cur, cu_local)
    assert torch.equal(L.join_shards_varlen([p[0] for p in parts], cu_seqlens, layout=layout), x)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("n", WORLDS)
def test_varlen_zigzag_and_striped_apply_the_layout_per_sequence(layout, n):
    unit = _unit(layout, n)
    lens = [unit, 0, 3 * unit, 2 * unit]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.arange(int(cu[-1]))
    for r in range(n):
        xr, cur = L.take_shard_varlen(x, cu, r, n, layout=layout)
        assert torch.equal(cur, cu // n)  # the local batch is again a packed batch
        for i in range(len(lens)):
            local = xr[cur[i]:cur[i + 1]]
            want = L.positions(lens[i], r, n, layout) + cu[i]
            assert torch.equal(local, want)


@pytest.mark.parametrize("n", WORLDS)
def test_varlen_contiguous_cuts_the_token_stream(n):
    lens = [5, 1, 7, 3]
    lens[-1] += (-sum(lens)) % n
    cu = [0]
    for x in lens:
        cu.append(cu[-1] + x)
    total = cu[-1]
    m = total // n
    for r in range(n):
        idx, local = L.varlen_positions(cu, r, n, "contiguous")
        assert idx.tolist() == list(range(r * m, (r + 1) * m))
        want = sorted({0, m, *[c - r * m for c in cu if r * m < c < (r + 1) * m]})
        assert local.tolist() == want


def test_varlen_contiguous_piece_boundaries_by_hand():
    # sequences [0,5) [5,6) [6,12) over 3 ranks of 4 tokens
    cu = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    got = [L.varlen_positions(cu, r, 3)[1].tolist() for r in range(3)]
    assert got == [[0, 4], [0, 1, 2, 4], [0, 4]]


def test_varlen_positions_on_a_non_leading_dim():
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    x = torch.randn(3, 8, 2)
    parts = [L.take_shard_varlen(x, cu, r, 2, layout="zigzag", dim=1)[0] for r in range(2)]
    assert parts[0].shape == (3, 4, 2)
    assert torch.equal(L.join_shards_varlen(parts, cu, layout="zigzag", dim=1), x)


# --------------------------------------------------------------------------------------------
# divisibility errors


@pytest.mark.parametrize("layout,n,s", [("contiguous", 3, 8), ("striped", 4, 6),
                                        ("zigzag", 2, 6), ("zigzag", 3, 9), ("zigzag", 8, 8)])
def test_dense_divisibility_errors(layout, n, s):
    with pytest.raises(ValueError, match=f"divisible by {_unit(layout, n)}") as ei:
        L.take_shard(torch.zeros(1, s, 1, 1), 0, n, layout=layout)
    assert layout in str(ei.value) and str(s) in str(ei.value)
    with pytest.raises(ValueError, match="divisible"):
        L.positions(s, 0, n, layout)


def test_varlen_divisibility_errors():
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)  # second sequence: 6 tokens
    with pytest.raises(ValueError, match="divisible by 4"):
        L.take_shard_varlen(torch.zeros(10), cu, 0, 2, layout="zigzag")
    with pytest.raises(ValueError, match="divisible by 4"):
        L.take_shard_varlen(torch.zeros(10), cu, 0, 4, layout="striped")
    with pytest.raises(ValueError, match="divisible by 3"):
        L.take_shard_varlen(torch.zeros(10), cu, 0, 3, layout="contiguous")
    assert L.take_shard_varlen(torch.zeros(10), cu, 0, 2, layout="striped")[0].shape == (5,)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_layout_rank_world_size():
    x = torch.zeros(1, 8, 1, 1)
    with pytest.raises(ValueError, match="layout"):
        L.take_shard(x, 0, 2, layout="ring")
    with pytest.raises(ValueError, match="layout"):
        L.join_shards([x], layout="ZIGZAG")
    for n in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="world_size"):
            L.positions(8, 0, n)
    for r in (-1, 2, 1.0, True):
        with pytest.raises(ValueError, match="rank"):
            L.positions(8, r, 2)


@pytest.mark.parametrize("seq_len", [-4, 8.0, "8", None])
def test_bad_seq_len(seq_len):
    with pytest.raises((ValueError, TypeError), match="seq_len|sequence length"):
        L.positions(seq_len, 0, 2)


def test_bad_tensor_and_dim():
    with pytest.raises(TypeError, match="x"):
        L.take_shard([1, 2, 3, 4], 0, 2)
    with pytest.raises((ValueError, IndexError), match="dim"):
        L.take_shard(torch.zeros(1, 8), 0, 2, dim=5)
    with pytest.raises((ValueError, IndexError), match="dim"):
        L.join_shards([torch.zeros(1, 4)] * 2, dim=3)


def test_bad_chunks():
    with pytest.raises(ValueError, match="chunk"):
        L.join_shards([])
    with pytest.raises(ValueError, match="chunks differ"):
        L.join_shards([torch.zeros(1, 4), torch.zeros(1, 3)], dim=1)
    with pytest.raises(ValueError, match="chunks"):  # other dims differ
        L.join_shards([torch.zeros(2, 4), torch.zeros(3, 4)], dim=1)
    with pytest.raises(ValueError, match="chunk"):
        L.join_shards_varlen([], torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="tokens"):
        L.join_shards_varlen([torch.zeros(2), torch.zeros(3)], torch.tensor([0, 4],
                                                                        dtype=torch.int32))


@pytest.mark.parametrize("cu", [
    [0, 6, 4, 8],  # not monotone
    [2, 4, 8],  # does not start at 0
    [0, 4],  # ends before the token count (8): trailing tokens would be dropped
    [0, 4, 12],  # ends after the token count
])
def test_bad_cu_seqlens_values(cu):
    x = torch.zeros(8)
    for layout in LAYOUTS:
        with pytest.raises(ValueError, match="cu_seqlens"):
            L.take_shard_varlen(x, torch.tensor(cu, dtype=torch.int32), 0, 2, layout=layout)


@pytest.mark.parametrize("cu", [torch.tensor([0.0, 4.0, 8.0]), torch.tensor([[0, 4, 8]]),
                                torch.tensor([8], dtype=torch.int32), "0,4,8"])
def test_bad_cu_seqlens_types(cu):
    with pytest.raises((ValueError, TypeError), match="cu_seqlens"):
        L.take_shard_varlen(torch.zeros(8), cu, 0, 2)


