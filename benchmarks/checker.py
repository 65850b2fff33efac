"""The randomized checker lives in tests/stress/checker.py (``python -m tests.stress``).

This module only keeps ``python -m benchmarks.checker``, which README.md documents, working."""

import sys

from tests.stress.checker import *  # noqa: F403
from tests.stress.checker import main

if __name__ == "__main__":
    sys.exit(main())
