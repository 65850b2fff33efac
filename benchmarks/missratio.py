"""A cold miss with its fill against the uncached lookup, on PostgreSQL, in one run:
``python -m benchmarks.missratio [BEFORE] [--awake]`` (``--awake``: see :mod:`benchmarks.awake`).

Each call reads, in a fresh session, a row no one has read before (so its key is absent: a cold
cache), the uncached path with a plain ``Session.get``, sa_cache's with a ``CachingSession``
(its read, its lease, the SELECT, its fill). With a checkout BEFORE (e.g. ``/work/main``), that
checkout's miss runs interleaved too. Calls alternate in short batches and each is timed alone
(see :func:`benchmarks.readshapes.interleave`); it prints the median call, the ratio to the
uncached lookup (target: at most 1.5x) and the Redis round trips per miss, counted on the real
connections (target: at most 2). Beside them, the floor under any miss that fills with two round
trips: the uncached lookup followed by two round trips of the same shapes (a lease with the
read, a fill with the release) written raw on a connection held open, with no client code at all
(:func:`floor_miss`). The first misses of a run are read the three-round-trip way
until the kind's miss forecast turns (:mod:`sa_cache.forecast`): they are run before timing.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from tests.counting import RedisCounter
from tests.databases import SERVERS, create_database, drop_database

from .env import REDIS_URL, TIMEOUT, counted_region
from .readshapes import fill_table, interleave, mapped_row

ROWS = 10_000
ROUNDS = 40
CALLS = 25
WARM_UP = 30
DB_NAME = f"sa_cache_missratio_{os.getpid()}"


def cached_miss(
    sa_cache: ModuleType, engine: Engine, prefix: str, pks: Iterator[int]
) -> tuple[Callable[[], Any], RedisCounter, Any]:
    """A miss of the next never-read row, on ``sa_cache`` (a checkout's package)."""
    counter = RedisCounter()
    cache = sa_cache.IdentityCache(counted_region(counter), prefix=prefix)
    row = mapped_row(cache)
    cache.flush()
    Session_ = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)

    def miss() -> None:
        with Session_() as s:
            s.get(row, next(pks))

    return miss, counter, cache


def floor_miss(uncached: Callable[[], None], prefix: str) -> Callable[[], None]:
    """The uncached lookup, then the two round trips a cold miss costs at least, of the shapes
    sa_cache sends (``SET NX PX`` of a lease with an ``MGET`` of the generation and the row; a
    ``SET PX`` of the row with a ``DEL`` of the lease), each written in one send on one held
    connection and its replies read raw: what the miss would cost if the cache's own code and
    redis-py's were free."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=TIMEOUT)
    conn = client.connection_pool.get_connection()
    row, lease, generation = f"{prefix}:row", f"{prefix}:row:lease", f"{prefix}:gen"
    value = b"\x96" + b"v" * 230  # about the size of the benchmark row, msgpacked
    read = conn.pack_commands(
        [("SET", lease, b"t" * 8, "PX", 500, "NX"), ("MGET", generation, row)]
    )
    fill = conn.pack_commands([("SET", row, value, "PX", 60_000), ("DEL", lease)])

    def exchange(packed: Any) -> None:
        conn.send_packed_command(packed)
        conn.read_response()
        conn.read_response()

    def miss() -> None:
        uncached()
        exchange(read)
        exchange(fill)

    return miss


def main() -> None:
    import sa_cache

    from . import awake
    from .interleaved import load

    args, measured_in = awake.regime(sys.argv[1:])
    before = args[0] if args else None
    url = create_database(SERVERS["postgresql"], DB_NAME)
    engine = create_engine(url)
    try:
        fill_table(engine, mapped_row(), ROWS)
        plain_row = mapped_row()
        ids = itertools.cycle(range(1, ROWS + 1))

        def uncached() -> None:
            with Session(engine) as s:
                s.get(plain_row, next(ids))

        # each side reads the rows in order, each once: keys of its own prefix, never read
        after, after_count, after_cache = cached_miss(
            sa_cache, engine, "missratio_after", iter(range(1, ROWS + 1))
        )
        shapes: dict[str, tuple[Callable[[], Any], int, float]] = {
            "uncached Session.get": (uncached, CALLS, 1.0),
            "sa_cache cold miss + fill": (after, CALLS, 1.0),
            "floor: uncached + 2 raw round trips": (
                floor_miss(uncached, "missratio_floor"),
                CALLS,
                1.0,
            ),
        }
        counters = {"sa_cache cold miss + fill": after_count}
        caches = [after_cache]
        if before:
            old, old_count, old_cache = cached_miss(
                load(before, "sa_cache_before"),
                engine,
                "missratio_before",
                iter(range(1, ROWS + 1)),
            )
            shapes["before: sa_cache cold miss + fill"] = (old, CALLS, 1.0)
            counters["before: sa_cache cold miss + fill"] = old_count
            caches.append(old_cache)
        for fn, _, _ in shapes.values():
            for _ in range(WARM_UP):
                fn()
        for counter in counters.values():
            counter.reset()
        with measured_in:
            wall, cpu = interleave(shapes, ROUNDS)
        medians = {name: statistics.median(values) for name, values in wall.items()}
        print(f"{'':40} {'wall us':>9} {'cpu us':>9} {'round trips':>12}")
        for name, us in medians.items():
            counter = counters.get(name)
            trips = "" if counter is None else f"{counter.round_trips / (ROUNDS * CALLS):.2f}"
            print(f"{name:40} {us:9.2f} {statistics.median(cpu[name]):9.2f} {trips:>12}")
        base = medians["uncached Session.get"]
        for name in [*counters, "floor: uncached + 2 raw round trips"]:
            print(f"{name + ' / uncached':40} {medians[name] / base:9.2f}x")
        for cache in caches:
            cache.flush()
    finally:
        engine.dispose()
        drop_database(SERVERS["postgresql"], DB_NAME)


if __name__ == "__main__":
    main()
