"""Two checkouts' hit paths side by side in one run: ``python -m benchmarks.compare BEFORE AFTER``.

Runs :mod:`benchmarks.hitpath` for each checkout in alternation (``--rounds`` times each, on the
in-process store and on Redis), each in a process of its own so the two never share an import,
and prints each figure's median per checkout and the ratio after / before. Alternating spreads
the noise of a shared machine over both sides instead of charging it to one.

``--cpu`` passes hitpath's CPU clock (see there); the default is wall-clock time.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys

REDIS_URL = os.environ.get("SA_CACHE_TEST_REDIS") or "redis://127.0.0.1:6379/0"


def run(checkout: str, backend: str, cpu: bool) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.hitpath", checkout, backend]
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run(
        command + (["--cpu"] if cpu else []), cwd=checkout, env=env, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--backends", default=f"memory,{REDIS_URL}")
    options = parser.parse_args()
    sides = {"before": os.path.abspath(options.before), "after": os.path.abspath(options.after)}
    for backend in options.backends.split(","):
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(options.rounds):
            for side, checkout in sides.items():
                runs[side].append(run(checkout, backend, options.cpu))
        label = "memory" if backend == "memory" else "redis"
        for name in runs["before"][0]:
            before = statistics.median(r[name] for r in runs["before"])
            after = statistics.median(r[name] for r in runs["after"])
            print(f"{label:7} {name:38} before {before:8.2f}  after {after:8.2f}  "
                  f"after/before {after / before:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
