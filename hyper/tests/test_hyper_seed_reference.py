"""The seed reference of the quality benchmark (``bench/seed_reference.py``): longattn's rules
give ``hyper_attention`` exactly, the fused seed's rules give the dense weighted attention they
describe, and ``bench_quality.py --smoke`` runs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from longattn.common.testing import shared_script
from longattn.hyper import draw_projections, draw_sample_indices, hyper_attention, make_plan

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    return shared_script(BENCH / f"{name}.py")


ref = _load("seed_reference")


def _qkv(seed, b, s, h, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(3)]


def test_bucket_rank_orders():
    code = torch.arange(256)
    g = ref.bucket_rank(code, "g")
    assert torch.equal(g, code ^ (code >> 1))
    assert torch.equal(ref.bucket_rank(g, "ginv"), code)  # g^-1 undoes g


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1 << 26, 1])  # all heads at once, one head per group
def test_longattn_rules_give_hyper_attention(causal, chunk, monkeypatch):
    monkeypatch.setattr(ref, "CHUNK", chunk)
    b, s, h, d, msl = 2, 256, 2, 16, 64 if causal else 32
    q, k, v = _qkv(0, b, s, h, d)
    g = torch.Generator().manual_seed(1)
    p = draw_projections(d, 4, generator=g)
    si = draw_sample_indices(s, s, b, h, 32, causal=causal, min_seq_len=msl, generator=g)
    ids = {c: i for i, c in enumerate(make_plan(s, s, causal, msl).calls)}
    want, want_lse = hyper_attention(q, k, v, causal=causal, block_size=32, min_seq_len=msl,
                                     projections=p, sample_indices=si, backend="torch",
                                     return_lse=True)
    out, lse = ref.seed_attention(q, k, v, projections=p, rules=ref.LONGATTN, causal=causal,
                                  block_size=32, sample_size=32, min_seq_len=msl, tile=16,
                                  samples=lambda *c: si[ids[c]])
    assert (out - want).abs().max() < 1e-12 and (lse - want_lse).abs().max() < 1e-12


def _dense_fused(q, k, v, p, *, block, cols, exclude):
    """Dense weighted attention of one non-causal call under the fused seed's rules: weight
    1 for the sorted block's keys, plus 1 per sampled column (``cols[h]``: (head, key) pairs it
    reads, none for a head whose columns lie past the tensor: NaN), g(code) order."""
    _, s, h, d = q.shape
    rq = ref.bucket_rank(ref.lsh_codes(q, p), "g")[0]
    rk = ref.bucket_rank(ref.lsh_codes(k, p), "g")[0]
    outs, lses = [], []
    for hh in range(h):
        bq = torch.argsort(torch.sort(rq[hh], stable=True).indices) // block  # block of row
        bk = torch.argsort(torch.sort(rk[hh], stable=True).indices) // block
        keys, vals, w = [k[0, :, hh]], [v[0, :, hh]], [(bq[:, None] == bk[None, :]).double()]
        if cols[hh] is None:
            outs.append(torch.full((s, v.shape[-1]), math.nan, dtype=q.dtype))
            lses.append(torch.full((s,), math.nan, dtype=q.dtype))
            continue
        for src, j in cols[hh]:
            keys.append(k[0, j, src][None])
            vals.append(v[0, j, src][None])
            inblock = (src == hh) & (bk[j] == bq)
            w.append((~inblock if exclude else torch.ones_like(inblock)).double()[:, None])
        kk, vv, ww = torch.cat(keys), torch.cat(vals), torch.cat(w, 1)
        sc = q[0, :, hh] @ kk.T * d ** -0.5 + torch.log(ww)
        lses.append(torch.logsumexp(sc, -1))
        outs.append(torch.softmax(sc, -1) @ vv)
    return torch.stack(outs, 1)[None], torch.stack(lses)[None]


@pytest.mark.parametrize("exclude", [False, True])
def test_fused_rules_are_dense_weighted_attention(exclude):
    s, h, d, tile = 64, 2, 8, 8
    q, k, v = _qkv(2, 1, s, h, d)
    p = draw_projections(d, 3, generator=torch.Generator().manual_seed(3))
    rules = ref.FUSED.but(exclude=exclude)
    kw = dict(projections=p, block_size=16, min_seq_len=16, tile=tile)
    # one column tile: the first 8 keys of each head, weight 1
    out, lse = ref.seed_attention(q, k, v, rules=rules, sample_size=8, **kw)
    cols = [[(hh, j) for j in range(8)] for hh in range(h)]
    want, want_lse = _dense_fused(q, k, v, p, block=16, cols=cols, exclude=exclude)
    assert (out - want).abs().max() < 1e-12 and (lse - want_lse).abs().max() < 1e-12
    # two column tiles with the kernel's stride bug (row stride 8): the second tile of head 0
    # is 8 * 8 = 64 rows on, i.e. head 1's keys 0..7; head 1's lies past the tensor
    out, lse = ref.seed_attention(q, k, v, rules=rules, sample_size=16, **kw)
    cols = [[(0, j) for j in range(8)] + [(1, j) for j in range(8)], None]
    want, want_lse = _dense_fused(q, k, v, p, block=16, cols=cols, exclude=exclude)
    assert (out[:, :, 0] - want[:, :, 0]).abs().max() < 1e-12
    assert (lse[:, 0] - want_lse[:, 0]).abs().max() < 1e-12
    assert torch.isnan(out[:, :, 1]).all()
    # "first": the first 16 keys of each head instead
    out, _ = ref.seed_attention(q, k, v, rules=rules.but(samples="first"), sample_size=16, **kw)
    cols = [[(hh, j) for j in range(16)] for hh in range(h)]
    want, _ = _dense_fused(q, k, v, p, block=16, cols=cols, exclude=exclude)
    assert (out - want).abs().max() < 1e-12


def test_fused_causal_reads_future_keys():
    # the fused kernel counts its column addresses from the key slice of a causal call: the
    # call of rows 16..31 over keys 0..15 has a second column tile 4 * 4 = 16 rows on, keys
    # 16..19, so row 16 sees its future keys 17..19
    s, h, d = 64, 1, 8
    q, k, v = _qkv(4, 1, s, h, d)
    p = draw_projections(d, 3, generator=torch.Generator().manual_seed(5))
    kw = dict(projections=p, causal=True, block_size=8, sample_size=8, min_seq_len=16, tile=4,
              row_stride=4)
    v2 = v.clone()
    v2[:, 17:20] += 1.0
    for rules, leaks in ((ref.FUSED, True), (ref.FUSED.but(samples="first"), False)):
        out, _ = ref.seed_attention(q, k, v, rules=rules, **kw)
        out2, _ = ref.seed_attention(q, k, v2, rules=rules, **kw)
        change = float((out2[:, 16] - out[:, 16]).abs().max())
        assert (change > 1e-3) if leaks else (change < 1e-12), (rules, change)


def test_bench_quality_smoke(tmp_path):
    mod = _load("bench_quality")
    mod.main(["--smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_quality.json").read_text())
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench_quality.png").stat().st_size > 0
    sweeps = {(r["extra"]["sweep"], r["extra"]["family"], r["method"]) for r in data}
    for fam in ("random", "clustered", "heavy", "model"):
        assert {m for sw, f, m in sweeps if sw == "ablation" and f == fam} == set(mod.METHODS)
        assert {m for sw, f, m in sweeps if sw == "budget" and f == fam} == \
            set(mod.BUDGET_METHODS)
        assert {m for sw, f, m in sweeps if sw == "causal" and f == fam} == \
            set(mod.CAUSAL_METHODS)
    model = [r["extra"] for r in data if r["extra"]["sweep"] == "model"]
    assert [e["S"] for e in model[1:]] == [256] and model[0]["eval"]["acc"] > 0.5, model
    assert model[1]["top8_noncausal"][0] > 0.3, model  # the trained attention is heavy
    for r in data:
        e = r["extra"]
        if e["sweep"] == "model":
            continue
        assert (e["block_mass"] is None) == e["causal"]
        if not e["causal"]:
            assert 0 < e["block_mass"] <= 1 + 1e-9, r  # a subset of the keys
        if r["method"] != "seed, kernel columns":  # its reads may lie past the tensor
            assert e["rel_err"] is not None and 0 < e["rel_err"] < 10, r
