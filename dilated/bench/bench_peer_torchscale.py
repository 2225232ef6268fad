"""Peers side by side on one GPU: torchscale's LongNet ``DilatedAttention`` against longattn's
``MultiheadDilatedAttention`` at LongNet's configuration, in the same run.

    bash common/bench/fetch_peers.sh    # once, where the index and GitHub are reachable
    PYTHONPATH=.peers:common/src:reference/src:dilated/src \
        python dilated/bench/bench_peer_torchscale.py [--out DIR] [--rounds 3]
    ... --check    # CPU, float32: where the outputs agree, and why they differ elsewhere
    ... --smoke    # a tiny run of the whole script on the CPU

Configuration (``bench_dilated.py``'s, LongNet's): segments 2048..32768, rates 1, 2, 4, 6, 12,
12 heads, head dim 64 (embed 768), bf16, causal, forward and forward + backward, 2**20 tokens
per row (B x S) at S = 32k .. 1M. Contenders, alternated round by round
(``bench.time_interleaved``) on the same input ``x [B, S, 768]``:

* ``torchscale`` -- ``torchscale.component.dilated_attention.DilatedAttention`` from
  microsoft/torchscale (GitHub; the index's torchscale 0.3.0 has no LongNet), run unchanged
  with its args object (``DecoderConfig(segment_length=..., dilated_ratio=...,
  flash_attention=True, seq_parallel=False, xpos_rel_pos=False)``, sub-LN on, as its LongNet
  decoder builds it). It calls ``flash_attn.flash_attn_interface.flash_attn_func(...,
  return_attn_probs=True)``; no flash-attn exists for the GPU machine's torch, so
  ``common/bench/flash_shim.py`` provides it on ``longattn.common.kernels`` (the kernels longattn
  uses; its forward adds nothing, its backward calls the kernels' backward directly);
* ``longattn module`` -- ``MultiheadDilatedAttention`` (the same projections, sub-LN and output
  projection; the weights are copied into torchscale's module);
* ``longattn function`` -- ``dilated_attention`` alone on ``q, k, v [B, S, 12, 64]``.

A row (or one contender) that runs out of memory is recorded as such; the others still run.

The two modules do not compute the same function, so their outputs are compared only where
they agree (``--check``, and the same cases in bf16 at the start of a GPU run):

* heads: torchscale gives head ``h`` the offset ``h // ceil(H / r)`` (contiguous groups), LongNet
  and longattn ``h mod r``;
* torchscale pads each segment to a multiple of ``r`` and concatenates the padded segments
  before cutting the output back to ``S``: where ``r`` does not divide ``w`` (LongNet's 16384 /
  6, 32768 / 12) and the sequence holds more than one segment, the outputs of that branch land
  on the wrong positions (shifted by the padding of the segments before);
* torchscale mixes the branches with weights computed from the lse under ``torch.no_grad()``, so
  its gradients leave out the lse's part (exact only with one branch).

``--check`` compares, per case: longattn against a float64 reimplementation with LongNet's rule
(itself checked against ``longattn.reference.dilated``), torchscale against the same
reimplementation with torchscale's head rule, padding and gradient-free weights (which must
agree), torchscale against LongNet-with-its-head-rule (how far those three behaviours take it),
and torchscale against longattn (equal where every rate is 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from unittest import mock

import torch
import torch.nn.functional as F

from longattn.common import bench
from longattn.common.kernels import pick_backend
from longattn.common.testing import rel_error, shared_script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEERS_DIR = os.path.join(ROOT, ".peers")
EMBED, HEADS = 768, 12

# (name, segments, rates, S, B, H, head_dim); the rate-1 cases are where the semantics agree
CASES = [
    ("one branch, rate 1", (16,), (1,), 64, 2, 4, 8),
    ("two branches, rates 1, 1", (16, 32), (1, 1), 64, 2, 4, 8),
    ("LongNet's rates, every r divides every w", (12, 24, 48, 96, 192), (1, 2, 4, 6, 12), 384, 1,
     12, 4),
    ("LongNet's rates and power-of-two segments", (16, 32, 64, 128, 256), (1, 2, 4, 6, 12), 512,
     1, 12, 4),
]


def _shim():
    return shared_script(os.path.join(ROOT, "common", "bench", "flash_shim.py"))


def _bench_dilated():
    return shared_script(os.path.join(HERE, "bench_dilated.py"))


# ---------------------------------------------------------------------------------------------
# the peer


def _import_torchscale():
    """torchscale's DilatedAttention and DecoderConfig, with the flash-attn shim installed first.

    torchscale's ``component/flash_attention.py`` imports ``flash_attn_func`` only when
    ``torch.cuda.is_available()`` and the capability is above 7 (else its xformers path, else
    None). On the CPU (``--check``, ``--smoke``) that module is imported with those two answers
    set to (True, (9, 0)) so that its flash-attn wrapper, the one the GPU runs, is the one used;
    nothing else is changed."""
    if os.path.isdir(PEERS_DIR) and PEERS_DIR not in sys.path:
        sys.path.append(PEERS_DIR)
    _shim().install()
    name = "torchscale.component.flash_attention"
    if name not in sys.modules and not torch.cuda.is_available():
        with mock.patch("torch.cuda.is_available", return_value=True), \
                mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)):
            __import__(name)
    from torchscale.architecture.config import DecoderConfig
    from torchscale.component import multihead_attention
    from torchscale.component.dilated_attention import DilatedAttention

    if multihead_attention.flash_attn_func is None:
        raise RuntimeError("torchscale found no flash_attn_func (the shim was not installed "
                           "before torchscale was imported)")
    return DilatedAttention, DecoderConfig


def torchscale_module(seg, rates, embed, heads):
    """torchscale's DilatedAttention as its LongNet decoder layer builds it."""
    cls, config = _import_torchscale()
    args = config(segment_length=str(list(seg)), dilated_ratio=str(list(rates)),
                  flash_attention=True, seq_parallel=False, xpos_rel_pos=False, multiway=False,
                  layernorm_eps=1e-5)
    return cls(args, embed, heads, dropout=0.0, self_attention=True,
               encoder_decoder_attention=False, subln=True)


def torchscale_version():
    try:
        with open(os.path.join(PEERS_DIR, "SOURCES.txt")) as f:
            line = next(ln for ln in f if ln.startswith("torchscale"))
        return "torchscale " + line.split()[1][:12]
    except (OSError, StopIteration):
        return "torchscale (source unknown)"


# What the benchmark needs of a peer: a module factory and the semantics it implements.
# head_rule "contiguous": head h -> offset h // ceil(H / r); layout "torchscale": padded segments
# concatenated; lse_grad False: branch weights without gradient.
PEER = {"name": "torchscale", "make": torchscale_module, "version": torchscale_version,
        "head_rule": "contiguous", "layout": "torchscale", "lse_grad": False}


def copy_weights(ours, theirs):
    """Our projections, sub-LN and output projection into the peer's module."""
    with torch.no_grad():
        for a, b in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                     ("out_proj", "out_proj"), ("norm", "inner_attn_ln")):
            src, dst = getattr(ours, a), getattr(theirs, b)
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)


# ---------------------------------------------------------------------------------------------
# the float64 reimplementation (any head rule, either layout, with or without the lse gradient)


def head_offset(h, r, heads, rule):
    return h % r if rule == "mod" else h // math.ceil(heads / r)


def dilated64(q, k, v, seg, rates, *, head_rule="mod", layout="exact", lse_grad=True):
    """Causal dilated attention of ``q, k, v [B, S, H, D]`` in the dtype given (float64), with
    autograd. Each branch ``(w, r)`` cuts the sequence (zero-padded to a multiple of ``w' =
    min(w, S)``) into segments, pads each with zeros to a multiple of ``r`` (torchscale; causal,
    so no real row sees the padding), and attends causally among the rows of the head's offset.
    ``layout="exact"`` puts each segment's rows back at their positions (LongNet);
    ``"torchscale"`` concatenates the padded segments and cuts at ``S``. Branches are mixed by
    ``softmax(lse)`` weights, computed without gradient when ``lse_grad`` is False."""
    b, s, h, d = q.shape
    scale = d ** -0.5
    outs, lses = [], []
    for w, r in zip(seg, rates):
        w = min(w, s)
        nseg = -(-s // w)
        wp = -(-w // r) * r

        def segments(x, w=w, nseg=nseg, wp=wp):
            x = F.pad(x, (0, 0, 0, 0, 0, nseg * w - s)).reshape(b, nseg, w, h, d)
            return F.pad(x, (0, 0, 0, 0, 0, wp - w))

        qs, ks, vs = segments(q), segments(k), segments(v)
        i = torch.arange(wp, device=q.device)
        off = torch.tensor([head_offset(j, r, h, head_rule) for j in range(h)], device=q.device)
        keep = (i[None, :] % r) == off[:, None]  # [H, wp]
        mask = keep[:, :, None] & keep[:, None, :] & (i[None, None, :] <= i[None, :, None])
        sc = torch.einsum("bnqhd,bnkhd->bnhqk", qs, ks) * scale
        sc = sc.masked_fill(~mask, float("-inf"))
        dead = ~mask.any(-1)  # [H, wp]: rows this branch does not keep for that head
        lse = torch.logsumexp(sc.masked_fill(dead[:, :, None], 0.0), -1)
        o = torch.einsum("bnhqk,bnkhd->bnqhd", torch.exp(sc - lse[..., None]), vs)
        lse = lse.masked_fill(dead, float("-inf"))  # [b, n, H, wp]
        if layout == "exact":
            o, lse, width = o[:, :, :w], lse[..., :w], w
        else:
            width = wp
        outs.append(o.reshape(b, nseg * width, h, d)[:, :s])
        lses.append(lse.permute(0, 2, 1, 3).reshape(b, h, nseg * width)[..., :s])
    stacked = torch.stack(lses)  # [branches, B, H, S]
    if not lse_grad:
        stacked = stacked.detach()
    top = stacked.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    wts = torch.exp(stacked - top)
    wts = wts / wts.sum(0).clamp_min(torch.finfo(wts.dtype).tiny)
    return sum(wt.transpose(1, 2)[..., None] * o for wt, o in zip(wts, outs))


def module64(x, params, seg, rates, heads, **kw):
    """Projections -> :func:`dilated64` -> sub-LN -> output projection, in float64."""
    b, s, e = x.shape
    q, k, v = (F.linear(x, params[f"{n}.weight"], params[f"{n}.bias"]).view(b, s, heads, -1)
               for n in ("q_proj", "k_proj", "v_proj"))
    a = dilated64(q, k, v, seg, rates, **kw).reshape(b, s, e)
    a = F.layer_norm(a, (e,), params["norm.weight"], params["norm.bias"], 1e-5)
    return F.linear(a, params["out_proj.weight"], params["out_proj.bias"])


PARAMS = ("q_proj", "k_proj", "v_proj", "out_proj", "norm")


def _grads(mod, names):
    return torch.cat([getattr(mod, n).weight.grad.flatten() for n in names]
                     + [getattr(mod, n).bias.grad.flatten() for n in names])


def check_case(case, device, dtype, peer):
    """Errors of one case (see the module docstring); forward ``out``, input gradient ``dx``,
    parameter gradients ``dparams`` (all projections, sub-LN)."""
    from longattn.dilated import MultiheadDilatedAttention
    from longattn.reference.dilated import dilated_attention as oracle

    name, seg, rates, s, b, h, d = case
    e = h * d
    torch.manual_seed(0)
    ours = MultiheadDilatedAttention(e, h, seg, rates).to(device, dtype)
    theirs = peer["make"](seg, rates, e, h).to(device, dtype)
    copy_weights(ours, theirs)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(b, s, e, generator=g, device=device).to(dtype)
    do = torch.randn(b, s, e, generator=g, device=device).to(dtype)
    got = {}
    for who, mod in (("longattn", ours), ("peer", theirs)):
        xg = x.clone().requires_grad_()
        out = mod(xg, xg, xg, is_causal=True)[0]
        out.backward(do)
        names = PARAMS if who == "longattn" else (*PARAMS[:4], "inner_attn_ln")
        got[who] = {"out": out.detach(), "dx": xg.grad, "dparams": _grads(mod, names)}
    params64 = {f"{n}.{p}": getattr(getattr(ours, n), p).detach().double().requires_grad_()
                for n in PARAMS for p in ("weight", "bias")}

    def ref(**kw):
        xg = x.double().requires_grad_()
        out = module64(xg, params64, seg, rates, h, **kw)
        grads = torch.autograd.grad(out, [xg, *params64.values()], do.double())
        order = [f"{n}.weight" for n in PARAMS] + [f"{n}.bias" for n in PARAMS]
        by = dict(zip(params64, grads[1:]))
        return {"out": out.detach(), "dx": grads[0],
                "dparams": torch.cat([by[k].flatten() for k in order])}

    def errs(a, r):
        return {k: rel_error(a[k], r[k]) for k in ("out", "dx", "dparams")}

    longnet = ref(head_rule="mod")
    its_own = ref(head_rule=peer["head_rule"], layout=peer["layout"], lse_grad=peer["lse_grad"])
    its_rule = ref(head_rule=peer["head_rule"])
    # the reimplementation with LongNet's rule against the oracle (attention only)
    q, k, v = (F.linear(x.double(), params64[f"{n}.weight"], params64[f"{n}.bias"])
               .view(b, s, h, d).detach() for n in ("q_proj", "k_proj", "v_proj"))
    ro, _ = oracle(*(t.cpu().numpy() for t in (q, k, v)), seg, rates, causal=True)
    return {
        "reference (h mod r) vs longattn.reference oracle":
            {"out": rel_error(dilated64(q, k, v, seg, rates), ro)},
        "longattn vs reference (h mod r)": errs(got["longattn"], longnet),
        f"{peer['name']} vs reference ({peer['name']}'s semantics)": errs(got["peer"], its_own),
        f"{peer['name']} vs LongNet with {peer['name']}'s head rule": errs(got["peer"],
                                                                            its_rule),
        f"{peer['name']} vs longattn": errs(got["peer"], got["longattn"]),
    }


def run_checks(device, dtype, peer, cases=None):
    """Every case; prints one line per comparison. Returns (ok, result rows)."""
    from longattn.common.testing import TOLERANCES

    _shim().install()  # peers import flash-attn
    tol = TOLERANCES[dtype]
    ok, results = True, []
    for case in cases or CASES:
        name, seg, rates, s, b, h, d = case
        errs = check_case(case, device, dtype, peer)
        agree = all(r == 1 for r in rates)
        print(f"\n-- {name}: segments {list(seg)}, rates {list(rates)}, S={s}, B={b}, H={h}, "
              f"D={d}, causal, {str(dtype).replace('torch.', '')}")
        for what, e in errs.items():
            if what.startswith("reference"):
                must = {"out": 1e-12}
            elif what.startswith("longattn") or "semantics" in what:
                must = dict.fromkeys(e, tol)
            elif what.endswith("vs longattn") and agree:
                # one branch: the same function; more: the forward only (no lse gradient)
                must = dict.fromkeys(e if len(rates) == 1 else ("out",), tol)
            else:
                must = {}
            good = all(e[k] <= lim for k, lim in must.items())
            ok &= good
            print(f"{what:58s} " + ", ".join(f"{k} {v:.2e}" for k, v in e.items())
                  + ("" if not must else f"  (must be <= {max(must.values()):g}: "
                     + ", ".join(must) + (")  OK" if good else ")  FAILED")))
            results.append(bench.result("peer_torchscale", f"check {name}: {what}",
                                        median_ms=None, device=device, dtype=dtype,
                                        shape={"S": s, "B": b, "H": h, "D": d,
                                               "segments": list(seg), "rates": list(rates)},
                                        errors=e, must=list(must), ok=good))
    return ok, results


# ---------------------------------------------------------------------------------------------
# timing


def _is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def _contenders(device, dtype, b, s, seg, rates, heads, embed, peer, config):
    """{name: (fwd, fwd_bwd)} on one input; a contender that fails to build or to run once is
    {name: error string} instead."""
    from longattn.dilated import MultiheadDilatedAttention, dilated_attention

    bd = _bench_dilated()
    d = embed // heads
    torch.manual_seed(0)
    out = {}
    ours = MultiheadDilatedAttention(embed, heads, seg, rates, config=config).to(device, dtype)
    x, do = (bd._rand((b, s, embed), device, dtype, i) for i in (50, 51))
    xg = x.clone().requires_grad_()

    def module_fns(mod):
        params = [p for p in mod.parameters() if p.requires_grad]

        def fwd():
            with torch.no_grad():
                return mod(x, x, x, is_causal=True)[0]

        def fwd_bwd():
            o = mod(xg, xg, xg, is_causal=True)[0]
            return torch.autograd.grad(o, [xg, *params], do)

        return fwd, fwd_bwd

    def make_theirs():
        theirs = peer["make"](seg, rates, embed, heads).to(device, dtype)
        copy_weights(ours, theirs)
        return module_fns(theirs)

    def make_function():
        q, k, v = (bd._rand((b, s, heads, d), device, dtype, 60 + i).requires_grad_()
                   for i in range(3))
        dout = bd._rand((b, s, heads, d), device, dtype, 63)

        def fwd():
            with torch.no_grad():
                return dilated_attention(q, k, v, seg, rates, causal=True, config=config)

        def fwd_bwd():
            o = dilated_attention(q, k, v, seg, rates, causal=True, config=config)
            return torch.autograd.grad(o, (q, k, v), dout)

        return fwd, fwd_bwd

    peak = {}
    for name, make in ((peer["name"], make_theirs), ("longattn module", lambda: module_fns(ours)),
                       ("longattn function", make_function)):
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            fns = make()
            fns[1]()  # warm-up outside the timings (plans, kernels' graphs)
            fns[0]()
            if device == "cuda":
                torch.cuda.synchronize()
                peak[name] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            out[name] = fns
        except Exception as e:  # noqa: BLE001 - one contender's failure must not stop the row
            out[name] = "OOM" if _is_oom(e) else f"{type(e).__name__}: {e}"
            if not _is_oom(e):
                traceback.print_exc()
            if device == "cuda":
                torch.cuda.empty_cache()
    return out, peak


def main(argv=None, peer=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU")
    ap.add_argument("--check", action="store_true",
                    help="CPU, float32: where torchscale's and longattn's outputs agree")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    peer = PEER if peer is None else peer
    out_dir = bench.out_dir(os.path.join(HERE, "results"), args.out)
    t_start = time.perf_counter()
    version = peer["version"]() if callable(peer.get("version")) else peer.get("version")
    if args.check:
        print(f"{bench.device_name('cpu')}, {time.strftime('%Y-%m-%d', time.gmtime())}, commit "
              f"{bench.git_sha()}; torch {torch.__version__}; peer: {version} through the "
              "flash-attn shim on longattn.common.kernels")
        torch.manual_seed(0)
        ok, results = run_checks("cpu", torch.float32, peer)
        path = bench.write_results(results, os.path.join(out_dir, "peer_torchscale_check.json"))
        print(f"\ncheck: {'PASS' if ok else 'FAIL'}; wrote {path}")
        return 0 if ok else 1
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        ap.error("no CUDA device; use --smoke or --check on the CPU")
    device = "cuda" if cuda else "cpu"
    from longattn.dilated import FusedConfig

    bd = _bench_dilated()
    config = FusedConfig()
    if cuda:
        dtype, heads, embed = torch.bfloat16, HEADS, EMBED
        seg, rates = bd.PAPER_SEGMENTS, bd.PAPER_RATES
        total, lengths = 1 << 20, [1 << p for p in range(15, 21)]
        cases = CASES
    else:
        dtype, heads, embed = torch.bfloat16, 4, 64
        seg, rates = (16, 32, 64, 128, 256), bd.PAPER_RATES
        total, lengths, args.rounds = 1024, [256, 512], 1
        cases = CASES[:1]
    fa = _shim().install()
    probe = torch.zeros(1, 8, heads, embed // heads, device=device, dtype=dtype)
    print(f"device: {bench.device_name(device)}; torch {torch.__version__}; "
          f"{str(dtype).replace('torch.', '')}; segments {list(seg)}, rates {list(rates)}, "
          f"{heads} heads, embed {embed}, causal, {total} tokens per row; peer: {version} with "
          + ("flash-attn" if not _shim().is_shim(fa) else "the flash-attn shim on "
             f"longattn.common.kernels (backend {pick_backend(probe, probe, probe)})"))

    # 1. correctness first: the check cases in this dtype
    ok, results = run_checks(device, dtype, peer, cases)
    print(f"\ncorrectness: {'PASS' if ok else 'FAIL'}\n")

    # 2. timing, one row per length, every contender alternated
    table = []
    for s in bench.progress(lengths, desc="lengths"):
        b = max(1, total // s)
        fns, peak = _contenders(device, dtype, b, s, seg, rates, heads, embed, peer, config)
        live = {f"{name} {d}": f for name, pair in fns.items() if not isinstance(pair, str)
                for d, f in zip(("fwd", "fwd+bwd"), pair)}
        times = {}
        if live:
            try:
                times = bench.time_interleaved(live, device=device, rounds=args.rounds,
                                               **bench.timing_kw(device))
            except Exception as e:  # noqa: BLE001
                print(f"S={s}: timing failed ({'OOM' if _is_oom(e) else e})")
                if not _is_oom(e):
                    traceback.print_exc()
        ref = {d: times.get(f"longattn module {d}") for d in ("fwd", "fwd+bwd")}
        for name, pair in fns.items():
            err = pair if isinstance(pair, str) else None
            row = {"S": s, "B": b, "contender": name}
            for d in ("fwd", "fwd+bwd"):
                ms = times.get(f"{name} {d}")
                row[f"{d} ms"] = ms if err is None else err
                if d == "fwd+bwd":
                    row["ns/token"] = None if ms is None else ms * 1e6 / (b * s)
                    row["fwd+bwd / longattn module"] = (None if ms is None or not ref[d]
                                                        else ms / ref[d])
                results.append(bench.result(
                    "peer_torchscale", f"{name} {d}", median_ms=ms, device=device, dtype=dtype,
                    shape={"B": b, "S": s, "H": heads, "D": embed // heads, "embed": embed,
                           "segments": list(seg), "rates": list(rates), "causal": True},
                    error=err, peak_gib=peak.get(name),
                    spread=times.get(f"{name} {d} spread"),
                    over_longattn_module=None if ms is None or not ref[d] else ms / ref[d],
                    peer=version if name == peer["name"] else None))
            row["peak GiB"] = peak.get(name)
            table.append(row)
            print(f"S={s} B={b} {name}: fwd {row['fwd ms']} ms, fwd+bwd {row['fwd+bwd ms']} ms",
                  flush=True)
        # each length's rows kept as they come: a run stopped by its time cap keeps them
        bench.write_results(results, os.path.join(out_dir, "bench_peer_torchscale.json"))
        del fns
        if cuda:
            torch.cuda.empty_cache()
    print(bench.format_table(table, ["S", "B", "contender", "fwd ms", "fwd+bwd ms", "ns/token",
                                     "fwd+bwd / longattn module", "peak GiB"]))
    path = bench.write_results(results, os.path.join(out_dir, "bench_peer_torchscale.json"))
    print(f"wrote {path}  ({time.perf_counter() - t_start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
