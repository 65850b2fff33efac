"""Failure domains: a store that partitions its keys (a Redis Cluster's primaries) gets one
breaker per domain from the guarded store, so one failed node costs only the keys it serves.

The store here is tests/partitioned_store.py: keys routed by hash tag to two private Redis
servers, "a" (every key but user 1's) and "b" (user 1's), so a domain fails in a second by
pausing or killing a server. The same behaviour on a real cluster whose master is SIGKILLed is
tests/test_cluster_outage.py."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache
from sa_cache.breaker import CircuitBreaker
from sa_cache.kinds import CachedKind
from sa_cache.near import NearStore
from sa_cache.store import DomainFailure, Fill, Write
from sa_cache.stores import redis_region, store_for

from .conftest import RUN_ID, register_all
from .counting import counting_sql, expect_sql
from .models import User
from .partitioned_store import PartitionedStore
from .redis_server import RedisServer


@pytest.fixture
def db() -> str:
    return "sqlite"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, RedisServer]]:
    started = {"a": RedisServer().start(), "b": RedisServer().start()}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def servers_up(servers: dict[str, RedisServer]) -> Iterator[dict[str, RedisServer]]:
    yield servers
    for server in servers.values():
        if server.process is None:
            server.start()
        elif server.paused:
            server.resume()
        server.client().config_set("maxmemory", "0")


class HeldDelivery:
    """A ``delivery_wait`` that holds the journal's delivery thread until the test ends."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def __call__(self, seconds: float) -> None:
        self.go.wait(30)


def _cache(servers: dict[str, RedisServer], **options: Any) -> IdentityCache:
    prefix = f"{RUN_ID}_dom_{uuid.uuid4().hex[:8]}"
    cache = register_all(IdentityCache(prefix=prefix, exit_flush_timeout=0, **options))
    stores = {name: store_for(redis_region(s.url, 0.2, 0)) for name, s in servers.items()}
    cache.store = PartitionedStore(stores, lambda tag: "b" if tag == "users:1" else "a")
    return cache


@pytest.fixture
def held() -> Iterator[HeldDelivery]:
    gate = HeldDelivery()
    yield gate
    gate.go.set()


def _name(Session: Any, pk: int) -> str:  # noqa: N803
    with Session() as s:
        return str(s.get(User, pk).name)


def _setup(engine: Engine, cache: IdentityCache) -> Any:
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
    with Session() as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two")])
        s.commit()
    for pk in (1, 2):
        _name(Session, pk)  # miss and fill
    return Session


def test_a_failed_domain_opens_its_own_breaker_and_the_other_domain_keeps_hitting(
    engine, servers_up, caplog
):
    """And it is logged once, by its name."""
    caplog.set_level(logging.WARNING, logger="sa_cache")
    cache = _cache(servers_up, breaker_cooldown=60)
    Session = _setup(engine, cache)  # noqa: N806
    store = cache.store
    assert isinstance(store, PartitionedStore)
    servers_up["b"].pause()
    with counting_sql(engine) as sql:
        with expect_sql(sql, 1):
            assert _name(Session, 1) == "one"  # times out on b: the database answers
        calls_to_b = store.calls["b"]
        for _ in range(5):
            with expect_sql(sql, 1):
                assert _name(Session, 1) == "one"
            with expect_sql(sql, 0):
                assert _name(Session, 2) == "two"  # a hit, from a
    assert store.calls["b"] == calls_to_b  # b's breaker refused every call after the first
    assert cache.guarded.breaker_for("b").is_open
    assert not cache.guarded.breaker_for("a").is_open
    assert not cache.breaker.is_open
    stats = cache.stats()
    assert stats["hits"] >= 5 and stats["errors"] == 1 and stats["bypassed"] >= 5
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("sa_cache: cache backend b unavailable")


def test_a_failed_generation_domain_sends_every_lookup_of_its_kind_to_the_database(
    engine, servers_up
):
    """A row can be judged only against its kind's generation: users' generation lives on a."""
    cache = _cache(servers_up, breaker_cooldown=60)
    Session = _setup(engine, cache)  # noqa: N806
    servers_up["a"].pause()
    with counting_sql(engine) as sql:
        for pk in (1, 2, 1):
            with expect_sql(sql, 1):
                assert _name(Session, pk) == ("one" if pk == 1 else "two")
    assert cache.guarded.breaker_for("a").is_open
    assert not cache.guarded.breaker_for("b").is_open


def test_evictions_of_a_failed_domain_are_journaled_and_the_others_written(
    engine, servers_up, held, caplog
):
    """A commit changing users 1 and 2 while b is down: user 2's tombstone reaches a at once
    (user 2 is then filled and hit again), user 1's is journaled; user 1 is read from the
    database, never filled, until the journal reaches b; then it hits again."""
    cache = _cache(servers_up, breaker_cooldown=60)
    cache.guarded.delivery_wait = held
    Session = _setup(engine, cache)  # noqa: N806
    model = cache.model_for(User.__mapper__)
    assert model is not None
    servers_up["b"].pause()
    with Session() as s:
        for user in s.query(User).order_by(User.id):
            user.name += "!"
        s.commit()
    assert cache.guarded.journal() == ({model.keys.row_key((1,)): model}, set())
    store = cache.store
    assert isinstance(store, PartitionedStore)
    servers_up["b"].resume()  # b still holds user 1 as "one": only the journal keeps it out
    with counting_sql(engine) as sql:
        with expect_sql(sql, 1):
            assert _name(Session, 2) == "two!"
        with expect_sql(sql, 0):
            assert _name(Session, 2) == "two!"
        calls_to_b = store.calls["b"]
        for _ in range(3):
            with expect_sql(sql, 1):
                assert _name(Session, 1) == "one!"
        assert store.calls["b"] == calls_to_b  # no read, lease or fill went to b
        with caplog.at_level(logging.WARNING, logger="sa_cache"):
            assert cache.deliver_evictions(5)
        assert caplog.records[-1].getMessage() == "sa_cache: cache backend b available again"
        assert cache.guarded.journal() == ({}, set())
        assert not cache.guarded.breaker_for("b").is_open
        with expect_sql(sql, 1):
            assert _name(Session, 1) == "one!"
        with expect_sql(sql, 0):
            assert _name(Session, 1) == "one!"


def test_a_journaled_key_is_never_answered_from_the_entry_its_domain_still_holds(
    engine, servers_up, held
):
    """b refuses writes (out of memory) but answers reads, so its breaker keeps closing: the
    eviction of user 1 stays journaled while b still holds the entry from before the commit.
    Every read of user 1 goes to the database until the journal is written. (The threshold
    is high enough that the commit's refused writes alone never open b's breaker.)"""
    cache = _cache(servers_up, breaker_cooldown=60, breaker_threshold=10)
    cache.guarded.delivery_wait = held
    Session = _setup(engine, cache)  # noqa: N806
    with Session() as s:
        assert s.get(User, 1).name == "one"  # a hit: b holds it
    servers_up["b"].client().config_set("maxmemory", "1")  # every write refused, reads served
    with Session() as s:
        s.get(User, 1).name = "uno"
        s.commit()
    assert cache.guarded.journal()[0]
    with counting_sql(engine) as sql:
        for _ in range(4):
            with expect_sql(sql, 1):
                assert _name(Session, 1) == "uno"
        assert not cache.guarded.breaker_for("b").is_open  # reads kept succeeding
        servers_up["b"].client().config_set("maxmemory", "0")
        with expect_sql(sql, 1):
            assert _name(Session, 1) == "uno"  # the read delivered the journal first
        assert cache.guarded.journal() == ({}, set())
        with expect_sql(sql, 0):
            assert _name(Session, 1) == "uno"


def test_while_a_keys_eviction_is_journaled_its_lease_is_refused_and_its_fill_dropped(
    engine, servers_up, held
):
    """b refuses a connection once (killed, not hung: its breaker stays closed) and comes
    back empty: the eviction of user 1 is journaled and b holds nothing for it. A lease taken
    or a fill written then would cache what a reader loaded before the commit; both wait for
    the journal."""
    cache = _cache(servers_up, breaker_cooldown=60, breaker_threshold=3)
    cache.guarded.delivery_wait = held
    _setup(engine, cache)
    model = cache.model_for(User.__mapper__)
    assert model is not None
    key = model.keys.row_key((1,))
    servers_up["b"].kill()
    assert not cache.evict(User, 1)
    servers_up["b"].start()  # same port, empty memory
    assert not cache.guarded.breaker_for("b").is_open
    guarded = cache.guarded
    kind: CachedKind = model
    assert guarded.acquire(kind, key, key + ":lease", 5) is None
    guarded.fill([(kind, Fill(key, None, b"loaded before the commit", 60))])
    assert servers_up["b"].client().keys("*") == []
    assert cache.deliver_evictions(5)
    assert guarded.acquire(kind, key, key + ":lease", 5) is not None


def test_a_probe_granted_for_a_call_that_is_not_sent_is_given_back():
    breaker = CircuitBreaker(threshold=1, cooldown=0)
    breaker.failed(ConnectionError())
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # one at a time
    breaker.cancel_probe()
    assert breaker.allow()


def test_a_near_cache_in_front_of_domains_reports_a_failed_domain_at_the_caller_s_places(
    servers_up: dict[str, RedisServer],
) -> None:
    """The near cache asks its store only for what its memory lacks; a failure of some domains
    names places in that shorter list, which it must translate back to the caller's keys, or
    the guarded store would take a healthy key for a failed one and the failed one for an
    answer."""
    stores = {name: store_for(redis_region(s.url, 0.2, 0)) for name, s in servers_up.items()}
    partitioned = PartitionedStore(stores, lambda tag: "b" if tag == "users:1" else "a")
    partitioned.client = stores["a"].client  # type: ignore[attr-defined]  # tracked: a only
    prefix = f"{RUN_ID}_near_dom_{uuid.uuid4().hex[:8]}"
    near = NearStore(partitioned, prefix)
    try:
        started = time.monotonic()
        while near.invalidations.confirmed() <= started and time.monotonic() < started + 10:
            time.sleep(0.01)
        a1, a2, b1 = (f"{prefix}:{{users:{n}}}" for n in (2, 3, 1))
        near.write_many([Write(a1, b"a1", 60), Write(a2, b"a2", 60), Write(b1, b"b1", 60)])
        assert near.get_many([a1]) == [b"a1"]  # kept in memory
        servers_up["b"].kill()
        with pytest.raises(DomainFailure) as failed:
            near.get_many([a1, a2, b1])
        assert failed.value.failed == {2}
        assert failed.value.results[:2] == [b"a1", b"a2"]
    finally:
        near.close()


class FrontedStore(PartitionedStore):
    """A store answering some keys itself (as a near cache in front of a cluster would) and
    asking its domains for the rest: a DomainFailure from them counts the rest only."""

    def __init__(self, inner: PartitionedStore, local: dict[str, bytes]) -> None:
        super().__init__(inner.stores, inner.route)
        self.local = local

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        rest = [key for key in keys if key not in self.local]
        fetched = iter(super().get_many(rest))
        return [self.local[key] if key in self.local else next(fetched) for key in keys]


def test_a_domain_failure_whose_indexes_do_not_match_the_call_fails_the_whole_call(
    engine, servers_up
):
    """The replies of a failure are matched to keys by index: a wrapper that reports the
    indexes of a smaller call of its own must not have its replies given to the wrong keys."""
    cache = _cache(servers_up, breaker_cooldown=60, breaker_threshold=10)
    Session = _setup(engine, cache)  # noqa: N806
    inner = cache.store
    assert isinstance(inner, PartitionedStore)
    model = cache.model_for(User.__mapper__)
    assert model is not None
    generation_key = model.keys.generation_key
    generation = inner.get_many([generation_key])[0]
    assert generation is not None
    cache.store = FrontedStore(inner, {generation_key: generation})
    servers_up["b"].pause()  # users 1 (b) and 2 (a) in one read: b fails, a answers
    with counting_sql(engine) as sql, expect_sql(sql, 1), Session() as s:
        assert [u.name for u in s.get_many(User, [1, 2])] == ["one", "two"]
    assert cache.stats()["rejected"] == 0
