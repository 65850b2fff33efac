"""asyncio: ``async_sessionmaker(engine, sync_session_class=CachingSession, cache=cache)`` gives
an ``AsyncSession`` whose lookups, fills and evictions are the caching session's own, run inside
SQLAlchemy's greenlet. The store is called synchronously, so with Redis each lookup blocks the
event loop for one round trip, as a synchronous driver would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from sa_cache import CachingSession, IdentityCache

from .counting import RedisCounter, SQLCounter, counting_sql, expect_commands, expect_sql
from .models import Address, User

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
            with expect_commands(redis_counter, {"SET": 1}):
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
