"""No log line carries a cached value: redis-py names a failing pipeline command with all its
arguments, so a store error during a fill (a row's values) or an eviction (a tombstone) must be
logged by its command's name alone. A private redis-server is driven out of memory and denied by
an ACL to produce those errors for real."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from sa_cache import CachingSession

from .conftest import require_service
from .models import User
from .redis_server import RedisServer

SECRET = "Zebediah Quux-Secret"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    require_service("redis", 6379)
    server = RedisServer("--maxmemory-policy", "noeviction").start()
    yield server
    server.stop()


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sa_cache"))


def test_a_fill_refused_for_memory_is_logged_without_the_rows_values(
    engine, server, cache_factory, caplog
):
    with Session(engine) as s:
        s.add(User(id=1, name=SECRET, email="secret@example.com"))
        s.commit()
    cache = cache_factory(server.url, breaker_cooldown=0, lease_wait=0)  # the fill writes first
    factory = sessionmaker(engine, class_=CachingSession, cache=cache)
    with factory() as s:
        s.get(User, 404)  # creates the generation while writes are allowed
    server.client().config_set("maxmemory", "1")  # every write refused from now on
    caplog.set_level(logging.WARNING, logger="sa_cache")
    with factory() as s:
        assert s.get(User, 1).name == SECRET  # the fill fails: answered by the database
    text = logged(caplog)
    assert "unavailable" in text and "OutOfMemoryError" in text
    assert SECRET not in text and "secret@example.com" not in text
    assert cache.stats()["errors"] >= 1


def test_an_eviction_refused_by_an_acl_is_logged_without_the_tombstone(
    engine, server, cache_factory, caplog
):
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+ping")
    cache = cache_factory(
        server.url.replace("redis://", "redis://reader:pw@"), breaker_cooldown=0
    )
    factory = sessionmaker(engine, class_=CachingSession, cache=cache)
    caplog.set_level(logging.WARNING, logger="sa_cache")
    with factory() as s:
        s.add(User(id=2, name=SECRET))
        s.commit()  # the insert's tombstone SET is refused (NOPERM): the first store call
    text = logged(caplog)
    assert "NoPermissionError" in text and "'set' command" in text
    assert "users:2" not in text and "pw@" not in text
    tombstones: list[Any] = list(cache.guarded.journal()[0])
    assert tombstones  # journaled for later: nothing lost
