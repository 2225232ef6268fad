# The Triton interpreter must be switched on before triton is first imported: the Triton
# kernels run on the CPU under TRITON_INTERPRET=1.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
