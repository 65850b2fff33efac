"""Side-by-side benchmarks of sa_cache against the alternatives: python -m benchmarks."""
