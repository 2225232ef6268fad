"""hamilton's answers to ``python -m longattn.common.repro hamilton --target T``.

The claims (``hamilton/targets/<T>/target.json``) are TASP's speed-ups over ring / zigzag ring
on a multi-GPU target, so one GPU cannot measure them:

* predicted: ``hamilton/bench/predict_hamilton.py``'s model (its functions, called here) over
  the target's sweep (``config.json``), with the compute of one step from the single-GPU block
  times measured on an H200 (``bench/results/h200/step_times.json``, forward of one L x L
  block, B = 1, H = 20, d = 64, bf16) scaled by the target's attention FLOP/s over the H200's;
* measured: the geometric-mean speed-up in ``targets/<T>/results/repro_<T>.json``, which
  ``hamilton/bench/repro_hamilton.py`` writes on the target's machine; until one is committed
  the claim is "not measured yet".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

from longattn.common import topology

STEP_FILE = "bench/results/h200/step_times.json"


def _predict_module(pkg_dir):
    """hamilton/bench/predict_hamilton.py, imported from its file (a script, not a module of
    the package)."""
    path = pkg_dir / "bench" / "predict_hamilton.py"
    spec = importlib.util.spec_from_file_location("_longattn_predict_hamilton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _ScaledSteps:
    """Measured H200 block times, scaled to the target by attention FLOP/s."""

    def __init__(self, steps, ref_flops):
        self.steps, self.ref_flops = steps, ref_flops

    def block_ms(self, target, L, bh, d):
        # the H100-1 entry only makes StepTimes return the measured figure unscaled
        ms = self.steps.block_ms(topology.TARGETS["H100-1"], L, bh, d)
        return ms * self.ref_flops / target.attn_flops_fwd


def predict(ctx, pred):
    cfg = ctx.sweep
    target = dataclasses.replace(ctx.hw, nodes=cfg["nodes"], gpus_per_node=cfg["gpus_per_node"])
    steps = _ScaledSteps(pred.StepTimes(str(ctx.pkg_dir / STEP_FILE)),
                         topology.get_target("H200-1").attn_flops_fwd)
    return pred.predict_rows(cfg, target, steps)


def _measured(ctx):
    """Geometric mean over the rows of repro_hamilton.py's JSON of ring ms / TASP ms (full)."""
    path = ctx.folder / "results" / f"repro_{ctx.target}.json"
    if ctx.dry_run or not path.is_file():
        return None
    with open(path) as f:
        rows = json.load(f)
    by = {}
    for r in rows:
        if r["extra"].get("dry_run"):
            continue
        s = r["shape"]
        by[(r["extra"]["mask"], r["extra"]["schedule"], s["seqlen"], s["batch"],
            s["heads"])] = r
    logs = [math.log(by[(m, "ring", *k)]["median_ms"] / r["median_ms"])
            for (m, meth, *k), r in by.items() if m == "full" and meth == "tasp"
            and (m, "ring", *k) in by]
    if not logs:
        return None
    any_row = next(iter(by.values()))
    return math.exp(sum(logs) / len(logs)), any_row["device"], any_row["date"], str(path)


def run(ctx):
    pred = _predict_module(ctx.pkg_dir)
    rows = predict(ctx, pred)
    basis = (f"alpha-beta model (common.topology, {ctx.hw.name} figures) with one step's "
             f"compute from single-GPU block times measured on an NVIDIA H200, scaled by "
             f"attention FLOP/s; {len(rows)} configurations")
    for mask in ("full", "causal"):
        avg, mx = pred._avg(rows, mask, "tasp")
        xs, ys = pred.speedup_curve(rows, mask, "tasp")
        ctx.answer(f"tasp_{mask}_mean", avg, "predicted", basis, source=STEP_FILE,
                   device="NVIDIA H200 (step times)", date=None,
                   series={f"{mask}: TASP / {'zigzag ring' if mask == 'causal' else 'ring'}":
                           (xs, ys)},
                   x="per-GPU sequence length (tokens)", y="speed-up (geo-mean over B, H)")
        ctx.answer(f"tasp_{mask}_max", mx, "predicted", basis, source=STEP_FILE,
                   device="NVIDIA H200 (step times)")
    if any(c["id"] == "two_level_full_mean" for c in ctx.spec["claims"]):
        avg, _ = pred._avg(rows, "full", "two_level")
        ctx.answer("two_level_full_mean", avg, "predicted", basis, source=STEP_FILE,
                   device="NVIDIA H200 (step times)")
    got = _measured(ctx)
    if got is None:
        ctx.answer("tasp_full_measured", None, "not measured yet",
                   f"needs {ctx.hw.world_size} GPUs of the target: python "
                   f"hamilton/bench/repro_hamilton.py --target {ctx.target}")
    else:
        val, device, date, path = got
        ctx.answer("tasp_full_measured", val, "measured",
                   "geometric mean of ring ms / TASP ms over the full-mask rows",
                   source=path, device=device, date=date)
    return {"rows": rows}


def readme_views(pkg_dir):
    """The figures hamilton's README derives from ``targets/<T>/prediction.json``: per target,
    mask and method, the mean and the maximum over the rows of ring ms / method ms."""
    out = []
    for path in sorted((pkg_dir / "targets").glob("*/prediction.json")):
        with open(path) as f:
            rows = json.load(f)["rows"]
        for mask in ("full", "causal"):
            for m in ("tasp", "two_level"):
                v = [r["ring_ms"] / r[f"{m}_ms"] for r in rows
                     if r["mask"] == mask and f"{m}_ms" in r]
                if v:
                    out += [sum(v) / len(v), max(v)]
    return out
