"""In-process CPU per warm roles request: the Flask roles application (benchmarks/roles_app.py)
under its test client, logged in as user 7, ``time.process_time`` over N warm ``GET
/abilities``. The workers of the served benchmark are CPU-bound, so this figure is what bounds
their requests per second; it excludes the database's and Redis's own CPU (other processes).

    python -m benchmarks.request_cpu [--requests 2000] [--rounds 3] [--variants none,sa_cache]

Each round runs every variant in turn on one PostgreSQL database created for the run (500
users, :func:`benchmarks.roles_app.populate`) and one Redis prefix per run, so variants are
compared side by side under the same machine load; the best round of each is reported, with
their ratio. To compare two checkouts, run the script from each, alternately.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from tests.databases import SERVERS, create_database, drop_database

from . import roles_app


def cpu_per_request(app: Any, requests: int) -> float:
    """Process CPU seconds per ``GET /abilities`` once the cache is warm."""
    client = app.test_client()
    assert client.get("/login/7").status_code == 200
    for _ in range(50):  # warm: the user, the collections, the rows, SQLAlchemy's caches
        assert client.get("/abilities").status_code == 200
    start = time.process_time()
    for _ in range(requests):
        client.get("/abilities")
    return (time.process_time() - start) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="none,sa_cache")
    args = parser.parse_args()
    name = f"sa_cache_cpu_{uuid.uuid4().hex[:8]}"
    url = create_database(SERVERS["postgresql"], name)
    try:
        roles_app.populate(url, 500)
        prefix = f"sa_cache_bench_cpu_{uuid.uuid4().hex[:8]}"
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for variant in args.variants.split(","):
                app = roles_app.create_app(
                    {
                        "BENCH_VARIANT": variant,
                        "BENCH_DATABASE_URL": url,
                        "BENCH_CACHE_PREFIX": prefix,
                    }
                )
                try:
                    took = cpu_per_request(app, args.requests)
                finally:
                    roles_app.close(app)
                best[variant] = min(took, best.get(variant, took))
        for variant, took in best.items():
            print(f"{variant}: {took * 1000:.3f} ms CPU per warm request")
        if "none" in best and "sa_cache" in best:
            print(f"uncached / sa_cache: {best['none'] / best['sa_cache']:.2f}x")
    finally:
        drop_database(SERVERS["postgresql"], name)


if __name__ == "__main__":
    main()
