"""HyperAttention's error against exact attention, longattn next to the seed (insuhan/hyper-attn,
its pure-torch path), on the same inputs, LSH hyperplanes and budgets, plus longattn's
ablations that isolate each difference between the two.

    PYTHONPATH=common/src:reference/src:hyper/src python hyper/bench/quality_vs_seed.py \\
        --seed-dir PATH/TO/hyper-attn [--out DIR] [--quick]

``--seed-dir`` is a checkout of https://github.com/insuhan/hyper-attn (its
``models/attention/hyper_attn.py`` is imported from there, never copied). On a CPU in fp32 the
seed's ``exact_attention`` ignores its ``bias`` argument, so its sampled part keeps samples that
fall in the row's block (counted twice); that is what this script runs.

Inputs (B = 1, H = 2, D = 64, fp32, softmax_scale = 1/8):
* random: q, k, v ~ N(0, 1): scores ~N(0, 1), attention spread over every key.
* clustered: S/16 clusters with centres ~N(0, I); q and k = 1.5 * centre + 0.3 * noise (each
  query has ~16 heavy keys, its cluster).
* trained: q, k, v of the last layer of a tiny 2-layer transformer (RoPE, 2 heads of 64)
  trained here on the CPU for ``--train-steps`` steps on next-token prediction of sequences
  made of a random 128-token segment repeated (induction: each query's heavy keys are the
  tokens after earlier copies of its context), run on one sequence of S tokens.

Methods: ``seed`` (the seed's torch path), ``longattn`` (``hyper_attention``, torch path), and
longattn ablations through ``longattn.hyper.torch_path.hyper_torch``: ``double_count`` (keep
in-block samples, the seed's fp32 rule), ``merge_equal`` (block and sampled outputs averaged
1/2 : 1/2), ``seed_order`` (sort by ``g(code)`` as the seed, not ``g^-1(code)``),
``no_replacement`` (samples drawn without replacement). All share the seed's hyperplanes.

Error = ``||out - exact|| / ||exact||`` over all rows and heads, mean of ``--seeds`` draws.
``block_share`` = mean over rows of the block part's weight in the merge (``exp(lse_block -
lse)``). Writes ``quality_vs_seed.json`` and ``quality_vs_seed.png`` to ``--out`` (default
``hyper/bench/results/quality``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import torch

from longattn.common.testing import rel_error
from longattn.hyper import hyper_attention, lsh_rank, make_plan
from longattn.hyper.plan import Plan
from longattn.hyper.torch_path import hyper_torch

D, H = 64, 2
ABLATIONS = ("double_count", "merge_equal", "seed_order", "no_replacement")


# ----------------------------------------------------------------------------- the seed
def load_seed(seed_dir):
    """The seed's ``HyperAttention`` class and a list that records its merge weights."""
    try:
        import einops  # noqa: F401
    except ImportError:  # the seed uses one einops pattern; a stand-in for it
        mod = types.ModuleType("einops")

        def rearrange(x, pattern):
            if pattern != "n -> 1 n 1":
                raise NotImplementedError(pattern)
            return x.view(1, -1, 1)

        mod.rearrange = rearrange
        sys.modules["einops"] = mod
    sys.path.insert(0, os.path.abspath(seed_dir))
    from models.attention import hyper_attn

    shares = []
    merge = hyper_attn.add_self_attentions

    def recording_merge(attn1, lse1, attn2, lse2):
        shares.append(float(torch.sigmoid(lse1 - lse2).mean()))  # c of the seed's merge
        return merge(attn1, lse1, attn2, lse2)

    hyper_attn.add_self_attentions = recording_merge
    return hyper_attn.HyperAttention, shares


def run_seed(cls, shares, q, k, v, p, *, block, samples, causal, min_seq_len, seed):
    attn = cls(input_dim=D, lsh_num_projs=p.shape[1], block_size=block, sample_size=samples,
               min_seq_len=min_seq_len)
    attn.lsh.proj_dir = p.view(1, 1, D, -1).to(q.dtype)  # the same hyperplanes as longattn
    torch.manual_seed(seed)  # the seed draws its samples from the global generator
    del shares[:]
    out = attn(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal)
    share = shares[-1] if shares and not causal else float("nan")
    return out.transpose(1, 2), share


# ----------------------------------------------------------------------------- longattn
def codes(x, p):
    """LSH codes [B, H, S] (bit t = x . p_t > 0), float64 as longattn's CPU hash."""
    bits = (x.double() @ p.double()) > 0
    return (bits.long() * (1 << torch.arange(p.shape[1]))).sum(-1).transpose(1, 2)


def draw_samples(plan: Plan, m, g, replace=True):
    """[n_calls, B=1, H, m] sorted-key positions, uniform with or without replacement."""
    rows = []
    for c in plan.calls:
        nk = c[3]
        if replace:
            rows.append(torch.randint(0, nk, (1, H, m), generator=g))
        else:
            rows.append(torch.stack([torch.randperm(nk, generator=g)[:m] for _ in range(H)])[None])
    return torch.stack(rows)


def run_longattn(method, q, k, v, p, *, block, samples, causal, min_seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    plan = make_plan(q.shape[1], k.shape[1], causal, min_seq_len)
    smp = draw_samples(plan, samples, g, replace=method != "no_replacement") \
        if samples and plan.calls else None
    if method in ("longattn", "no_replacement"):
        out, lse = hyper_attention(q, k, v, causal=causal, block_size=block,
                                   sample_size=samples, min_seq_len=min_seq_len,
                                   projections=p, sample_indices=smp, backend="torch",
                                   return_lse=True)
    else:
        if method == "seed_order":
            cq, ck = codes(q, p), codes(k, p)
            rq, rk = cq ^ (cq >> 1), ck ^ (ck >> 1)
        else:
            rq, rk = lsh_rank(q, p), lsh_rank(k, p)
        out, lse = hyper_torch(q, k, v, rq, rk, smp, plan, softmax_scale=D ** -0.5,
                               block_size=min(block, q.shape[1]), smooth=False,
                               causal=causal, double_count=method == "double_count",
                               merge="equal" if method == "merge_equal" else "lse")
    share = float("nan")
    if not causal and smp is not None and method != "seed_order":  # the block's weight
        _, lse_b = hyper_attention(q, k, v, block_size=block, sample_size=0,
                                   min_seq_len=min_seq_len, projections=p,
                                   backend="torch", return_lse=True)
        share = float(torch.exp(lse_b - lse).mean())
    return out, share


# ----------------------------------------------------------------------------- inputs
def exact(q, k, v, causal, chunk=2048):
    """Exact attention in float64 by query chunks (no S x S matrix)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    outs = []
    for a in range(0, q.shape[2], chunk):
        qc = q[:, :, a:a + chunk]
        s = torch.einsum("bhid,bhjd->bhij", qc, k) * D ** -0.5
        if causal:
            i = torch.arange(a, a + qc.shape[2]).view(-1, 1)
            s = s.masked_fill(torch.arange(k.shape[2]).view(1, -1) > i, float("-inf"))
        outs.append(torch.softmax(s, -1) @ v)
    return torch.cat(outs, 2).transpose(1, 2).float()


def random_inputs(s, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, s, H, D, generator=g) for _ in range(3)]


def clustered_inputs(s, seed):
    g = torch.Generator().manual_seed(seed)
    nc = max(1, s // 16)
    centres = torch.randn(H, nc, D, generator=g)
    which = torch.randint(0, nc, (s, H), generator=g)
    c = centres[torch.arange(H).view(1, H), which]
    q = 1.5 * c + 0.3 * torch.randn(s, H, D, generator=g)
    k = 1.5 * c + 0.3 * torch.randn(s, H, D, generator=g)
    return q[None], k[None], torch.randn(1, s, H, D, generator=g)


class TinyLM(torch.nn.Module):
    """2 attention layers (RoPE, H heads of D) with MLPs, pre-norm, causal."""

    def __init__(self, vocab=64, layers=2):
        super().__init__()
        w = H * D
        self.emb = torch.nn.Embedding(vocab, w)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            n1=torch.nn.LayerNorm(w), qkv=torch.nn.Linear(w, 3 * w), o=torch.nn.Linear(w, w),
            n2=torch.nn.LayerNorm(w), mlp=torch.nn.Sequential(
                torch.nn.Linear(w, 2 * w), torch.nn.GELU(), torch.nn.Linear(2 * w, w))))
            for _ in range(layers))
        self.head = torch.nn.Linear(w, vocab)

    @staticmethod
    def rope(x):  # x [B, S, H, D]
        s, half = x.shape[1], D // 2
        f = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
        ang = torch.arange(s, dtype=torch.float32)[:, None] * f
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    def forward(self, tokens, capture=None):
        x = self.emb(tokens)
        b, s = tokens.shape
        for i, blk in enumerate(self.blocks):
            q, k, v = blk["qkv"](blk["n1"](x)).view(b, s, 3, H, D).unbind(2)
            q, k = self.rope(q), self.rope(k)
            if capture is not None and i == len(self.blocks) - 1:
                capture.extend(t.detach() for t in (q, k, v))
                return None
            a = torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
            x = x + blk["o"](a.transpose(1, 2).reshape(b, s, H * D))
            x = x + blk["mlp"](blk["n2"](x))
        return self.head(x)


def repeated_tokens(b, s, g, vocab=64, segment=128):
    seg = torch.randint(0, vocab, (b, segment), generator=g)
    return seg.repeat(1, -(-s // segment))[:, :s]


def train_tiny_lm(steps, seed=0):
    """Train TinyLM on repeated segments; returns the model and its final training loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = repeated_tokens(16, 257, g)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


def trained_inputs(model, s, seed):
    cap = []
    with torch.no_grad():
        model(repeated_tokens(1, s, torch.Generator().manual_seed(1000 + seed)), capture=cap)
    return cap


def top_mass(q, k, causal, top=16, rows=256):
    """Mean share of a row's attention held by its ``top`` heaviest keys (``rows`` rows)."""
    idx = torch.linspace(q.shape[1] // 2, q.shape[1] - 1, rows).long()
    s = torch.einsum("bihd,bjhd->bhij", q[:, idx].double(), k.double()) * D ** -0.5
    if causal:
        s = s.masked_fill(torch.arange(k.shape[1]).view(1, -1) > idx.view(-1, 1), -math.inf)
    p = torch.softmax(s, -1)
    return float(p.topk(top, -1).values.sum(-1).mean())


# ----------------------------------------------------------------------------- driver
def measure(families, seeds, seed_cls, shares, points, methods, lsh):
    rows = []
    for fam, make in families.items():
        for pt in points:
            s, causal, block, samples, msl = (pt[x] for x in
                                              ("S", "causal", "block", "samples", "msl"))
            errs = {m: [] for m in methods}
            blk = {m: [] for m in methods}
            mass = []
            for seed in range(seeds):
                q, k, v = make(s, seed)
                ex = exact(q, k, v, causal)
                mass.append(top_mass(q, k, causal))
                p = torch.randn(D, lsh, generator=torch.Generator().manual_seed(100 + seed))
                kw = dict(block=block, samples=samples, causal=causal, min_seq_len=msl,
                          seed=200 + seed)
                for m in methods:
                    if m == "seed":
                        out, share = run_seed(seed_cls, shares, q, k, v, p, **kw)
                    else:
                        out, share = run_longattn(m, q, k, v, p, **kw)
                    errs[m].append(rel_error(out, ex))
                    blk[m].append(share)
            row = dict(inputs=fam, **pt, lsh_num_projs=lsh, top16_mass=statistics.mean(mass),
                       rel_err={m: statistics.mean(e) for m, e in errs.items()},
                       rel_err_seeds={m: e for m, e in errs.items()},
                       block_share={m: statistics.mean(b) for m, b in blk.items()})
            rows.append(row)
            print(f"{fam:<9} S={s:<6} {'causal' if causal else 'full':<6} block={block:<5} "
                  f"m={samples:<5} " + " ".join(f"{m}={e:.3f}" for m, e in
                                                row["rel_err"].items()), flush=True)
    return rows


def plans(quick):
    """(table points, curve points)."""
    if quick:
        table = [dict(S=2048, causal=False, block=64, samples=64, msl=64, sweep="table"),
                 dict(S=2048, causal=True, block=64, samples=64, msl=512, sweep="table")]
        curve = [dict(S=2048, causal=False, block=b, samples=b, msl=64, sweep="budget")
                 for b in (32, 128)]
        return table, curve
    table = [dict(S=s, causal=False, block=256, samples=256, msl=256, sweep="table")
             for s in (4096, 16384)]
    table.append(dict(S=8192, causal=True, block=256, samples=256, msl=1024, sweep="table"))
    curve = [dict(S=8192, causal=False, block=b, samples=b, msl=256, sweep="budget")
             for b in (64, 128, 256, 512, 1024)]
    curve += [dict(S=8192, causal=False, block=256, samples=m, msl=256, sweep="samples")
              for m in (0, 64, 1024)]
    return table, curve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-dir", required=True, help="checkout of insuhan/hyper-attn")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--lsh", type=int, default=8, help="LSH hyperplanes (both methods)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--plot-only", action="store_true", help="re-plot the JSON in --out")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "quality")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "quality_vs_seed.json")
    if args.plot_only:
        with open(path) as f:
            plot(json.load(f), out)
        return
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.train_steps if args.train_steps is not None else (20 if args.quick else 300)
    t0 = time.time()
    seed_cls, shares = load_seed(args.seed_dir)
    model, loss = train_tiny_lm(steps)
    print(f"tiny LM: {steps} steps, final loss {loss:.3f} ({time.time() - t0:.0f} s)",
          flush=True)
    families = {"random": random_inputs, "clustered": clustered_inputs,
                "trained": lambda s, seed: trained_inputs(model, s, seed)}
    table, curve = plans(args.quick)
    rows = measure(families, seeds, seed_cls, shares, table,
                   ("seed", "longattn") + ABLATIONS, args.lsh)
    rows += measure(families, seeds, seed_cls, shares, curve,
                    ("seed", "longattn", "merge_equal"), args.lsh)
    meta = dict(device=f"CPU, {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
                dtype="float32", B=1, H=H, D=D, seeds=seeds, torch=torch.__version__,
                date=datetime.date.today().isoformat(), seconds=round(time.time() - t0),
                longattn_commit=_git(os.path.dirname(os.path.abspath(__file__))),
                seed_commit=_git(args.seed_dir, top=True),
                tiny_lm=dict(steps=steps, final_loss=loss),
                command=" ".join(["python", "hyper/bench/quality_vs_seed.py"] + (argv or
                                                                                sys.argv[1:])))
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(dict(meta=meta, rows=rows), out)
    print(f"wrote {path} and quality_vs_seed.png ({meta['seconds']} s)")


def _git(d, top=False):
    """Short commit of the checkout at ``d``; ``top``: only if ``d`` is its top (a seed copy
    without ``.git`` inside this repository would report this repository's commit)."""
    if top and not os.path.exists(os.path.join(d, ".git")):
        return "unknown (no .git)"
    try:
        return subprocess.run(["git", "-C", d, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(data, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fams = list(dict.fromkeys(r["inputs"] for r in rows))
    sweeps = (("budget", "block = samples"), ("samples", "samples (block 256)"))
    fig, axes = plt.subplots(len(sweeps), len(fams), figsize=(5 * len(fams), 8), squeeze=False)
    styles = {"seed": ("tab:gray", "--"), "longattn": ("tab:blue", "-"),
              "merge_equal": ("tab:orange", ":")}
    for i, (sweep, xlabel) in enumerate(sweeps):
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            rs = [r for r in rows if r["sweep"] == sweep and r["inputs"] == fam]
            if not rs:
                ax.set_visible(False)
                continue
            xs = [r["block"] if sweep == "budget" else r["samples"] for r in rs]
            for m, (c, ls) in styles.items():
                ax.plot(xs, [r["rel_err"][m] for r in rs], ls, color=c, marker="o", label=m)
            ax.set_xscale("symlog" if 0 in xs else "log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("rel. error of out")
            ax.set_title(f"{fam}, S {rs[0]['S']}, non-causal")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = data["meta"]
    fig.suptitle(f"HyperAttention error vs budget: longattn vs seed ({m['device']}, "
                 f"{m['dtype']}, H={m['H']}, D={m['D']}, mean of {m['seeds']} seeds, "
                 f"{m['date']})")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality_vs_seed.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
