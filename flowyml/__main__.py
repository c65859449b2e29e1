"""``python -m flowyml``: the ``flowyml`` command."""

import sys

from flowyml._cli import main

sys.exit(main())
