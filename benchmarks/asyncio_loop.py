"""How long the cache blocks the event loop under ``AsyncSession``:
``python -m benchmarks.asyncio_loop [--tasks 200] [--lookups 20] [--redis URL]
[--store redis|cluster|sentinel]``.

``--store cluster`` and ``--store sentinel`` start a private Redis Cluster (3 masters, 3
replicas) or Sentinel setup (master, replica, 3 sentinels) on loopback, as the tests do
(tests/redis_cluster.py, tests/redis_sentinel.py), unless ``--redis`` names one.

200 concurrent tasks each run lookups (``AsyncSession.get``, one session per lookup) against
Redis on an aiosqlite database: cache hits, and with ``--miss-every N`` every Nth lookup an
evicted miss that loads and fills. Every step the loop runs (each callback, each resumption of
a task until its next await) is timed, after one warm-up lookup per task; the benchmark prints,
side by side in one run:

- **awaited**: the store as it runs under ``AsyncSession`` (a ``redis.asyncio`` client awaited
  through SQLAlchemy's greenlet bridge);
- **blocking**: the same store forced onto its synchronous client (what every release before
  the asyncio bridge did; for the Cluster, its nodes' synchronous connections).

For each: the longest step in milliseconds and how many steps exceeded 1 ms, each also less the
garbage collector's pauses inside the step (a collection pauses the loop whatever code runs),
the 99th percentile step, and lookups per second. A step includes SQLAlchemy's own work between
two awaits (placing an instance, a flush), not only the cache's; the blocking variant's extra is
the Redis round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import gc
import tempfile
import time
import uuid
from typing import Any

from sqlalchemy import Integer, String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_cache import CachingSession, IdentityCache
from sa_cache.stores.redis_cluster import RedisClusterStore

timer: _StepTimer
SLOW_STEP = 0.001  # seconds: the bound of the issue


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class _StepTimer:
    """Times every step the event loop runs (``asyncio.events.Handle._run``: a callback, or one
    resumption of a task up to its next await) while installed, and the garbage collector's
    pauses within each step (``gc.callbacks``): a collection stops every thread whatever runs,
    so a step's time less its collections is what the code in it cost."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.without_gc: list[float] = []
        self._original = asyncio.events.Handle._run
        self._gc_total = 0.0
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self._gc_total += time.perf_counter() - self._gc_started

    def __enter__(self) -> _StepTimer:
        original, durations, without_gc = self._original, self.durations, self.without_gc

        def timed(handle: Any) -> None:
            gc_before = self._gc_total
            started = time.perf_counter()
            try:
                original(handle)
            finally:
                took = time.perf_counter() - started
                durations.append(took)
                without_gc.append(took - (self._gc_total - gc_before))

        gc.callbacks.append(self._on_gc)
        asyncio.events.Handle._run = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]
        gc.callbacks.remove(self._on_gc)


async def _run(
    cache: IdentityCache, url: str, tasks: int, lookups: int, miss_every: int
) -> float:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    Session = async_sessionmaker(engine, sync_session_class=CachingSession, cache=cache)
    async with Session() as s:
        s.add_all(Item(id=n, name=f"item {n}") for n in range(tasks))
        await s.commit()

    async with Session() as s:  # warm: every row cached
        for n in range(tasks):
            await s.get(Item, n)

    async def worker(n: int, lookups: int) -> None:
        for round_ in range(lookups):
            if miss_every and round_ % miss_every == miss_every - 1:
                cache.evict(Item, n)  # a miss: a load and a fill
            async with Session() as s:
                await s.get(Item, n)

    # every task's first lookup is a first for it (a greenlet, compiled statements, a pool
    # connection): the loop's steady state is what is timed
    await asyncio.gather(*(worker(n, 1) for n in range(tasks)))
    started = time.perf_counter()
    with timer:
        await asyncio.gather(*(worker(n, lookups) for n in range(tasks)))
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return tasks * lookups / elapsed


def measure(
    variant: str, redis_url: str, tasks: int, lookups: int, miss_every: int = 0
) -> dict[str, float]:
    """One variant's figures: the longest step (ms), steps over 1 ms, lookups per second."""
    cache = IdentityCache(redis_url, prefix=f"bench_aio_{uuid.uuid4().hex[:8]}")
    cache.register(Item)
    store: Any = cache.store
    if variant == "blocking":
        if isinstance(store, RedisClusterStore):  # the nodes' synchronous connections
            store._connection = store.client.get_redis_connection
        else:
            store._client = lambda: store.client  # the synchronous client, inside the loop
    global timer
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{folder}/bench.sqlite"
        try:
            rate = asyncio.run(_run(cache, url, tasks, lookups, miss_every))
        finally:
            cache.flush()
    durations = sorted(timer.durations)
    without_gc = sorted(timer.without_gc)
    return {
        "longest_step_ms": 1000 * durations[-1],
        "longest_without_gc_ms": 1000 * without_gc[-1],
        "p99_step_ms": 1000 * durations[int(0.99 * (len(durations) - 1))],
        "steps_over_1ms": float(sum(1 for d in durations if d > SLOW_STEP)),
        "over_1ms_without_gc": float(sum(1 for d in without_gc if d > SLOW_STEP)),
        "steps": float(len(durations)),
        "lookups_per_s": rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--lookups", type=int, default=20)
    parser.add_argument("--miss-every", type=int, default=0)
    parser.add_argument("--redis", default=None, help="a cache URL (default: 6379, or private)")
    parser.add_argument("--store", choices=("redis", "cluster", "sentinel"), default="redis")
    args = parser.parse_args()
    servers: Any = None
    if args.redis is None and args.store == "cluster":
        from tests.redis_cluster import RedisClusterServers

        servers = RedisClusterServers().start()
    elif args.redis is None and args.store == "sentinel":
        from tests.redis_sentinel import RedisSentinelServers

        servers = RedisSentinelServers().start()
    try:
        _report(args, args.redis or (servers.url if servers else "redis://127.0.0.1:6379/0"))
    finally:
        if servers is not None:
            servers.stop()


def _report(args: argparse.Namespace, url: str) -> None:
    print(f"{args.tasks} tasks x {args.lookups} lookups, cache at {url}")
    print(
        f"{'variant':9} {'longest step ms':>15} {'(less gc)':>10} {'p99 ms':>7} "
        f"{'steps > 1 ms':>12} {'(less gc)':>10} {'of steps':>9} {'lookups/s':>10}"
    )
    for variant in ("awaited", "blocking"):
        f = measure(variant, url, args.tasks, args.lookups, args.miss_every)
        print(
            f"{variant:9} {f['longest_step_ms']:15.2f} {f['longest_without_gc_ms']:10.2f} "
            f"{f['p99_step_ms']:7.3f} {f['steps_over_1ms']:12.0f} "
            f"{f['over_1ms_without_gc']:10.0f} {f['steps']:9.0f} {f['lookups_per_s']:10.0f}"
        )


if __name__ == "__main__":
    main()
