"""Eviction. Changes are collected at flush (net changes only; old and new identity
when a primary key changes), kept across savepoints, discarded on rollback, and evicted when the
transaction commits, before the user's own ``after_commit`` listeners run. One commit costs at
most one cache round trip however many rows changed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, CachingSessionMixin, IdentityCache, codec

from .counting import expect_commands, expect_sql
from .entries import entry_kind
from .extra_models import Account, Login, ensure_tables
from .models import Address, User
from .test_fidelity_writes import after, differential, names


def evictions(cache: IdentityCache) -> int:
    return int(cache.stats()["evictions"])


@pytest.mark.usefixtures("users")
def test_an_update_is_evicted_at_commit_and_the_next_lookup_loads_and_caches_the_new_row(
    Session, sql, cache, redis_counter
):
    before = evictions(cache)
    with Session() as s:
        s.get(User, 1).name = "new"
        with expect_commands(redis_counter, {"SET": 2}, round_trips=2):
            s.commit()
    assert evictions(cache) == before + 1
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "new"
    with expect_sql(sql, selects=0), Session() as s:
        assert s.get(User, 1).name == "new"


@pytest.mark.usefixtures("users")
def test_a_rolled_back_update_never_reaches_the_cache_and_evicts_nothing(
    Session, sql, cache, redis_counter
):
    before = evictions(cache)
    with expect_commands(redis_counter, {"MGET": 1}), Session() as s:  # the get; no write
        user = s.get(User, 1)
        user.name = "discarded"
        s.flush()
        s.rollback()
    assert evictions(cache) == before
    hits = cache.stats()["hits"]
    with expect_sql(sql, 0), Session() as s:
        assert s.get(User, 1).name == "u1"
    assert cache.stats()["hits"] == hits + 1


@pytest.mark.usefixtures("users")
def test_setting_an_attribute_to_its_current_value_evicts_nothing(
    Session, sql, cache, redis_counter
):
    before = evictions(cache)
    with Session() as s:
        user = s.get(User, 1)
        user.name = "u1"
        assert user in s.dirty and not s.is_modified(user)
        with expect_commands(redis_counter, {}):
            s.commit()
    assert evictions(cache) == before
    with expect_sql(sql, 0), Session() as s:
        assert s.get(User, 1).name == "u1"


@pytest.mark.usefixtures("users")
def test_a_primary_key_change_evicts_both_the_old_and_the_new_identity(
    Session, sql, cache, redis_counter
):
    with Session() as s:
        assert s.get(User, 7) is None  # the new identity is negatively cached
    assert entry_kind(cache, User, 7) == codec.AbsentEntry
    before = evictions(cache)
    with Session() as s:
        s.get(User, 1).id = 7
        with expect_commands(redis_counter, {"SET": 4}, round_trips=2):
            s.commit()
    assert evictions(cache) == before + 2
    assert entry_kind(cache, User, 1) == codec.Tombstone
    assert entry_kind(cache, User, 7) == codec.Tombstone
    with expect_sql(sql, selects=2):
        with Session() as s:
            assert s.get(User, 1) is None
        with Session() as s:
            assert s.get(User, 7).name == "u1"


@pytest.mark.usefixtures("users")
def test_a_delete_is_evicted_and_the_next_lookup_returns_none(Session, sql, cache):
    before = evictions(cache)
    with Session() as s:
        s.delete(s.get(User, 2))
        s.commit()
    assert evictions(cache) == before + 1
    with expect_sql(sql, selects=1):
        with Session() as s:
            assert s.get(User, 2) is None
        with Session() as s:
            assert s.get(User, 2) is None  # now from the negative entry


@pytest.mark.usefixtures("users")
def test_an_insert_evicts_the_negative_entry_for_its_primary_key(Session, sql, cache):
    with Session() as s:
        assert s.get(User, 9) is None
    assert entry_kind(cache, User, 9) == codec.AbsentEntry
    with Session() as s:
        s.add(User(id=9, name="nine"))
        s.commit()
    assert entry_kind(cache, User, 9) == codec.Tombstone
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 9).name == "nine"


@pytest.mark.usefixtures("users")
def test_a_change_made_in_a_released_savepoint_is_evicted_when_the_outer_transaction_commits(
    Session, sql, cache
):
    with Session() as s:
        user = s.get(User, 1)
        with s.begin_nested():
            user.name = "in savepoint"
        s.commit()
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "in savepoint"


@pytest.mark.usefixtures("users")
def test_a_rolled_back_savepoint_keeps_the_evictions_of_earlier_flushes(Session, sql, cache):
    with Session() as s:
        s.get(User, 1).name = "outer"
        s.flush()
        savepoint = s.begin_nested()
        s.get(User, 2).name = "inner"
        s.flush()
        savepoint.rollback()
        s.commit()
    with expect_sql(sql, selects=2):
        with Session() as s:
            assert s.get(User, 1).name == "outer"
        with Session() as s:
            assert s.get(User, 2).name == "u2"  # evicting a row the savepoint undid is harmless
        with Session() as s:
            assert s.get(User, 3).name == "u3"


@pytest.mark.usefixtures("users")
def test_releasing_a_savepoint_evicts_nothing_before_the_outer_commit(
    Session, sql, cache, redis_counter
):
    before = evictions(cache)
    with Session() as s:
        s.get(User, 2).name = "outer"
        s.flush()  # the database transaction has begun (pysqlite begins one at the first write)
        user = s.get(User, 1)
        with expect_commands(redis_counter, {}), s.begin_nested():
            user.name = "released"
        assert evictions(cache) == before
        with expect_sql(sql, 0), Session() as other:
            assert other.get(User, 1).name == "u1"  # the committed row, from the cache
        s.commit()
    assert evictions(cache) == before + 2
    with Session() as s:
        assert s.get(User, 1).name == "released"


@pytest.mark.usefixtures("users")
def test_commit_with_a_savepoint_still_open_evicts_once_at_the_outermost_commit(
    Session, sql, db, cache, redis_counter
):
    before = evictions(cache)
    with Session() as s:
        user = s.get(User, 1)
        s.begin_nested()
        user.name = "nested"
        # a hold, then the eviction; on pysqlite the SAVEPOINT began the database transaction, so
        # the RELEASE is the commit: SQLAlchemy reports no commit before it, and only the
        # eviction after it is written (the commit window is not held there)
        trips = 1 if db == "sqlite" else 2
        with expect_commands(redis_counter, {"SET": trips}, round_trips=trips):
            s.commit()  # releases the savepoint and commits the transaction
    assert evictions(cache) == before + 1
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "nested"


@pytest.mark.usefixtures("users")
def test_a_released_savepoint_whose_transaction_rolls_back_evicts_nothing(
    Session, sql, cache, redis_counter
):
    before = evictions(cache)
    with Session() as s:
        s.get(User, 2).name = "outer"
        s.flush()  # the database transaction has begun (pysqlite begins one at the first write)
        user = s.get(User, 1)
        with expect_commands(redis_counter, {}):
            with s.begin_nested():
                user.name = "released"
            s.rollback()
    assert evictions(cache) == before
    with expect_sql(sql, 0), Session() as s:
        assert s.get(User, 1).name == "u1"


SAVEPOINT_WRITES = {
    "rename": lambda s: setattr(s.get(User, 1), "name", "renamed"),
    "merge": lambda s: s.merge(User(id=2, name="merged")),
    "bulk delete": lambda s: s.execute(delete(User).where(User.id < 3)),
}


@pytest.mark.parametrize("release", [True, False], ids=["released", "rolled-back"])
@pytest.mark.parametrize("write", list(SAVEPOINT_WRITES))
def test_a_savepoint_begun_before_the_transactions_first_write_is_read_as_the_database_keeps_it(
    engine, Session, cache, write, release
):
    """pysqlite's default mode begins a database transaction only at a write: a SAVEPOINT before
    the first one begins it, and its RELEASE commits, so the rollback after it undoes nothing.
    Whatever each database keeps, the cached session reads it, as plain SQLAlchemy does."""

    def scenario(factory: Any) -> list[Any]:
        with factory() as s:
            seen = names(s, (1,))  # from the cache: no statement before the savepoint
            savepoint = s.begin_nested()
            SAVEPOINT_WRITES[write](s)
            s.flush()
            if release:
                savepoint.commit()
            else:
                savepoint.rollback()
            s.rollback()
            seen += names(s)
        return seen + after(factory)

    differential(engine, Session, cache, scenario)


SAVEPOINT_LOOKUPS = {
    "get": lambda s: s.get(User, 1),
    "get of an absent row": lambda s: s.get(User, 9),
    "Query.get": lambda s: s.query(User).get(3),
    "get_many": lambda s: (
        s.get_many(User, [1, 3, 9])
        if isinstance(s, CachingSession)
        else [s.get(User, pk) for pk in (1, 3, 9)]
    ),
}


@pytest.mark.parametrize("lookup", list(SAVEPOINT_LOOKUPS))
def test_a_hit_inside_a_savepoint_begins_the_savepoint_as_the_load_would(
    engine, Session, cache, lookup
):
    """A savepoint's SAVEPOINT goes out with its first statement. On SQLite it begins the
    database transaction (pysqlite begins none before a write), after which a later savepoint's
    release no longer commits: a hit that skipped it would let that release commit what the
    rollback was to undo."""

    def scenario(factory: Any) -> list[Any]:
        with factory() as s:
            savepoint = s.begin_nested()
            SAVEPOINT_LOOKUPS[lookup](s)  # cached rows 1 and 3, cached absence 9
            savepoint.rollback()
            with s.begin_nested():
                s.get(User, 2).name = "released"
            s.rollback()
            seen = names(s)
        return seen + after(factory)

    differential(engine, Session, cache, scenario)


@pytest.mark.usefixtures("users")
@pytest.mark.parametrize("where", ["session_class", "sessionmaker", "instance"])
def test_an_after_commit_listener_of_the_application_reads_the_new_row_not_the_cached_one(
    engine, cache, where
):
    class AppSession(CachingSession):
        pass

    factory = sessionmaker(engine, class_=AppSession, cache=cache)
    seen: list[str] = []

    def enqueue_job(session: Any) -> None:
        with factory() as fresh:
            seen.append(fresh.get(User, 1).name)

    with factory() as s:
        target = {"session_class": AppSession, "sessionmaker": factory, "instance": s}[where]
        event.listen(target, "after_commit", enqueue_job)
        s.get(User, 1).name = "committed"
        s.commit()
    assert seen == ["committed"]


@pytest.mark.usefixtures("users")
def test_an_after_commit_listener_on_the_base_session_registered_before_the_mixin_runs_after(
    engine, cache
):
    seen: list[str] = []

    def enqueue_job(session: Any) -> None:
        if isinstance(session, AppSession) and not seen:
            with AppSession(engine, cache=cache) as fresh:
                seen.append(fresh.get(User, 1).name)

    event.listen(PlainSession, "after_commit", enqueue_job)
    try:

        class AppSession(CachingSessionMixin, PlainSession):  # defined after the listener
            pass

        with AppSession(engine, cache=cache) as s:
            s.get(User, 1).name = "committed"
            s.commit()
    finally:
        event.remove(PlainSession, "after_commit", enqueue_job)
    assert seen == ["committed"]


def test_fifty_rows_changed_in_one_commit_cost_two_round_trips_a_hold_and_an_eviction(
    Session, sql, cache, redis_counter
):
    with Session() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 51)])
        s.commit()
    with Session() as s:
        s.get_many(User, range(1, 51))
    before = evictions(cache)
    with Session() as s:
        for user in s.scalars(select(User)):
            user.name = user.name.upper()
        with expect_commands(redis_counter, {"SET": 100}, round_trips=2):
            s.commit()
    assert evictions(cache) == before + 50
    with expect_sql(sql, selects=1), Session() as s:
        assert [u.name for u in s.get_many(User, [1, 50])] == ["U1", "U50"]


def test_a_foreign_key_changed_through_a_relationship_evicts_the_registered_row(
    Session, sql, cache
):
    cache.register(Address)
    with Session() as s:
        s.add_all([User(id=1, name="a"), User(id=2, name="b")])
        s.add(Address(id=10, user_id=1, city="Oslo"))
        s.commit()
    with Session() as s:
        assert s.get(Address, 10).user_id == 1
    with Session() as s:
        with expect_sql(sql, 0):
            address = s.get(Address, 10)  # from the cache
        address.user = s.get(User, 2)
        s.commit()
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Address, 10).user_id == 2


def test_moving_a_registered_child_between_parent_collections_evicts_it(Session, sql, cache):
    cache.register(Address)
    with Session() as s:
        s.add_all([User(id=1, name="a"), User(id=2, name="b")])
        s.add(Address(id=10, user_id=1, city="Oslo"))
        s.commit()
    with Session() as s:
        s.get(Address, 10)
    with Session() as s:
        address = s.get(Address, 10)
        old, new = s.get(User, 1), s.get(User, 2)
        old.addresses.remove(address)
        new.addresses.append(address)
        s.commit()
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Address, 10).user_id == 2


def test_a_row_the_flush_deletes_as_an_orphan_is_evicted(engine, Session, sql, cache):
    ensure_tables(engine)
    cache.register(Account)
    cache.register(Login)
    with Session() as s:
        s.add(Account(id=1, email="a@x", name="a", logins=[Login(id=1), Login(id=2)]))
        s.commit()
    for pk in (1, 2):
        with Session() as s:
            s.get(Login, pk)
    with Session() as s:
        account = s.get(Account, 1)
        account.logins.remove(s.get(Login, 1))  # not in session.deleted: the flush orphans it
        s.commit()
    with expect_sql(sql, selects=1):
        with Session() as s:
            assert s.get(Login, 1) is None
        with Session() as s:
            assert s.get(Login, 2) is not None
