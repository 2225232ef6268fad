"""API conformance across packages (DESIGN §1, §3, §4, §5).

* every package imports;
* every public name of DESIGN §5 exists once a paper package has landed (its ``__init__``
  docstring no longer calls it a placeholder), and its signature accepts every call the
  contract allows: same positional order, same keyword names and defaults, keyword-only where
  the contract says so; extra parameters only with defaults;
* the shared parts (§3 reference, §4 common) expose their names with the agreed signatures;
* the dependency rules of §1: no paper package imports another, ``reference`` imports numpy
  only, ``common`` never imports ``reference``;
* each landed paper package registers a ``longattn.demo`` entry point.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ["hamilton", "tree", "hyper", "ring_swa", "dilated"]
REQ = inspect.Parameter.empty
POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
KW = inspect.Parameter.KEYWORD_ONLY
# the seed APIs name the tensors query / key / value; positionally they are the same
ALIASES = {"q": {"query"}, "k": {"key"}, "v": {"value"}}


def _spec(src: str) -> inspect.Signature:
    """Signature of a contract written as a Python ``def`` header."""
    ns: dict = {}
    exec(f"def f{src}: pass", ns)  # noqa: S102 - our own constant strings
    return inspect.signature(ns["f"])


# (module, attribute, contract signature or None = only "exists and is callable")
CONTRACT = {
    "hamilton": [
        ("longattn.hamilton", "hamilton_attn",
         "(q, k, v, *, group=None, causal=False, scale=None, schedule='auto', return_lse=False)"),
        ("longattn.hamilton", "shard", "(x, *, group=None, causal=False)"),
        ("longattn.hamilton", "unshard", "(x, *, group=None, causal=False)"),
        ("longattn.hamilton.schedules", "hamiltonian_cycles", "(n)"),
        ("longattn.hamilton.schedules", "multi_ring_schedule", "(n)"),
        ("longattn.hamilton.schedules", "ring_schedule", "(n)"),
        ("longattn.hamilton.schedules", "two_level_schedule", "(nodes, gpus_per_node)"),
        ("longattn.hamilton.schedules", "validate_schedule", "(s)"),
    ],
    "tree": [
        ("longattn.tree", "tree_decode", "(q, k, v, *, group=None, scale=None, hierarchy=None)"),
        ("longattn.tree", "ring_decode", "(q, k, v, *, group=None, scale=None)"),
        ("longattn.tree.jax", "tree_decode", "(q, k, v, *, mesh, axis_name, scale=None)"),
        ("longattn.tree.jax", "ring_decode", "(q, k, v, *, mesh, axis_name, scale=None)"),
    ],
    "hyper": [
        ("longattn.hyper", "HyperAttention",
         "(input_dim, lsh_num_projs=8, block_size=256, sample_size=256, min_seq_len=2048, "
         "smooth_block=False)"),
        ("longattn.hyper", "HyperAttention.forward",
         "(self, q, k, v, causal=False, scale=None, return_lse=False, generator=None)"),
        ("longattn.hyper", "hyper_attention",
         "(q, k, v, *, causal=False, scale=None, lsh_num_projs=8, block_size=256, "
         "sample_size=256, min_seq_len=2048, smooth_block=False, generator=None, "
         "return_lse=False)"),
    ],
    "ring_swa": [
        ("longattn.ring_swa", "ring_sliding_window_attn",
         "(q, k, v, window_size, cp_group=None, cp_size=None, cp_local_rank=None, "
         "cp_prev_global_rank=None, cp_next_global_rank=None, softmax_scale=None)"),
        ("longattn.ring_swa", "ring_sliding_window_attn_varlen",
         "(q, k, v, window_size, cu_seqlens, cp_group=None, cp_size=None, cp_local_rank=None, "
         "cp_prev_global_rank=None, cp_next_global_rank=None, softmax_scale=None)"),
        ("longattn.ring_swa", "ring_streaming_llm_attn",
         "(q, k, v, window_size, cp_group=None, cp_size=None, cp_local_rank=None, "
         "cp_prev_global_rank=None, cp_next_global_rank=None, softmax_scale=None, "
         "num_sink_tokens=1)"),
        ("longattn.ring_swa", "ring_streaming_llm_attn_varlen",
         "(q, k, v, window_size, cu_seqlens, cp_group=None, cp_size=None, cp_local_rank=None, "
         "cp_prev_global_rank=None, cp_next_global_rank=None, softmax_scale=None, "
         "num_sink_tokens=1)"),
    ],
    "dilated": [
        ("longattn.dilated", "dilated_attention",
         "(q, k, v, segment_lengths, dilation_rates, *, is_causal=False, scale=None, "
         "group=None)"),
        ("longattn.dilated", "DilatedAttention",
         "(segment_lengths, dilation_rates, softmax_scale=None, attention_dropout=0.0)"),
        ("longattn.dilated", "DilatedAttention.forward", "(self, q, k, v, is_causal=False)"),
        ("longattn.dilated", "MultiheadDilatedAttention",
         "(embed_dim, num_heads, segment_lengths, dilation_rates, dropout=0.0, bias=True, "
         "layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, device=None, dtype=None)"),
        ("longattn.dilated", "LongNet", None),
        ("longattn.dilated", "LongNetLM", "(num_tokens)"),
    ],
    "common": [
        ("longattn.common.merge", "merge_partials", "(out_a, lse_a, out_b, lse_b)"),
        ("longattn.common.merge", "merge_partials_", "(out, lse, out_b, lse_b)"),
        ("longattn.common", "merge_partials", "(out_a, lse_a, out_b, lse_b)"),
        ("longattn.common.kernels", "attention_forward",
         "(q, k, v, *, scale=None, causal=False, window=(-1, -1), backend='auto')"),
        ("longattn.common.kernels", "attention_backward",
         "(dout, q, k, v, out, lse, *, scale=None, causal=False, window=(-1, -1), dlse=None, "
         "backend='auto')"),
        ("longattn.common.kernels", "attention",
         "(q, k, v, *, scale=None, causal=False, window=(-1, -1), return_lse=False, "
         "backend='auto')"),
        ("longattn.common.kernels", "register_backend", "(name, backend)"),
        ("longattn.common.comm", "exchange", "(sends, recvs, group=None)"),
        ("longattn.common.comm", "ring_exchange", "(send_buf, recv_buf, group=None, *, shift=1)"),
        ("longattn.common.comm", "all_to_all_step", "(send_chunks, recv_chunks, group=None)"),
        ("longattn.common.comm", "counting", "()"),
        ("longattn.common.comm", "record", "(kind, peer, nbytes)"),
        ("longattn.common.layout", "positions", "(seq_len, rank, world_size, layout='contiguous')"),
        ("longattn.common.layout", "shard", "(x, rank, world_size, *, layout='contiguous', dim=1)"),
        ("longattn.common.layout", "unshard", "(chunks, *, layout='contiguous', dim=1)"),
        ("longattn.common.layout", "shard_varlen",
         "(x, cu_seqlens, rank, world_size, *, layout='contiguous', dim=0)"),
        ("longattn.common.layout", "unshard_varlen",
         "(chunks, cu_seqlens, *, layout='contiguous', dim=0)"),
        ("longattn.common.layout", "varlen_positions",
         "(cu_seqlens, rank, world_size, layout='contiguous')"),
        ("longattn.common.checks", "check_qkv", "(q, k, v, *, varlen=False)"),
        ("longattn.common.checks", "check_window", "(window)"),
        ("longattn.common.checks", "check_scale", "(scale, head_dim)"),
        ("longattn.common.checks", "check_cu_seqlens", "(cu_seqlens, total_tokens)"),
        ("longattn.common.checks", "check_same_across_ranks", "(name, values, group=None)"),
        ("longattn.common.testing", "run_world", "(world_size, fn, *args, timeout=None)"),
        ("longattn.common.testing", "rel_error", "(actual, expected)"),
        ("longattn.common.testing", "assert_close", "(actual, expected, dtype=None)"),
        ("longattn.common.topology", "Target", None),
        ("longattn.common.topology", "get_target", "(name)"),
        ("longattn.common.topology", "step_time", "(target, messages)"),
        ("longattn.common.bench", "time_fn", "(fn, *, device=None)"),
        ("longattn.common.bench", "result", "(method, what, *, median_ms)"),
        ("longattn.common.bench", "write_results", "(results, path)"),
    ],
    "reference": [
        ("longattn.reference", "attention", "(q, k, v, *, mask=None, scale=None)"),
        ("longattn.reference", "attention_backward",
         "(dout, q, k, v, *, mask=None, scale=None, dlse=None)"),
        ("longattn.reference", "causal_mask", "(sq, sk=None)"),
        ("longattn.reference", "window_mask", "(sq, sk=None, window=(-1, -1))"),
        ("longattn.reference", "sink_mask", "(sq, sk=None, num_sink_tokens=1)"),
        ("longattn.reference", "document_mask", "(cu_seqlens_q, cu_seqlens_k=None)"),
        ("longattn.reference", "and_masks", "(*masks)"),
        ("longattn.reference", "or_masks", "(*masks)"),
        ("longattn.reference", "tree_combine", "(outs, lses)"),
        ("longattn.reference", "dilated_attention",
         "(q, k, v, segment_lengths, dilation_rates, *, causal)"),
        ("longattn.reference", "hyper_attention",
         "(q, k, v, *, projections, sample_indices, block_size, min_seq_len, causal)"),
    ],
}


def _landed(pkg: str) -> bool:
    mod = importlib.import_module(f"longattn.{pkg}")
    return "placeholder" not in (mod.__doc__ or "").lower()


def _resolve(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def conformance_problems(actual: inspect.Signature, spec: inspect.Signature) -> list[str]:
    """Every way a call that the contract allows could fail against ``actual``."""
    problems = []
    a_params = list(actual.parameters.values())
    a_pos = [p for p in a_params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, POS)]
    has_var_pos = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in a_params)
    has_var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in a_params)
    by_name = {p.name: p for p in a_params}
    used = set()
    for i, s in enumerate(spec.parameters.values()):
        if s.kind == inspect.Parameter.VAR_POSITIONAL:
            if not has_var_pos:
                problems.append(f"needs *{s.name}")
            continue
        if s.kind == POS:  # may be passed positionally at index i
            if i >= len(a_pos):
                if not has_var_pos:
                    problems.append(f"{s.name!r} is not accepted at position {i}")
                continue
            a = a_pos[i]
            if a.name != s.name and a.name not in ALIASES.get(s.name, ()) and s.default is not REQ:
                problems.append(f"position {i} is {a.name!r}, contract says {s.name!r}")
            if s.default is not REQ and a.default != s.default:
                problems.append(f"{s.name!r} default {a.default!r}, contract {s.default!r}")
            used.add(a.name)
            continue
        # keyword-only in the contract: must be accepted by name with the same default
        a = by_name.get(s.name)
        if a is None or a.kind == inspect.Parameter.POSITIONAL_ONLY:
            if not has_var_kw:
                problems.append(f"keyword {s.name!r} missing")
            continue
        if s.default is not REQ and a.default != s.default:
            problems.append(f"{s.name!r} default {a.default!r}, contract {s.default!r}")
        # (a default where the contract has none is fine: every call still works)
        used.add(a.name)
    for a in a_params:  # parameters beyond the contract must be optional
        if a.name in used or a.kind in (inspect.Parameter.VAR_POSITIONAL,
                                        inspect.Parameter.VAR_KEYWORD):
            continue
        if a.default is REQ:
            problems.append(f"extra parameter {a.name!r} has no default")
    return problems


def test_the_checker_itself():
    ok = _spec("(q, k, v, *, causal=False, scale=None)")
    assert conformance_problems(_spec("(q, k, v, *, causal=False, scale=None, x=1)"), ok) == []
    assert conformance_problems(_spec("(q, k, v, causal=False, scale=None)"), ok) == []
    assert conformance_problems(_spec("(query, key, value, *, causal=False, scale=None)"),
                                ok) == []
    assert conformance_problems(_spec("(q, k, v, *, causal=True, scale=None)"), ok)
    assert conformance_problems(_spec("(q, k, v, *, scale=None)"), ok)
    assert conformance_problems(_spec("(q, k, v, extra, *, causal=False, scale=None)"), ok)
    assert conformance_problems(_spec("(q, k, *, causal=False, scale=None)"), ok)
    pos = _spec("(q, k, v, window_size, cp_group=None)")
    assert conformance_problems(_spec("(q, k, v, window_size, *, cp_group=None)"), pos)
    assert conformance_problems(_spec("(q, k, v, window_size, softmax_scale=None, cp_group=None)"),
                                pos)
    assert conformance_problems(_spec("(q, k, v, *args, **kw)"), ok) == []


@pytest.mark.parametrize("pkg", ["common", "reference", *PAPERS])
def test_package_imports(pkg):
    mod = importlib.import_module(f"longattn.{pkg}")
    assert mod.__name__ == f"longattn.{pkg}"
    assert not (ROOT / pkg / "src" / "longattn" / "__init__.py").exists()  # PEP 420 namespace


def _contract_cases():
    for pkg, items in CONTRACT.items():
        for module, attr, sig in items:
            yield pytest.param(pkg, module, attr, sig, id=f"{module}:{attr}")


OPTIONAL_REFERENCE = {"dilated_attention", "hyper_attention"}  # land with their paper issues


@pytest.mark.parametrize("pkg,module,attr,sig", list(_contract_cases()))
def test_public_name_exists_with_the_contract_signature(pkg, module, attr, sig):
    if pkg in PAPERS and not _landed(pkg):
        mod = importlib.import_module(f"longattn.{pkg}")
        assert not hasattr(mod, attr.split(".")[0]) or _landed(pkg)
        return  # placeholder package: importing is all it promises
    if pkg == "reference" and attr in OPTIONAL_REFERENCE:
        if not hasattr(importlib.import_module(module), attr):
            return
    try:
        obj = _resolve(module, attr)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{module}.{attr} is missing: {e}")
    assert callable(obj), f"{module}.{attr} is not callable"
    if sig is None:
        return
    actual = inspect.signature(obj)
    problems = conformance_problems(actual, _spec(sig))
    assert not problems, f"{module}.{attr}{actual} vs contract {sig}: " + "; ".join(problems)


def test_reference_dilated_and_hyper_exist_once_their_packages_land():
    ref = importlib.import_module("longattn.reference")
    if _landed("dilated"):
        assert hasattr(ref, "dilated_attention")
    if _landed("hyper"):
        assert hasattr(ref, "hyper_attention")


def test_topology_defines_the_four_targets():
    topo = importlib.import_module("longattn.common.topology")
    assert set(topo.TARGETS) == {"H100-1", "H100-2", "H100-4", "MI300X-1"}


# --------------------------------------------------------------------------------------------
# dependency rules (static: the import statements in each package's source)


def _imports(pkg: str, *, eager_only: bool = False) -> set[str]:
    """Modules imported anywhere in the package's source, or (``eager_only``) only those
    imported when the package is imported (not inside function bodies: lazy imports in a
    ``demo.rows`` or an oracle helper for tests are allowed)."""
    names = set()
    for path in (ROOT / pkg / "src").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        todo = [tree]
        while todo:
            node = todo.pop()
            for child in ast.iter_child_nodes(node):
                if eager_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda)):
                    continue
                todo.append(child)
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _longattn_pkgs(names):
    return {n.split(".")[1] for n in names if n.startswith("longattn.") and n.count(".") >= 1}


@pytest.mark.parametrize("pkg", PAPERS)
def test_no_paper_package_imports_another(pkg):
    used = _longattn_pkgs(_imports(pkg)) - {pkg, "common"}
    assert not (used & set(PAPERS)), f"longattn.{pkg} imports {sorted(used & set(PAPERS))}"
    eager = _longattn_pkgs(_imports(pkg, eager_only=True))
    assert "reference" not in eager, f"importing longattn.{pkg} imports the oracle"


def test_reference_imports_numpy_only():
    third_party = {n.split(".")[0] for n in _imports("reference")}
    stdlib = {"__future__", "math", "itertools", "functools", "dataclasses", "typing",
              "collections", "warnings", "numbers", "operator"}
    assert third_party - stdlib - {"numpy", "longattn"} == set(), third_party
    assert _longattn_pkgs(_imports("reference")) <= {"reference"}


def test_common_never_imports_reference_or_a_paper_package():
    used = _longattn_pkgs(_imports("common")) - {"common"}
    assert not used, f"longattn.common imports {sorted(used)}"


@pytest.mark.parametrize("pkg", PAPERS)
def test_landed_paper_packages_register_demo_rows(pkg):
    if not _landed(pkg):
        return
    eps = {ep.name: ep for ep in metadata.entry_points(group="longattn.demo")}
    assert pkg in eps, f"no longattn.demo entry point for {pkg} (have {sorted(eps)})"
    fn = eps[pkg].load()
    assert callable(fn)
    assert list(inspect.signature(fn).parameters)[:1] == ["run_world"]
