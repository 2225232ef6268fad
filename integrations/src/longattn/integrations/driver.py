"""The demo driver: every longattn method on a CPU world of gloo ranks, checked against the oracle.

One implementation behind ``longattn demo``, ``longattn check``, ``nox -s demo`` and
``python tests/demo.py``: :func:`collect_rows` gathers

* the foundation rows (``method="common"``): the local kernels of ``longattn.common`` forward
  and backward against the float64 oracle ``longattn.reference``, and a merge of 4 ranks'
  key-shard partials (needs ``longattn-reference``; without it there are no such rows);
* every installed package's rows, through the entry point group ``longattn.demo``
  (``rows(run_world) -> list[dict]``), so ``common`` never imports a paper package.

A row is a dict with ``method``, ``what``, ``shape``, ``rel_err``, ``tol`` (2e-2 when absent),
``time_ms`` and ``bytes`` (sent per rank, or None); it passes when ``rel_err`` is finite and at
most its ``tol`` (:func:`row_passes`).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from importlib.metadata import entry_points

FOUNDATION = "common"  # the method name of the foundation rows
DEFAULT_TOL = 2e-2
WORLD = 4
COLUMNS = ["method", "what", "shape", "rel_err", "time_ms", "bytes"]


# ---------------------------------------------------------------------------------------------
# rows


def demo_entry_points(only=None):
    """The ``longattn.demo`` entry points, sorted by name (``only``: names to keep; unknown
    names, other than the foundation's, raise ``SystemExit`` naming what is installed)."""
    eps = entry_points()
    group = eps.select(group="longattn.demo") if hasattr(eps, "select") else eps.get(
        "longattn.demo", [])
    found = sorted(group, key=lambda e: e.name)
    if only:
        unknown = sorted(set(only) - {e.name for e in found} - {FOUNDATION})
        if unknown:
            raise SystemExit(f"longattn: no demo rows for {unknown}; installed: "
                             f"{[FOUNDATION] + [e.name for e in found]}")
        found = [e for e in found if e.name in only]
    return found


def _inputs(seed, b=1, s=64, hq=4, hkv=2, d=16):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv)]


def _merge_on_world(rank, world, seed):
    """Each rank attends to its quarter of the keys; all partials are gathered and merged."""
    import torch
    import torch.distributed as dist

    from longattn.common import comm
    from longattn.common.kernels import attention_forward
    from longattn.common.merge import merge_partials

    q, k, v = _inputs(seed)
    m = k.shape[1] // world
    ks, vs = k[:, rank * m:(rank + 1) * m], v[:, rank * m:(rank + 1) * m]
    t0 = time.perf_counter()
    with comm.counting() as c:
        out, lse = attention_forward(q, ks.contiguous(), vs.contiguous())
        outs = [torch.empty_like(out) for _ in range(world)]
        lses = [torch.empty_like(lse) for _ in range(world)]
        comm.all_gather(outs, out.contiguous(), group=dist.group.WORLD)
        comm.all_gather(lses, lse.contiguous(), group=dist.group.WORLD)
        for p in range(world):
            if p != rank:
                comm.record("send", p, out.numel() * out.element_size()
                            + lse.numel() * lse.element_size())
        acc_o, acc_l = outs[0], lses[0]
        for o, lse_p in zip(outs[1:], lses[1:]):
            acc_o, acc_l = merge_partials(acc_o, acc_l, o, lse_p)
    return acc_o, acc_l, (time.perf_counter() - t0) * 1e3, c.bytes_sent


def foundation_rows(run_world):
    """The rows of ``longattn.common`` against the float64 oracle."""
    try:
        from longattn import reference as R
    except ImportError:
        print(f"  {FOUNDATION}: longattn-reference is not installed; no rows")
        return []
    import torch

    from longattn.common.kernels import attention_backward, attention_forward
    from longattn.common.testing import rel_error

    rows = []
    q, k, v = _inputs(0)
    qn, kn, vn = (t.numpy() for t in (q, k, v))
    o_ref, l_ref = R.attention(qn, kn, vn)
    o, lse, ms, nbytes = run_world(WORLD, _merge_on_world, 0)[0]
    rows.append({"method": FOUNDATION, "what": f"merge of {WORLD} ranks' key-shard partials",
                 "shape": "B1 S64 H4/2 D16 fp64", "tol": 1e-10,
                 "rel_err": max(rel_error(o, o_ref), rel_error(lse, l_ref)), "time_ms": ms,
                 "bytes": nbytes})
    for causal, window, name in ((True, (-1, -1), "causal"), (False, (8, 8), "window (8,8)"),
                                 (True, (-1, -1), "causal Sq<Sk")):
        qq = q[:, :40] if name.endswith("Sq<Sk") else q
        mask = R.window_mask(qq.shape[1], k.shape[1], window)
        if causal:
            mask = mask & R.causal_mask(qq.shape[1], k.shape[1])
        do = torch.randn_like(qq)
        t0 = time.perf_counter()
        out, lse = attention_forward(qq, k, v, causal=causal, window_size=window)
        grads = attention_backward(do, qq, k, v, out, lse, causal=causal, window_size=window)
        ms = (time.perf_counter() - t0) * 1e3
        ro, _ = R.attention(qq.numpy(), kn, vn, mask=mask)
        rg = R.attention_backward(do.numpy(), qq.numpy(), kn, vn, mask=mask)
        err = max([rel_error(out, ro)] + [rel_error(a, b) for a, b in zip(grads, rg)])
        rows.append({"method": FOUNDATION, "what": f"kernels torch fwd+bwd {name}",
                     "shape": f"B1 Sq{qq.shape[1]} Sk64 H4/2 D16 fp64", "rel_err": err,
                     "tol": 1e-10, "time_ms": ms, "bytes": None})
    return rows


def collect_rows(only=None, run_world=None, log=print):
    """The foundation's rows and every installed package's demo rows (``only``: these method
    names); a package that raises gives one failing row instead of hiding the others."""
    if run_world is None:
        from longattn.common.testing import run_world
    sources = [(FOUNDATION, foundation_rows)] if not only or FOUNDATION in only else []
    sources += [(ep.name, ep) for ep in demo_entry_points(only)]
    rows = []
    for name, src in sources:
        t0 = time.perf_counter()
        try:
            fn = src if name == FOUNDATION else src.load()
            got = list(fn(run_world))
        except Exception as e:  # noqa: BLE001 - one broken package must not hide the others
            traceback.print_exc()
            got = [{"method": name, "what": f"FAILED: {type(e).__name__}: {e}"[:100],
                    "rel_err": float("inf")}]
        log(f"  {name}: {len(got)} rows in {time.perf_counter() - t0:.1f} s")
        rows += got
    return rows


def row_passes(row) -> bool:
    """``rel_err`` finite and at most the row's ``tol`` (2e-2 when it gives none); a row with
    no ``rel_err`` (a timing row) makes no accuracy claim and passes."""
    err = row.get("rel_err")
    err = 0.0 if err is None else float(err)
    tol = row.get("tol")
    return math.isfinite(err) and err <= float(DEFAULT_TOL if tol is None else tol)


# ---------------------------------------------------------------------------------------------
# output


WIDTH = 100  # columns a printed table may take


def fit_table(rows, columns, width=WIDTH) -> str:
    """:func:`longattn.common.bench.format_table`'s table, at most ``width`` columns wide."""
    from longattn.common.bench import format_table

    return format_table(rows, columns, width=width)


def check_table(rows) -> str:
    table = [{**r, "tol": r.get("tol", DEFAULT_TOL), "ok": "PASS" if row_passes(r) else "FAIL"}
             for r in rows]
    return fit_table(table, ["method", "what", "shape", "rel_err", "tol", "ok"])


def plot(rows, path) -> bool:
    """A bar per row (relative error, log scale; green when it passes). False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r.get('method')}: {r.get('what')}"[:60] for r in rows]
    errs = [max(float(r.get("rel_err") or 0.0), 1e-18) for r in rows]
    errs = [e if math.isfinite(e) else 1.0 for e in errs]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    ax.barh(range(len(rows)), errs,
            color=["tab:green" if row_passes(r) else "tab:red" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1e-10, color="k", ls="--", lw=0.8, label="fp64 tolerance 1e-10")
    ax.axvline(DEFAULT_TOL, color="r", ls=":", lw=0.8, label="bf16 tolerance 2e-2")
    ax.set_xlabel("relative error against the float64 oracle / single-process model")
    ax.set_title("longattn demo: CPU world of gloo ranks")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def writable_dir(path: str) -> str:
    """Create ``path`` and check that a file can be written there; ``SystemExit`` saying why
    not (called before any row runs)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".longattn-write-test")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"longattn: cannot write the results to --out {path!r}: "
                         f"{e.strerror or e}") from None
    return path


def run_demo(only=None, out="demo_out") -> int:
    """Every row with time and bytes: prints the table, writes ``demo.json`` (and ``demo.png``
    with matplotlib) into ``out``; returns 1 when a row fails or there are none, else 0."""
    writable_dir(out)
    t0 = time.perf_counter()
    print("longattn demo: every installed method on a CPU world of gloo ranks", flush=True)
    rows = collect_rows(only)
    print(fit_table(rows, COLUMNS))
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    plotted = plot(rows, os.path.join(out, "demo.png")) if rows else False
    bad = [r for r in rows if not row_passes(r)]
    print(f"{len(rows)} rows, {len(bad)} over tolerance, {time.perf_counter() - t0:.1f} s; "
          f"results in {out}/demo.json" + (", demo.png" if plotted else ""))
    return 1 if bad or not rows else 0


def run_check(only=None) -> int:
    """The same rows as a pass/fail matrix; returns 1 when a row fails or there are none."""
    t0 = time.perf_counter()
    print("longattn check: every installed method against the oracle, CPU gloo world",
          flush=True)
    rows = collect_rows(only)
    print(check_table(rows))
    bad = [r for r in rows if not row_passes(r)]
    print(f"{len(rows)} rows, {len(bad)} failed, {time.perf_counter() - t0:.1f} s")
    return 1 if bad or not rows else 0
