"""Where the benchmark runs: its own databases (``sa_cache_bench`` in PostgreSQL and MariaDB, a
SQLite file in a temporary directory), its own Redis key prefixes, and exact counters of Redis
round trips (counted on the real connections).

Databases and counters are the tests' own (tests/databases.py, tests/counting.py): the benchmarks
measure with the instruments the test suite checks, and creating a database works one way
everywhere. The dependency points from benchmarks to tests, never back.
"""

from __future__ import annotations

import os
from typing import Any

import redis

from tests.counting import RedisCounter, counted_redis_client, counted_redis_region
from tests.databases import SERVERS, available, create_database, port_open
from tests.databases import drop_database as _drop_database

__all__ = [
    "REDIS_URL",
    "RUN",
    "RoundTrips",
    "available",
    "counted_client",
    "counted_region",
    "database_url",
    "delete_prefix",
    "drop_database",
    "port_open",
]

REDIS_URL = "redis://127.0.0.1:6379/0"
DB_NAME = "sa_cache_bench"
RUN = f"sa_cache_bench_{os.getpid()}"
TIMEOUT = 0.25  # seconds: the short socket timeouts sa_cache uses

RoundTrips = RedisCounter  # the name benchmarks/web.py and the paths use


def database_url(db: str, tmpdir: str) -> str:
    """Create (or recreate) the benchmark's own database and return its URL."""
    if db == "sqlite":
        return f"sqlite:///{os.path.join(tmpdir, 'bench.sqlite3')}"
    return create_database(SERVERS[db], DB_NAME)


def drop_database(db: str) -> None:
    if db != "sqlite":
        _drop_database(SERVERS[db], DB_NAME)


def counted_region(counter: RedisCounter, **extra: Any) -> Any:
    """dogpile's Redis backend with counted connections; ``extra``: ``make_region`` arguments."""
    return counted_redis_region(counter, REDIS_URL, socket_timeout=TIMEOUT, **extra)


def counted_client(counter: RedisCounter) -> redis.Redis:
    return counted_redis_client(counter, REDIS_URL, socket_timeout=TIMEOUT)


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += client.unlink(*batch)
            batch = []
    if batch:
        removed += client.unlink(*batch)
    return removed
