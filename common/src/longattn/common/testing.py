"""Test helpers: persistent gloo worlds, random inputs, dtype tolerances, oracle errors.

    run_world(n, fn, *args, timeout=None)      # fn(rank, world_size, *args) on n gloo ranks
    random_qkv(b, sq, sk, hq, hkv, d, *, dtype, seed, device="cpu", dv=None) -> (q, k, v)
    random_like(t, *, seed)                    # e.g. dout for a backward
    oracle_errors(actual, expected) -> {name: relative error}
    assert_errors(errs, dtype, tol=None)       # every error within TOLERANCES[dtype] (or tol)
    rel_error(actual, expected), assert_close(actual, expected, dtype=None)

The shared oracle harness, for example::

    q, k, v = random_qkv(2, 64, 64, 4, 2, 16, dtype=torch.bfloat16, seed=0)
    out, lse = my_attention(q, k, v)
    ref_out, ref_lse = longattn.reference.attention(*(t.double().numpy() for t in (q, k, v)))
    assert_errors(oracle_errors({"out": out, "lse": lse}, {"out": ref_out, "lse": ref_lse}),
                  torch.bfloat16)

``run_world(n, fn, *args)`` runs ``fn(rank, world_size, *args)`` on every rank of a CPU world
of ``n`` gloo processes and returns the per-rank results in rank order. A world of each size
starts once per test session and is reused (each rank imports torch once: ~1 s per rank here);
``fn`` must be importable by name (a module-level function). If a rank raises, the others may
be stuck in a collective: the world is torn down and the error re-raised with the rank's
traceback. If the call does not finish within ``timeout`` seconds the world is killed and
:class:`WorldTimeout` is raised, so a hang fails a test instead of blocking CI.

Arguments and results travel pickled; tensors travel by value.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback

import torch

DEFAULT_TIMEOUT = float(os.environ.get("LONGATTN_WORLD_TIMEOUT", "120"))

# Relative error allowed per dtype when comparing against the float64 oracle.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


class WorldTimeout(TimeoutError):
    """A ``run_world`` call did not finish within its timeout (a hang, or far too slow)."""


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


def rel_error(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` in float64 over all elements (Frobenius).

    ``-inf`` entries that agree are ignored (empty rows' lse); any NaN, or an inf on only one
    side, gives ``inf`` so it can never pass a tolerance.
    """
    import numpy as np

    a = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else actual
    e = expected.detach().double().cpu().numpy() if isinstance(expected, torch.Tensor) else expected
    a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"rel_error: shapes differ {a.shape} vs {e.shape}")
    if np.isnan(a).any() or np.isnan(e).any():
        return float("inf")
    both_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    if (np.isinf(a) ^ np.isinf(e)).any() or (np.isinf(a) & np.isinf(e) & ~both_inf).any():
        return float("inf")
    a, e = np.where(both_inf, 0.0, a), np.where(both_inf, 0.0, e)
    num = np.linalg.norm((a - e).ravel())
    den = np.linalg.norm(e.ravel())
    if den == 0.0:
        return float(num)
    return float(num / den)


def assert_close(actual, expected, dtype=None, *, tol=None, what="value"):
    """Assert ``rel_error(actual, expected) <= tol`` (tol from :data:`TOLERANCES` by dtype)."""
    if tol is None:
        dtype = dtype if dtype is not None else actual.dtype
        tol = TOLERANCES[dtype]
    err = rel_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


def _positive_ints(**named):
    for name, x in named.items():
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")


def random_qkv(b, sq, sk, hq, hkv, d, *, dtype, seed, device="cpu", dv=None):
    """Random BSHD ``(q [b, sq, hq, d], k [b, sk, hkv, d], v [b, sk, hkv, dv or d])``.

    Standard normal values drawn in float64 from a CPU generator seeded with ``seed`` (the same
    tensors on every device and machine), then cast to ``dtype`` and moved to ``device``. Never
    zeros or constants: a test on zeros passes for kernels that ignore their inputs."""
    _positive_ints(b=b, sq=sq, sk=sk, hq=hq, hkv=hkv, d=d, seed=seed)
    dv = d if dv is None else dv
    _positive_ints(dv=dv)
    if hkv == 0 or hq % hkv:
        raise ValueError(f"hq ({hq}) must be a positive multiple of hkv ({hkv})")
    if dtype not in TOLERANCES:
        raise TypeError(f"dtype must be one of {list(TOLERANCES)}, got {dtype!r}")
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    return draw(b, sq, hq, d), draw(b, sk, hkv, d), draw(b, sk, hkv, dv)


def large_logit_qkv(b, sq, sk, hq, hkv, d, *, logit, seed, device="cpu", dv=None):
    """float32 ``(q, k, v)`` whose scores ``q . k`` (``softmax_scale=1.0``) are ``logit`` plus a
    spread of a few units, each score **exact** in float32.

    Dimension 0 carries the offset (``q = 128``, ``k = logit / 128``, which must be a dyadic
    rational); the other dimensions hold multiples of 1/8 in [-1, 1], so every product is a
    multiple of 2**-6 and every partial sum is representable below 2**17. One attention kernel
    over all keys is then exact to float32 rounding of its output, and what a method adds on top
    (merging partials through their ``lse``) is what a comparison with float64 attention sees."""
    _positive_ints(b=b, sq=sq, sk=sk, hq=hq, hkv=hkv, seed=seed)
    if d < 2:
        raise ValueError(f"d must be >= 2 (one offset dimension), got {d}")
    k0 = logit / 128.0
    if float(torch.tensor(k0, dtype=torch.float32)) * 128.0 != logit or abs(logit) >= 2**16:
        raise ValueError(f"logit must be below 2**16 with logit / 128 exact in float32, got "
                         f"{logit}")
    g = torch.Generator().manual_seed(seed)

    def eighths(*shape):
        return torch.randint(-8, 9, shape, generator=g).to(torch.float32) / 8

    q, k = eighths(b, sq, hq, d), eighths(b, sk, hkv, d)
    q[..., 0], k[..., 0] = 128.0, k0
    v = torch.randn(b, sk, hkv, d if dv is None else dv, generator=g)
    return q.to(device), k.to(device), v.to(device)


def random_like(t, *, seed):
    """A random normal tensor of ``t``'s shape, dtype and device (e.g. ``dout``), drawn like
    :func:`random_qkv` from ``seed``."""
    _positive_ints(seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*t.shape, generator=g, dtype=torch.float64).to(t.dtype).to(t.device)


def oracle_errors(actual, expected) -> dict:
    """``{name: rel_error(actual[name], expected[name])}`` for every name.

    ``actual`` maps names to tensors (``out``, ``lse``, ``dq``, ...), ``expected`` the same
    names to numpy arrays or tensors (the float64 oracle). Both must have the same names and,
    per name, the same shape. A NaN anywhere (in particular where the oracle is finite), or an
    infinity on one side only, gives ``inf``: it never passes a tolerance."""
    if not isinstance(actual, dict) or not isinstance(expected, dict):
        raise TypeError("actual and expected must be dicts of name -> tensor / array")
    if set(actual) != set(expected):
        raise ValueError(f"actual and expected must have the same names: only in actual "
                         f"{sorted(set(actual) - set(expected))}, only in expected "
                         f"{sorted(set(expected) - set(actual))}")
    errs = {}
    for name in actual:
        try:
            errs[name] = rel_error(actual[name], expected[name])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return errs


def assert_errors(errs, dtype, tol=None):
    """Assert every error of ``errs`` (from :func:`oracle_errors`) is within ``tol``: by default
    ``TOLERANCES[dtype]``; a float for every name, or a dict with one per name. The message
    lists every name over its tolerance. Returns ``errs``."""
    if tol is None:
        if dtype not in TOLERANCES:
            raise TypeError(f"dtype must be one of {list(TOLERANCES)}, got {dtype!r}")
        tol = TOLERANCES[dtype]
    tols = tol if isinstance(tol, dict) else dict.fromkeys(errs, tol)
    missing = sorted(set(errs) - set(tols))
    if missing:
        raise ValueError(f"tol has no entry for {missing}")
    bad = [f"{name}: {err:.3e} > {tols[name]:.1e}" for name, err in errs.items()
           if not err <= tols[name]]
    assert not bad, f"relative error over the {dtype} tolerance: " + "; ".join(bad)
    return errs


# --------------------------------------------------------------------------------------------
# persistent worlds


def _worker(rank, world_size, init_file, tasks, results, env):
    os.environ.clear()  # the parent's environment now, not the fork server's at its start
    os.environ.update(env)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    results.put((rank, "ready", None))
    while True:
        item = tasks.get()
        if item is None:
            break
        task_id, path, payload = item
        for p in reversed(path):
            if p not in sys.path:
                sys.path.insert(0, p)
        try:
            fn, args = pickle.loads(payload)
            out = fn(rank, world_size, *args)
            results.put((rank, task_id, ("ok", pickle.dumps(out))))
        except BaseException:  # noqa: BLE001 - report everything, including asserts
            results.put((rank, task_id, ("err", traceback.format_exc())))
    dist.destroy_process_group()


class _World:
    def __init__(self, n):
        ctx = _context()
        self.n = n
        self.tmp = tempfile.mkdtemp(prefix="longattn_world_")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, n, os.path.join(self.tmp, "store"), self.tasks[r], self.results,
                      dict(os.environ)),
                daemon=True,
            )
            for r in range(n)
        ]
        self.next_id = 0
        _log_start(n)
        for p in self.procs:
            p.start()
        ready = 0
        deadline = time.monotonic() + 60 + 10 * n
        while ready < n:
            try:
                _, tag, _ = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.kill()
                    why = f"ranks {dead} exited" if dead else "timed out"
                    raise WorldTimeout(f"world of {n} ranks did not start ({why})") from None
                continue
            ready += tag == "ready"

    def alive(self):
        return all(p.is_alive() for p in self.procs)

    def run(self, fn, args, timeout):
        self.next_id += 1
        tid = self.next_id
        payload = pickle.dumps((fn, args))
        for q in self.tasks:
            q.put((tid, list(sys.path), payload))
        got, first_err = {}, None
        deadline = time.monotonic() + timeout
        while len(got) < self.n:
            remaining = deadline - time.monotonic()
            if first_err is not None:  # give the others a moment to fail too, then give up
                remaining = min(remaining, first_err[1] + 3.0 - time.monotonic())
            try:  # poll, so a crashed rank is noticed within half a second
                rank, task_id, res = self.results.get(timeout=min(0.5, max(0.05, remaining)))
            except queue.Empty:
                if first_err is not None:
                    break
                if any(not p.is_alive() for p in self.procs):
                    self.kill()
                    raise RankError("a rank died (killed or crashed) during run_world") from None
                if time.monotonic() >= deadline:
                    self.kill()
                    raise WorldTimeout(
                        f"run_world({self.n}, {getattr(fn, '__name__', fn)}) did not finish in "
                        f"{timeout:.0f} s; finished ranks: {sorted(got)}"
                    ) from None
                continue
            if task_id != tid:
                continue  # stale result of an earlier, failed call
            got[rank] = res
            if res[0] == "err" and first_err is None:
                first_err = (rank, time.monotonic())
        errs = {r: res[1] for r, res in got.items() if res[0] == "err"}
        if errs or len(got) < self.n:
            self.kill()  # ranks may be stuck in a collective with the failed one
            r = min(errs) if errs else None
            msg = f"rank {r} raised:\n{errs[r]}" if errs else "ranks did not finish"
            raise RankError(msg)
        return [pickle.loads(got[r][1]) for r in range(self.n)]

    def kill(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        _WORLDS.pop(self.n, None)

    def close(self):
        for q in self.tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
        self.kill()


_WORLDS: dict[int, _World] = {}
# Ranks are forked from one server process per test process that has imported torch once: spawning
# each rank from scratch re-imported torch in every rank, and a pytest run starts dozens of ranks
# (LONGATTN_WORLD_LOG lists them). The server forks before any CUDA or thread pool exists; the
# main script is still imported by every rank, as with spawn.
_PRELOAD = ("torch", "torch.distributed", "numpy", "longattn.common.testing")


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


def _log_start(n):
    """With LONGATTN_WORLD_LOG=FILE, one line per world start (size, pid, time, the test
    running): how a suite's time splits between start-ups (each rank imports torch) and work."""
    path = os.environ.get("LONGATTN_WORLD_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{n} {os.getpid()} {time.time():.1f} "
                    f"{os.environ.get('PYTEST_CURRENT_TEST', '-')}\n")


def run_world(world_size: int, fn, *args, timeout: float | None = None):
    """Run ``fn(rank, world_size, *args)`` on a persistent gloo world; return per-rank results.

    ``world_size`` 1 also starts a (one-rank) process group, so code paths are the same.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise TypeError(f"fn must be a module-level function importable by name ({e})") from None
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
        if not timeout > 0 or timeout == float("inf"):
            raise ValueError(f"timeout must be positive and finite, got {timeout}")
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    w = _WORLDS.get(world_size)
    if w is None or not w.alive():
        if w is not None:
            w.kill()
        w = _WORLDS[world_size] = _World(world_size)
    return w.run(fn, args, timeout)


def world_pids(world_size: int):
    """PIDs of the live world of this size (tests of reuse), or None."""
    w = _WORLDS.get(world_size)
    return [p.pid for p in w.procs] if w is not None and w.alive() else None


def shutdown_worlds():
    """End every world at once (at interpreter exit): the ranks hold nothing worth a clean
    gloo shutdown, and waiting for each one cost tens of seconds per pytest run."""
    for w in list(_WORLDS.values()):
        w.kill()
    _WORLDS.clear()


atexit.register(shutdown_worlds)


def readme_python_blocks(readme, section: str = "Quick start") -> list[str]:
    """The ```` ```python ```` blocks of one ``## <section>`` of a README, in order (the tests that
    run a package's quick start verbatim take them from here)."""
    import re
    from pathlib import Path

    text = Path(readme).read_text()
    if f"## {section}" not in text:
        raise ValueError(f"{readme} has no '## {section}' section")
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def device_rel_error(actual, expected, chunk: int = 1 << 24) -> float:
    """:func:`rel_error` for tensors too large to copy to the host in float64 (a GPU probe's
    262,144-token outputs): ``||actual - expected|| / ||expected||`` summed in float64 on the
    tensors' device, ``chunk`` elements at a time; ``inf`` if either holds a NaN or an inf, or
    if ``expected`` is zero and ``actual`` is not."""
    if actual.shape != expected.shape:
        raise ValueError(f"device_rel_error: shapes differ {tuple(actual.shape)} vs "
                         f"{tuple(expected.shape)}")
    num = den = 0.0
    for x, y in zip(actual.reshape(-1).split(chunk), expected.reshape(-1).split(chunk)):
        x, y = x.double(), y.double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return float("inf")
        num += float(((x - y) ** 2).sum())
        den += float((y ** 2).sum())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5


def load_script(path, name: str | None = None, *, register: bool = False):
    """The Python file ``path`` (a benchmark or probe script, not a package module) loaded as
    module ``name`` (default: its file name without ``.py``), for tests that call its
    functions or its ``main``; with ``register`` it is put into ``sys.modules`` before it runs
    (its dataclasses look their module up there), and taken out again if it raises."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path)
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        if register:
            del sys.modules[name]
        raise
    return mod


def shared_script(path, name: str | None = None):
    """:func:`load_script` once per process: the module registered in ``sys.modules`` under
    ``name`` (default: the file name without ``.py``), so scripts that import each other's
    functions (a benchmark reusing another's simulation, a shim installed by two scripts) and
    the tests that drive them share one module and its state."""
    import sys
    from pathlib import Path

    name = name or Path(path).stem
    mod = sys.modules.get(name)
    return mod if mod is not None else load_script(path, name, register=True)


@contextlib.contextmanager
def flash_shim_removed_after():
    """Inside the block a benchmark may install ``common/bench/flash_shim.py`` (loaded by
    :func:`shared_script` as ``flash_shim``); after it the shim is uninstalled unless
    ``flash_attn.flash_attn_interface`` was there before, so later tests of the session see the
    modules they would see without it."""
    import sys

    before = "flash_attn.flash_attn_interface" in sys.modules
    try:
        yield
    finally:
        shim = sys.modules.get("flash_shim")
        if not before and shim is not None:
            shim.uninstall()


def dense_reference64(q, k, v, dout, mask, scale, dlse=None):
    """float64 attention of packed ``q [Tq, Hq, D]`` over ``k, v [Tk, Hkv, D]`` (GQA: heads
    repeated) with the boolean ``mask [Tq, Tk]`` (e.g. ``longattn.reference.document_mask``),
    and its gradients for ``dout`` (and ``dlse [Hq, Tq]``, the gradient of lse, if given), on
    q's device: ``(out, lse [Hq, Tq], [dq, dk, dv])``. The oracle's computation in torch, for
    GPU probes whose sizes would take the numpy oracle minutes; a row that sees no key has
    out 0, lse -inf and gradient 0."""
    mask = torch.as_tensor(mask, device=q.device)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    sc = torch.einsum("qhd,khd->hqk", qd, kd.repeat_interleave(g, 1)) * scale
    sc = sc.masked_fill(~mask, float("-inf"))
    dead = ~mask.any(-1)  # [Tq]: rows that see no key (finite lse, p = 0 there)
    lse = torch.logsumexp(sc.masked_fill(dead[:, None], 0.0), -1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(sc - lse[..., None]), vd.repeat_interleave(g, 1))
    if dlse is None:
        out.backward(dout.double())
    else:  # a dead row's lse is a constant here (its scores were replaced): no gradient
        ((out * dout.double()).sum() + (lse * dlse.to(lse.device, torch.float64)).sum()).backward()
    lse = lse.detach().masked_fill(dead, float("-inf"))
    return out.detach(), lse, [t.grad for t in (qd, kd, vd)]


# --------------------------------------------------------------------------------------------
# a stand-in for FlashAttention-4's interface (the fa4 kernel backend's CPU tests and the
# --smoke run of common/bench/check_fa4.py)

_NEG_INF = float("-inf")

# FA4's keyword parameters (flash_attn.cute.interface of flash-attn-4 4.0.0b40) that the
# stand-in accepts only at their defaults: it does not model them.
_FA4_FWD_OTHER = {"qv": None, "seqused_q": None, "seqused_k": None, "min_seqlen_k": None,
                  "page_table": None, "learnable_sink": None, "tile_mn": None,
                  "mma_pv_is_rs": None, "intra_wg_overlap": None, "num_splits": 1,
                  "pack_gqa": None, "_arch": None, "score_mod": None, "mask_mod": None,
                  "block_sparse_tensors": None, "out": None, "lse": None, "aux_tensors": None,
                  "aux_scalars": None, "scales": None, "gather_kv_indices": None,
                  "scheduler_metadata": None, "seqlen_k_per_split": None,
                  "disable_scheduler_metadata": False, "gather_bwd_recompute_p": False,
                  "config": None}
_FA4_BWD_OTHER = {"m_block_size": 64, "n_block_size": 128, "num_threads": 256,
                  "pack_gqa": False, "num_stages_Q": 2, "num_stages_dO": 2,
                  "SdP_swapAB": False, "dKV_swapAB": False, "dQ_swapAB": False,
                  "AtomLayoutMSdP": 2, "AtomLayoutNdKV": 2, "AtomLayoutMdQ": 2,
                  "V_in_regs": False, "seqused_q": None, "seqused_k": None,
                  "deterministic": False, "dq": None, "dk": None, "dv": None,
                  "score_mod": None, "score_mod_bwd": None, "mask_mod": None,
                  "aux_tensors": None, "aux_scalars": None, "block_sparse_tensors": None,
                  "learnable_sink": None, "config": None}


class Fa4Standin:
    """FlashAttention-4's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` (``flash_attn.cute.
    interface``) with its argument names, return values and conventions, computed in float64
    with torch on any device: what the ``fa4`` backend calls, for tests without a GPU
    (``with fa4_backend.use(Fa4Standin()):``). The conventions, as FA4's source has them:

    * fp16 / bf16 only; q, k, v of one dtype; ``Hq % Hkv == 0`` (GQA natively); head dims in
      multiples of 8 up to 256 on sm90 (``arch``), up to 128 or 256 on sm100 / sm110;
    * forward -> ``(out, lse, None, None, None)``: ``out`` like q with v's head dim, in q's dtype;
      ``lse`` float32 natural log ``[B, Hq, Sq]`` (packed ``[Hq, Tq]`` with ``cu_seqlens_q``),
      ``None`` unless ``return_lse`` (or an input requires grad);
    * the window: ``window_size_left / _right`` with ``None`` unbounded; both negative mean both
      ``None``; ``causal`` sets ``right = 0``; ``(None, 0)`` is causal, any other window with a
      bound is "local" and a negative side is used as a number. Bottom-right aligned: query i
      sees key j iff ``i' - left <= j <= i' + right``, ``i' = i + Sk - Sq`` (per sequence);
    * a row that sees no key: ``lse = -inf``, ``out = 0``; a row whose scores hold a NaN:
      ``lse = -inf`` (its NaN row sum is mapped there) and ``out`` NaN;
    * backward -> ``(dq, dk, dv)`` in the inputs' dtype: P recomputed from the *given* lse (a
      ``-inf`` lse counts as 0, so a row with every score masked has p = 0), ``delta =
      rowsum(out * dout) - dlse``; ``lse`` and ``dlse`` float32 of lse's layout;
    * varlen: ``cu_seqlens_q / _k`` int32 ``[num_seqs + 1]``, packed ``[T, H, D]`` tensors;
    * ``out=`` (forward) and ``dq=`` (backward): the result is written into the given tensor,
      which must have the result's shape and dtype and (as FA4's output layouts are compiled)
      a unit last stride, other strides in multiples of 16 bytes and a 16-byte aligned pointer.

    ``calls`` records each call as ``(name, {argument: value})`` for tests of what was passed.
    """

    def __init__(self, arch: int = 90):
        self.arch = arch
        self.calls: list = []

    @staticmethod
    def resolve_window(causal, left, right):
        """FA4's ``(causal, local, left, right)`` for its ``causal`` and window arguments."""
        if left is not None and right is not None and left < 0 and right < 0:
            left = right = None
        if causal:
            right = 0
        if left is None and right is None:
            return False, False, None, None
        if left is None and right == 0:
            return True, False, None, None
        return False, True, left, right

    @classmethod
    def mask(cls, sq, sk, causal, left, right, device="cpu"):
        """Boolean ``[Sq, Sk]``: which keys each query sees under FA4's window rules."""
        causal, local, left, right = cls.resolve_window(causal, left, right)
        i = torch.arange(sq, device=device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=device)[None, :]
        m = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if causal:
            m &= j <= i
        if local and right is not None:
            m &= j <= i + right
        if local and left is not None:
            m &= j >= i - left
        return m

    def _enter(self, kind, recorded, softcap, q, k, v, others, defaults):
        """Record the call (``calls``), then refuse what FA4 or the stand-in does not take."""
        self.calls.append((kind, {**recorded, **others}))
        cu_q, cu_k = recorded["cu_seqlens_q"], recorded["cu_seqlens_k"]
        if softcap not in (None, 0.0):
            raise NotImplementedError("the stand-in does not model softcap")
        unknown = set(others) - set(defaults)
        if unknown:
            raise TypeError(f"FA4 takes no argument(s) {sorted(unknown)}")
        for name, value in others.items():
            default = defaults[name]
            if value is not default and (isinstance(value, torch.Tensor) or value != default):
                raise NotImplementedError(f"the stand-in does not model {name}={value!r}")
        assert v.dtype in (torch.float16, torch.bfloat16), "inputs must be float16 or bfloat16"
        assert q.dtype == k.dtype == v.dtype, "q, k, v must have the same dtype"
        assert q.shape[-2] % k.shape[-2] == 0, "num_head must be divisible by num_head_kv"
        d, dv = q.shape[-1], v.shape[-1]
        top = 256 if self.arch // 10 == 9 else 128
        ok = all(x % 8 == 0 and (8 <= x <= top or (self.arch // 10 in (10, 11) and x == 256))
                 for x in (d, dv))
        assert ok, f"(head_dim, head_dim_v)=({d}, {dv}) is not supported on sm{self.arch}"
        assert (cu_q is None) == (cu_k is None), "the stand-in models cu_seqlens_q and _k together"
        for cu in (cu_q, cu_k):
            if cu is not None:
                assert cu.dtype == torch.int32 and cu.ndim == 1, "cu_seqlens must be int32 [B+1]"
                assert cu.device == q.device, "cu_seqlens must be on q's device"
        if cu_q is not None:
            assert q.ndim == k.ndim == 3 and cu_q.shape == cu_k.shape
            assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0]

    @staticmethod
    def _segments(q, k, cu_q, cu_k):
        """``(query rows, key rows, batch index or None)`` of each sequence."""
        if cu_q is None:
            return [(slice(None), slice(None), b) for b in range(q.shape[0])]
        cq, ck = cu_q.tolist(), cu_k.tolist()
        return [(slice(a, b), slice(c, d), None)
                for a, b, c, d in zip(cq, cq[1:], ck, ck[1:])]

    def _scores(self, q, k, scale, causal, left, right):
        g = q.shape[1] // k.shape[1]
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(g, 1)) * scale
        m = self.mask(q.shape[0], k.shape[0], causal, left, right, q.device)
        return s.masked_fill(~m, _NEG_INF)

    def _flash_attn_fwd(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                        max_seqlen_k=None, softmax_scale=None, causal=False, softcap=None,
                        window_size_left=None, window_size_right=None, return_lse=False,
                        **others):
        self._enter("fwd", dict(
            causal=causal, window_size_left=window_size_left,
            window_size_right=window_size_right, softmax_scale=softmax_scale,
            return_lse=return_lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k), softcap, q, k, v, {
                n: x for n, x in others.items() if n != "out"}, _FA4_FWD_OTHER)
        given = self._given(others.pop("out", None), "out", (*q.shape[:-1], v.shape[-1]),
                            q.dtype)
        self.calls[-1][1]["out"] = given
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        varlen = cu_seqlens_q is not None
        hq = q.shape[-2]
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full((hq, q.shape[0]) if varlen else (q.shape[0], hq, q.shape[1]), _NEG_INF,
                         dtype=torch.float32, device=q.device)
        for rq, rk, b in self._segments(q, k, cu_seqlens_q, cu_seqlens_k):
            qs, ks, vs = (q[rq], k[rk], v[rk]) if b is None else (q[b], k[b], v[b])
            if qs.shape[0] == 0 or ks.shape[0] == 0:
                continue
            s = self._scores(qs, ks, scale, causal, window_size_left, window_size_right)
            mx = s.amax(-1, keepdim=True)  # NaN in a row: NaN
            e = torch.exp(s - torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx))
            den = e.sum(-1)
            bad = (den == 0) | den.isnan()  # FA4: lse -inf, out = acc / 1
            o = torch.einsum("hqk,khd->qhd", e, vs.double().repeat_interleave(
                hq // ks.shape[1], 1)) / torch.where(bad, 1.0, den).t()[..., None]
            ls = torch.where(bad, _NEG_INF, mx[..., 0] + torch.log(den))
            if b is None:
                out[rq], lse[:, rq] = o.to(q.dtype), ls.float()
            else:
                out[b], lse[b] = o.to(q.dtype), ls.float()
        grad = any(t.requires_grad for t in (q, k, v))
        out = out if given is None else given.copy_(out)
        return out, (lse if return_lse or grad else None), None, None, None

    @staticmethod
    def _given(t, name, shape, dtype):
        """An ``out=`` / ``dq=`` tensor, checked as FA4 checks it (None passes)."""
        if t is None:
            return None
        assert tuple(t.shape) == tuple(shape), f"{name} shape {tuple(t.shape)} != {shape}"
        assert t.dtype == dtype, f"{name} dtype {t.dtype} != expected {dtype}"
        per = 16 // t.element_size()
        assert (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                and all(x > 0 and x % per == 0 for x in t.stride()[:-1])), (
            f"{name} must have aligned strides and a contiguous last dimension")
        return t

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, softmax_scale=None, causal=False,
                        softcap=0.0, window_size_left=None, window_size_right=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                        max_seqlen_k=None, dlse=None, **others):
        self._enter("bwd", dict(
            causal=causal, window_size_left=window_size_left,
            window_size_right=window_size_right, softmax_scale=softmax_scale,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, dlse=dlse), softcap, q, k, v, {
                n: x for n, x in others.items() if n != "dq"}, _FA4_BWD_OTHER)
        given = self._given(others.pop("dq", None), "dq", q.shape, q.dtype)
        self.calls[-1][1]["dq"] = given
        assert q.dtype == out.dtype == dout.dtype, "inputs must have the same dtype"
        varlen = cu_seqlens_q is not None
        want = (q.shape[-2], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
        assert lse.dtype == torch.float32 and tuple(lse.shape) == want, "lse float32 [B, H, Sq]"
        assert dlse is None or (dlse.dtype == torch.float32 and dlse.shape == lse.shape)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64, device=t.device)
                      for t in (q, k, v))
        hq = q.shape[-2]
        for rq, rk, b in self._segments(q, k, cu_seqlens_q, cu_seqlens_k):
            at = (rq, rk) if b is None else (b, b)
            qs, ks, vs = q[at[0]], k[at[1]], v[at[1]]
            if qs.shape[0] == 0 or ks.shape[0] == 0:
                continue
            g = hq // ks.shape[1]
            ls = lse[:, rq] if b is None else lse[b]  # [H, Sq]
            dls = None if dlse is None else (dlse[:, rq] if b is None else dlse[b])
            ls = torch.where(torch.isneginf(ls), torch.zeros_like(ls), ls).double()
            s = self._scores(qs, ks, scale, causal, window_size_left, window_size_right)
            p = torch.exp(s - ls[..., None])
            do, os_ = dout[at[0]].double(), out[at[0]].double()
            delta = (do * os_).sum(-1).t()  # [H, Sq]
            if dls is not None:
                delta = delta - dls.double()
            kr, vr = (t.double().repeat_interleave(g, 1) for t in (ks, vs))
            ds = p * (torch.einsum("qhd,khd->hqk", do, vr) - delta[..., None])
            dq[at[0]] = torch.einsum("hqk,khd->qhd", ds, kr) * scale
            dkr = torch.einsum("hqk,qhd->khd", ds, qs.double()) * scale
            dvr = torch.einsum("hqk,qhd->khd", p, do)
            n = ks.shape[0]
            dk[at[1]] = dkr.reshape(n, ks.shape[1], g, -1).sum(2)
            dv[at[1]] = dvr.reshape(n, ks.shape[1], g, -1).sum(2)
        dq = dq.to(q.dtype) if given is None else given.copy_(dq)
        return dq, dk.to(k.dtype), dv.to(v.dtype)
