"""Negative caching. A lookup of a missing row caches its absence (short TTL);
inserting that key evicts it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec

from .conftest import CacheFactory
from .counting import expect_commands, expect_sql
from .entries import entry_kind, row_key, stat
from .models import Employee, Engineer, Manager, Membership, User

NEGATIVE_TTL = 5


def seconds_to_live(cache: IdentityCache, backend: str, model: type[Any], *pk: Any) -> float:
    """The remaining TTL of a row's entry, read from the store itself."""
    key = row_key(cache, model, *pk)
    if backend == "redis":
        return float(cache.store.client.pttl(key)) / 1000  # type: ignore[attr-defined]
    expires_at, _ = cache.store._backend.get(key)  # type: ignore[attr-defined]
    return float(expires_at - time.monotonic())


@pytest.fixture
def short_cache(backend: str, cache_factory: CacheFactory) -> IdentityCache:
    return cache_factory(backend, negative_ttl=NEGATIVE_TTL)


@pytest.fixture
def alice(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add(User(id=1, name="alice"))
        s.commit()
    with Session() as s:
        s.get(User, 1)  # creates User's generation, so the counts below are per lookup


@pytest.mark.usefixtures("alice")
def test_a_missing_row_is_looked_up_in_the_database_once(Session, sql, cache, redis_counter):
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 404) is None
    assert entry_kind(cache, User, 404) == codec.AbsentEntry
    assert stat(cache, "fills") == 2  # alice, then the absence
    with expect_sql(sql, selects=0), expect_commands(redis_counter, {"MGET": 2}, round_trips=2):
        for _ in range(2):
            with Session() as s:
                assert s.get(User, 404) is None
    assert stat(cache, "hits") == 2


def test_caching_an_absence_is_one_read_and_one_conditional_write(
    engine, backend, cache_factory, redis_counter, sql
):
    cache = cache_factory(backend, lease_wait=0)  # the herd lease is test_herd's
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        assert s.get(User, 1) is None  # creates User's generation
    with (
        expect_sql(sql, selects=1),
        expect_commands(redis_counter, {"MGET": 1, "SET": 1}, round_trips=2),  # SET NX
        Session() as s,
    ):
        assert s.get(User, 404) is None
    assert entry_kind(cache, User, 404) == codec.AbsentEntry


def test_an_absence_lives_at_most_negative_ttl_and_a_row_much_longer(engine, short_cache, backend):
    Session = sessionmaker(engine, class_=CachingSession, cache=short_cache)
    with Session() as s:
        s.add(User(id=1, name="alice"))
        s.commit()
    with Session() as s:
        assert s.get(User, 1) is not None
    with Session() as s:
        assert s.get(User, 404) is None
    with Session() as s:
        assert s.get_many(User, [405]) == [None]
    assert entry_kind(short_cache, User, 404) == codec.AbsentEntry
    assert entry_kind(short_cache, User, 405) == codec.AbsentEntry
    for pk in (404, 405):
        assert 0 < seconds_to_live(short_cache, backend, User, pk) <= NEGATIVE_TTL
    assert seconds_to_live(short_cache, backend, User, 1) > short_cache.ttl - 60


@pytest.mark.usefixtures("alice")
def test_inserting_the_row_in_another_session_evicts_its_absence(Session, sql, cache):
    with Session() as s:
        assert s.get(User, 2) is None
    with Session() as s:
        s.add(User(id=2, name="bob"))
        s.commit()
    assert entry_kind(cache, User, 2) == codec.Tombstone
    with expect_sql(sql, selects=1):
        with Session() as s:
            assert s.get(User, 2).name == "bob"
        with Session() as s:
            assert s.get(User, 2).name == "bob"


@pytest.mark.usefixtures("alice")
def test_inserting_the_row_with_its_key_spelled_differently_evicts_its_absence(Session, cache):
    with Session() as s:
        assert s.get(User, 9) is None
    with Session() as s:
        s.add(User(id="09", name="nine"))  # the database stores 9; the instance holds "09"
        s.commit()
    assert entry_kind(cache, User, 9) == codec.Tombstone
    with Session() as s:
        assert s.get(User, 9).name == "nine"


@pytest.mark.usefixtures("alice")
def test_an_absence_is_evicted_with_its_whole_model(Session, sql, cache):
    with Session() as s:
        assert s.get(User, 404) is None
    cache.evict_model(User)
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 404) is None


def test_a_subclass_lookup_of_a_missing_row_caches_no_absence(Session, sql, cache):
    with expect_sql(sql, selects=2):
        for _ in range(2):
            with Session() as s:
                assert s.get(Engineer, 7) is None
    assert entry_kind(cache, Employee, 7) is None
    assert stat(cache, "fills", Employee) == 0


def test_a_subclass_lookup_of_a_row_of_a_sibling_class_caches_no_absence(Session, sql, cache):
    with Session() as s:
        s.add(Manager(id=5, name="mia", reports=3))
        s.commit()
    with Session() as s:
        assert s.get(Engineer, 5) is None  # the row exists: it is a Manager
    assert entry_kind(cache, Employee, 5) == codec.Tombstone  # the insert's, untouched
    with Session() as s:
        manager = s.get(Employee, 5)
        assert isinstance(manager, Manager) and manager.name == "mia"


def test_a_base_lookup_of_a_missing_row_caches_the_absence_for_the_whole_hierarchy(
    Session, sql, cache
):
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Employee, 7) is None
    assert entry_kind(cache, Employee, 7) == codec.AbsentEntry
    with expect_sql(sql, selects=0):
        with Session() as s:
            assert s.get(Employee, 7) is None
        with Session() as s:
            assert s.get(Engineer, 7) is None


@pytest.mark.usefixtures("alice")
def test_get_many_caches_the_absence_of_every_missing_row_in_one_write(
    Session, sql, cache, redis_counter
):
    # alice is a hit; no lease in get_many; both absences in one pipeline
    with (
        expect_sql(sql, selects=1),
        expect_commands(redis_counter, {"MGET": 1, "SET": 2}, round_trips=2),
        Session() as s,
    ):
        assert s.get_many(User, [404, 1, 405]) == [None, s.get(User, 1), None]
    assert entry_kind(cache, User, 404) == entry_kind(cache, User, 405) == codec.AbsentEntry
    with expect_sql(sql, 0):
        with Session() as s:
            assert s.get_many(User, [405, 404]) == [None, None]
        with Session() as s:
            assert s.get(User, 404) is None


def test_a_composite_primary_key_caches_its_absence_where_strings_compare_exactly(
    Session, sql, cache, db
):
    # MariaDB's default collation matches "ACME" to "acme": no negative entries for string keys
    with expect_sql(sql, selects=2 if db == "mariadb" else 1):
        for _ in range(2):
            with Session() as s:
                assert s.get(Membership, ("acme", 1)) is None
    with Session() as s:
        s.add(Membership(org="acme", member=1, role="owner"))
        s.commit()
    with Session() as s:
        assert s.get(Membership, ("acme", 1)).role == "owner"
