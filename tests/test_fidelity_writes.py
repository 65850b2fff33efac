"""Writes the cache must see as SQLAlchemy runs them (issue "A hit is the load SQLAlchemy would
have done", points 7, 10 and 11). Every test runs one scenario twice, through a plain session
and through the caching one, from the same rows (the caching run with rows 1 and 3 cached, row 2
cold and row 9 cached as absent), and asserts both saw the same: inside the writing transaction,
after its rollback and after its commit.

- 7: a statement evicts by the database table it writes, whatever names it (a lightweight
  ``table()``, a ``Table`` of another metadata, ``aliased(Model)``, another mapped class, every
  table of a MariaDB multi-table UPDATE), and counts as a write (nothing is filled until the
  transaction ends).
- 10: ORM ``update()`` / ``delete()`` keep the caller's ``synchronize_session``.
- 11: ``bulk_save_objects`` does what SQLAlchemy's does: no load, no autoflush.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    column,
    delete,
    func,
    insert,
    table,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased, sessionmaker

from sa_cache import CachingSession, IdentityCache

from . import models
from .counting import SQLCounter
from .models import Employee, User
from .models_writes import UserRecord

Factory = Callable[..., Any]
PKS = (1, 2, 3, 9)


def reset(engine: Engine, cache: IdentityCache | None) -> None:
    """Users u1-u3 and employee e1; with a cache: users 1 and 3 and employee 1 cached, user 9
    cached as absent, user 2 not cached (one lookup per session: a REPEATABLE READ session
    fills only its first)."""
    with engine.begin() as conn:
        for t in reversed(models.Base.metadata.sorted_tables):
            conn.execute(t.delete())
        conn.execute(
            insert(User.__table__),
            [{"id": i, "name": f"u{i}", "active": True, "version": 1} for i in (1, 2, 3)],
        )
        conn.execute(insert(Employee.__table__), [{"id": 1, "name": "e1", "kind": "employee"}])
    if cache is None:
        return
    cache.evict_model(User)
    cache.evict_model(Employee)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    for model, pk in ((User, 1), (User, 3), (User, 9), (Employee, 1)):
        with Session() as s:
            s.get(model, pk)


def names(s: Any, pks: tuple[int, ...] = PKS) -> list[str | None]:
    return [u.name if u is not None else None for u in (s.get(User, pk) for pk in pks)]


def after(factory: Factory) -> list[Any]:
    """What fresh sessions read: each user in its own session, then employee 1."""
    seen: list[Any] = []
    for pk in PKS:
        with factory() as s:
            seen.extend(names(s, (pk,)))
    with factory() as s:
        seen.append(s.get(Employee, 1).name)
    return seen


def differential(
    engine: Engine, Session: sessionmaker[CachingSession], cache: IdentityCache, scenario: Any
) -> list[Any]:
    """Run ``scenario(factory)`` through a plain session factory and through the caching one,
    each from :func:`reset` rows, and assert they saw the same; returns what they saw."""
    reset(engine, None)
    plain = scenario(sessionmaker(engine))
    reset(engine, cache)
    cached = scenario(Session)
    assert cached == plain
    return plain


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as error:  # the same error, or the same answer
        return type(error).__name__


# -- 7: eviction follows the database table ------------------------------------------------------

light = table("users", column("id"), column("name"), column("active"), column("version"))
other = Table(
    "users",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("name", String(50)),
    Column("active", Boolean),
    Column("version", Integer),
)
alias = aliased(User)

STATEMENTS = {
    "update-table()": lambda: update(light).where(light.c.id.in_([1, 2])).values(name="new"),
    "delete-table()": lambda: delete(light).where(light.c.id.in_([1, 2])),
    "insert-table()": lambda: insert(light).values(id=9, name="nine", active=True, version=1),
    "insert-table()-executemany": lambda: (
        insert(light),
        [{"id": 9, "name": "nine", "active": True, "version": 1}],
    ),
    "update-other-metadata": lambda: update(other).where(other.c.id.in_([1, 2])).values(name="o"),
    "delete-other-metadata": lambda: delete(other).where(other.c.id == 1),
    "insert-other-metadata": lambda: (
        insert(other),
        [{"id": 9, "name": "nine", "active": True, "version": 1}],
    ),
    "update-aliased": lambda: update(alias).where(alias.id.in_([1, 2])).values(name="al"),
    "delete-aliased": lambda: delete(alias).where(alias.id == 1),
    "update-aliased-fetch": lambda: update(alias)
    .where(alias.id.in_([1, 2]))
    .values(name="al")
    .execution_options(synchronize_session="fetch"),
}


def execute(s: Any, statement: Any) -> Any:
    if isinstance(statement, tuple):
        return s.execute(*statement).rowcount
    return s.execute(statement).rowcount


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_a_statement_evicts_by_the_table_it_writes_whatever_names_it(
    engine, Session, cache, name
):
    statement = STATEMENTS[name]

    def scenario(factory: Factory) -> list[Any]:
        seen: list[Any] = []
        with factory() as s:
            seen.append(outcome(lambda: execute(s, statement())))
            seen.append(names(s))  # its own write, uncommitted; nothing may be filled
            s.rollback()
        seen.append(after(factory))
        with factory() as s:
            seen.append(outcome(lambda: execute(s, statement())))
            s.commit()
        seen.append(after(factory))
        return seen

    differential(engine, Session, cache, scenario)


@pytest.mark.parametrize("how", ["flush", "bulk_update_mappings", "bulk_save_objects", "orm"])
def test_a_second_unregistered_class_on_a_cached_table_evicts_its_rows(
    engine, Session, cache, how
):
    def scenario(factory: Factory) -> list[Any]:
        seen: list[Any] = []
        for end in ("rollback", "commit"):
            with factory() as s:
                if how == "flush":
                    s.get(UserRecord, 1).name = "rec"
                    s.add(UserRecord(id=9, name="nine"))
                    s.delete(s.get(UserRecord, 3))
                    s.flush()
                elif how == "bulk_update_mappings":
                    s.bulk_update_mappings(UserRecord, [{"id": 1, "name": "rec"}])
                elif how == "bulk_save_objects":
                    s.bulk_save_objects([UserRecord(id=9, name="nine", active=True, version=1)])
                else:
                    s.execute(update(UserRecord).where(UserRecord.id == 1).values(name="rec"))
                seen.append(names(s))
                getattr(s, end)()
            seen.append(after(factory))
        return seen

    differential(engine, Session, cache, scenario)


@pytest.mark.parametrize("form", ["core", "orm"])
def test_a_mariadb_multi_table_update_evicts_every_table_it_sets(engine, Session, cache, db, form):
    if db != "mariadb":
        pytest.skip("UPDATE of several tables is MySQL/MariaDB's")
    users, employees = User.__table__, Employee.__table__

    def statement() -> Any:
        if form == "core":
            return (
                update(users)
                .where(users.c.id == employees.c.id)
                .values({users.c.name: "x", employees.c.name: "y"})
            )
        return (
            update(User)
            .where(User.id == Employee.id)
            .values({User.name: "x", Employee.name: "y"})
            .execution_options(synchronize_session=False)
        )

    def scenario(factory: Factory) -> list[Any]:
        with factory() as s:
            rowcount = s.execute(statement()).rowcount
            s.commit()
        return [rowcount, after(factory)]

    assert differential(engine, Session, cache, scenario)[1][-1] == "y"


# -- 10: synchronize_session keeps its meaning ----------------------------------------------------

SYNC = ["auto", "evaluate", "fetch", False]


@pytest.mark.parametrize("sync", SYNC)
def test_an_orm_update_keeps_the_callers_synchronize_session(engine, Session, cache, sync):
    def scenario(factory: Factory) -> list[Any]:
        seen: list[Any] = []
        with factory(autoflush=False) as s:
            pending = s.get(User, 1)
            pending.name = "pending"  # unflushed: "evaluate" overwrites it, "fetch" does not
            stmt = update(User).where(User.id.in_([1, 2])).values(name="bulk")
            seen.append(s.execute(stmt.execution_options(synchronize_session=sync)).rowcount)
            seen.append((pending.name, pending in s.dirty))
            s.commit()
        seen.append(after(factory))
        return seen

    differential(engine, Session, cache, scenario)


@pytest.mark.parametrize("sync", SYNC)
@pytest.mark.parametrize("verb", ["update", "delete"])
def test_criteria_python_cannot_evaluate_behave_as_without_the_cache(
    engine, Session, cache, sync, verb
):
    def scenario(factory: Factory) -> list[Any]:
        seen: list[Any] = []
        with factory() as s:
            s.get(User, 1)
            stmt: Any = delete(User) if verb == "delete" else update(User).values(name="low")
            stmt = stmt.where(func.lower(User.name) == "u1")
            stmt = stmt.execution_options(synchronize_session=sync)
            seen.append(outcome(lambda: s.execute(stmt).rowcount))
            seen.append(names(s))
            s.commit()
        seen.append(after(factory))
        return seen

    differential(engine, Session, cache, scenario)


@pytest.mark.parametrize("sync", SYNC)
def test_an_orm_delete_removes_the_objects_sqlalchemy_would(engine, Session, cache, sync):
    def scenario(factory: Factory) -> list[Any]:
        seen: list[Any] = []
        with factory(autoflush=False) as s:
            changed, other = s.get(User, 1), s.get(User, 2)
            changed.name = "changed"  # "evaluate" matches in Python: this one no longer matches
            stmt = delete(User).where(User.name.in_(["u1", "u2"]))
            seen.append(s.execute(stmt.execution_options(synchronize_session=sync)).rowcount)
            seen.append((changed in s, other in s))
            seen.append(outcome(s.commit))
            s.rollback()
        seen.append(after(factory))
        return seen

    differential(engine, Session, cache, scenario)


# -- 11: the legacy bulk methods are left to do what they do --------------------------------------


def test_bulk_save_objects_neither_loads_nor_autoflushes(engine, Session, cache, sql: SQLCounter):
    def scenario(factory: Factory) -> list[Any]:
        seen: list[Any] = []
        with factory() as s:
            expired = s.get(User, 1)
            s.commit()  # expired, its primary key too
            expired.name = "bulk"
            s.add(User(id=7, name="pending"))
            sql.reset()
            seen.append(outcome(lambda: s.bulk_save_objects([expired, User(id=8, name="8")])))
            seen.append([" ".join(statement.split()[:3]) for statement in sql.statements])
            seen.append(sorted(u.id for u in s.new))
            s.rollback()
        with factory() as s:
            seen.append([u.name if u else None for u in (s.get(User, pk) for pk in (1, 7, 8))])
        seen.append(after(factory))
        return seen

    differential(engine, Session, cache, scenario)


def test_bulk_save_objects_evicts_what_it_writes_in_the_bulk_order(engine, Session, cache, sql):
    def scenario(factory: Factory) -> list[Any]:
        seen: list[Any] = []
        with factory() as s:
            detached = s.get(User, 1)
        detached.name = "saved"
        with factory() as s:
            s.add(User(id=7, name="pending"))
            sql.reset()
            s.bulk_save_objects([User(id=9, name="nine"), detached], preserve_order=True)
            seen.append([" ".join(statement.split()[:3]) for statement in sql.statements])
            seen.append(names(s))
            s.commit()
        seen.append(after(factory))
        return seen

    differential(engine, Session, cache, scenario)
