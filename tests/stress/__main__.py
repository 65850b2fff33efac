"""``python -m tests.stress --db postgresql --operations 100000 [--scenario NAME ...]``: the
randomized checker, every scenario that applies to the database unless named."""

import sys

from tests.stress.checker import main

sys.exit(main())
