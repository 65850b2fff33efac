"""Stress runs of the cache against real servers: the randomized consistency checker
(:mod:`tests.stress.checker`), run by tests/test_checker.py at a small size and by
``python -m tests.stress`` at any size."""
