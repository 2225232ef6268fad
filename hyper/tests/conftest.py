# The Triton interpreter must be switched on before triton is first imported (DESIGN 8).
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture
def bf16_dots(monkeypatch):
    """The triton 3.9 interpreter multiplies bf16 dot operands as their raw uint16 bits
    (``InterpreterBuilder.create_dot``); widen them to fp32 first, as the GPU's fp32-accumulating
    tensor-core dots do (exactly: bf16 -> fp32 is a shift of the bits)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    orig = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << np.uint32(16)
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, *args):
        return orig(self, widen(a), widen(b), *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
