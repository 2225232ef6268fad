# The Triton interpreter must be switched on before triton is first imported (DESIGN 8).
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
