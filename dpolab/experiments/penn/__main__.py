"""``python -m dpolab.experiments.penn``: see cli.py."""

import sys

from .cli import main

sys.exit(main())
