"""Behaviour differences SQLAlchemy's own test suite found under the cache (docs/
sqlalchemy-suite.md), pinned here on every database and store: each scenario gives plain
SQLAlchemy's answer through a caching session."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, case, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, registry

from sa_cache import CachingSession, CachingSessionMixin, IdentityCache

from .counting import expect_sql
from .models import User


@pytest.fixture
def rows(engine: Engine) -> None:
    with Session(engine) as s:
        s.add_all([User(id=7, name="seven"), User(id=8, name="eight")])
        s.commit()


@pytest.mark.usefixtures("rows")
def test_an_update_run_as_from_statement_returning_is_tracked_like_any_update(engine, cache):
    """``select(User).from_statement(update(...).returning(User))``: the DML inside is seen."""
    if not engine.dialect.update_returning:
        pytest.skip("the dialect has no UPDATE ... RETURNING")
    with CachingSession(engine, cache=cache) as s:
        s.get(User, 7)  # cached
    statement = select(User).from_statement(
        update(User).where(User.id == 7).values(name="renamed").returning(User)
    )
    answers = []
    for session in (Session(engine), CachingSession(engine, cache=cache)):
        with session as s:
            answers.append([u.name for u in s.scalars(statement)])
            s.rollback()
    assert answers[0] == answers[1] == ["renamed"]
    with CachingSession(engine, cache=cache) as s:
        assert [u.name for u in s.scalars(statement)] == ["renamed"]
        s.commit()
    with CachingSession(engine, cache=cache) as s:
        assert s.get(User, 7).name == "renamed"  # the commit evicted the cached row


class Routing(Session):
    """An application's own get_bind, which counts its calls."""

    calls: list[str]

    def get_bind(self, mapper: Any = None, *, clause: Any = None, **kw: Any) -> Any:
        self.calls.append(type(clause).__name__)
        return super().get_bind(mapper, clause=clause, **kw)


class CachingRouting(CachingSessionMixin, Routing):
    pass


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize("how", ["auto", "evaluate", "fetch", False])
def test_an_applications_get_bind_is_called_as_often_as_without_the_cache(engine, cache, how):
    calls = {}
    sessions = {"plain": Routing(engine), "cached": CachingRouting(engine, cache=cache)}
    for name, session in sessions.items():
        session.calls = []
        with session as s:
            s.execute(
                update(User).where(User.id == 7).values(name="x"),
                execution_options={"synchronize_session": how},
            )
            calls[name] = list(s.calls)
            s.rollback()
    assert calls["cached"] == calls["plain"]


def test_a_hit_on_a_hierarchy_whose_polymorphic_on_is_an_expression(engine, backend, cache_factory):
    metadata = MetaData()
    people = Table(
        "fid_people",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("type", String(1)),
        Column("data", String(20)),
    )

    class Person:
        pass

    class Boss(Person):
        pass

    mapper_registry = registry(metadata=metadata)
    base = mapper_registry.map_imperatively(
        Person,
        people,
        polymorphic_identity="person",
        polymorphic_on=case({"P": "person", "B": "boss"}, value=people.c.type),
    )
    mapper_registry.map_imperatively(Boss, inherits=base, polymorphic_identity="boss")
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(people.insert(), {"id": 55, "type": "B", "data": "original"})
    cache: IdentityCache = cache_factory(backend)
    cache.register(Person)
    try:
        seen = []
        for _miss_then_hit in range(2):
            with CachingSession(engine, cache=cache) as s:
                found = s.get(Person, 55)
                seen.append((type(found).__name__, found.data))
        with Session(engine) as s:
            found = s.get(Person, 55)
            plain = (type(found).__name__, found.data)
        assert seen == [plain, plain] == [("Boss", "original")] * 2
        assert cache.stats()["models"]["Person"]["hits"] == 1
    finally:
        metadata.drop_all(engine)
        mapper_registry.dispose()


@pytest.mark.usefixtures("rows")
def test_a_get_bind_replaced_on_the_session_is_called_as_often_as_without_the_cache(engine, cache):
    calls = {}
    for name, session in (
        ("plain", Session(engine)),
        ("cached", CachingSession(engine, cache=cache)),
    ):
        seen: list[Any] = []
        original = session.get_bind

        def get_bind(
            *args: Any, _seen: list[Any] = seen, _original: Any = original, **kw: Any
        ) -> Any:
            _seen.append(sorted(kw))
            return _original(*args, **kw)

        session.get_bind = get_bind  # type: ignore[method-assign]
        with session as s:
            s.execute(update(User).where(User.id == 7).values(name="x"))
            s.rollback()
        calls[name] = seen
    assert calls["cached"] == calls["plain"]


# -- a session on a Connection whose transaction it did not begin ---------------------------------


def test_a_row_written_uncommitted_on_the_sessions_connection_never_reaches_the_cache(
    engine, cache
):
    with engine.connect() as conn:
        conn.execute(User.__table__.insert(), {"id": 9, "name": "never committed"})
        with CachingSession(bind=conn, cache=cache) as s:
            assert s.get(User, 9).name == "never committed"  # as plain SQLAlchemy: its connection
        conn.rollback()
    with CachingSession(engine, cache=cache) as s:
        assert s.get(User, 9) is None
    assert cache.stats()["models"]["User"]["skipped"] == 1


def test_a_cached_absence_never_hides_a_row_the_sessions_connection_wrote(engine, cache):
    with CachingSession(engine, cache=cache) as s:
        assert s.get(User, 9) is None  # "no row 9" cached
    with engine.connect() as conn:
        conn.execute(User.__table__.insert(), {"id": 9, "name": "mine"})
        with CachingSession(bind=conn, cache=cache) as s:
            assert s.get(User, 9).name == "mine"
        conn.rollback()


@pytest.mark.usefixtures("rows")
def test_the_outer_transaction_test_recipe_publishes_nothing_it_rolls_back(engine, cache):
    """SQLAlchemy's "joining a session into an external transaction" recipe."""
    with engine.connect() as conn:
        outer = conn.begin()
        with CachingSession(
            bind=conn, cache=cache, join_transaction_mode="create_savepoint"
        ) as s:
            s.get(User, 7).name = "inside the test"
            s.commit()  # releases the savepoint; the outer transaction is still open
            assert s.get(User, 7).name == "inside the test"
        outer.rollback()
    with Session(engine) as plain, CachingSession(engine, cache=cache) as s:
        # "seven" where the driver rolls a released savepoint back with its transaction
        # (pysqlite's own transaction handling does not: the plain session says so too)
        assert s.get(User, 7).name == plain.get(User, 7).name


@pytest.mark.usefixtures("rows")
def test_a_session_on_a_connection_it_begins_itself_uses_the_cache(engine, cache, sql):
    with CachingSession(engine, cache=cache) as s:
        s.get(User, 7)  # cached
    with engine.connect() as conn, CachingSession(bind=conn, cache=cache) as s, expect_sql(sql, 0):
        assert s.get(User, 7).name == "seven"  # a hit: the session's own transaction
