"""``python -m twostep`` is the ``twostep`` command."""

import sys

from twostep.cli import main

sys.exit(main())
