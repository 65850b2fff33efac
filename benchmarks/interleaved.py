"""Two checkouts' hit paths in one process, interleaved call by call:
``python -m benchmarks.interleaved BEFORE AFTER [memory|REDIS_URL]``.

Each checkout's ``sa_cache`` is imported under a name of its own (``sa_cache_before``,
``sa_cache_after``), with its own mapped class, engine and cache (:func:`benchmarks.hitpath.
workload`), so both run side by side. The
timing alternates short batches of the two (a hit, and ``get_many`` of 1000 rows), so whatever
else the machine does weighs on both alike; it prints each side's median per batch and the ratio
after / before. Where :mod:`benchmarks.compare` runs each side in a process of its own, this one
keeps them in one: use it on a busy machine.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from types import ModuleType

from .hitpath import workload


def load(checkout: str, name: str) -> ModuleType:
    """``checkout``'s sa_cache package, imported as ``name``."""
    package = f"{checkout}/sa_cache"
    spec = importlib.util.spec_from_file_location(
        name, f"{package}/__init__.py", submodule_search_locations=[package]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


BATCHES = {"hit_us": (200, 1.0), "get_many_1000_us_per_key": (2, 1000.0)}


def main() -> None:
    before, after = sys.argv[1], sys.argv[2]
    backend = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "memory" else None
    sides = {
        "before": workload(load(before, "sa_cache_before"), backend, "interleaved_before"),
        "after": workload(load(after, "sa_cache_after"), backend, "interleaved_after"),
    }
    for name, (calls, per) in BATCHES.items():
        timings: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(40):
            for side, functions in sides.items():
                fn = functions[name]
                started = time.perf_counter()
                for _ in range(calls):
                    fn()
                timings[side].append((time.perf_counter() - started) / calls / per * 1e6)
        b, a = statistics.median(timings["before"]), statistics.median(timings["after"])
        print(f"{name:28} before {b:8.2f}  after {a:8.2f}  after/before {a / b:5.2f}")


if __name__ == "__main__":
    main()
