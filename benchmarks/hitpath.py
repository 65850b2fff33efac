"""The hit path and get_many alone, for before/after comparisons of a change to sa_cache.

``python -m benchmarks.hitpath [CHECKOUT] [memory|REDIS_URL] [--cpu]`` imports sa_cache from
CHECKOUT (default: this one), so two checkouts (``git worktree add /tmp/before <commit>``) can be
measured with the same script; ``python -m benchmarks.compare`` runs two of them in alternation.
``--cpu`` times with the process's CPU clock instead of the wall clock, so other work on a shared
machine weighs less (a Redis round trip's wait then does not count: compare like with like).

SQLite in memory, a 10-column model, 1000 rows; a fresh session per operation; prints the median
of 5 rounds, and get_many once more with Python's cyclic garbage collector paused, whose share of
a bulk load swings with the heap.
"""

from __future__ import annotations

import datetime as dt
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, Integer, String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def workload(sa_cache: Any, backend: str | None, prefix: str) -> dict[str, Callable[[], Any]]:
    """The two operations timed, on ``sa_cache`` (the package of the checkout measured): a hit,
    and get_many of 1000 cached rows, each in a fresh session. Shared with
    :mod:`benchmarks.interleaved`."""
    cache = sa_cache.IdentityCache(backend, prefix=prefix)

    class Base(DeclarativeBase):
        pass

    @cache.register
    class Row(Base):
        __tablename__ = "row"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        a: Mapped[str] = mapped_column(String(50))
        b: Mapped[str] = mapped_column(String(50))
        c: Mapped[bool] = mapped_column(Boolean)
        d: Mapped[dt.datetime] = mapped_column(DateTime)
        e: Mapped[float] = mapped_column(Float)
        f: Mapped[str] = mapped_column(Text)
        g: Mapped[int] = mapped_column(Integer)
        h: Mapped[str] = mapped_column(String(20))
        i: Mapped[bool] = mapped_column(Boolean)

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    when = dt.datetime(2020, 1, 1, 12, 0, 0, 123)
    with Session() as s:
        s.add_all(
            Row(
                id=n,
                a="x" * 20,
                b="y" * 20,
                c=True,
                d=when,
                e=1.5,
                f="t" * 100,
                g=n,
                h="h",
                i=False,
            )
            for n in range(1, 1001)
        )
        s.commit()
    with Session() as s:
        s.get_many(Row, range(1, 1001))
    with Session() as s:
        s.get(Row, 7)

    def hit() -> None:
        with Session() as s:
            s.get(Row, 7)

    def many() -> None:
        with Session() as s:
            s.get_many(Row, range(1, 1001))

    return {"hit_us": hit, "get_many_1000_us_per_key": many}


def measure(
    checkout: str | None, backend: str | None, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    if checkout:
        sys.path.insert(0, checkout)
    import sa_cache

    operations = workload(sa_cache, backend, "hitpath")
    hit, many = operations["hit_us"], operations["get_many_1000_us_per_key"]

    def median_us(fn: Callable[[], Any], n: int) -> float:
        rounds = []
        for _ in range(5):
            started = clock()
            for _ in range(n):
                fn()
            rounds.append((clock() - started) / n * 1e6)
        return statistics.median(rounds)

    def paused(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            gc.disable()
            try:
                fn()
            finally:
                gc.enable()

        return run

    return {
        "hit_us": round(median_us(hit, 5000), 2),
        "get_many_1000_us_per_key": round(median_us(many, 30) / 1000, 2),
        # without the collector's share, which swings with the heap (see the results file)
        "get_many_1000_us_per_key_gc_paused": round(median_us(paused(many), 30) / 1000, 2),
    }


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    checkout = args[0] if args else None
    backend = args[1] if len(args) > 1 and args[1] != "memory" else None
    clock = time.process_time if "--cpu" in sys.argv else time.perf_counter
    print(measure(checkout, backend, clock))
