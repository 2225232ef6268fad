"""Every distributed method on worlds of 2, 4 and 8 ranks on one GPU, against one process.

    python integrations/bench/gpu_world.py [--out DIR] [--gpu-world 2,4,8] [options of
        ``longattn check --gpu-world``]

One call: runs :func:`longattn.integrations.gpu_world.run` (the ranks are spawned here, gloo,
all on ``cuda:0``; under ``torchrun`` with ``LONGATTN_DIST_BACKEND=nccl`` one GPU per rank),
prints the table and writes ``DIR/gpu_world.json`` (every row, shapes, device, torch version)
and ``DIR/gpu_world.log`` (the table and each case's time). Exit status 1 if a row fails.
``--device cpu`` runs the same on CPU tensors with small shapes (a smoke run anywhere).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def main(argv=None) -> int:
    from longattn.integrations import gpu_world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_world.add_arguments(ap)
    ap.add_argument("--out", default="integrations/bench/results",
                    help="folder of gpu_world.json and gpu_world.log")
    ap.set_defaults(gpu_world=[2, 4, 8])
    args = ap.parse_args(argv)
    if args.device == "cpu":  # Triton kernels on the CPU interpreter (before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.json = args.json or str(out / "gpu_world.json")
    rank0 = os.environ.get("RANK", "0") == "0"
    log = open(out / "gpu_world.log", "w") if rank0 else None  # noqa: SIM115 - closed below
    stdout, stderr = sys.stdout, sys.stderr
    if log is not None:
        sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
    try:
        print("+", " ".join([sys.executable, *sys.argv]))
        return gpu_world.run(args)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        if log is not None:
            log.close()


if __name__ == "__main__":
    sys.exit(main())
