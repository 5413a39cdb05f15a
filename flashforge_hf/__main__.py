"""``python -m flashforge_hf``: the ``flashforge-hf`` command (see :mod:`flashforge_hf.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
