"""No dirty reads. Inside a transaction that has flushed changes to a row, or run a
bulk statement on its model, lookups of those rows bypass the cache, and the session never fills
the shared cache with data it has written and not yet committed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, codec

from .counting import expect_commands, expect_sql
from .entries import entry_kind, stat
from .models import Address, User


@pytest.fixture
def users(Session: sessionmaker[CachingSession]) -> None:
    """Users 1-3 cached; user 4 exists but was never loaded (its key holds the insert's
    tombstone)."""
    with Session() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in (1, 2, 3, 4)])
        s.commit()
    for pk in (1, 2, 3):
        with Session() as s:
            s.get(User, pk)


@pytest.mark.usefixtures("users")
def test_a_row_flushed_by_this_transaction_is_read_from_the_database_and_others_see_the_cache(
    Session, sql, cache, redis_counter
):
    a = Session()
    try:
        user = a.get(User, 1)
        user.name = "uncommitted"
        a.flush()
        a.expunge(user)
        del user
        # the cache is not even asked
        with expect_sql(sql, selects=1), expect_commands(redis_counter, {}):
            assert a.get(User, 1).name == "uncommitted"
        with expect_sql(sql, 0), Session() as b:
            assert b.get(User, 1).name == "u1"  # the committed row, from the cache
        evictions = stat(cache, "evictions")
        a.rollback()
    finally:
        a.close()
    assert entry_kind(cache, User, 1) == codec.RowEntry
    assert stat(cache, "evictions") == evictions
    hits = stat(cache, "hits")
    with expect_sql(sql, 0), Session() as b:
        assert b.get(User, 1).name == "u1"
    assert stat(cache, "hits") == hits + 1


@pytest.mark.usefixtures("users")
def test_a_row_deleted_by_this_transaction_is_not_served_from_the_cache(Session, sql):
    with Session() as a:
        a.delete(a.get(User, 2))
        a.flush()
        with expect_sql(sql, selects=1):
            assert a.get(User, 2) is None
        with expect_sql(sql, 0), Session() as b:
            assert b.get(User, 2).name == "u2"


@pytest.mark.usefixtures("users")
def test_a_row_inserted_by_this_transaction_is_not_hidden_by_a_negative_entry(Session, sql, cache):
    with Session() as s:
        assert s.get(User, 9) is None
    assert entry_kind(cache, User, 9) == codec.AbsentEntry
    with Session() as a:
        a.add(User(id=9, name="nine"))
        a.flush()
        a.expunge_all()
        with expect_sql(sql, selects=1):
            nine = a.get(User, 9)
            assert nine.name == "nine"
            assert a.get_many(User, [9]) == [nine]
        with Session() as b:
            assert b.get(User, 9) is None  # uncommitted: others still see the absence
        a.rollback()
    assert entry_kind(cache, User, 9) == codec.AbsentEntry


@pytest.mark.usefixtures("users")
def test_get_many_reads_the_rows_this_transaction_flushed_from_the_database(
    Session, sql, redis_counter
):
    with Session() as a:
        a.get(User, 1).name = "uncommitted"
        a.flush()
        a.expunge_all()
        # the database for user 1 only; the cache for user 2 only, and no fill
        with expect_sql(sql, selects=1), expect_commands(redis_counter, {"MGET": 1}):
            assert [u.name for u in a.get_many(User, [1, 2])] == ["uncommitted", "u2"]


@pytest.mark.usefixtures("users")
def test_after_a_core_bulk_statement_every_row_of_the_model_is_read_from_the_database(
    Session, sql, redis_counter
):
    with Session() as a:
        a.execute(update(User.__table__).where(User.__table__.c.id == 1).values(name="bulk"))
        with expect_sql(sql, selects=3), expect_commands(redis_counter, {}):
            assert [a.get(User, pk).name for pk in (1, 2, 3)] == ["bulk", "u2", "u3"]
        a.rollback()


@pytest.mark.usefixtures("users")
def test_after_an_orm_bulk_update_the_rows_it_may_have_changed_are_read_from_the_database(
    Session, sql, engine
):
    with Session() as a:
        fetch = {"synchronize_session": "fetch"}  # "auto"/"evaluate" never learn the rows
        a.execute(update(User).where(User.id == 1).values(name="bulk"), execution_options=fetch)
        a.expunge_all()
        with expect_sql(sql, selects=1):
            assert a.get(User, 1).name == "bulk"
        # with RETURNING, "fetch" named its rows; without it the whole model is bypassed
        with expect_sql(sql, selects=0 if engine.dialect.update_returning else 1):
            assert a.get(User, 2).name == "u2"
        a.rollback()


def _write_cached_row(s: Any) -> None:
    s.get(User, 1).name = "uncommitted"
    s.flush()


def _write_uncached_model(s: Any) -> None:
    s.add(Address(id=1, user_id=1))
    s.flush()


def _bulk_update_by_key(s: Any) -> None:
    s.execute(update(User), [{"id": 1, "name": "uncommitted"}])


@pytest.mark.usefixtures("users")
@pytest.mark.parametrize(
    "write",
    [_write_cached_row, _write_uncached_model, _bulk_update_by_key],
    ids=["flushed_cached_row", "flushed_other_model", "bulk_update_by_key"],
)
def test_a_session_that_has_written_fills_nothing_until_its_transaction_ends(
    Session, sql, cache, redis_counter, write
):
    fills = stat(cache, "fills")
    with Session() as a:
        write(a)
        # reads only: no SET, no EVALSHA
        with expect_sql(sql, selects=3), expect_commands(redis_counter, {"MGET": 3}, round_trips=3):
            assert a.get(User, 4).name == "u4"
            assert a.get(User, 404) is None
            assert [u.name if u else None for u in a.get_many(User, [2, 405])] == ["u2", None]
        assert stat(cache, "fills") == fills
        a.commit()
    assert entry_kind(cache, User, 4) == codec.Tombstone
    assert entry_kind(cache, User, 404) is None
    assert entry_kind(cache, User, 405) is None


@pytest.mark.usefixtures("users")
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_fills_work_again_in_the_next_transaction(Session, sql, cache, end):
    fills = stat(cache, "fills")
    with Session() as a:
        a.get(User, 1).name = "written"
        a.flush()
        getattr(a, end)()
        assert a.get(User, 4).name == "u4"
    assert stat(cache, "fills") == fills + 1
    assert entry_kind(cache, User, 4) == codec.RowEntry
    with expect_sql(sql, 0), Session() as s:
        assert s.get(User, 4).name == "u4"


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_the_fill_after_the_transaction_ends_is_one_compare_and_set(
    engine, backend, cache_factory, redis_counter, end
):
    cache = cache_factory(backend, lease_wait=0)  # the herd lease is test_herd's
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.add_all([User(id=1, name="u1"), User(id=4, name="u4")])
        s.commit()
    with Session() as a:
        a.get(User, 1).name = "written"
        a.flush()
        getattr(a, end)()
        # the read, then a compare-and-set replacing the tombstone the insert left
        with expect_commands(redis_counter, {"MGET": 1, "EVALSHA": 1}, round_trips=2):
            assert a.get(User, 4).name == "u4"
    assert entry_kind(cache, User, 4) == codec.RowEntry


def test_a_session_that_ran_a_textual_write_fills_nothing_until_its_transaction_ends(
    Session, cache
):
    with Session() as s:
        s.add(User(id=1, name="before"))
        s.commit()
    with Session() as s:
        s.execute(text("UPDATE users SET name = 'uncommitted' WHERE id = 1"))
        assert s.get(User, 1).name == "uncommitted"  # its own write, from the database
        fills = cache.stats()["fills"]
        s.rollback()
    assert cache.stats()["fills"] == fills
    with Session() as s:
        assert s.get(User, 1).name == "before"
