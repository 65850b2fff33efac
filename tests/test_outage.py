"""Redis down or slow. Every lookup still returns the right answer from the database,
a cache error never reaches the caller, and it is counted in stats() and logged once per outage.

These tests start their own redis-server on a spare loopback port; the shared one is never
killed or paused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache
from sa_cache.store import Fill, Write

from .conftest import require_service
from .counting import expect_sql
from .models import User
from .redis_server import RedisServer, free_port


@pytest.fixture
def server() -> Iterator[RedisServer]:
    require_service("redis", 6379)
    server = RedisServer().start()
    yield server
    server.stop()


#: every cache here: a short timeout and one retry (the caches come from ``cache_factory``)
FAST_FAILURE = {"socket_timeout": 0.2, "retries": 1}


@pytest.fixture
def users(engine) -> None:
    with sessionmaker(engine)() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 5)])
        s.commit()


def sa_cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sa_cache"]


@pytest.mark.usefixtures("users")
def test_with_nothing_listening_every_lookup_is_answered_by_the_database(
    engine, sql, caplog, cache_factory
):
    cache = cache_factory(f"redis://127.0.0.1:{free_port()}/0", **FAST_FAILURE)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    caplog.set_level(logging.WARNING, logger="sa_cache")
    for _ in range(3):
        with Session() as s:
            assert s.get(User, 1).name == "u1"
            assert [u.id for u in s.get_many(User, [2, 3])] == [2, 3]
            assert s.get(User, 404) is None
            s.get(User, 2).name = "changed"
            s.commit()  # the eviction fails too, and is journaled
    with Session() as s:
        assert s.get(User, 2).name == "changed"
    assert sql.selects() >= 10
    stats = cache.stats()
    # three refused connections open the breaker; after that the store is not even tried
    assert stats["errors"] == 3 and stats["bypassed"] >= 10 and stats["hits"] == 0
    assert len(sa_cache_warnings(caplog)) == 1  # once per outage, not per call


@pytest.mark.usefixtures("users")
def test_a_hung_redis_costs_a_bounded_timeout_and_never_an_error(
    engine, server, sql, cache_factory
):
    cache = cache_factory(server.url, **FAST_FAILURE)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.get(User, 1)
    server.pause()
    try:
        started = time.monotonic()
        with Session() as s:  # one request, four lookups through the cache
            users = [s.get(User, pk) for pk in (1, 2, 3)]
            assert [u.name for u in users] == ["u1", "u2", "u3"]
            assert [u.name for u in s.get_many(User, [1, 4])] == ["u1", "u4"]
        assert time.monotonic() - started < 2.0  # not redis-py's default 5 s x 10 retries
    finally:
        server.resume()
    stats = cache.stats()
    assert stats["errors"] == 1  # the first timeout opened the breaker: one timeout in all
    assert stats["bypassed"] == 3  # the other lookups did not touch the network


@pytest.mark.usefixtures("users")
def test_a_row_changed_while_redis_was_unreachable_is_never_served_stale(
    engine, server, caplog, cache_factory
):
    cache = cache_factory(server.url, **FAST_FAILURE, breaker_cooldown=0)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    caplog.set_level(logging.WARNING, logger="sa_cache")
    with Session() as s:
        assert s.get(User, 1).name == "u1"  # cached
    server.pause()
    try:
        with Session() as s:
            s.get(User, 1).name = "during the outage"
            s.commit()  # the eviction times out: journaled
    finally:
        server.resume()
    with Session() as s:  # the journal is replayed before the cache is read
        assert s.get(User, 1).name == "during the outage"
    with Session() as s:
        assert s.get(User, 1).name == "during the outage"
    messages = sa_cache_warnings(caplog)
    assert messages[0].startswith("sa_cache: cache backend unavailable")
    assert messages[-1] == "sa_cache: cache backend available again"


@pytest.mark.usefixtures("users")
def test_a_killed_and_restarted_redis_is_used_again(engine, server, sql, cache_factory):
    cache = cache_factory(server.url, **FAST_FAILURE, breaker_cooldown=0)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.get(User, 1)
    server.kill()
    with Session() as s:
        assert s.get(User, 1).name == "u1"
    restarted = RedisServer()
    restarted.port = server.port
    restarted.start()
    try:
        with Session() as s:
            assert s.get(User, 1).name == "u1"  # a miss on the empty server: fills again
        with expect_sql(sql, 0), Session() as s:
            assert s.get(User, 1).name == "u1"
    finally:
        restarted.stop()


@pytest.mark.usefixtures("users")
def test_an_overflowing_journal_evicts_whole_models_when_redis_is_back(
    engine, server, sql, cache_factory
):
    cache = cache_factory(server.url, **FAST_FAILURE, breaker_cooldown=0)
    cache.guarded.journal_limit = 2
    held = threading.Event()  # the background delivery waits: here the read replays the journal
    cache.guarded.delivery_wait = lambda seconds: held.wait()
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    for pk in (1, 2, 3):
        with Session() as s:
            s.get(User, pk)  # cached
    model = cache.model_for(User.__mapper__)
    generation = cache.store.get_many([model.keys.generation_key])[0]
    server.pause()
    try:
        for pk in (1, 2, 3):  # three keys journaled: more than the journal keeps
            with Session() as s:
                s.get(User, pk).name = f"changed {pk}"
                s.commit()
    finally:
        server.resume()
    assert cache.guarded.journal() == ({}, {model})
    with Session() as s:  # the replay replaces the generation: every old entry is a miss
        assert [s.get(User, pk).name for pk in (1, 2, 3)] == [f"changed {pk}" for pk in (1, 2, 3)]
    assert cache.store.get_many([model.keys.generation_key])[0] != generation
    assert cache.guarded.journal() == ({}, set())
    held.set()


def test_a_store_call_that_timed_out_leaves_no_reply_behind_for_the_next_command(server):
    """The store reads raw replies on a pooled connection of its own choosing: a connection
    whose read timed out is dropped, or its next command would read the late reply (another
    key's value)."""
    store = IdentityCache(server.url, prefix="late_reply", socket_timeout=0.2).store
    store.write_many([Write("late_reply:a", b"A", 10), Write("late_reply:b", b"B", 10)])
    server.pause()  # SIGSTOP: the reply to the next read comes only after the resume
    try:
        with pytest.raises(redis.TimeoutError):
            store.get_many(["late_reply:a"])
    finally:
        server.resume()
    assert store.get_many(["late_reply:b"]) == [b"B"]
    assert store.fill_many([Fill("late_reply:c", None, b"C", 10)]) == [True]
