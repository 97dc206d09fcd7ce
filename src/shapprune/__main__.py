"""``python -m shapprune``: the command line."""

import sys

from shapprune.cli import main

sys.exit(main())
