"""The ragged (THD) cuDNN varlen path of the cudnn backend, on the CPU.

cuDNN cannot run here, so the graph code runs against a small stand-in for the ``cudnn``
module (:class:`FakeCudnn`) that records the graph and executes it the way cuDNN documents
its SDPA with a padding mask and ragged offsets: each sequence ``b`` read at element offset
``ragged[b]`` with the declared strides, ``seq_len_q/kv[b]`` rows and keys, the band aligned
bottom-right on the sequence's own lengths, stats ``[B, H, S, 1]`` ragged like the rest, and
out-of-bounds reads or writes raise. That checks what can go wrong without a GPU: offsets,
strides, the lse layout, the padding sequences of the batch bucket, the backward's
``max_total_seq_len``, graph reuse across document layouts, the fall-back when cuDNN refuses.
What cuDNN itself computes is checked on a GPU by ``common/bench/check_cudnn_ragged.py``.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.common.bench import cu_seqlens
from longattn.common.kernels import cudnn_backend as cb
from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
from longattn.common.testing import rel_error
from longattn.reference import attention, attention_backward, document_mask

# --------------------------------------------------------------------------------------------
# the bucket rule and the run-time tensors


def test_bucket_examples():
    assert [cb.bucket_batch(n) for n in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]
    assert [cb.bucket_seqlen(n) for n in (0, 1, 127, 128, 129, 1837, 32768)] == [
        128, 128, 128, 128, 256, 2048, 32768]
    assert cb.bucket_total(262144) == 262144
    assert cb.bucket_total(262145) == 262144 + 65536
    assert cb.bucket_total(200000) == 7 * 32768
    assert cb.bucket_total(5) == 128


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 1 << 22))
def test_bucket_bounds(n):
    b, s, t = cb.bucket_batch(n), cb.bucket_seqlen(n), cb.bucket_total(n)
    assert n <= b < 2 * n and b & (b - 1) == 0
    assert max(n, 128) <= s < 2 * max(n, 128) and s & (s - 1) == 0
    assert n <= t < n + max(128, n / 4)
    assert cb.bucket_total(t) == t  # a bucket is its own bucket


def test_ragged_metadata_pads_with_empty_sequences():
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    lens, offs = cb.ragged_metadata(cu, 8, (4 * 16, 4))
    assert lens.dtype == torch.int32 and lens.shape == (8, 1, 1, 1)
    assert lens.flatten().tolist() == [5, 0, 7, 0, 0, 0, 0, 0]
    assert set(offs) == {64, 4}
    for e, t in offs.items():
        assert t.dtype == torch.int64 and t.shape == (9, 1, 1, 1)
        assert t.flatten().tolist() == [e * x for x in (0, 5, 5, 12, 12, 12, 12, 12, 12)]
    with pytest.raises(ValueError, match="3 sequences, the graph 1 to 2"):
        cb.ragged_metadata(cu, 2, (4,))


def test_ragged_metadata_int64_offsets_do_not_overflow():
    cu = torch.tensor([0, 1 << 20, 1 << 21], dtype=torch.int32)
    _, offs = cb.ragged_metadata(cu, 2, (64 * 128,))
    assert offs[64 * 128].flatten().tolist()[-1] == (1 << 21) * 64 * 128  # > 2**31


def _layout(lq, lk, window=(-1, 0)):
    q = torch.zeros(sum(lq), 1, 8)
    k = torch.zeros(sum(lk), 1, 8)
    cu = lambda ls: np.concatenate([[0], np.cumsum(ls)]).tolist()  # noqa: E731
    return cb._call_layout(q, k, cu(lq), cu(lk), window, None, None)


def test_graph_key_depends_on_the_bucket_not_on_the_lengths():
    def key(kind, lq, lk, window=(-1, 0)):
        lay = _layout(lq, lk, window)[0]
        return cb.varlen_key(kind, torch.bfloat16, torch.device("cpu"), 0.125, window,
                             (8, 2, 128, 128), lay)

    a = ([1000, 700, 137], [1000, 700, 137])
    b = ([3, 1024, 810], [3, 1024, 810])  # other lengths, same bucket (3 -> 4, 1024, 1837)
    for kind in ("varlen fwd", "varlen bwd"):
        assert key(kind, *a) == key(kind, *b)
        assert key(kind, *a) != key(kind, [1000, 700, 137, 1, 1], [1000, 700, 137, 1, 1])
        assert key(kind, *a) != key(kind, [1025, 700, 112], [1025, 700, 112])  # S 1024 -> 2048
        assert key(kind, *a) != key(kind, [1000, 700, 37], [1000, 800, 37])  # bottom-right
    # the token total is the backward's (workspace) only
    c = ([1000, 700, 600], [1000, 700, 600])  # 2300 tokens: another total bucket
    assert key("varlen fwd", *a) == key("varlen fwd", *c)
    assert key("varlen bwd", *a) != key("varlen bwd", *c)


def test_call_layout():
    lay, alone, keyless = _layout([5, 0, 9], [5, 3, 9])
    assert lay == cb.RaggedLayout(4, 128, 128, 128, 128, True) and alone and not keyless
    lay, alone, keyless = _layout([5, 9], [5, 9])
    assert not lay.bottom_right and not alone and not keyless  # top-left: lengths agree
    lay, alone, keyless = _layout([5, 9], [6, 0], window=(-1, -1))
    assert not lay.bottom_right and keyless and not alone  # no band: nothing to align
    # tensors and both max lengths: nothing read back to the host
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    x = torch.zeros(14, 1, 8)
    lay, alone, keyless = cb._call_layout(x, x, cu, cu, (-1, 0), 9, 9)
    assert not lay.bottom_right and alone and keyless  # same tensor: top-left; rows zeroed
    lay, _, _ = cb._call_layout(x, x, cu, cu.clone(), (-1, 0), 9, 9)
    assert lay.bottom_right


def test_sequences_without_keys_get_no_queries():
    data = cb._run_tensors(torch.device("cpu"), [0, 4, 9, 9, 12], [0, 0, 6, 8, 8],
                           cb.ragged_layout(4, 5, 6, 12, 8, False), (2, 1, 8, 8))
    assert data["seq_q"].flatten().tolist() == [0, 5, 0, 0]  # 1st and 4th: no keys
    assert data["seq_k"].flatten().tolist() == [0, 6, 2, 0]
    assert data["off_q16"].flatten().tolist() == [0, 64, 144, 144, 192]  # rows stay in place


def test_varlen_supports_reasons():
    x = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    reason = cb.varlen_supports(x, x, x, [4], [4], (-1, 0))
    assert reason == (cb.MISSING if cb.cudnn is None else "needs CUDA tensors")


# --------------------------------------------------------------------------------------------
# a stand-in for cudnn that executes graphs the way cuDNN documents them


class FakeTensor:
    def __init__(self, name, dim=None, stride=None, data_type=None):
        self.name, self.dim, self.stride, self.data_type = name, dim, stride, data_type
        self.ragged, self.output = None, False

    def set_output(self, v):
        self.output = v
        return self

    def set_dim(self, d):
        self.dim = list(d)
        return self

    def set_stride(self, s):
        self.stride = list(s)
        return self

    def set_data_type(self, t):
        self.data_type = t
        return self

    def set_ragged_offset(self, t):
        self.ragged = t
        return self


class FakeGraph:
    def __init__(self, fake, **kw):
        self.fake, self.node, self.tensors = fake, None, []

    def tensor(self, name, dim, stride, data_type):
        t = FakeTensor(name, list(dim), list(stride), data_type)
        self.tensors.append(t)
        return t

    def sdpa(self, name, q, k, v, generate_stats, attn_scale, **kw):
        assert generate_stats
        self.node = dict(kind="fwd", q=q, k=k, v=v, scale=attn_scale, **kw)
        self.node.update(o=FakeTensor("O"), stats=FakeTensor("Stats"))
        return self.node["o"], self.node["stats"]

    def sdpa_backward(self, name, q, k, v, o, dO, stats, attn_scale, **kw):
        self.node = dict(kind="bwd", q=q, k=k, v=v, o=o, dO=dO, stats=stats, scale=attn_scale,
                         **kw)
        self.node.update(dq=FakeTensor("dQ"), dk=FakeTensor("dK"), dv=FakeTensor("dV"))
        return self.node["dq"], self.node["dk"], self.node["dv"]

    def validate(self):
        n, dt = self.node, self.fake.data_type
        assert n["use_padding_mask"] is True
        b = n["seq_len_q"].dim[0]
        for s in ("seq_len_q", "seq_len_kv"):
            assert n[s].dim == [b, 1, 1, 1] and n[s].data_type == dt.INT32
        ports = ("q", "k", "v", "o", "stats") + (("dO", "dq", "dk", "dv") if "dq" in n else ())
        for p in ports:
            t = n[p]
            assert t.ragged is not None, f"{p} is not ragged"
            assert t.ragged.dim == [b + 1, 1, 1, 1] and t.ragged.data_type == dt.INT64
            assert len(t.dim) == 4 and t.dim[0] == b and t.stride[3] == 1
        if n["kind"] == "bwd":
            assert n["max_total_seq_len_q"] >= 1 and n["max_total_seq_len_kv"] >= 1
        if self.fake.refuse:
            raise self.fake.cudnnGraphNotSupportedError("no engine (test)")

    def build_operation_graph(self):
        pass

    def create_execution_plans(self, modes):
        self.fake.builds[self.node["kind"]] += 1

    def check_support(self):
        pass

    def build_plans(self):
        pass

    def get_workspace_size(self):
        return 16

    def execute(self, pack, workspace, handle=None):
        assert all(isinstance(t, FakeTensor) for t in pack)
        n = dict(self.node)
        data = {p: pack[t] for p, t in n.items() if isinstance(t, FakeTensor)}
        for p in ("q", "k", "v", "o", "stats", "dO", "dq", "dk", "dv"):
            if p in data:
                data[p + "_ro"] = pack[n[p].ragged].flatten().tolist()
        (_fwd if n["kind"] == "fwd" else _bwd)(n, data)


def _view(t, x, ro, b, rows):
    """Sequence b of ragged operand t (data x) as a [rows, H, D] view; raises out of bounds."""
    _, h, s, d = t.dim
    _, sh, ss, sd = t.stride
    assert rows <= s, f"{t.name}: {rows} rows > the graph's S {s}"
    off = ro[b]
    if rows:
        last = off + (rows - 1) * ss + (h - 1) * sh + (d - 1) * sd
        assert off >= 0 and last < x.numel(), f"{t.name}: element {last} out of bounds"
    assert x.is_contiguous()
    return x.view(-1).as_strided((rows, h, d), (ss, sh, sd), x.storage_offset() + off)


def _mask(n, lq, lk):
    i = torch.arange(lq)[:, None]
    if n["diagonal_alignment"] == "BR":
        i = i + lk - lq
    j = torch.arange(lk)[None, :]
    m = torch.ones(lq, lk, dtype=torch.bool)
    if n.get("diagonal_band_left_bound") is not None:
        m &= j > i - n["diagonal_band_left_bound"]
    if n.get("diagonal_band_right_bound") is not None:
        m &= j <= i + n["diagonal_band_right_bound"]
    return m


def _seqs(n, data):
    lq = data["seq_len_q"].flatten().tolist()
    lk = data["seq_len_kv"].flatten().tolist()
    assert not any(b == 0 < a for a, b in zip(lq, lk)), "queries without keys: not documented"
    return list(enumerate(zip(lq, lk)))


def _scores(n, data, b, lq, lk):
    q = _view(n["q"], data["q"], data["q_ro"], b, lq).double()
    k = _view(n["k"], data["k"], data["k_ro"], b, lk).double()
    v = _view(n["v"], data["v"], data["v_ro"], b, lk).double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * n["scale"]
    return q, k, v, s.masked_fill(~_mask(n, lq, lk), float("-inf"))


def _fwd(n, data):
    for b, (lq, lk) in _seqs(n, data):
        if lq == 0:
            continue
        _, _, v, s = _scores(n, data, b, lq, lk)
        lse = torch.logsumexp(s, -1)  # [H, lq]
        out = torch.einsum("hij,jhd->ihd", torch.exp(s - lse[..., None]), v)
        _view(n["o"], data["o"], data["o_ro"], b, lq).copy_(out)
        _view(n["stats"], data["stats"], data["stats_ro"], b, lq).copy_(lse.t()[..., None])


def _bwd(n, data):
    assert data["q"].shape[0] <= n["max_total_seq_len_q"]
    assert data["k"].shape[0] <= n["max_total_seq_len_kv"]
    for b, (lq, lk) in _seqs(n, data):
        if lq == 0:
            continue  # cuDNN may leave dK / dV of keys no query sees unwritten
        q, k, v, s = _scores(n, data, b, lq, lk)
        lse = _view(n["stats"], data["stats"], data["stats_ro"], b, lq)[..., 0].t().double()
        p = torch.exp(s - lse[..., None])  # [H, lq, lk]
        do = _view(n["dO"], data["dO"], data["dO_ro"], b, lq).double()
        o = _view(n["o"], data["o"], data["o_ro"], b, lq).double()
        dp = torch.einsum("ihd,jhd->hij", do, v)
        ds = p * (dp - (do * o).sum(-1).t()[..., None])
        hkv = n["k"].dim[1]
        dk = torch.einsum("hij,ihd->jhd", ds, q) * n["scale"]
        dv = torch.einsum("hij,ihd->jhd", p, do)
        _view(n["dq"], data["dq"], data["dq_ro"], b, lq).copy_(
            torch.einsum("hij,jhd->ihd", ds, k) * n["scale"])
        _view(n["dk"], data["dk"], data["dk_ro"], b, lk).copy_(
            dk.unflatten(1, (hkv, -1)).sum(2))
        _view(n["dv"], data["dv"], data["dv_ro"], b, lk).copy_(
            dv.unflatten(1, (hkv, -1)).sum(2))


class FakeCudnn(types.SimpleNamespace):
    class cudnnGraphNotSupportedError(Exception):
        pass

    def __init__(self):
        super().__init__(
            data_type=types.SimpleNamespace(HALF="half", BFLOAT16="bf16", FLOAT="float",
                                            INT32="int32", INT64="int64"),
            heur_mode=types.SimpleNamespace(A="A", FALLBACK="FALLBACK"),
            diagonal_alignment=types.SimpleNamespace(TOP_LEFT="TL", BOTTOM_RIGHT="BR"),
            builds={"fwd": 0, "bwd": 0}, refuse=False)

    def pygraph(self, **kw):
        return FakeGraph(self, **kw)


@pytest.fixture
def fake(monkeypatch):
    f = FakeCudnn()
    monkeypatch.setattr(cb, "cudnn", f)
    monkeypatch.setattr(cb, "MISSING", None)
    monkeypatch.setattr(cb, "_DTYPES", {torch.float16: "half", torch.bfloat16: "bf16"})
    monkeypatch.setattr(cb, "_handle", lambda device: None)
    monkeypatch.setattr(cb, "_graphs", {})
    # the CPU stands in for CUDA: every other rule of varlen_supports still applies
    real = cb.cuda_limits
    monkeypatch.setattr(cb, "cuda_limits", lambda req, dtypes, max_head_dim=None: real(
        req, dtypes, max_head_dim) if req.q.is_cuda else (
        None if req.q.dtype in dtypes and not req.needs_dlse else "refused"))
    return f




def _inputs(lq, lk, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, d, generator=g).to(dtype)
    k, v = (torch.randn(sum(lk), hkv, d, generator=g).to(dtype) for _ in range(2))
    dout = torch.randn(sum(lq), hq, d, generator=g).to(dtype)
    return q, k, v, dout


def _oracle(q, k, v, dout, cu_q, cu_k, causal, window):
    m = document_mask(cu_q.numpy(), cu_k.numpy(), causal=causal, window=window)
    args = [t.double().numpy()[None] for t in (q, k, v)]
    out, lse = attention(*args, mask=m[None, None])
    grads = attention_backward(dout.double().numpy()[None], *args, mask=m[None, None])
    return out[0], lse[0], [x[0] for x in grads]


CASES = [
    # (q lengths, k lengths, Hq, Hkv, D, causal, window)
    ([300, 1, 77, 459], None, 4, 2, 16, True, (-1, -1)),  # odd lengths, GQA
    ([30, 51, 7, 64], [51, 102, 7, 70], 4, 4, 8, True, (-1, -1)),  # Sq < Sk: bottom-right
    ([30, 51, 7, 64], [51, 102, 7, 70], 2, 1, 16, False, (-1, -1)),  # Sq < Sk, full
    ([1] * 9, None, 2, 2, 8, True, (-1, -1)),  # one-token documents, 9 -> 16 sequences
    ([40, 0, 25], [40, 12, 30], 2, 1, 8, True, (6, 0)),  # keys without queries, window
    ([33, 20], [50, 20], 2, 2, 8, False, (5, 3)),  # two-sided window, bottom-right
    ([9, 14, 6, 11], [0, 30, 0, 11], 4, 2, 8, False, (-1, -1)),  # queries without keys
    ([9, 14, 6, 11], [20, 0, 7, 11], 2, 2, 16, True, (-1, -1)),  # ... causal, GQA
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fake_ragged_graph_matches_the_oracle(fake, case):
    lq, lk, hq, hkv, d, causal, window = CASES[case]
    lk = lk or lq
    q, k, v, dout = _inputs(lq, lk, hq, hkv, d, torch.float16, seed=case)
    cq, ck = cu_seqlens(lq), cu_seqlens(lk)
    out, lse = attention_forward_varlen(q, k, v, cq, ck, causal=causal, window_size=window,
                                        backend="cudnn")
    assert fake.builds == {"fwd": 1, "bwd": 0}  # ran the ragged graph, not the loop
    dq, dk, dv = attention_backward_varlen(dout, q, k, v, out, lse, cq, ck, causal=causal,
                                           window_size=window, backend="cudnn")
    assert fake.builds == {"fwd": 1, "bwd": 1}
    ro, rl, rg = _oracle(q, k, v, dout, cq, ck, causal, window)
    assert lse.dtype == torch.float32 and lse.shape == (hq, sum(lq)) and lse.is_contiguous()
    assert out.shape == (sum(lq), hq, d) and out.dtype == q.dtype
    assert rel_error(out, ro) < 2e-3 and rel_error(lse, rl) < 1e-6
    for got, ref in zip((dq, dk, dv), rg):
        assert got.dtype == q.dtype
        assert rel_error(got, ref) < 3e-3


def test_fake_graph_declares_ragged_operands(fake):
    lq, lk = [5, 9, 2], [7, 9, 3]
    q, k, v, dout = _inputs(lq, lk, 4, 2, 16, torch.bfloat16)
    out, lse = cb.varlen_forward(q, k, v, cu_seqlens(lq), cu_seqlens(lk), softmax_scale=0.25,
                                 window_size=(-1, 0))
    (g, ts), = [x for x in cb._graphs.values()]
    n = g.node
    assert n["diagonal_alignment"] == "BR" and n["diagonal_band_right_bound"] == 0
    assert "diagonal_band_left_bound" not in n and n["scale"] == 0.25
    assert n["q"].dim == [4, 4, 128, 16] and n["q"].stride == [128 * 64, 16, 64, 1]
    assert n["k"].dim == [4, 2, 128, 16] and n["k"].stride == [128 * 32, 16, 32, 1]
    assert n["stats"].dim == [4, 4, 128, 1] and n["stats"].stride == [128 * 4, 1, 4, 1]
    assert n["stats"].data_type == "float" and n["o"].data_type == "bf16"
    assert n["q"].ragged is n["o"].ragged  # D == Dv: one offset tensor (cu * Hq * D)


def test_fake_graph_is_reused_across_document_layouts(fake):
    rng = np.random.default_rng(0)
    layouts = set()
    for _ in range(5):  # 5 to 8 documents (B -> 8), the longest 200 (S -> 256), 600 tokens
        n = int(rng.integers(5, 9))
        lens = [200] + (rng.multinomial(400 - (n - 1), [1 / (n - 1)] * (n - 1)) + 1).tolist()
        rng.shuffle(lens)
        layouts.add(tuple(lens))
        q, k, v, dout = _inputs(lens, lens, 2, 1, 8, torch.bfloat16)
        cu = cu_seqlens(lens)
        out, lse = cb.varlen_forward(q, k, v, cu, cu, softmax_scale=0.3, window_size=(-1, 0))
        cb.varlen_backward(dout, q, k, v, out, lse, cu, cu, softmax_scale=0.3,
                           window_size=(-1, 0))
    assert len(layouts) == 5 and fake.builds == {"fwd": 1, "bwd": 1}
    assert cb.graph_count("varlen fwd") == 1 and cb.graph_count("varlen bwd") == 1


def test_fake_refusal_falls_back_to_auto_with_a_warning(fake):
    fake.refuse = True
    lq = [6, 9]
    q, k, v, dout = _inputs(lq, lq, 2, 1, 8, torch.float16)
    cu = cu_seqlens(lq)
    with pytest.warns(RuntimeWarning, match="no engine for this varlen fwd graph"):
        out, lse = attention_forward_varlen(q, k, v, cu, cu, softmax_scale=0.3, causal=True,
                                            backend="cudnn")
    ref_out, ref_lse = attention_forward_varlen(q, k, v, cu, cu, softmax_scale=0.3, causal=True,
                                                backend="torch")
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(cb.GraphRefused):  # remembered: no second build, no second warning
        cb.varlen_forward(q, k, v, cu, cu, softmax_scale=0.3, window_size=(-1, 0))
    assert fake.builds == {"fwd": 0, "bwd": 0} and cb.graph_count() == 0


def test_fake_unserved_calls_do_not_build(fake):
    q, k, v, dout = _inputs([6, 2], [3, 2], 2, 1, 8, torch.float16)
    # Sq > Sk causal: the first rows see no key -> not the ragged graph
    no_key = "a query row sees no key of its sequence"
    assert cb.varlen_supports(q, k, v, [6, 2], [3, 2], (-1, 0)) == no_key
    assert cb.varlen_supports(q, k, v, [6, 5], [6, 2], (-1, 0)) == no_key
    assert cb.varlen_supports(q, k, v, [6, 2], [0, 5], (-1, 0)) is None  # no key at all: served
    assert cb.varlen_supports(q, k, v, [6, 2], [6, 2], (-1, 0), needs_dlse=True) == "refused"
    assert cb.varlen_supports(q.float(), k, v, [6, 2], [6, 2], (-1, 0)) == "refused"
    assert cb.varlen_supports(q, k, v, [6, 2], [6, 2], (-1, 0)) is None
    assert fake.builds == {"fwd": 0, "bwd": 0}


def test_varlen_bad_arguments(fake):
    q, k, v, dout = _inputs([6, 2], [6, 2], 2, 1, 8, torch.float16)
    cu = cu_seqlens([6, 2])
    with pytest.raises(ValueError, match="cu_seqlens_q .* and cu_seqlens_k"):
        cb.varlen_forward(q, k, v, cu, cu_seqlens([8]), softmax_scale=0.3, window_size=(-1, 0))
    with pytest.raises(TypeError, match="q must be float16 or bfloat16"):
        cb.varlen_forward(q.float(), k, v, cu, cu, softmax_scale=0.3, window_size=(-1, 0))
    with pytest.raises(ValueError, match="k must be a packed"):
        cb.varlen_forward(q, k[None], v, cu, cu, softmax_scale=0.3, window_size=(-1, 0))
    with pytest.raises(ValueError, match=r"lse must be \[Hq, Tq\]"):
        cb.varlen_backward(dout, q, k, v, q, torch.zeros(8, 2), cu, cu, softmax_scale=0.3,
                           window_size=(-1, 0))


# --------------------------------------------------------------------------------------------
# the GPU probe's own logic, on the stand-in


def _probe():
    from pathlib import Path

    from longattn.common.testing import load_script

    return load_script(Path(__file__).resolve().parents[1] / "bench" / "check_cudnn_ragged.py")


def test_probe_reference_is_the_oracle():
    probe = _probe()
    lq, lk = [5, 9, 1, 4], [7, 9, 3, 0]  # the last sequence: queries without keys
    q, k, v, dout = _inputs(lq, lk, 4, 2, 8, torch.float64)
    for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (2, 0))):
        out, lse, grads = probe.reference(q, k, v, dout, lq, lk, 8 ** -0.5, causal=causal,
                                          window=window)
        ro, rl, rg = _oracle(q, k, v, dout, cu_seqlens(lq), cu_seqlens(lk), causal, window)
        assert np.isneginf(lse[:, -4:].numpy()).all() and not out[-4:].any()
        for got, ref in zip((out, lse, *grads), (ro, rl, *rg)):
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_probe_checks_run_on_the_stand_in(fake, monkeypatch):
    probe = _probe()
    for name in ("varlen_forward", "varlen_backward"):  # RaggedCalls wraps them: restore after
        monkeypatch.setattr(cb, name, getattr(cb, name))
    calls = probe.RaggedCalls(cb)
    cpu = torch.device("cpu")
    small = lambda ls: ls and [n if n <= 1 else max(2, n // 8) for n in ls]  # noqa: E731
    for name, lq, lk, *rest in probe.CASES:  # the GPU's cases, 8x shorter (a CPU reference)
        row = probe.check_case((name, small(lq), small(lk), *rest), cpu, calls)
        assert row["ok"] and row["path"] == "ragged", row
    layouts = probe.draw_layouts(2048, 64, 256, 3)
    assert len({tuple(x) for x in layouts}) == 3 and all(sum(x) == 2048 for x in layouts)
    row = probe.check_reuse(layouts, 2, 16, cpu, {})
    assert row["ok"] and (row["graphs fwd"], row["graphs bwd"]) == (1, 1), row
    fake.refuse = True  # a refused graph: the row says it fell back and fails
    row = probe.check_case(("refused", [5, 9], None, 2, 2, 8, True, (-1, -1)), cpu, calls)
    assert not row["ok"] and row["path"] == "fell back" and "no engine" in row["refused"]


def test_probe_without_cuda_skips(tmp_path, capsys, monkeypatch):
    """Where CUDA is missing the probe says it skipped and succeeds (checked on any machine:
    CUDA is hidden)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _probe().main(["--smoke", "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out


def test_host_metadata_travels_in_one_copy_with_its_dtypes():
    """The lengths (int32) and offsets (int64, past 2**31) made on the host come back equal,
    with their dtypes and shapes, from the one flat copy to the device."""
    cu = torch.tensor([0, 3, 3, 1 << 20], dtype=torch.int64)
    lens, offs = cb.ragged_metadata(cu, 4, (4096,))
    data = {"seq": lens, "off": offs[4096]}
    got = cb._to_device(data, torch.device("cpu"))
    for name, t in data.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name
    assert int(got["off"].max()) == (1 << 20) * 4096 > 2 ** 31
