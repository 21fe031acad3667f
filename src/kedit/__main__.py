"""``python -m kedit``: the ``kedit`` command line."""

import sys

from kedit.cli import main

sys.exit(main())
