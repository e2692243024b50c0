"""``python -m hyperref``: the ``hyperref`` command."""

import sys

from .cli import main

sys.exit(main())
