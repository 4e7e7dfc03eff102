"""``python -m asyncckpt``: the same command line as the ``asyncckpt`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
