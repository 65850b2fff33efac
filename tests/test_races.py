"""No stale fill. An eviction is never undone by a reader that loaded the old row
before the commit and stores it afterwards.

The interleavings are forced, not hoped for: :class:`HookedStore` is the real store with a
callback run at the critical point, between the reader's database read and its cache write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.store import Fill, Release

from .conftest import CacheFactory
from .counting import expect_sql
from .models import User


class HookedStore:
    """The cache's own store; ``before_fill`` runs once, just before the next fill."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.before_fill: list[Callable[[], None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        if self.before_fill:
            self.before_fill.pop()()
        return self._inner.fill_many(fills, release)  # type: ignore[no-any-return]


@pytest.fixture
def cache(backend: str, cache_factory: CacheFactory) -> IdentityCache:
    """Leases off: these tests are about the fill protocol itself (tests/test_herd.py covers the
    leases; with them on, a writer inside the hook would wait for the reader's lease)."""
    return cache_factory(backend, lease_wait=0)


@pytest.fixture
def hooked(cache: IdentityCache) -> HookedStore:
    store = HookedStore(cache.store)
    cache.store = store  # type: ignore[assignment]
    return store


def raw_entry(cache: IdentityCache, pk: int) -> Any:
    key = cache.model_for(User.__mapper__).keys.row_key((pk,))  # type: ignore[union-attr]
    raw = cache.store.get_many([key])[0]
    return None if raw is None else codec.decode(raw)


def rename(Session: sessionmaker[CachingSession], pk: int, name: str) -> None:
    with Session() as s:
        s.get(User, pk).name = name
        s.commit()


@pytest.fixture
def old_row(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add(User(id=1, name="old"))
        s.commit()


@pytest.mark.usefixtures("old_row")
def test_a_fill_racing_an_eviction_does_not_undo_it(Session, hooked, cache, sql):
    hooked.before_fill.append(lambda: rename(Session, 1, "new"))
    with Session() as reader:
        assert reader.get(User, 1).name == "old"  # loaded before the writer committed
    assert type(raw_entry(cache, 1)) is codec.Tombstone  # the reader's fill was refused
    with expect_sql(sql, selects=1):
        with Session() as s:
            assert s.get(User, 1).name == "new"
        with Session() as s:
            assert s.get(User, 1).name == "new"


@pytest.mark.usefixtures("old_row")
def test_two_evictions_during_one_fill_leave_the_newest_tombstone(Session, hooked, cache):
    tombstones = []

    def second_reader_and_writer() -> None:
        rename(Session, 1, "v1")
        tombstones.append(raw_entry(cache, 1))
        hooked.before_fill.append(lambda: rename(Session, 1, "v2"))
        with Session() as reader2:  # observes the first tombstone, loads v1
            assert reader2.get(User, 1).name == "v1"

    hooked.before_fill.append(second_reader_and_writer)
    with Session() as reader1:  # observed an absent key, loads "old"
        assert reader1.get(User, 1).name == "old"
    final = raw_entry(cache, 1)
    assert type(final) is codec.Tombstone and final != tombstones[0]
    with Session() as s:
        assert s.get(User, 1).name == "v2"
    assert type(raw_entry(cache, 1)) is codec.RowEntry


@pytest.mark.usefixtures("old_row")
def test_a_fill_racing_an_eviction_in_get_many_does_not_undo_it(Session, hooked, cache):
    with Session() as s:
        s.add(User(id=2, name="other"))
        s.commit()
    hooked.before_fill.append(lambda: rename(Session, 1, "new"))
    with Session() as reader:
        assert [u.name for u in reader.get_many(User, [1, 2])] == ["old", "other"]
    assert type(raw_entry(cache, 1)) is codec.Tombstone
    assert type(raw_entry(cache, 2)) is codec.RowEntry
    with Session() as s:
        assert s.get(User, 1).name == "new"


def test_a_negative_fill_racing_an_insert_does_not_hide_the_row(Session, hooked, cache):
    def insert() -> None:
        with Session() as s:
            s.add(User(id=7, name="late"))
            s.commit()

    hooked.before_fill.append(insert)
    with Session() as reader:
        assert reader.get(User, 7) is None
    with Session() as s:
        assert s.get(User, 7).name == "late"


@pytest.mark.usefixtures("old_row")
def test_a_rollback_after_flush_leaves_the_cache_as_it_was(Session, cache, sql):
    with Session() as s:
        s.get(User, 1)  # cached
    evictions = cache.stats()["evictions"]
    with Session() as writer:
        writer.get(User, 1).name = "never"
        writer.flush()
        with Session() as reader, expect_sql(sql, 0):
            assert reader.get(User, 1).name == "old"
        writer.rollback()
    assert cache.stats()["evictions"] == evictions
    with Session() as s:
        assert s.get(User, 1).name == "old"
    assert type(raw_entry(cache, 1)) is codec.RowEntry


@pytest.mark.usefixtures("old_row")
def test_a_fill_slower_than_a_quarter_of_the_tombstone_ttl_is_dropped(
    engine, backend, cache_factory
):
    cache = cache_factory(backend, tombstone_ttl=1e-9)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        assert s.get(User, 1).name == "old"
    assert cache.stats()["fills"] == 0
    assert raw_entry(cache, 1) is None
