"""asyncio: ``async_sessionmaker(engine, sync_session_class=CachingSession, cache=cache)`` gives
an ``AsyncSession`` whose lookups, fills and evictions are the caching session's own, run inside
SQLAlchemy's greenlet. The cache's Redis I/O is awaited on the event loop through the same
greenlet bridge as the database driver's (a ``redis.asyncio`` client per loop), and lease waits
await ``asyncio.sleep``: a lookup suspends its task, never the loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache

from .counting import RedisCounter, SQLCounter, counting_sql, expect_commands, expect_sql
from .models import Address, User
from .redis_server import RedisServer

ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+psycopg_async",
    "mariadb": "mysql+aiomysql",
}


def run(
    db: str,
    engine: Engine,
    cache: IdentityCache,
    scenario: Any,
) -> None:
    """Run ``scenario(Session, sql)`` on an async engine of the same database as ``engine``."""

    async def main() -> None:
        async_engine = create_async_engine(engine.url.set(drivername=ASYNC_DRIVERS[db]))
        Session = async_sessionmaker(
            async_engine, sync_session_class=CachingSession, cache=cache, expire_on_commit=False
        )
        try:
            with counting_sql(async_engine.sync_engine) as sql:
                await scenario(Session, sql)
        finally:
            await async_engine.dispose()

    asyncio.run(main())


def test_an_async_session_hits_fills_and_evicts_as_a_session_does(
    db: str, engine: Engine, cache: IdentityCache, redis_counter: RedisCounter
) -> None:
    async def scenario(Session: async_sessionmaker[AsyncSession], sql: SQLCounter) -> None:
        async with Session() as s:
            s.add(User(id=1, name="before"))
            await s.commit()
        async with Session() as s:
            assert (await s.get(User, 1)).name == "before"  # a miss: fills
        with expect_sql(sql, 0), expect_commands(redis_counter, round_trips=1):
            async with Session() as s:
                assert (await s.get(User, 1)).name == "before"
        async with Session() as s:
            (await s.get(User, 1)).name = "after"
            with expect_commands(redis_counter, {"SET": 2}):
                await s.commit()
        async with Session() as s:
            with expect_sql(sql, selects=1):
                assert (await s.get(User, 1)).name == "after"

        async def get_many() -> None:
            async with Session() as s:
                users = await s.run_sync(lambda sync: sync.get_many(User, [1, 2]))
                assert [u and u.name for u in users] == ["after", None]

        await get_many()  # caches user 2's absence
        with expect_sql(sql, 0):
            await get_many()

    run(db, engine, cache, scenario)
    assert cache.stats()["hits"] >= 3


def test_an_async_lazy_many_to_one_load_and_a_rollback_behave_as_in_a_session(
    db: str, engine: Engine, cache: IdentityCache
) -> None:
    async def scenario(Session: async_sessionmaker[AsyncSession], sql: SQLCounter) -> None:
        async with Session() as s:
            s.add_all([User(id=1, name="owner"), Address(id=10, user_id=1)])
            await s.commit()
        async with Session() as s:
            await s.get(User, 1)  # fills
        with expect_sql(sql, selects=1):  # the address; its user came from the cache
            async with Session() as s:
                owner = await s.run_sync(lambda sync: sync.get(Address, 10).user.name)
            assert owner == "owner"
        async with Session() as s:
            (await s.get(User, 1)).name = "rolled back"
            await s.flush()
            await s.rollback()
        with expect_sql(sql, 0):  # the rollback evicted nothing and filled nothing
            async with Session() as s:
                assert (await s.get(User, 1)).name == "owner"

    run(db, engine, cache, scenario)


@pytest.mark.filterwarnings("ignore:fully NULL primary key identity")
@pytest.mark.parametrize("bad", ["abc", None, 2**70], ids=["text", "none", "huge"])
def test_an_async_get_of_a_bad_key_answers_as_a_plain_async_session(
    db: str, engine: Engine, cache: IdentityCache, bad: Any
) -> None:
    async def outcome(session: AsyncSession) -> Any:
        try:
            return ("ok", await session.get(User, bad))
        except Exception as exc:
            return ("raised", type(exc))

    async def scenario(Session: async_sessionmaker[AsyncSession], sql: SQLCounter) -> None:
        async with Session() as s:
            cached = await outcome(s)
        async with AsyncSession(s.bind) as plain:
            assert await outcome(plain) == cached

    run(db, engine, cache, scenario)


def test_an_async_savepoint_begun_before_the_first_write_is_read_as_the_database_keeps_it(
    db: str, engine: Engine, cache: IdentityCache
) -> None:
    """aiosqlite runs pysqlite's default mode, which begins a transaction only at a write: the
    savepoint's release commits and the rollback after it undoes nothing. The caching session
    reads what each database kept, as a plain one does."""

    async def scenario(Session: async_sessionmaker[AsyncSession], sql: SQLCounter) -> None:
        seen = []
        for factory in (async_sessionmaker(Session.kw["bind"]), Session):
            Warming = sessionmaker(engine, class_=CachingSession, cache=cache)
            with Warming() as warming:
                warming.query(User).delete()
                warming.add(User(id=1, name="u1"))
                warming.commit()
            with Warming() as warming:
                assert warming.get(User, 1).name == "u1"  # cached for the caching run
            async with factory() as s:
                names = [(await s.get(User, 1)).name]  # a hit: no statement before the savepoint
                async with s.begin_nested():
                    (await s.get(User, 1)).name = "released"
                await s.rollback()
                names.append((await s.get(User, 1)).name)
            async with factory() as s:
                names.append((await s.get(User, 1)).name)
            seen.append(names)
        plain, cached = seen
        assert cached == plain

    run(db, engine, cache, scenario)


def test_the_cache_s_redis_round_trips_suspend_the_task_not_the_event_loop(
    engine: Engine, db: str, cache_factory: Any
) -> None:
    """While a lookup waits for a Redis that does not answer (a hung server: the read times
    out), other tasks on the loop keep running: the round trip is awaited through SQLAlchemy's
    greenlet bridge on a ``redis.asyncio`` client, as the async database drivers are."""
    if db != "sqlite":
        pytest.skip("the store's I/O, not the database's")
    server = RedisServer().start()
    try:
        cache = cache_factory(server.url, socket_timeout=0.3, breaker_threshold=100)

        async def main() -> tuple[str, int]:
            async_engine = create_async_engine(engine.url.set(drivername=ASYNC_DRIVERS[db]))
            Session = async_sessionmaker(
                async_engine, sync_session_class=CachingSession, cache=cache
            )
            async with Session() as s:
                s.add(User(id=1, name="a"))
                await s.commit()
            ticks = 0
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0.005)

            async def lookup() -> str:
                try:
                    async with Session() as s:
                        return (await s.get(User, 1)).name  # Redis hangs: the database answers
                finally:
                    done.set()

            server.pause()
            try:
                name, _ = await asyncio.gather(lookup(), ticker())
            finally:
                server.resume()
            await async_engine.dispose()
            return name, ticks

        name, ticks = asyncio.run(main())
        assert name == "a"
        # the read alone waits 0.3 s for its timeout: a blocked loop would not tick at all
        assert ticks >= 20
        assert cache.stats()["errors"] >= 1
    finally:
        server.stop()


def test_a_lease_wait_under_asyncio_awaits(engine: Engine, db: str, cache: IdentityCache) -> None:
    """A lookup waiting for another caller's fill sleeps with ``asyncio.sleep``."""
    if db != "sqlite":
        pytest.skip("the store's I/O, not the database's")
    from sa_cache.session import CachingSessionMixin

    slept = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        original = asyncio.sleep

        async def watched(seconds: float) -> None:
            slept.append(asyncio.get_running_loop() is loop)
            await original(seconds)

        asyncio.sleep = watched  # type: ignore[assignment]
        try:
            await _run_in_greenlet(lambda: CachingSessionMixin.cache_sleep(0.001))
        finally:
            asyncio.sleep = original  # type: ignore[assignment]

    asyncio.run(main())
    assert slept == [True]


async def _run_in_greenlet(function: Any) -> Any:
    from sqlalchemy.util import greenlet_spawn

    return await greenlet_spawn(function)
