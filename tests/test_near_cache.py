"""The near cache: answers from this process's memory that are never older than this process's
commits, older than another process's only until Redis's tracking message arrives, and never
served through a tracking connection that is gone or silent.

Two caches on the same prefix, each with its own connections (its own Redis clients and its own
tracking connection), stand for two processes; benchmarks/near_staleness.py measures the same
thing across real processes. Tests that kill or pause Redis start a private redis-server.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, NearCache
from sa_cache.near import NearStore

from . import redis_sentinel
from .conftest import require_redis_cluster, require_service
from .counting import expect_commands, expect_sql
from .models import User
from .redis_sentinel import RedisSentinelServers
from .redis_server import RedisServer

DEADLINE = 10.0  # seconds any wait may take before the test fails


def wait_for(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def near(cache: IdentityCache) -> NearStore:
    store = cache.store
    assert isinstance(store, NearStore)
    return store


def connected(cache: IdentityCache) -> None:
    """Wait until the cache's tracking connections answered a ping sent from now on."""
    start = time.monotonic()
    wait_for(lambda: near(cache).invalidations.confirmed() > start, "a confirmed ping")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    require_service("redis", 6379)
    server = RedisServer().start()
    yield server
    server.stop()


def sessions(engine: Engine, cache: IdentityCache | None) -> sessionmaker[CachingSession]:
    return sessionmaker(engine, class_=CachingSession, cache=cache)


def version_of(Session: sessionmaker[CachingSession], pk: int) -> int:  # noqa: N803
    with Session() as s:
        return s.get(User, pk).version


def bump(Session: sessionmaker[CachingSession], pk: int) -> int:  # noqa: N803
    with Session() as s:
        user = s.get(User, pk)
        user.version += 1
        s.commit()
        return user.version


pytestmark = [pytest.mark.usefixtures("uncached_users"), pytest.mark.parametrize("db", ["sqlite"])]


# -- hits -----------------------------------------------------------------------------------------


def test_a_near_hit_sends_nothing_to_redis_and_no_sql(engine, sql, caches, redis_counter):
    from .conftest import counted_region

    cache = caches(counted_region(redis_counter))
    connected(cache)
    Session = sessions(engine, cache)
    assert version_of(Session, 1) == 1  # miss: loaded and filled
    assert version_of(Session, 1) == 1  # Redis hit, now held in memory
    with expect_sql(sql, 0), expect_commands(redis_counter, {}), Session() as s:
        user = s.get(User, 1)
        assert (user.name, user.version) == ("u1", 1)
    assert cache.stats()["near"]["hits"] >= 2  # the generation and the row
    assert cache.stats()["hits"] == 2
    assert cache.store.capabilities.near


def test_a_near_hit_is_the_same_load_as_without_any_cache(engine, caches):
    """Differential: the state a near hit places is the state plain SQLAlchemy loads."""
    cache = caches()
    connected(cache)
    cached, plain = sessions(engine, cache), sessions(engine, None)
    for _ in range(3):
        version_of(cached, 2)
    with cached() as s, plain() as p:
        hit, loaded = s.get(User, 2), p.get(User, 2)
        for attr in ("id", "name", "email", "active", "version"):
            assert getattr(hit, attr) == getattr(loaded, attr)
        assert "bio" not in hit.__dict__ and "bio" not in loaded.__dict__  # deferred stays so
        assert not s.dirty and hit.bio == loaded.bio
    assert cache.stats()["near"]["hits"] > 0


# -- this process's commits -----------------------------------------------------------------------


def test_an_own_commit_is_never_followed_by_an_older_answer_even_without_messages(engine, caches):
    """Tracking messages withheld: only the synchronous drop of the written keys stands between
    a commit and its next read."""
    cache = caches()
    connected(cache)
    store = near(cache)
    withheld: list[list[str]] = []
    store.invalidations._on_keys = withheld.append  # messages arrive, and are not applied
    Session = sessions(engine, cache)
    for _ in range(3):
        version_of(Session, 1)
    for _ in range(20):
        committed = bump(Session, 1)
        assert version_of(Session, 1) == committed
        assert version_of(Session, 1) == committed  # and the refill is the new row
    assert withheld and store.stats.invalidations >= 20


def test_a_fetch_overtaken_by_an_invalidation_keeps_nothing(caches):
    """The race: a fetch reads a value, the value's invalidation is applied, then the fetch
    would keep what it read. Forced with a hook inside the fetch."""
    cache = caches()
    connected(cache)
    store = near(cache)
    key = cache.prefix + ":race"
    store.write_many([_write(key, b"old")])
    inner_get = store.inner.get_many
    applied: list[str] = []
    apply = store.invalidations._on_keys

    def applying(keys: list[str]) -> None:
        apply(keys)
        applied.extend(keys)

    def overtaken(keys: Any) -> Any:
        values = inner_get(keys)
        store.inner.write_many([_write(key, b"new")])  # another writer, after the read
        wait_for(lambda: key in applied, "the invalidation to be applied mid-fetch")
        return values

    store.invalidations._on_keys = applying

    store.inner.get_many = overtaken  # type: ignore[method-assign]
    try:
        assert store.get_many([key]) == [b"old"]  # answered as read...
    finally:
        del store.inner.get_many
    assert store.get_many([key]) == [b"new"]  # ...but not kept


def test_a_message_taken_off_the_socket_but_not_yet_applied_is_applied_before_an_answer(caches):
    """The supervisor thread has read an invalidation and not applied it yet (held there by a
    hook): a read that begins then must wait for it, not answer from memory."""
    cache = caches()
    connected(cache)
    store = near(cache)
    key = cache.prefix + ":taken"
    store.write_many([_write(key, b"old")])
    assert store.get_many([key]) == [b"old"] and store.get_many([key]) == [b"old"]
    taken, release = threading.Event(), threading.Event()
    apply = store.invalidations._on_keys

    def held(keys: list[str]) -> None:
        if threading.current_thread().name == "sa_cache-invalidations" and key in keys:
            taken.set()
            release.wait(DEADLINE)
        apply(keys)

    store.invalidations._on_keys = held
    store.inner.write_many([_write(key, b"new")])  # another writer
    assert taken.wait(DEADLINE), "the supervisor did not take the message"
    answers: list[Any] = []
    reader = threading.Thread(target=lambda: answers.append(store.get_many([key])))
    reader.start()
    reader.join(0.2)  # it may not answer while the message waits to be applied...
    release.set()
    reader.join(DEADLINE)
    assert answers == [[b"new"]]  # ...and then answers the new value


def _write(key: str, value: bytes) -> Any:
    from sa_cache.store import Write

    return Write(key, value, 60)


# -- other processes' commits ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["redis", "cluster"])
def test_another_caches_commit_reaches_this_near_cache_once_its_message_has_arrived(
    engine, caches, where
):
    """Two caches, two sets of connections: B's commit is seen by A no later than A's tracking
    connections (one per Cluster primary) answer a ping sent after the commit returned."""
    url = require_redis_cluster().url if where == "cluster" else None
    a = caches(url)
    b = caches(url, prefix=a.prefix)
    connected(a)
    connected(b)
    assert len(near(a).invalidations._endpoints) == (3 if where == "cluster" else 1)
    SessionA, SessionB = sessions(engine, a), sessions(engine, b)  # noqa: N806
    for _ in range(3):
        assert version_of(SessionA, 1) == 1
    hits = a.stats()["near"]["hits"]
    for _ in range(10):
        committed = bump(SessionB, 1)
        returned = time.monotonic()
        wait_for(lambda r=returned: near(a).invalidations.confirmed() > r, "a ping after it")
        assert version_of(SessionA, 1) == committed
        assert version_of(SessionA, 1) == committed
    stats = a.stats()["near"]
    assert stats["invalidations"] >= 10 and stats["hits"] > hits


def test_a_flushall_drops_every_entry(caches, server):
    cache = caches(server.url)
    connected(cache)
    store = near(cache)
    key = cache.prefix + ":k"
    store.write_many([_write(key, b"v")])
    assert store.get_many([key]) == [b"v"] and store.get_many([key]) == [b"v"]
    flushes = store.stats.flushes
    server.client().flushall()
    wait_for(lambda: store.stats.flushes > flushes, "the flush message")
    assert store.get_many([key]) == [None]


# -- losses ---------------------------------------------------------------------------------------


def test_a_killed_tracking_connection_drops_everything_and_serves_nothing_stale(
    engine, caches, server
):
    a = caches(server.url)
    b = caches(server.url, prefix=a.prefix, near_cache=False)
    connected(a)
    SessionA, SessionB = sessions(engine, a), sessions(engine, b)  # noqa: N806
    for _ in range(3):
        version_of(SessionA, 1)
    store = near(a)
    connects, flushes = store.invalidations.connects, store.stats.flushes
    admin = server.client()
    assert admin.client_kill_filter(_type="pubsub") == 1  # the tracking connection, only
    committed = bump(SessionB, 1)  # its message is lost with the connection
    wait_for(lambda: store.invalidations.connects > connects, "the reconnection")
    connected(a)
    assert store.stats.flushes > flushes
    assert version_of(SessionA, 1) == committed  # nothing held from before the loss
    hits = store.stats.hits
    assert version_of(SessionA, 1) == committed
    assert store.stats.hits > hits  # served from memory again


def test_a_silent_partition_stops_entries_being_served_after_max_age(engine, sql, caches, server):
    """SIGSTOP: connections stay open, nothing answers. Entries are served for at most
    ``max_age`` after the last answered ping; then reads go to Redis, time out, and the
    database answers."""
    settings = NearCache(max_age=0.35, ping_interval=0.05, timeout=5.0)
    cache = caches(server.url, near_cache=settings, socket_timeout=0.2, breaker_cooldown=60)
    connected(cache)
    Session = sessions(engine, cache)
    for _ in range(3):
        version_of(Session, 1)
    with sessionmaker(engine)() as s:  # a change the cache cannot see: only the bound holds
        s.execute(update(User).where(User.id == 1).values(version=7))
        s.commit()
    server.pause()
    paused_at = time.monotonic()
    store = near(cache)
    confirmed = store.invalidations.confirmed()
    while time.monotonic() < confirmed + settings.max_age - 0.05:  # time passing, the bound
        with expect_sql(sql, 0):
            assert version_of(Session, 1) == 1  # still within the bound: served from memory
    time.sleep(max(0.0, confirmed + settings.max_age + 0.01 - time.monotonic()))
    assert version_of(Session, 1) == 7  # the database's answer, the paused Redis timed out
    assert time.monotonic() - paused_at < settings.max_age + 1.0
    assert version_of(Session, 1) == 7
    server.resume()


def test_a_store_error_drops_everything(caches):
    """What opens the breaker drops every entry first."""
    cache = caches()
    connected(cache)
    store = near(cache)
    key = cache.prefix + ":k"
    store.write_many([_write(key, b"v")])
    store.get_many([key])
    assert store._entries

    def failing(keys: Any) -> Any:
        raise redis.ConnectionError("down")

    store.inner.get_many = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(redis.ConnectionError):
            store.get_many([key + "2"])
    finally:
        del store.inner.get_many
    assert not store._entries and store.stats.flushes >= 1


def test_a_change_of_master_drops_everything(caches, server):
    """The masters are re-resolved every ``topology_interval``; a different one drops all."""
    cache = caches(server.url, near_cache=NearCache(topology_interval=0.05))
    connected(cache)
    store = near(cache)
    flushes, connects = store.stats.flushes, store.invalidations.connects
    other = RedisServer().start()
    try:
        store.inner.client.connection_pool.connection_kwargs["port"] = other.port
        wait_for(lambda: store.stats.flushes > flushes, "the flush")
        wait_for(lambda: store.invalidations.connects > connects, "the new master's connection")
        assert store.invalidations._endpoints[0].port == other.port
    finally:
        store.inner.client.connection_pool.connection_kwargs["port"] = server.port
        other.stop()


@pytest.mark.slow
def test_a_sentinel_failover_drops_everything_and_the_new_master_is_followed(engine, caches):
    """A graceful failover of a private Sentinel deployment: the near cache drops what it held
    and follows the new master; a commit made there is seen."""
    servers = RedisSentinelServers().start()
    try:
        a = caches(servers.url, near_cache=NearCache(topology_interval=0.1))
        b = caches(servers.url, prefix=a.prefix, near_cache=False)
        connected(a)
        SessionA, SessionB = sessions(engine, a), sessions(engine, b)  # noqa: N806
        for _ in range(3):
            assert version_of(SessionA, 1) == 1
        store = near(a)
        old = servers.master_port()
        assert store.invalidations._endpoints[0].port == old
        flushes = store.stats.flushes
        servers.failover()
        new = servers.wait_new_master(old)
        wait_for(lambda: store.invalidations._endpoints[0].port == new, "the new master followed")
        assert store.stats.flushes > flushes
        committed = bump(SessionB, 1)
        connected(a)
        hits = store.stats.hits
        for _ in range(5):  # loaded and filled, a Redis hit kept in memory, then memory
            assert version_of(SessionA, 1) == committed
        assert store.stats.hits > hits  # served from memory again
    finally:
        servers.stop()


def test_a_forked_child_starts_empty_with_tracking_connections_of_its_own(caches):
    cache = caches()
    connected(cache)
    store = near(cache)
    key = cache.prefix + ":forked"
    store.write_many([_write(key, b"v")])
    assert store.get_many([key]) == [b"v"] and store.get_many([key]) == [b"v"]
    connects = store.invalidations.connects
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if every expectation holds
        ok = False
        try:
            ok = not store._entries
            store.get_many([key])  # notices the fork: its own connections from now on
            start = time.monotonic()
            while store.invalidations.confirmed() <= start and time.monotonic() < start + 5:
                time.sleep(0.01)
            ok = ok and store.invalidations.confirmed() > start
            ok = ok and store.invalidations.connects == connects + 1
            store.get_many([key])
            hits = store.stats.hits
            ok = ok and store.get_many([key]) == [b"v"] and store.stats.hits == hits + 1
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    hits = store.stats.hits
    assert store.get_many([key]) == [b"v"] and store.stats.hits == hits + 1  # the parent's


def test_the_store_under_it_keeps_its_capabilities_and_attributes(caches):
    """Everything the wrapped store declares or offers reaches the cache through the near
    cache: a Sentinel store's failover handling included."""
    cache = caches(redis_sentinel.shared().url)
    store = near(cache)
    assert store.capabilities == store.inner.capabilities._replace(near=True)
    assert store.capabilities.failover and not store.inner.capabilities.near
    assert store.client is store.inner.client  # type: ignore[attr-defined]
    assert store.inner._generations.__func__ is type(cache)._new_generations  # type: ignore[attr-defined]


def test_the_near_stores_capabilities_follow_what_the_store_under_it_learns(caches):
    """The guards read the capabilities on every call, so the near store makes its own once, and
    again whenever the wrapped store's change (as Redis's do when it learns ``keeps_ttl`` at its
    first timed lease); what is set on the near store is set on the store under it."""
    store = near(caches())
    first = store.capabilities
    assert store.capabilities is first  # made once, not on every read
    learnt = store.inner.capabilities._replace(keeps_ttl=not first.keeps_ttl)
    store.inner.capabilities = learnt  # what RedisStore._learn_keeps_ttl does
    assert store.capabilities == learnt._replace(near=True)
    store.capabilities = first
    assert store.inner.capabilities == first._replace(near=False)
    assert store.capabilities == first


def test_a_near_cache_needs_a_shared_store():
    with pytest.raises(ValueError, match="shared store"):
        IdentityCache(near_cache=True)


def test_concurrent_readers_and_a_writer_in_one_process_never_read_older_than_a_commit(
    engine, caches
):
    """Readers race one writer; each read must return a version at least that of the last
    commit that returned before the read began."""
    cache = caches()
    connected(cache)
    Session = sessions(engine, cache)
    committed = [1]
    stop = threading.Event()
    stale: list[tuple[int, int]] = []

    def reader() -> None:
        while not stop.is_set():
            floor = committed[0]
            seen = version_of(Session, 3)
            if seen < floor:
                stale.append((seen, floor))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(60):
            committed[0] = bump(Session, 3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert stale == []
    assert cache.stats()["near"]["hits"] > 0
