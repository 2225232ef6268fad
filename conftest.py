"""Settings shared by every package's tests (pytest loads this file for any test path under the
repository root, the isolated per-package runs included)."""

import os

import pytest

# The shared repro checks are a source module, not a test file: rewrite its asserts too, so a
# failing check shows the values as a test's own assert would.
pytest.register_assert_rewrite("longattn.common.repro_checks")


def pytest_configure(config):
    """Under TRITON_INTERPRET=1, turn off the interpreter's integer-overflow sanitizer.

    The interpreter checks every int32 add/sub/mul of a kernel for overflow by recomputing it in
    int64 with numpy, a large share of the interpreted kernels' time. The check cannot fire
    here: the CPU tests' tensors hold at most thousands of elements, so no index comes near
    2**31. A compiled kernel skips it too unless built with ``debug=True``."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    options = getattr(interpreter, "InterpreterOptions", None)
    builder = getattr(interpreter, "interpreter_builder", None)
    if options is not None and hasattr(builder, "options"):
        builder.options = options(sanitize_overflow=False)
