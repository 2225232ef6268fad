"""Where the GPU time of one call goes: the top kernels of a torch.profiler trace.

    PYTHONPATH=$(ls -d */src | tr '\\n' ':') python common/bench/profile_kernels.py \\
        {dilated,hyper-causal,hyper,swa} [--top 14]

* ``dilated``: LongNet's schedule (segments 2048..32768, rates 1,2,4,6,12), B=32, S=32768,
  H=12, D=64, bf16, causal, forward + backward;
* ``hyper-causal`` / ``hyper``: HyperAttention forward at B=1, S=131072, H=32, D=64, bf16,
  defaults, causal / not;
* ``swa``: the local sliding window (S=131072, W=4096, H=32, D=128, bf16), forward + backward.

Prints the total device time and the kernels with the most self device time (one call after a
warm-up call). Used to find the non-kernel overheads quoted in the package READMEs.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def _rand(*shape, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)


def _dilated():
    from longattn.dilated import dilated_attention

    seg, rates = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
    q, k, v, do = (_rand(32, 32768, 12, 64, seed=i) for i in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def run():
        o = dilated_attention(q, k, v, seg, rates, causal=True)
        torch.autograd.grad(o, (q, k, v), do)

    return run


def _hyper(causal):
    from longattn.hyper import hyper_attention

    q, k, v = (_rand(1, 131072, 32, 64, seed=i) for i in range(3))
    return lambda: hyper_attention(q, k, v, causal=causal)


def _swa():
    from longattn.common.kernels import attention_backward, attention_forward

    q, k, v, do = (_rand(1, 131072, 32, 128, seed=i) for i in range(4))

    def run():
        o, lse = attention_forward(q, k, v, causal=True, window_size=(4096, 0))
        attention_backward(do, q, k, v, o, lse, causal=True, window_size=(4096, 0))

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["dilated", "hyper-causal", "hyper", "swa"])
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    fn = {"dilated": _dilated, "hyper-causal": lambda: _hyper(True),
          "hyper": lambda: _hyper(False), "swa": _swa}[args.what]()
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    print(f"{args.what}: total device time {sum(e.self_device_time_total for e in ev) / 1e3:.2f}"
          " ms")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"  {e.self_device_time_total / 1e3:9.2f} ms  x{e.count:4d}  {e.key[:100]}")


if __name__ == "__main__":
    main()
