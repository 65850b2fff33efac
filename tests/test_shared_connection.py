"""Sessions that share a connection: writes are tracked where the database sees them (the
connection and its transaction), and evicted when the transaction that really commits does so.

- A session joined to an outer transaction (SQLAlchemy's "join an external transaction" recipe)
  commits nothing durable at its own commit: the outer commit does, and no reader may cache the
  row as it was before that commit, not even while the commit runs.
- The outer transaction rolling back leaves the cache serving only committed rows.
- A session sharing a connection with a session that wrote reads that session's uncommitted rows
  through it, so it must not fill the cache with them.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec

from .counting import expect_sql
from .models import User

JOIN_MODES = ["create_savepoint", "conditional_savepoint"]


@pytest.fixture(params=JOIN_MODES)
def mode(request: pytest.FixtureRequest, db: str) -> str:
    """How the joined session joins the outer transaction."""
    if request.param == "create_savepoint" and db == "sqlite":
        # pysqlite runs SAVEPOINT outside its transaction, so RELEASE commits the outer one
        # (SQLAlchemy's SQLite docs: the BEGIN recipe); plain SQLAlchemy would see it committed
        pytest.skip("pysqlite's SAVEPOINT commits the outer transaction")
    return str(request.param)


@pytest.fixture
def Session(engine: Engine, cache: IdentityCache) -> sessionmaker[CachingSession]:  # noqa: N802
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.add_all([User(id=1, name="old"), User(id=2, name="other")])
        s.commit()
    with Session() as s:
        s.get(User, 1)  # cached
        s.get(User, 2)
    return Session


def _entry(cache: IdentityCache, pk: int) -> Any:
    raw = cache.store.get_many([cache.model_for(User.__mapper__).keys.row_key((pk,))])[0]
    return None if raw is None else codec.decode(raw)


def _read(Session: sessionmaker[CachingSession], pk: int = 1) -> str:  # noqa: N803
    with Session() as s:
        return s.get(User, pk).name


def test_a_joined_session_s_update_is_evicted_at_the_outer_commit_and_held_while_it_runs(
    engine: Engine, Session: sessionmaker[CachingSession], cache: IdentityCache, sql: Any, mode: str
) -> None:
    seen_during_commit = []
    with engine.connect() as conn:
        outer = conn.begin()
        with CachingSession(bind=conn, join_transaction_mode=mode, cache=cache) as joined:
            joined.get(User, 1).name = "new"
            joined.commit()  # durable only when `outer` commits
        # before the outer commit a reader loads the committed row, and may cache it
        assert _read(Session) == "old"
        assert _read(Session) == "old"

        @event.listens_for(conn, "commit")
        def read_during_the_commit(connection: Any) -> None:
            # the database commit has not happened yet: a reader loads "old" and must not cache it
            seen_during_commit.append(_read(Session))
            seen_during_commit.append(type(_entry(cache, 1)).__name__)

        outer.commit()
        event.remove(conn, "commit", read_during_the_commit)
        # committed; the connection has not been used or returned since
        with expect_sql(sql, selects=1):
            assert _read(Session) == "new"
        assert type(_entry(cache, 1)) is codec.Hold  # no fill until the eviction after the commit
    # returned to the pool: the post-commit eviction ran, fills resume
    assert type(_entry(cache, 1)) is codec.Tombstone
    assert _read(Session) == "new"
    with expect_sql(sql, 0):
        assert _read(Session) == "new"
    assert seen_during_commit == ["old", "Hold"]


def test_the_next_transaction_on_the_connection_ends_the_hold(
    engine: Engine, Session: sessionmaker[CachingSession], cache: IdentityCache, sql: Any, mode: str
) -> None:
    with engine.connect() as conn:
        outer = conn.begin()
        with CachingSession(bind=conn, join_transaction_mode=mode, cache=cache) as joined:
            joined.get(User, 1).name = "new"
            joined.commit()
        outer.commit()
        assert type(_entry(cache, 1)) is codec.Hold
        conn.begin()  # the connection goes on: its commit is done, so its eviction runs
        assert type(_entry(cache, 1)) is codec.Tombstone
        assert _read(Session) == "new"
        with expect_sql(sql, 0):
            assert _read(Session) == "new"
        conn.rollback()


def test_an_outer_rollback_leaves_only_committed_rows_in_the_cache(
    engine: Engine, Session: sessionmaker[CachingSession], cache: IdentityCache, sql: Any, mode: str
) -> None:
    with engine.connect() as conn:
        outer = conn.begin()
        with CachingSession(bind=conn, join_transaction_mode=mode, cache=cache) as joined:
            joined.get(User, 1).name = "never committed"
            joined.commit()
        assert _read(Session) == "old"
        outer.rollback()
    assert _read(Session) == "old"
    with expect_sql(sql, 0):
        assert _read(Session) == "old"


def test_a_bulk_update_in_a_joined_session_holds_the_whole_model_during_the_outer_commit(
    engine: Engine, Session: sessionmaker[CachingSession], cache: IdentityCache, sql: Any, mode: str
) -> None:
    seen_during_commit = []
    model = cache.model_for(User.__mapper__)
    with engine.connect() as conn:
        outer = conn.begin()
        with CachingSession(bind=conn, join_transaction_mode=mode, cache=cache) as s:
            s.execute(update(User).values(name="bulk"))
            s.commit()
        assert _read(Session, 2) == "other"

        @event.listens_for(conn, "commit")
        def read_during_the_commit(connection: Any) -> None:
            seen_during_commit.append(_read(Session, 2))
            generation = cache.store.get_many([model.keys.generation_key])[0]
            seen_during_commit.append(codec.is_held_generation(generation))

        outer.commit()
        event.remove(conn, "commit", read_during_the_commit)
        assert _read(Session, 2) == "bulk"
    assert _read(Session, 2) == "bulk"
    with expect_sql(sql, 0):
        assert _read(Session, 2) == "bulk"
    assert seen_during_commit == ["other", True]


def test_a_session_never_caches_rows_another_session_flushed_on_their_shared_connection(
    engine: Engine, Session: sessionmaker[CachingSession], cache: IdentityCache, sql: Any
) -> None:
    cache.evict(User, 1)  # not cached: the owner lookup below misses
    with engine.connect() as conn:
        owner = CachingSession(bind=conn, cache=cache)
        owner.connection()  # the owner begins the connection's transaction
        writer = CachingSession(bind=conn, cache=cache)  # joins it
        writer.get(User, 1).name = "uncommitted"
        writer.flush()
        # the owner reads the writer's row through the shared connection, as plain SQLAlchemy
        # does, and must not publish it
        with expect_sql(sql, selects=1):
            assert owner.get(User, 1).name == "uncommitted"
        assert type(_entry(cache, 1)) is codec.Tombstone  # nothing filled
        writer.close()
        owner.close()  # rolls the connection's transaction back
    assert _read(Session) == "old"
    assert _read(Session) == "old"
