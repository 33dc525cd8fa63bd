"""``python -m twostep`` is the ``twostep`` command."""

import sys

from .cli import main

sys.exit(main())
