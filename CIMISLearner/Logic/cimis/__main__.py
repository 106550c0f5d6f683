"""``python -m cimis``: the ``cimis`` command, for scripts and Slicer's Python where no console script is installed."""

import sys

from cimis.cli import main

sys.exit(main())
