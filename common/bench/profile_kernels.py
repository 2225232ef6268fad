"""Where the GPU time of one call goes: the top kernels of a torch.profiler trace.

    PYTHONPATH=$(ls -d */src | tr '\\n' ':') python common/bench/profile_kernels.py \\
        {dilated,hyper-causal,hyper-causal-bwd,hyper,swa} ... [--top 14] [--out DIR]

* ``dilated``: LongNet's schedule (segments 2048..32768, rates 1,2,4,6,12), B=32, S=32768,
  H=12, D=64, bf16, causal, forward + backward;
* ``hyper-causal`` / ``hyper``: HyperAttention forward at B=1, S=131072, H=32, D=64, bf16,
  defaults, causal / not; ``hyper-causal-bwd``: the same causal call, forward + backward (the
  configuration of ``hyper/bench/bench_hyper.py``'s causal fwd+bwd row: block 256, 256 samples,
  ``min_seq_len`` 2048);
* ``swa``: the local sliding window (S=131072, W=4096, H=32, D=128, bf16), forward + backward;
* ``packed-allgather`` / ``packed-baseline``: ``hamilton/bench/bench_packed.py``'s default
  documents (8 ranks x 32,768 tokens, 1,024..32,768-token documents, seed 0, H=32, D=128,
  bf16, causal) on cuDNN's ragged graphs: the all-gather rank with the most 128x128 tiles, as
  the benchmark times it (``bench_packed.allgather_sequences``' ``+merge`` forward + backward:
  key gather, the two calls, the dK/dV sums); and the one call over every document that the
  benchmark divides by 8;
* ``cudnn-top-left`` / ``cudnn-bottom-right``: one ragged cuDNN call (forward + backward) over a
  32,768-token causal document (H=32, D=128, bf16) and a 2-key document with 2 queries, or 1
  query: the second makes the graph's causal band bottom-right aligned (as every packed
  all-gather call whose segments have more keys than queries), the same work otherwise;
* ``hamilton-merge`` / ``hamilton-overlap`` / ``hamilton-overlap-defer`` /
  ``hamilton-defer-all`` (``overlap+defer_all``): rank 0 of
  ``hamilton/bench/bench_hamilton.py``'s 8-rank zigzag ring (8,192 tokens a rank, H=32,
  D=128, bf16), forward + backward with its merges and dK/dV accumulation, as the benchmark
  times that variant.
* ``dilated-fa4`` / ``hyper-causal-bwd-fa4`` / ``hamilton-defer-all-fa4``: those with
  ``backend="fa4"`` (hyper: its exact leaves), FA4 installed by ``common/bench/fa4_wheels.sh``.

Prints, per configuration named (several may follow each other in one call), the total device
time, the call's wall time between CUDA events, the kernels with the most self device time and
the host ops with the most self CPU time (one call after a warm-up call); ``--out``
also writes them to ``DIR/profile_kernels.json``. Used to find the non-kernel overheads quoted
in the package READMEs.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))


def _rand(*shape, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)


def _dilated(backend="auto"):
    from longattn.dilated import dilated_attention

    seg, rates = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
    q, k, v, do = (_rand(32, 32768, 12, 64, seed=i) for i in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def run():
        o = dilated_attention(q, k, v, seg, rates, causal=True, backend=backend)
        torch.autograd.grad(o, (q, k, v), do)

    return run


def _hyper(causal):
    from longattn.hyper import hyper_attention

    q, k, v = (_rand(1, 131072, 32, 64, seed=i) for i in range(3))
    return lambda: hyper_attention(q, k, v, causal=causal)


def _hyper_bwd(backend="auto"):
    from longattn.hyper import HyperConfig, hyper_attention

    q, k, v, do = (_rand(1, 131072, 32, 64, seed=i) for i in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def run():
        o = hyper_attention(q, k, v, causal=True, block_size=256, sample_size=256,
                            min_seq_len=2048, config=HyperConfig(leaf_backend=backend))
        torch.autograd.grad(o, (q, k, v), do)

    return run


def _swa():
    from longattn.common.kernels import attention_backward, attention_forward

    q, k, v, do = (_rand(1, 131072, 32, 128, seed=i) for i in range(4))

    def run():
        o, lse = attention_forward(q, k, v, causal=True, window_size=(4096, 0))
        attention_backward(do, q, k, v, o, lse, causal=True, window_size=(4096, 0))

    return run


def packed_case(kind, *, device="cuda", n=8, tokens=32768, heads=32, dim=128, min_doc=1024,
                max_doc=32768, backend="cudnn"):
    """The ``packed-allgather`` (``kind="allgather"``) or ``packed-baseline`` closure (module
    docstring); smaller sizes and ``device="cpu"`` for a test."""
    from longattn.common import bench
    from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
    from longattn.common.testing import shared_script
    from longattn.hamilton.packing import make_allgather_plan

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = bench.draw_documents(n * tokens, min_doc, max_doc, 0)
    if kind == "allgather":  # the benchmark's own closure of that rank (with its dK/dV sum)
        packed = shared_script(os.path.join(HERE, "..", "..", "hamilton", "bench",
                                            "bench_packed.py"))
        plan = max((make_allgather_plan(bench.cu_seqlens(lens), n, r, True) for r in range(n)),
                   key=lambda p: p.tiles())
        return packed.allgather_sequences(device, dtype, plan, heads, dim, backend)["+merge"][1]
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, do = (torch.randn(n * tokens, heads, dim, generator=g, device=device).to(dtype)
                   for _ in range(4))
    cu = bench.cu_seqlens(lens, device)

    def base():
        o, lse = attention_forward_varlen(q, k, v, cu, cu, causal=True, backend=backend)
        attention_backward_varlen(do, q, k, v, o, lse, cu, cu, causal=True, backend=backend)

    return base


def alignment_case(bottom_right, *, device="cuda", s=32768, heads=32, dim=128,
                   backend="cudnn"):
    """The ``cudnn-top-left`` / ``cudnn-bottom-right`` closure (module docstring)."""
    from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(1)
    lq = 1 if bottom_right else 2
    cu_q = torch.tensor([0, s, s + lq], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, s, s + 2], dtype=torch.int32, device=device)
    q, do = (torch.randn(s + lq, heads, dim, generator=g, device=device).to(dtype)
             for _ in range(2))
    k, v = (torch.randn(s + 2, heads, dim, generator=g, device=device).to(dtype)
            for _ in range(2))

    def run():
        o, lse = attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True, backend=backend)
        attention_backward_varlen(do, q, k, v, o, lse, cu_q, cu_k, causal=True,
                                  backend=backend)

    return run


def hamilton_case(variant, *, device="cuda", n=8, tokens=8192, heads=32, dim=128, rank=0,
                  backend="auto"):
    """``hamilton/bench/bench_hamilton.py``'s own fwd+bwd closure of one zigzag-ring rank with
    its merges and dK/dV accumulation (``variant``: one of its ``VARIANTS``); smaller sizes
    and ``device="cpu"`` for a test."""
    from longattn.common.testing import shared_script
    from longattn.hamilton import HamiltonConfig

    ham = shared_script(os.path.join(HERE, "..", "..", "hamilton", "bench", "bench_hamilton.py"))
    mode, opts = ham.VARIANTS[variant]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return ham.make_sequence(device, dtype, n, tokens, heads, dim, rank, "ring", mode,
                             HamiltonConfig(**opts), backend)[1]


_CASES = {"dilated": _dilated, "hyper-causal": lambda: _hyper(True),
          "hyper-causal-bwd": _hyper_bwd, "hyper": lambda: _hyper(False), "swa": _swa,
          "packed-allgather": lambda: packed_case("allgather"),
          "packed-baseline": lambda: packed_case("baseline"),
          "cudnn-top-left": lambda: alignment_case(False),
          "cudnn-bottom-right": lambda: alignment_case(True),
          "hamilton-merge": lambda: hamilton_case("merge"),
          "hamilton-overlap": lambda: hamilton_case("overlap"),
          "hamilton-overlap-defer": lambda: hamilton_case("overlap+defer"),
          "hamilton-defer-all": lambda: hamilton_case("overlap+defer_all"),
          # the same with FlashAttention-4 as the local kernel (common/bench/fa4_wheels.sh)
          "dilated-fa4": lambda: _dilated("fa4"),
          "hyper-causal-bwd-fa4": lambda: _hyper_bwd("fa4"),
          "hamilton-defer-all-fa4": lambda: hamilton_case("overlap+defer_all", backend="fa4")}


def profile_one(what, top):
    """``(total ms, [(self ms, count, kernel name)] of the top kernels, wall ms, [(self ms,
    count, host op)] of the top host ops)`` of one call: wall is the call's time between two
    CUDA events (what a benchmark times); where it exceeds the kernels' total the GPU waited
    for the host, and the host ops say on what (a synchronizing copy, the launches)."""
    return profile_fn(_CASES[what](), top)


def profile_fn(fn, top):
    """:func:`profile_one` of a callable (also used by ``hyper/bench/tune_hyper.py``)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    total = sum(e.self_device_time_total for e in ev) / 1e3
    rows = [(e.self_device_time_total / 1e3, e.count, e.key[:100])
            for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:top]]
    host = [(e.self_cpu_time_total / 1e3, e.count, e.key[:100])
            for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:top]]
    return total, rows, start.elapsed_time(stop), host


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="+", choices=sorted(_CASES))
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--out", default=None, help="also write DIR/profile_kernels.json")
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    for what in args.what:
        total, rows, wall, host = profile_one(what, args.top)
        print(f"{what}: total device time {total:.2f} ms, wall {wall:.2f} ms (CUDA events)")
        for ms, count, name in rows:
            print(f"  {ms:9.2f} ms  x{count:4d}  {name}")
        print(f"{what}: host ops with the most self CPU time")
        for ms, count, name in host:
            print(f"  {ms:9.2f} ms  x{count:4d}  {name}")
        result["cases"][what] = {"total_ms": total, "wall_ms": wall, "top": [
            {"ms": ms, "count": count, "kernel": name} for ms, count, name in rows],
            "host": [{"ms": ms, "count": count, "op": name} for ms, count, name in host]}
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_kernels.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
