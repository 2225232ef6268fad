"""``python -m longattn.integrations`` runs the ``longattn`` command."""

import sys

from longattn.integrations.cli import main

sys.exit(main())
