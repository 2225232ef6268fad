"""The main job: every longattn method on a CPU world of gloo ranks, checked against the oracle.

    nox -s demo          (or: python tests/demo.py [--only PKG ...] [--out demo_out])

The same program as ``longattn demo`` (one implementation: ``longattn.integrations.driver``):
the foundation rows of ``longattn.common`` and every installed package's rows (entry point group
``longattn.demo``). Prints a table (what, shape, relative error, time, bytes), writes
``demo.json`` and ``demo.png`` into ``--out`` and exits 1 when a row is over its tolerance.
"""

from __future__ import annotations

import sys

from longattn.integrations.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
