"""dilated/bench/bench_peer_torchscale.py on the CPU: the whole script (--smoke) and its checks
with a minimal peer written here (torchscale's head rule, its module's attribute names, its
branch weights without gradient, flash-attn's ``flash_attn_func`` through the shim), and with
torchscale's LongNet itself where ``.peers/`` holds it (``common/bench/fetch_peers.sh``; CI has
no copy, so there the in-test peer stands in)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from longattn.common.testing import flash_shim_removed_after, load_script

BENCH = Path(__file__).resolve().parents[1] / "bench"
ROOT = BENCH.parents[1]
REAL = (ROOT / ".peers" / "torchscale").is_dir()


def _bench():
    return load_script(BENCH / "bench_peer_torchscale.py")


class FakeDilatedAttention(nn.Module):
    """Dilated attention with torchscale's head rule (head h: offset h // ceil(H / r)), the
    exact positions (no segment padding), branch weights from the lse without gradient."""

    def __init__(self, seg, rates, embed, heads, rule="contiguous"):
        super().__init__()
        self.seg, self.rates, self.heads, self.rule = list(seg), list(rates), heads, rule
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed, embed)
                                                                for _ in range(4))
        self.inner_attn_ln = nn.LayerNorm(embed, eps=1e-5)

    def forward(self, query, key, value, is_causal=False):
        from flash_attn.flash_attn_interface import flash_attn_func

        b, s, e = query.shape
        h = self.heads
        q, k, v = (p(x).view(b, s, h, e // h) for p, x in ((self.q_proj, query),
                                                            (self.k_proj, key),
                                                            (self.v_proj, value)))
        outs, lses = [], []
        for w, r in zip(self.seg, self.rates):
            w = min(w, s)
            out = q.new_zeros(q.shape)
            lse = torch.full((b, h, s), float("-inf"), dtype=torch.float32)
            for j in range(h):
                off = j // math.ceil(h / r) if self.rule == "contiguous" else j % r
                for start in range(0, s, w):
                    idx = torch.arange(start + off, min(start + w, s), r)
                    if idx.numel():
                        o, l, _ = flash_attn_func(q[:, idx, j:j + 1], k[:, idx, j:j + 1],
                                                  v[:, idx, j:j + 1], causal=is_causal,
                                                  return_attn_probs=True)
                        out[:, idx, j] = o[:, :, 0]
                        lse[:, j, idx] = l[:, 0]
            outs.append(out)
            lses.append(lse)
        with torch.no_grad():
            wts = torch.softmax(torch.stack(lses), 0)
        a = sum(wt.transpose(1, 2)[..., None].to(o.dtype) * o for wt, o in zip(wts, outs))
        return self.out_proj(self.inner_attn_ln(a.reshape(b, s, e))), None


FAKE = {"name": "in-test peer", "version": "in-test peer", "make": FakeDilatedAttention,
        "head_rule": "contiguous", "layout": "exact", "lse_grad": False}
# claims torchscale's head rule but implements LongNet's: its own-semantics check must fail
WRONG = dict(FAKE, make=lambda *a: FakeDilatedAttention(*a, rule="mod"))
PEERS = [FAKE] + ([None] if REAL else [])  # None: torchscale from .peers
IDS = ["in-test peer"] + (["torchscale"] if REAL else [])


@pytest.fixture(autouse=True)
def _no_shim_left_behind():
    with flash_shim_removed_after():
        yield


@pytest.mark.parametrize("peer", PEERS, ids=IDS)
def test_smoke(tmp_path, capsys, peer):
    mod = _bench()
    assert mod.main(["--smoke", "--out", str(tmp_path)], peer=peer) == 0
    data = json.loads((tmp_path / "bench_peer_torchscale.json").read_text())
    name = "torchscale" if peer is None else FAKE["name"]
    timed = {(r["what"], r["shape"]["S"]) for r in data if r["median_ms"] is not None}
    for s in (256, 512):
        for who in (name, "longattn module", "longattn function"):
            for d in ("fwd", "fwd+bwd"):
                assert (f"{who} {d}", s) in timed, timed
    checks = [r for r in data if r["what"].startswith("check")]
    assert checks and all(r["extra"]["ok"] for r in checks)
    same = [r for r in checks if r["what"].endswith(f"{name} vs longattn")]
    assert same and same[0]["extra"]["must"] == ["out", "dx", "dparams"]  # one rate-1 branch
    assert "correctness: PASS" in capsys.readouterr().out


@pytest.mark.parametrize("peer", PEERS, ids=IDS)
def test_checks_show_where_the_outputs_agree(peer):
    mod = _bench()
    peer = mod.PEER if peer is None else peer
    ok, rows = mod.run_checks("cpu", torch.float32, peer, mod.CASES[1:3])
    assert ok
    errs = {r["what"].split(": ", 1)[1].split(" (")[0]: r["extra"]["errors"] for r in rows
            if "LongNet's rates" in r["what"]}
    who = peer["name"]
    # another head rule: the outputs differ; without the lse gradient: so do the gradients
    assert errs[f"{who} vs longattn"]["out"] > 0.1
    assert errs[f"{who} vs LongNet with {who}'s head rule"]["dx"] > 1e-2
    two = {r["what"].split(": ", 1)[1]: r["extra"]["errors"] for r in rows
           if "rates 1, 1" in r["what"]}
    assert two[f"{who} vs longattn"]["out"] < 1e-5 < two[f"{who} vs longattn"]["dx"]


def test_checks_fail_for_a_peer_that_is_not_what_it_claims():
    mod = _bench()
    ok, rows = mod.run_checks("cpu", torch.float32, WRONG, mod.CASES[2:3])
    assert not ok
    bad = [r["what"] for r in rows if not r["extra"]["ok"]]
    assert bad == [f"check {mod.CASES[2][0]}: in-test peer vs reference (in-test peer's "
                   "semantics)"]


def test_reference_reproduces_longnets_oracle_and_torchscales_layout():
    """The float64 reimplementation: LongNet's rule equals the oracle; torchscale's layout
    differs from the exact one only where r does not divide w and S holds several segments."""
    from longattn.reference.dilated import dilated_attention as oracle

    mod = _bench()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for seg, rates in (((8, 20), (1, 3)), ((5, 16, 40), (1, 2, 6))):
        got = mod.dilated64(q, k, v, seg, rates)
        ref, _ = oracle(q.numpy(), k.numpy(), v.numpy(), seg, rates, causal=True)
        assert float((got - torch.from_numpy(ref)).abs().max()) < 1e-12
    divides = mod.dilated64(q, k, v, (8, 20), (1, 4), layout="torchscale")
    assert torch.equal(divides, mod.dilated64(q, k, v, (8, 20), (1, 4)))
    shifted = mod.dilated64(q, k, v, (8, 20), (1, 3), layout="torchscale")
    assert float((shifted - mod.dilated64(q, k, v, (8, 20), (1, 3))).abs().max()) > 1e-2
