"""Benchmark helpers: timing, a JSON result schema, plots, progress bars.

Timing: on CUDA ``triton.testing.do_bench`` (L2 flush, warm-up, median) when triton imports,
otherwise CUDA events; on the CPU ``time.perf_counter``. Always warm up first so compilation
and autotuning never land in a timing.

Result schema (one JSON object per measurement; :func:`result` builds it):
``{"method", "what", "target", "device", "shape": {...}, "dtype", "median_ms", "tflops",
"bytes_moved", "extra": {...}, "git_sha", "date", "torch"}``.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import time

import torch


def sync(device):
    """Wait for ``device``'s work (CUDA; a no-op elsewhere and for ``None``)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, *, cuda: bool = False) -> float:
    """Milliseconds of one ``fn()`` call: CUDA events around it (``cuda``), else wall clock."""
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(fn, *, device=None, warmup: int = 3, rep: int = 10):
    """Median milliseconds of ``fn()``. ``device`` says where it runs (None: CPU)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda and importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(25, warmup), rep=max(100, rep),
                              return_mode="median"))
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(time_once(fn, cuda=cuda) for _ in range(rep))


def timing_kw(device) -> dict:
    """:func:`time_fn`'s repetitions for a benchmark on ``device``: the defaults on CUDA; one
    warm-up and two runs elsewhere (the CPU smoke runs only check that a script works)."""
    return {} if torch.device(device).type == "cuda" else {"warmup": 1, "rep": 2}


def time_interleaved(fns: dict, *, device=None, rounds: int = 3, **kw):
    """Median ms of each ``fns[name]()``, measured in alternating rounds (A, B, A, B, ...).

    GPUs slow down under sustained load (power and clocks), so timing A fully and then B favours
    A. Alternating and taking the median over rounds compares them under the same conditions.
    Returns ``{name: median_ms}``; ``{name + " spread": max/min}`` tells the noise.
    """
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(time_fn(fn, device=device, **kw))
    out = {name: statistics.median(ts) for name, ts in per.items()}
    out.update({f"{name} spread": max(ts) / min(ts) for name, ts in per.items()})
    return out


def device_name(device=None) -> str:
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_sha() -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it (a working tree
    copied to another machine keeps the commit it started from, not the edits on top). Asked
    of git once per working directory and process: every row of a run names the same tree."""
    return _git_sha(os.getcwd())


@functools.cache
def _git_sha(cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False, cwd=cwd)
        sha = out.stdout.strip() or None
        if sha:
            diff = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                  capture_output=True, text=True, timeout=10, check=False,
                                  cwd=cwd)
            sha += "+dirty" if diff.stdout.strip() else ""
        return sha
    except (OSError, subprocess.SubprocessError):
        return None


def result(method, what, *, median_ms, shape=None, dtype=None, flops=None, bytes_moved=None,
           target=None, device=None, **extra):
    """One measurement in the common schema; ``flops`` (total) gives ``tflops``."""
    tflops = None if flops is None or not median_ms else flops / (median_ms * 1e-3) / 1e12
    return {
        "method": method,
        "what": what,
        "target": target,
        "device": device_name(device),
        "shape": dict(shape or {}),
        "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "median_ms": None if median_ms is None else float(median_ms),
        "tflops": tflops,
        "bytes_moved": bytes_moved,
        "extra": extra,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }


SCHEMA_KEYS = ("method", "what", "target", "device", "shape", "dtype", "median_ms", "tflops",
               "bytes_moved", "extra", "git_sha", "date", "torch")


def write_results(results, path) -> str:
    """Write a list of result dicts as JSON (creating folders). Returns the path."""
    for r in results:
        missing = [k for k in SCHEMA_KEYS if k not in r]
        if missing:
            raise ValueError(f"result lacks keys {missing}: {r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return path


def read_results(path):
    with open(path) as f:
        return json.load(f)


def draw_documents(total: int, lo: int, hi: int, seed: int) -> list:
    """Document lengths in ``[lo, hi]`` summing to ``total`` (``total >= lo``), drawn with
    numpy's ``default_rng(seed)``: the packed-document benchmarks' and probes' layouts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lens, left = [], total
    while left > hi:
        lens.append(int(rng.integers(lo, min(hi, left - lo) + 1)))
        left -= lens[-1]
    return lens + [left]


def cu_seqlens(lens, device="cpu") -> torch.Tensor:
    """flash-attn's int32 ``cu_seqlens`` ``[len(lens) + 1]`` of the lengths ``lens``."""
    import numpy as np

    return torch.tensor(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]),
                        dtype=torch.int32, device=device)


def parse_backends(text: str, allowed=None, *, option: str = "--backends") -> list:
    """A benchmark's ``--backends`` (or ``option``, named in the error): the comma-separated
    local-kernel backend names, in order, without repeats; each one ``"auto"`` or one of
    ``allowed`` (default: every backend of :mod:`longattn.common.kernels`, the unavailable ones
    included: those are reported and left out at run time, see :func:`backend_dtype`)."""
    if allowed is None:
        from longattn.common.kernels import backend_names

        allowed = backend_names()
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    known = sorted({"auto", *allowed})
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"{option}: {bad or text!r} not among {', '.join(known)}")
    return names


def backends_option(allowed=None, *, option: str = "--backends"):
    """An argparse ``type=`` for a ``--backends``-like option: the string becomes
    :func:`parse_backends`'s list, a bad one a usage error naming ``option`` (argparse also
    converts a string ``default``)."""
    import argparse

    def parse(text):
        try:
            return parse_backends(text, allowed, option=option)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def backend_dtype(backend, device, dtype, head_dims, *, window_size=(-1, -1)):
    """``(dtype, None)``: the dtype a benchmark's rows on ``backend`` run in (the run's, or
    bf16 where the backend serves only half precision and the run is float32 / float64: the CPU
    smoke runs), or ``(None, why not)`` where it cannot serve a causal call of these head dims
    (an int or several) here at all. ``"auto"`` always runs in the run's dtype."""
    if backend == "auto":
        return dtype, None
    from longattn.common import kernels as K

    dims = (head_dims,) if isinstance(head_dims, int) else tuple(head_dims)

    def why(dt):
        try:
            for d in dims:
                probe = torch.zeros(1, 8, 1, d, device=device, dtype=dt)
                K.pick_backend(probe, probe, probe, causal=True, window_size=window_size,
                               backend=backend)
        except ValueError as e:
            return " ".join(str(e).split())
        return None

    reason = why(dtype)
    if reason is None:
        return dtype, None
    if dtype not in (torch.float16, torch.bfloat16):
        reason = why(torch.bfloat16)  # in half precision: the reason that remains
        if reason is None:
            return torch.bfloat16, None
    return None, reason


def usable_backends(names, device, dtype, head_dims, *, window_size=(-1, -1), say=print,
                    label="backend"):
    """Which of the backends ``names`` a benchmark can run here: ``(runs, status)``, ``runs``
    ``{name: dtype}`` (:func:`backend_dtype`) and ``status`` ``{name: "ran" | "ran in bfloat16"
    | "unavailable: why"}`` for the JSON; each one left out, or run in another dtype, is said
    in one line through ``say``."""
    runs, status = {}, {}
    for be in names:
        dt, why = backend_dtype(be, device, dtype, head_dims, window_size=window_size)
        if dt is None:
            say(f"{label} {be} unavailable, left out: {why}")
            status[be] = f"unavailable: {why}"
            continue
        runs[be] = dt
        status[be] = "ran" + ("" if dt == dtype else f" in {str(dt)[6:]}")
        if dt != dtype:
            say(f"{label} {be}: runs in {str(dt)[6:]} (it serves no {dtype})")
    return runs, status


def backend_tag(name: str, backend: str) -> str:
    """A row's name: ``name`` for ``auto`` (the names earlier runs and readers use), ``name
    [backend]`` for the others."""
    return name if backend == "auto" else f"{name} [{backend}]"


def simulated_ranks_parser(doc: str, *, tokens: int):
    """An ``argparse`` parser with the options every simulated-ranks benchmark takes
    (``--smoke --out --ranks --tokens --heads --dim``); the script adds its own."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny configuration on the CPU")
    p.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=tokens, help="tokens per rank")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    return p


def out_dir(default: str, cli_value: str | None = None) -> str:
    """Where a benchmark writes: ``--out`` if given, else ``$OUT`` (device runs), else default."""
    d = cli_value or os.environ.get("OUT") or default
    os.makedirs(d, exist_ok=True)
    return d


def format_table(rows, columns=None, width=None) -> str:
    """Plain-text table of dicts (floats shown with 4 significant digits). With ``width``, at
    most that many columns wide: the widest cells are wrapped onto continuation lines (words
    kept whole where they fit) until the table fits."""
    import textwrap

    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return "" if x is None else str(x)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    while width is not None and sum(widths) + 2 * (len(widths) - 1) > width:
        i = max(range(len(widths)), key=widths.__getitem__)
        if widths[i] <= max(len(columns[i]), 8):
            break  # nothing left to wrap
        widths[i] -= 1
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    for row in cells:
        parts = [(textwrap.wrap(v, w, break_on_hyphens=False) or [""]) if len(v) > w else [v]
                 for v, w in zip(row, widths)]
        for k in range(max(map(len, parts))):
            lines.append("  ".join((p[k] if k < len(p) else "").ljust(w)
                                   for p, w in zip(parts, widths)))
    if width is not None:
        lines = [ln.rstrip() for ln in lines]
    return "\n".join(lines)


def progress(iterable, desc: str = "", total=None):
    """tqdm progress bar if tqdm is installed, else the plain iterable. Quiet when stderr is
    not a terminal (``disable=None``), so CI logs and redirected output carry no bar frames."""
    if importlib.util.find_spec("tqdm") is None:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None)


def plot_lines(series, path, *, xlabel, ylabel, title="", logx=False, logy=False):
    """``series`` = {label: (xs, ys)} -> PNG at ``path`` (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compile_sm90(fn, signature, constexprs, attrs=None, *, num_warps=4, num_stages=None):
    """Compile the Triton kernel ``fn`` for a Hopper GPU (sm_90) on any machine, with triton's
    own compiler and the ``cuobjdump`` of its wheel. Returns ``(shared memory bytes, "REG:n
    STACK:m")``. A developer tool (catches compile errors the interpreter cannot, and register
    spills); it leans on triton internals (``ASTSource``, ``GPUTarget``) that move between
    versions. Run it with ``TRITON_INTERPRET`` unset."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or {})
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                         check=False).stdout
    os.unlink(f.name)
    line = [x for x in out.splitlines() if "REG:" in x]
    return c.metadata.shared, " ".join(line[0].split()[:2]) if line else "?"


if __name__ == "__main__":  # python -m longattn.common.bench PKG [SCRIPT] [ARGS ...]
    import sys

    from longattn.common.script_runner import main

    sys.exit(main(sys.argv[1:]))
