"""JAX tests of longattn.tree run on 8 CPU devices; XLA reads this flag when jax first loads,
so it is set before any test module imports jax."""

import os

flag = "--xla_force_host_platform_device_count=8"
if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
