"""``python -m fire_core``: the ``fire-core`` command (see :mod:`fire_core.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
