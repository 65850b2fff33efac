"""asyncio on the Redis Cluster and Sentinel stores: under ``AsyncSession`` their own I/O is
awaited on the event loop (``redis.asyncio`` twins of their connections; a Cluster batch's node
pipelines awaited together, a slot-map refresh in a worker thread), so a lookup waiting for a
hung server suspends its task, never the loop: the hung-server pattern of tests/test_async.py,
with a Cluster master and a Sentinel-managed master paused (SIGSTOP)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from sa_cache import CachingSession, IdentityCache

from . import redis_sentinel
from .conftest import RUN_ID, register_all, require_redis_cluster
from .counting import counting_sql, expect_sql
from .models import User


@pytest.fixture
def db() -> str:
    return "sqlite"


def _async_url(engine: Engine) -> Any:
    return engine.url.set(drivername="sqlite+aiosqlite")


def _hung_lookup(engine: Engine, cache: IdentityCache, hang: Any, resume: Any) -> tuple[str, int]:
    """User 1 cached, then looked up while ``hang()`` holds the server it lives on: the name
    the lookup returned and how often a ticker task ran meanwhile (every 5 ms)."""

    async def main() -> tuple[str, int]:
        async_engine = create_async_engine(_async_url(engine))
        Session = async_sessionmaker(  # noqa: N806
            async_engine, sync_session_class=CachingSession, cache=cache
        )
        async with Session() as s:
            s.add(User(id=1, name="a"))
            await s.commit()
        for _ in range(2):  # a miss that fills, then a hit
            async with Session() as s:
                await s.get(User, 1)
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
                    return str((await s.get(User, 1)).name)  # the database answers
            finally:
                done.set()

        hang()
        try:
            name, _ = await asyncio.gather(lookup(), ticker())
        finally:
            resume()
        await async_engine.dispose()
        return name, ticks

    return asyncio.run(main())


def _url(backend: str) -> str:
    if backend == "cluster":
        servers = require_redis_cluster()
        servers.wait_ok()
        return servers.url
    return redis_sentinel.shared().url


@pytest.mark.parametrize("backend", ["cluster", "sentinel"])
def test_an_async_session_hits_fills_and_evicts(engine: Engine, backend: str) -> None:
    prefix = f"{RUN_ID}_aio_{uuid.uuid4().hex[:6]}"
    cache = register_all(IdentityCache(_url(backend), prefix=prefix))

    async def main() -> None:
        async_engine = create_async_engine(_async_url(engine))
        Session = async_sessionmaker(  # noqa: N806
            async_engine, sync_session_class=CachingSession, cache=cache
        )
        with counting_sql(async_engine.sync_engine) as sql:
            async with Session() as s:
                s.add_all([User(id=1, name="one"), User(id=2, name="two")])
                await s.commit()
            for _ in range(2):
                async with Session() as s:
                    users = await s.run_sync(lambda sync: sync.get_many(User, [1, 2, 3]))
            with expect_sql(sql, 0):
                async with Session() as s:
                    users = await s.run_sync(lambda sync: sync.get_many(User, [1, 2, 3]))
                    assert [u and u.name for u in users] == ["one", "two", None]
            async with Session() as s:
                (await s.get(User, 1)).name = "uno"
                await s.commit()
            with expect_sql(sql, 1):
                async with Session() as s:
                    assert (await s.get(User, 1)).name == "uno"
        await async_engine.dispose()

    try:
        asyncio.run(main())
        assert cache.stats()["hits"] >= 3 and cache.stats()["errors"] == 0
    finally:
        cache.flush()


def test_a_hung_cluster_master_suspends_the_lookup_not_the_event_loop(engine: Engine) -> None:
    servers = require_redis_cluster()
    servers.wait_ok()
    cache = register_all(
        IdentityCache(
            servers.url,
            prefix=f"{RUN_ID}_ahung_{uuid.uuid4().hex[:6]}",
            socket_timeout=0.3,
            breaker_threshold=100,
        )
    )
    model = cache.model_for(User.__mapper__)
    assert model is not None
    row_node = cache.store.domain_of(model.keys.row_key((1,)))  # type: ignore[attr-defined]
    node = next(n for n in servers.running() if n.address == row_node)
    try:
        name, ticks = _hung_lookup(engine, cache, node.pause, node.resume)
    finally:
        if node.paused:
            node.resume()
        servers.wait_ok()
    assert name == "a"
    # the read alone waits 0.3 s for its timeout: a blocked loop would not tick at all
    assert ticks >= 20
    assert cache.stats()["errors"] >= 1
    cache.flush()


def test_a_hung_sentinel_master_suspends_the_lookup_not_the_event_loop(engine: Engine) -> None:
    """Paused for well under the sentinels' down-after time: no failover, only a timeout."""
    servers = redis_sentinel.shared()
    cache = register_all(
        IdentityCache(
            servers.url,
            prefix=f"{RUN_ID}_ahung_{uuid.uuid4().hex[:6]}",
            socket_timeout=0.3,
            breaker_threshold=100,
        )
    )
    master = servers.server_on(servers.master_port())
    try:
        name, ticks = _hung_lookup(engine, cache, master.pause, master.resume)
    finally:
        if master.paused:
            master.resume()
    assert name == "a"
    assert ticks >= 20
    assert cache.stats()["errors"] >= 1
    cache.flush()


def test_under_asyncio_entries_written_before_a_change_of_master_are_not_served(
    engine: Engine,
) -> None:
    """tests/test_sentinel.py's change of master, with the reader's lookups under
    ``AsyncSession``: its ``redis.asyncio`` connections learn the new master's identity too,
    so the first read from it goes to the database and the next finds every generation
    replaced (a miss, then a fill), never the entry cached before the change."""
    from sqlalchemy.orm import sessionmaker

    from .redis_sentinel import RedisSentinelServers

    servers = RedisSentinelServers().start()
    prefix = f"{RUN_ID}_asn_{uuid.uuid4().hex[:6]}"
    try:
        with sessionmaker(engine)() as s:
            s.add(User(id=1, name="v1"))
            s.commit()
        reader = register_all(IdentityCache(servers.url, prefix=prefix))
        old, new = servers.master, servers.replica

        async def main(steps: Any) -> list[tuple[str, int]]:
            async_engine = create_async_engine(_async_url(engine))
            Session = async_sessionmaker(  # noqa: N806
                async_engine, sync_session_class=CachingSession, cache=reader
            )
            seen = []
            with counting_sql(async_engine.sync_engine) as sql:
                for _ in range(steps):
                    sql.reset()
                    async with Session() as s:
                        seen.append((str((await s.get(User, 1)).name), sql.count))
            await async_engine.dispose()
            return seen

        assert asyncio.run(main(2)) == [("v1", 1), ("v1", 0)]  # filled on the old master, a hit
        assert old.client().wait(1, 2000) == 1
        new.client().replicaof("NO", "ONE")
        servers.wait(lambda: old.client().info("replication")["connected_slaves"] == 0, "unlinked")
        writer = register_all(IdentityCache(servers.url, prefix=prefix))  # on the old master
        with sessionmaker(engine, class_=CachingSession, cache=writer)() as s:
            s.get(User, 1).name = "v2"
            s.commit()
        old.kill()
        servers.point_sentinels_at(new)
        assert asyncio.run(main(3)) == [("v2", 1), ("v2", 1), ("v2", 0)]
        assert reader.stats()["errors"] == 1
    finally:
        servers.stop()
