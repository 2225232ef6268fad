"""``python -m longattn.integrations`` runs the ``longattn`` command."""

import sys

from longattn.integrations.cli import main

if __name__ == "__main__":
    sys.exit(main())
