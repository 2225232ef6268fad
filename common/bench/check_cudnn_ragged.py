"""The ragged (THD) cuDNN varlen graphs of the cudnn backend on the GPU: correctness against a
float64 reference, graph reuse across document layouts, time next to the flash varlen op.

    PYTHONPATH=$(ls -d */src | tr '\\n' ':') python common/bench/check_cudnn_ragged.py [--out DIR]

``longattn.common.kernels.varlen`` with ``backend="cudnn"`` runs packed documents as one cuDNN
SDPA graph with a padding mask and ragged offsets
(:func:`longattn.common.kernels.cudnn_backend.varlen_forward` / ``varlen_backward``). This
script checks it, in three parts, each printed as it finishes:

* correctness (bf16): documents with odd lengths, ``Sq == Sk`` causal, ``Sq < Sk`` causal
  (bottom-right per document) and full, 32 short documents, one-token documents, one-token
  queries on long keys, a sliding window, documents with keys but no queries and with queries
  but no keys (hamilton's steps have them); GQA 8/2 and 8/8, head dims 64 and 128.
  ``out``, ``lse``, ``dq``, ``dk``, ``dv`` against float64 attention with the document mask
  (on the GPU); relative error <= 2e-2 is ok. A row also says whether the ragged graph ran
  (``ragged``), or cuDNN refused it and the call fell back;
* graph reuse: 5 calls (forward + backward) on 262,144 packed tokens of documents of 1k-32k
  tokens (H 32, D 128, causal), each with another document layout of the same size bucket:
  the graphs built must be 1 per direction; the ms of each call (the first builds them);
* time: the ragged graphs against the flash varlen op (``backend="aten"``), forward and
  forward + backward, on the first of those layouts (interleaved rounds,
  ``longattn.common.bench.time_interleaved``), and how far the two results differ.

Prints one row per check and the tables; with ``--out DIR`` (or ``$OUT``) writes
``check_cudnn_ragged.json`` (``longattn.common.bench`` result schema) and
``check_cudnn_ragged_log.txt``. Exits 1 when a correctness or reuse check fails or the
cudnn backend is unavailable. Without CUDA it prints the plan and that it skipped (exit 0);
``--smoke`` uses a small packed batch (16,384 tokens, H 4) for the reuse and time parts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

import numpy as np
import torch

from longattn.common.bench import cu_seqlens, sync
from longattn.common.testing import dense_reference64, device_rel_error
from longattn.reference import document_mask

TOL = 2e-2
_SHORT = np.random.default_rng(1).integers(1, 200, size=32).tolist()
# (name, q lengths, k lengths (None: the q lengths), Hq, Hkv, D, causal, window)
CASES = [
    ("Sq == Sk causal, 1837 tokens", [512, 1000, 1, 324], None, 8, 2, 128, True, (-1, -1)),
    ("Sq < Sk causal", [128, 512, 7, 64], [512, 1024, 7, 300], 8, 2, 128, True, (-1, -1)),
    ("Sq < Sk full", [128, 512, 7, 64], [512, 1024, 7, 300], 8, 8, 64, False, (-1, -1)),
    ("32 short docs", _SHORT, None, 8, 2, 128, True, (-1, -1)),
    ("1-token docs", [1, 1, 1, 200, 1, 1, 1, 1, 1], None, 8, 8, 64, True, (-1, -1)),
    ("1-token q, long k", [1, 1, 1], [1, 300, 77], 8, 2, 128, True, (-1, -1)),
    ("window (64, 0)", [700, 300, 513], None, 8, 2, 128, True, (64, 0)),
    ("keys without queries", [40, 0, 25, 300], [40, 12, 30, 300], 8, 2, 64, True, (-1, -1)),
    ("queries without keys", [300, 200, 150, 411], [512, 0, 700, 0], 8, 2, 128, False,
     (-1, -1)),
]
# the packed batch of the reuse and time parts: (tokens, shortest doc, longest doc, H, D)
BIG = (262144, 1024, 32768, 32, 128)
SMOKE = (16384, 256, 2048, 4, 128)
LAYOUTS = 5

_log: list[str] = []


def say(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    _log.append(line)


def _inputs(lq, lk, hq, hkv, d, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, dout = (torch.randn(sum(lq), hq, d, generator=g, device=device).bfloat16()
               for _ in range(2))
    k, v = (torch.randn(sum(lk), hkv, d, generator=g, device=device).bfloat16()
            for _ in range(2))
    return q, k, v, dout


def reference(q, k, v, dout, lq, lk, scale, *, causal=False, window=(-1, -1),
              num_sink_tokens=0, dlse=None):
    """float64 attention of packed sequences (query lengths ``lq``, key lengths ``lk``) under
    the oracle's document mask, and its gradients, on q's device: ``(out, lse [H, Tq], [dq,
    dk, dv])`` (:func:`longattn.common.testing.dense_reference64`; also the fa4 probe's)."""
    mask = document_mask(cu_seqlens(lq).numpy(), cu_seqlens(lk).numpy(), causal=causal,
                         window=window, num_sink_tokens=num_sink_tokens)
    return dense_reference64(q, k, v, dout, mask, scale, dlse=dlse)


class RaggedCalls:
    """Counts the calls that reached the ragged graphs (wraps the cudnn backend's functions
    the varlen module calls; a call cuDNN refused raises there and is not counted)."""

    def __init__(self, cb):
        self.cb, self.n = cb, {"varlen_forward": 0, "varlen_backward": 0}
        for name in self.n:
            setattr(cb, name, self._wrap(name, getattr(cb, name)))

    def _wrap(self, name, fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)  # GraphRefused propagates: not counted
            self.n[name] += 1
            return out
        return wrapped

    def snapshot(self):
        return dict(self.n)


def check_case(case, device, calls):
    from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen
    from longattn.common.testing import rel_error

    name, lq, lk, hq, hkv, d, causal, window = case
    lk = lk or lq
    q, k, v, dout = _inputs(lq, lk, hq, hkv, d, device)
    cq, ck = cu_seqlens(lq, device), cu_seqlens(lk, device)
    scale = d ** -0.5
    before = calls.snapshot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = attention_forward_varlen(q, k, v, cq, ck, causal=causal, window_size=window,
                                            backend="cudnn")
        dq, dk, dv = attention_backward_varlen(dout, q, k, v, out, lse, cq, ck, causal=causal,
                                               window_size=window, backend="cudnn")
    after = calls.snapshot()
    ragged = all(after[n] > before[n] for n in after)
    ro, rl, rg = reference(q, k, v, dout, lq, lk, scale, causal=causal, window=window)
    row = {"case": name, "docs": len(lq), "Tq": sum(lq), "Tk": sum(lk), "H": f"{hq}/{hkv}",
           "D": d, "causal": causal, "window": str(window),
           "path": "ragged" if ragged else "fell back"}
    for n, got, ref in (("out", out, ro), ("lse", lse, rl), ("dq", dq, rg[0]),
                        ("dk", dk, rg[1]), ("dv", dv, rg[2])):
        row[n] = rel_error(got, ref)
    refused = [str(w.message)[:160] for w in caught if "no engine" in str(w.message)]
    if refused:
        row["refused"] = refused[0]
    row["ok"] = bool(ragged and all(row[n] <= TOL for n in ("out", "lse", "dq", "dk", "dv")))
    return row


def draw_docs(rng, total, lo, hi):
    """Document lengths of ``lo``..``hi`` tokens (the last one what is left) summing to
    ``total``."""
    lens = []
    while sum(lens) < total:
        lens.append(int(rng.integers(lo, hi + 1)))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def draw_layouts(total, lo, hi, count, seed=0):
    """``count`` different document layouts of one size bucket (documents and longest)."""
    from longattn.common.kernels.cudnn_backend import bucket_batch, bucket_seqlen

    rng = np.random.default_rng(seed)
    bucket = lambda ls: (bucket_batch(len(ls)), bucket_seqlen(max(ls)))  # noqa: E731
    layouts = [draw_docs(rng, total, lo, hi)]
    while len(layouts) < count:
        lens = draw_docs(rng, total, lo, hi)
        if bucket(lens) == bucket(layouts[0]) and lens not in layouts:
            layouts.append(lens)
    return layouts


def check_reuse(layouts, h, d, device, keep):
    """Forward + backward on each layout (same tensors, other ``cu_seqlens``): graphs built and
    the ms of each call. Leaves the tensors in ``keep["tensors"]`` for the time part."""
    from longattn.common.kernels import cudnn_backend as cb
    from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen

    total = sum(layouts[0])
    q, k, v, dout = keep["tensors"] = _inputs([total], [total], h, h, d, device, seed=1)
    before = (cb.graph_count("varlen fwd"), cb.graph_count("varlen bwd"))
    ms = []
    for lens in layouts:
        cu = cu_seqlens(lens, device)
        sync(device)
        t0 = time.perf_counter()
        out, lse = attention_forward_varlen(q, k, v, cu, cu, causal=True, backend="cudnn")
        attention_backward_varlen(dout, q, k, v, out, lse, cu, cu, causal=True, backend="cudnn")
        sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    built = (cb.graph_count("varlen fwd") - before[0], cb.graph_count("varlen bwd") - before[1])
    return {"case": f"graph reuse, {len(layouts)} layouts", "docs": [len(x) for x in layouts],
            "longest": [max(x) for x in layouts], "graphs fwd": built[0],
            "graphs bwd": built[1], "call ms": [round(x, 1) for x in ms],
            "ok": built == (1, 1)}


def time_and_compare(lens, tensors, device):
    """Ragged cuDNN against the flash varlen op on one layout: ms and how far they differ."""
    from longattn.common.bench import time_interleaved
    from longattn.common.kernels.varlen import attention_backward_varlen, attention_forward_varlen

    q, k, v, dout = tensors
    cu = cu_seqlens(lens, device)

    def fwd(backend):
        return attention_forward_varlen(q, k, v, cu, cu, causal=True, backend=backend)

    def step(backend):
        out, lse = fwd(backend)
        return out, lse, *attention_backward_varlen(dout, q, k, v, out, lse, cu, cu,
                                                    causal=True, backend=backend)

    got, ref = step("cudnn"), step("aten")
    diff = {n: device_rel_error(a, b)
            for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
    del got, ref
    t = time_interleaved({"cudnn fwd": lambda: fwd("cudnn"), "flash fwd": lambda: fwd("aten"),
                          "cudnn fwd+bwd": lambda: step("cudnn"),
                          "flash fwd+bwd": lambda: step("aten")}, device=device, rounds=3)
    shape = {"tokens": sum(lens), "docs": len(lens), "longest": max(lens), "H": q.shape[1],
             "D": q.shape[2]}
    rows = [{"case": f"time {w}", **shape, "cudnn ms": t[f"cudnn {w}"],
             "flash ms": t[f"flash {w}"], "flash / cudnn": t[f"flash {w}"] / t[f"cudnn {w}"],
             "spread": max(t[f"cudnn {w} spread"], t[f"flash {w} spread"])}
            for w in ("fwd", "fwd+bwd")]
    agree = {"case": "cudnn vs flash", **shape, **{f"{n} diff": x for n, x in diff.items()},
             "ok": all(x <= TOL for x in diff.values())}
    return [agree] + rows


def _run(name, fn, rows):
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - one failed check is a row, the rest still run
        where = traceback.extract_tb(e.__traceback__)[-1]
        out = {"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300],
               "at": f"{os.path.basename(where.filename)}:{where.lineno} {where.line}"}
    for row in out if isinstance(out, list) else [out]:
        rows.append(row)
        say(f"{row['case']} ({time.perf_counter() - t0:.1f} s): {row}")
    return out


def _write(out_dir, rows, device):
    from longattn.common.bench import result, write_results

    res = [result("cudnn_ragged", r["case"], median_ms=r.get("cudnn ms"), dtype=torch.bfloat16,
                  device=device, **{k: v for k, v in r.items() if k != "case"}) for r in rows]
    path = write_results(res, os.path.join(out_dir, "check_cudnn_ragged.json"))
    with open(os.path.join(out_dir, "check_cudnn_ragged_log.txt"), "w") as f:
        f.write("\n".join(_log) + "\n")
    say(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default $OUT, else none)")
    p.add_argument("--smoke", action="store_true",
                   help=f"small packed batch for reuse and time ({SMOKE[0]} tokens)")
    a = p.parse_args(argv)
    total, lo, hi, h, d = SMOKE if a.smoke else BIG
    layouts = draw_layouts(total, lo, hi, LAYOUTS)
    say(f"check_cudnn_ragged: {len(CASES)} cases; reuse/time on {total} tokens, H {h}, D {d}, "
        f"documents per layout {[len(x) for x in layouts]}")
    if not torch.cuda.is_available():
        say("check_cudnn_ragged: no CUDA device here; skipped (nothing to check)")
        return 0
    from longattn.common.bench import format_table
    from longattn.common.kernels import cudnn_backend as cb

    if cb.cudnn is None:
        say(f"check_cudnn_ragged: the cudnn backend is unavailable: {cb.MISSING}")
        return 1
    device = torch.device("cuda")
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn-frontend "
        f"{getattr(cb.cudnn, '__version__', '?')}, cuDNN {cb.cudnn.backend_version()}")
    calls = RaggedCalls(cb)
    rows, keep = [], {}
    for case in CASES:
        _run(case[0], lambda c=case: check_case(c, device, calls), rows)
    _run("graph reuse", lambda: check_reuse(layouts, h, d, device, keep), rows)
    if "tensors" in keep:
        _run("time", lambda: time_and_compare(layouts[0], keep.pop("tensors"), device), rows)
    checks = [r for r in rows if "ok" in r]
    groups = {}  # one table per kind of row (the same columns)
    for r in rows:
        groups.setdefault(tuple(r), []).append(r)
    for group in groups.values():
        say(format_table(group, width=120))
    out = a.out or os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        _write(out, rows, device)
    return 0 if checks and all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
