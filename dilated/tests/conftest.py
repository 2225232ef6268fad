# The Triton interpreter must be switched on before triton is first imported: the fused kernels'
# tests run them on CPU tensors.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
