"""Train LongNetLM on a synthetic long-range copy task on the CPU, with and without its longest
branch, and plot both loss curves.

Task ("block copy"): a sequence of ``seq_len`` tokens is two copies of the same random first
half; the first half is made of runs of ``run`` equal symbols (``run`` = the largest dilation
rate, so each symbol occupies every residue class of the longest branch). Next-token loss is
measured on the second half, where every token repeats the token ``seq_len/2`` positions
earlier: further than any segment except the longest one can reach. Without the longest branch
the first token of each run (1 in ``run``) cannot be predicted better than chance, so its loss
stays near ``log(vocab)``; with it, the model can copy across the half-sequence.

    python dilated/examples/train_longnet.py            # about 5 minutes on one CPU core
    python dilated/examples/train_longnet.py --steps 50 # a quick look

Writes ``train_longnet.json`` and ``train_longnet.png`` into ``--out``
(default ``dilated/examples/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from longattn.common import bench
from longattn.dilated import LongNetLM


def make_batch(gen, batch, seq_len, vocab, run):
    half = seq_len // 2
    sym = torch.randint(0, vocab, (batch, half // run), generator=gen)
    first = sym.repeat_interleave(run, dim=1)
    return torch.cat([first, first], dim=1)


def losses(model, x, seq_len, run):
    """(mean loss on the second half, mean loss on the second half's run starts)."""
    logits = model(x[:, :-1])
    tgt = x[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")  # [B, S-1]
    half = seq_len // 2
    second = ce[:, half - 1:]  # targets at positions half .. S-1
    starts = second[:, ::run]  # targets at run starts: the ones that need the long branch
    return second.mean(), starts.mean()


def train(args, segments, rates, label):
    torch.manual_seed(args.seed)
    model = LongNetLM(args.vocab, d_model=args.d_model, nhead=args.heads, num_encoder_layers=0,
                      num_decoder_layers=args.layers, dim_feedforward=2 * args.d_model,
                      segment_lengths=segments, dilation_rates=rates, pos_emb=args.pos_emb)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.1, 1 - s / args.steps))
    gen = torch.Generator().manual_seed(args.seed + 1)  # same data for every model
    curve = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = make_batch(gen, args.batch, args.seq_len, args.vocab, args.run)
        loss, hard = losses(model, x, args.seq_len, args.run)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sched.step()
        curve.append((step, loss.item(), hard.item()))
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"[{label}] step {step:4d}  loss {loss.item():.3f}  run-start loss "
                  f"{hard.item():.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        eval_gen = torch.Generator().manual_seed(12345)
        ev = [losses(model, make_batch(eval_gen, args.batch, args.seq_len, args.vocab,
                                       args.run), args.seq_len, args.run) for _ in range(8)]
    final = sum(a.item() for a, _ in ev) / len(ev)
    final_hard = sum(b.item() for _, b in ev) / len(ev)
    return dict(label=label, segment_lengths=list(segments), dilation_rates=list(rates),
                final_loss=final, final_run_start_loss=final_hard, curve=curve,
                seconds=time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--segments", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--run", type=int, default=None, help="run length (default: largest rate)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--pos-emb", default="xpos", choices=["xpos", "rotary"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    args.run = args.run or max(args.rates)
    torch.set_num_threads(args.threads)
    if args.seq_len // 2 <= max(args.segments[:-1]):
        raise SystemExit("the copy distance must exceed every segment but the longest")
    runs = [train(args, args.segments, args.rates, "full schedule"),
            train(args, args.segments[:-1], args.rates[:-1], "longest branch removed")]
    chance = math.log(args.vocab)
    os.makedirs(args.out, exist_ok=True)
    summary = dict(config=vars(args), chance_loss=chance, runs=runs,
                   device=bench.device_name("cpu"), torch=torch.__version__,
                   git_sha=bench.git_sha(),
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    with open(os.path.join(args.out, "train_longnet.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nchance (log vocab) = {chance:.3f}; run starts are 1/{args.run} of the scored tokens")
    for r in runs:
        print(f"{r['label']:>24}: final loss {r['final_loss']:.4f}, run-start loss "
              f"{r['final_run_start_loss']:.4f}  ({r['seconds']:.0f} s)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in runs:
            steps = [c[0] for c in r["curve"]]
            ax.plot(steps, [c[1] for c in r["curve"]], label=f"{r['label']} (second half)")
            ax.plot(steps, [c[2] for c in r["curve"]], "--", alpha=0.6,
                    label=f"{r['label']} (run starts)")
        ax.axhline(chance, color="gray", lw=0.8, ls=":", label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title(f"LongNetLM block copy over {args.seq_len // 2} tokens, "
                     f"segments {args.segments}, rates {args.rates}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "train_longnet.png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")
    return summary


if __name__ == "__main__":
    main()
