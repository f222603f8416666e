"""``python -m rotstn``: the command line (see rotstn.cli)."""

import sys

from .cli import main

sys.exit(main())
