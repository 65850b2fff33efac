"""The snapshot hole: a reader whose transaction snapshot is older than an eviction must not be
able to store its snapshot in the cache (MariaDB's default REPEATABLE READ, and PostgreSQL's
REPEATABLE READ / SERIALIZABLE). READ COMMITTED takes a snapshot per statement, so its fills are
fresh and allowed."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, codec

from .counting import expect_sql
from .models import Address, User

LEVELS = {
    "sqlite": [None],
    "postgresql": [None, "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"],
    "mariadb": [None, "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"],
}


@pytest.mark.parametrize("level_index", range(4))
def test_a_reader_with_an_older_snapshot_never_fills_it(engine, db, cache, sql, level_index):
    if level_index >= len(LEVELS[db]):
        pytest.skip(f"{db} has one isolation behaviour here")
    level = LEVELS[db][level_index]
    reader_engine = engine if level is None else engine.execution_options(isolation_level=level)
    effective = level or engine.dialect.default_isolation_level
    snapshot_per_transaction = db != "sqlite" and effective in ("REPEATABLE READ", "SERIALIZABLE")

    Writer = sessionmaker(engine, class_=CachingSession, cache=cache)
    Reader = sessionmaker(reader_engine, class_=CachingSession, cache=cache)
    with Writer() as s:
        s.add(User(id=1, name="old"))
        s.add(Address(id=10, user_id=None))
        s.commit()

    with Reader() as reader:
        reader.get(Address, 10)  # the transaction's first read: its snapshot starts here
        with Writer() as writer:
            writer.get(User, 1).name = "new"
            writer.commit()  # evicts user 1
        seen = reader.get(User, 1).name  # a miss, loaded from the reader's snapshot
    # InnoDB's SERIALIZABLE turns plain SELECTs into locking reads of the newest row version
    reads_old_version = snapshot_per_transaction and not (
        db == "mariadb" and effective == "SERIALIZABLE"
    )
    assert seen == ("old" if reads_old_version else "new")
    # the exact cache state: the writer's tombstone untouched, or the new row filled
    key = cache.model_for(User.__mapper__).keys.row_key((1,))
    entry = codec.decode(cache.store.get_many([key])[0])
    if snapshot_per_transaction:
        assert type(entry) is codec.Tombstone
    else:
        assert type(entry) is codec.RowEntry and "new" in entry.values

    # a snapshot reader filled nothing; a READ COMMITTED one filled the new row
    with expect_sql(sql, selects=1 if snapshot_per_transaction else 0), Writer() as s:
        assert s.get(User, 1).name == "new"
    with Writer() as s:
        assert s.get(User, 1).name == "new"


def test_a_lookup_that_begins_the_transaction_fills_even_under_repeatable_read(
    engine, db, cache, sql
):
    if db == "postgresql":
        pytest.skip("PostgreSQL's REPEATABLE READ never uses the cache (test_isolation_promises)")
    level = "SERIALIZABLE" if db == "sqlite" else "REPEATABLE READ"
    Reader = sessionmaker(
        engine.execution_options(isolation_level=level), class_=CachingSession, cache=cache
    )
    with Reader() as s:
        s.add(User(id=1, name="a"))
        s.commit()
    with Reader() as s:
        s.get(User, 1)
    with expect_sql(sql, 0), Reader() as s:
        assert s.get(User, 1).name == "a"


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_session_on_a_connection_whose_snapshot_began_before_it_never_fills(
    engine, db, cache, level
):
    """The snapshot started on the connection before the session existed: the session's first
    read is not the transaction's first, so it must neither fill from the old snapshot nor
    serve the cache against it."""
    if db == "sqlite":
        pytest.skip("sqlite has one isolation behaviour here")
    Writer = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Writer() as s:
        s.add(User(id=1, name="old"))
        s.add(Address(id=10, user_id=None))
        s.commit()
    with engine.connect().execution_options(isolation_level=level) as conn:
        conn.execute(Address.__table__.select())  # the connection's snapshot starts here
        with Writer() as writer:
            writer.get(User, 1).name = "new"
            writer.commit()  # evicts user 1: a tombstone
        with CachingSession(bind=conn, cache=cache) as reader:
            seen = reader.get(User, 1).name
        conn.rollback()
    assert seen == ("new" if db == "mariadb" and level == "SERIALIZABLE" else "old")
    key = cache.model_for(User.__mapper__).keys.row_key((1,))
    assert type(codec.decode(cache.store.get_many([key])[0])) is codec.Tombstone  # no fill
    with Writer() as s:
        assert s.get(User, 1).name == "new"
