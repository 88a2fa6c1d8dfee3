"""``python -m fire_core``: the ``fire-core`` command (see :mod:`fire_core.tools.cli`)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
