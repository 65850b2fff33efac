"""``python -m tests.stress --db postgresql --operations 100000``: the randomized checker."""

import sys

from tests.stress.checker import main

sys.exit(main())
