"""Where the database promises first-updater-wins, serializability or locking reads (PostgreSQL
REPEATABLE READ and SERIALIZABLE, MariaDB SERIALIZABLE, MariaDB REPEATABLE READ with
``innodb_snapshot_isolation``), the promise holds with the cache as without it: lookups in such
transactions neither answer from the cache nor fill it, so a read-modify-write that loses to a
concurrent commit fails with the cache exactly as it fails without it, and no update is lost."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache

from .counting import counting_sql, expect_sql
from .models import User

#: (database, reader level, innodb_snapshot_isolation for the reader's connections)
PROMISING = [
    ("postgresql", "REPEATABLE READ", False),
    ("postgresql", "SERIALIZABLE", False),
    ("mariadb", "SERIALIZABLE", False),
    ("mariadb", "REPEATABLE READ", True),
]


def _engine_like(engine: Engine, *statements: str, **options: Any) -> Engine:
    """A new engine (its own pool) on ``engine``'s database, each connection set up with
    ``statements``."""
    url = engine.url.render_as_string(hide_password=False)
    made = create_engine(url, **options)

    @event.listens_for(made, "connect")
    def set_up(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for statement in statements:
            cursor.execute(statement)
        cursor.close()

    return made


@pytest.fixture
def promising(
    engine: Engine, db: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Engine, Engine]]:
    """(reader engine at the promising level, writer engine) for the parametrized case."""
    want, level, snapshot_isolation = request.param
    if db != want:
        pytest.skip(f"a {want} promise")
    reader_setup = []
    writer_setup = []
    if db == "mariadb":
        flag = "ON" if snapshot_isolation else "OFF"
        reader_setup.append(f"SET SESSION innodb_snapshot_isolation = {flag}")
        # a writer blocked by a reader's shared lock gives up at once instead of hanging the test
        writer_setup.append("SET SESSION innodb_lock_wait_timeout = 1")
    reader = _engine_like(engine, *reader_setup, isolation_level=level)
    writer = _engine_like(engine, *writer_setup)
    yield reader, writer
    reader.dispose()
    writer.dispose()


def _outcome(action: Any) -> str:
    try:
        action()
    except exc.DBAPIError as error:
        return type(error.orig).__name__ if error.orig is not None else type(error).__name__
    return "ok"


def read_modify_write_race(
    reader: Engine, writer: Engine, cache: IdentityCache | None
) -> tuple[str, str, str]:
    """T1 reads user 1 at the promising level; T2 renames it and commits; T1 appends to the name
    it read and commits. Returns (T2's outcome, T1's outcome, the committed name)."""
    Reader = sessionmaker(reader, class_=CachingSession, cache=cache)
    Writer = sessionmaker(writer, class_=CachingSession, cache=cache)
    with Writer() as s:
        existing = s.get(User, 1)
        if existing is not None:
            s.delete(existing)
            s.flush()
        s.add(User(id=1, name="v0"))
        s.commit()
    with Writer() as s:
        s.get(User, 1)  # warm: the row is in the cache, if there is one

    def rename_in_t2() -> None:
        with Writer() as t2:
            t2.get(User, 1).name = "t2"
            t2.commit()

    with Reader() as t1:
        user = t1.get(User, 1)  # without a cache, its snapshot (and locks) begin here
        t2_outcome = _outcome(rename_in_t2)

        def append_in_t1() -> None:
            user.name = user.name + "+t1"
            t1.commit()

        t1_outcome = _outcome(append_in_t1)
    with Writer() as s:
        name = s.get(User, 1, populate_existing=True).name
    return t2_outcome, t1_outcome, name


@pytest.mark.parametrize("promising", PROMISING, indirect=True, ids=lambda p: f"{p[0]}-{p[1]}")
def test_a_read_modify_write_loses_to_a_concurrent_commit_as_without_the_cache(
    promising: tuple[Engine, Engine], cache: IdentityCache
) -> None:
    reader, writer = promising
    without_cache = read_modify_write_race(reader, writer, None)
    with_cache = read_modify_write_race(reader, writer, cache)
    assert with_cache == without_cache
    t2_outcome, t1_outcome, name = with_cache
    # one of the two failed, and the committed name is the other's whole update: nothing lost
    assert (t2_outcome == "ok") != (t1_outcome == "ok")
    assert name == ("t2" if t2_outcome == "ok" else "v0+t1")


@pytest.mark.parametrize("promising", PROMISING, indirect=True, ids=lambda p: f"{p[0]}-{p[1]}")
def test_lookups_at_a_promising_level_skip_the_cache_and_fill_nothing(
    promising: tuple[Engine, Engine], cache: IdentityCache
) -> None:
    reader, writer = promising
    Writer = sessionmaker(writer, class_=CachingSession, cache=cache)
    Reader = sessionmaker(reader, class_=CachingSession, cache=cache)
    with Writer() as s:
        s.add_all([User(id=1, name="cached"), User(id=2, name="cold")])
        s.commit()
    with Writer() as s:
        s.get(User, 1)
    model = cache.model_for(User.__mapper__)
    before = model.stats.skipped
    with counting_sql(reader) as reader_sql, counting_sql(writer) as writer_sql:
        with expect_sql(reader_sql, selects=2), Reader() as s:
            assert s.get(User, 1).name == "cached"  # cached, yet loaded
            assert s.get(User, 2).name == "cold"  # a miss that fills nothing
        assert model.stats.skipped - before == 2
        with expect_sql(writer_sql, selects=1), Writer() as s:
            assert s.get(User, 2).name == "cold"  # still not cached
        with expect_sql(writer_sql, 0), Writer() as s:
            assert s.get(User, 1).name == "cached"


def _with_user_cached(engine: Engine, cache: IdentityCache) -> sessionmaker[CachingSession]:
    """A caching session factory on ``engine``, user 1 ("a") committed and cached."""
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.add(User(id=1, name="a"))
        s.commit()
    with Session() as s:
        s.get(User, 1)
    return Session


def test_mariadb_repeatable_read_without_snapshot_isolation_keeps_its_hits(
    engine: Engine, db: str, cache: IdentityCache, sql: Any
) -> None:
    """MariaDB's default REPEATABLE READ promises no first-updater-wins: hits are served."""
    if db != "mariadb":
        pytest.skip("MariaDB's default level")
    Session = _with_user_cached(engine, cache)
    with expect_sql(sql, 0), Session() as s:
        assert s.get(User, 1).name == "a"


def test_a_transaction_that_asks_for_a_promising_level_on_its_connection_skips_the_cache(
    engine: Engine, db: str, cache: IdentityCache, sql: Any
) -> None:
    """``session.connection(execution_options={"isolation_level": ...})`` sets the level of the
    transaction the lookup runs in: its connection's level is what counts, not the engine's."""
    if db != "postgresql":
        pytest.skip("PostgreSQL's levels")
    Session = _with_user_cached(engine, cache)
    with Session() as s:
        s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        with expect_sql(sql, selects=1):
            assert s.get(User, 1).name == "a"
    with expect_sql(sql, 0), Session() as s:  # READ COMMITTED again: a hit
        assert s.get(User, 1).name == "a"
