"""``python -m diffin``: the command line (:func:`diffin.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
