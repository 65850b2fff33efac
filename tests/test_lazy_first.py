"""A lazy load of a cached collection is answered before SQLAlchemy builds its SELECT
(``CachingSession.cache_lazy_collection``, reached from the relationship's loader callable): the
same answer the SELECT's path (``do_orm_execute``) gives, without the statement, its cache key,
``Session.execute`` or a result. Wherever the SELECT's path would decide from the statement, or
SQLAlchemy would do something first, the loader steps aside and that path runs exactly as
before.

Each scenario is differential: the same read through a plain session and through a warm cache
must agree (the members in order, the attribute's history, the load paths of the members, what
is pending, or the error raised); a spying session counts the statements SQLAlchemy executed
during the lazy access, which tells whether the loader answered first."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from sqlalchemy import event, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import (
    defer,
    lazyload,
    noload,
    raiseload,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.orm.attributes import instance_state

from sa_cache import CachingSession, IdentityCache, _orm

from .counting import RedisCounter, SQLCounter, expect_commands, expect_sql
from .models_relationships import CACHED, Member, Role, ensure_tables
from .test_relationships import names, roles_and_abilities, seed, settle


class SpyingSession(CachingSession):
    """A caching session that counts the statements SQLAlchemy executes through it."""

    executed = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.executed += 1
        return super().execute(*args, **kwargs)


class PlainSpyingSession(PlainSession):
    executed = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.executed += 1
        return super().execute(*args, **kwargs)


@pytest.fixture
def rel(engine: Engine, cache: IdentityCache) -> Iterator[None]:
    ensure_tables(engine)
    for model in CACHED:
        cache.register(model)
    yield


@pytest.fixture
def spying(engine: Engine, cache: IdentityCache) -> sessionmaker[SpyingSession]:
    return sessionmaker(engine, class_=SpyingSession, cache=cache)


@pytest.fixture
def plain(engine: Engine) -> sessionmaker[PlainSpyingSession]:
    return sessionmaker(engine, class_=PlainSpyingSession)


def path_of(instance: Any) -> tuple[str, ...]:
    """An instance's load path (what a later lazy load with options resolves along)."""
    return tuple(str(element) for element in instance_state(instance).load_path.path)


def lazy(s: Any, parent: Any, key: str = "roles") -> Any:
    """Access ``parent.<key>`` as the application does, counting from zero what SQLAlchemy
    executes meanwhile; what a plain load leaves behind: the members in order, the attribute's
    history, the members' load paths, what the session holds pending."""
    s.executed = 0
    try:
        members = getattr(parent, key)
    except Exception as error:  # the same error from both sessions
        return ("raised", type(error).__name__)
    history = inspect(parent).attrs[key].history
    return (
        names(members),
        (names(history.added), names(history.unchanged), names(history.deleted)),
        [path_of(m) for m in members],
        (len(s.new), len(s.dirty), len(s.deleted)),
    )


class Scenario(NamedTuple):
    name: str
    read: Callable[[Any], Any]
    #: whether the cached session answers before SQLAlchemy executes anything (None: neither
    #: session executes anything: nothing to tell apart)
    first: bool | None


def member(s: Any) -> Any:
    return s.get(Member, 1)


def member_by(s: Any, *options: Any) -> Any:
    return s.scalars(select(Member).where(Member.id == 1).options(*options)).one()


def with_pending_role(s: Any) -> Any:
    parent = member(s)
    s.add(Role(id=9, name="new", users=[parent]))  # the backref queues it on the unloaded roles
    return parent


def expired(s: Any) -> Any:
    parent = member(s)
    s.expire(parent)
    return parent


def expired_and_gone(s: Any) -> Any:
    """The member, expired, after another transaction deleted it (put back after the load)."""
    parent = s.get(Member, 3)
    s.expire(parent)
    members = Member.__table__
    with s.bind.begin() as conn:
        conn.execute(members.delete().where(members.c.id == 3))
    try:
        return lazy(s, parent)
    finally:
        with s.bind.begin() as conn:
            conn.execute(members.insert().values(id=3, name="m3"))


def no_autoflush(s: Any, parent: Any) -> Any:
    with s.no_autoflush:
        return lazy(s, parent)


def with_listener(s: Any) -> Any:
    seen: list[Any] = []
    event.listen(s, "do_orm_execute", lambda state: seen.append(state.lazy_loaded_from))
    parent = member(s)
    found = lazy(s, parent)
    return found, [state is inspect(parent) for state in seen]


def in_savepoint(s: Any) -> Any:
    parent = member(s)
    savepoint = s.begin_nested()
    found = lazy(s, parent)
    savepoint.rollback()
    return found, s.in_transaction(), [r.id for r in parent.roles]


def history_only(s: Any) -> Any:
    parent = member(s)
    s.executed = 0
    return inspect(parent).attrs.roles.history, inspect(parent).attrs.roles.loaded_value


def abilities_of_roles(s: Any) -> Any:
    found = []
    for role in member(s).roles:
        found.append(lazy(s, role, "abilities"))  # s.executed: the last one's
    return found


def users_of_role(s: Any) -> Any:
    return lazy(s, s.get(Role, 2), "users")


SCENARIOS = [
    Scenario("a plain access", lambda s: lazy(s, member(s)), True),
    Scenario("a parent a query loaded", lambda s: lazy(s, member_by(s)), True),
    Scenario("the other side of a many-to-many (its backref)", users_of_role, True),
    Scenario("the collections of hydrated members", abilities_of_roles, True),
    Scenario("under no_autoflush", lambda s: no_autoflush(s, member(s)), True),
    Scenario("inside a savepoint", in_savepoint, True),
    Scenario(
        "loader options on the parent", lambda s: lazy(s, member_by(s, defer(Member.name))), False
    ),
    Scenario(
        "loader criteria on the parent",
        lambda s: lazy(
            s,
            member_by(s, with_loader_criteria(Role, Role.name != "staff", include_aliases=True)),
        ),
        False,
    ),
    Scenario(
        "lazyload with criteria (a per-instance loader)",
        lambda s: lazy(s, member_by(s, lazyload(Member.roles.and_(Role.name == "admin")))),
        False,
    ),
    Scenario("raiseload", lambda s: lazy(s, member_by(s, raiseload(Member.roles))), None),
    Scenario("noload", lambda s: lazy(s, member_by(s, noload(Member.roles))), None),
    Scenario("a pending parent", lambda s: lazy(s, _pending(s)), None),
    Scenario(
        "a pending change the load autoflushes", lambda s: lazy(s, with_pending_role(s)), False
    ),
    Scenario(
        "a pending change under no_autoflush",
        lambda s: no_autoflush(s, with_pending_role(s)),
        True,
    ),
    Scenario("an expired parent (refreshed first)", lambda s: lazy(s, expired(s)), False),
    Scenario("an expired parent deleted meanwhile", expired_and_gone, False),
    Scenario("another do_orm_execute listener", with_listener, False),
    Scenario("the attribute's history (no load)", history_only, None),
]


def _pending(s: Any) -> Any:
    parent = Member(id=50, name="new")
    s.add(parent)
    return parent


def warm_request(s: Any) -> Any:
    """Everything the scenarios read: the request's collections, the users of role 2."""
    return roles_and_abilities(s), names(s.get(Role, 2).users)


def run(factory: Callable[[], Any], read: Callable[[Any], Any]) -> tuple[Any, int]:
    with factory() as s:
        found = read(s)
        executed = s.executed
        s.rollback()
    return found, executed


@pytest.mark.usefixtures("rel")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_lazy_load_answered_first_is_the_load_sqlalchemy_makes(
    scenario: Scenario,
    Session: sessionmaker[CachingSession],  # noqa: N803
    spying: sessionmaker[SpyingSession],
    plain: sessionmaker[PlainSpyingSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, warm_request, sql)
    expected, plain_executed = run(plain, scenario.read)
    settle(Session, warm_request, sql)
    found, executed = run(spying, scenario.read)
    assert found == expected
    if scenario.first is None:
        assert executed == plain_executed == 0
    elif scenario.first:
        assert plain_executed > 0 and executed == 0, "answered before its SELECT was built"
    else:
        assert executed == plain_executed > 0, "the SELECT's path, as before"


# -- exact costs ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("rel")
def test_a_warm_collection_costs_one_read_and_no_statement(
    spying: sessionmaker[SpyingSession],
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    with spying() as s:
        parent = s.get(Member, 1)
        s.executed = 0
        # the collection's keys with the rows of the members last seen in it, in one read
        with expect_sql(sql, 0), expect_commands(redis_counter, {"MGET": 1}, round_trips=1):
            assert [r.id for r in parent.roles] == [1, 2]
        assert s.executed == 0


@pytest.mark.usefixtures("rel")
def test_a_missed_collection_is_read_once_then_selected_and_filled(
    spying: sessionmaker[SpyingSession],
    Session: sessionmaker[CachingSession],  # noqa: N803
    cache: IdentityCache,
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    """The loader's read is the miss's observation: the SELECT's path fills from it without
    reading the key again. A key this process evicted is read with its lease (one round trip),
    then filled (one), as before the loader answered first."""
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    cache.evict_collection(Member, "roles", 1)
    with spying() as s:
        parent = s.get(Member, 1)
        s.executed = 0
        with expect_sql(sql, selects=1), expect_commands(redis_counter, round_trips=2) as sent:
            assert [r.id for r in parent.roles] == [1, 2]
        assert s.executed == 1
        assert not sent.live or sent.commands["MGET"] == 1, "the key is read once"
    with spying() as s:
        parent = s.get(Member, 1)
        s.executed = 0
        with expect_sql(sql, 0):
            assert [r.id for r in parent.roles] == [1, 2]
        assert s.executed == 0


@pytest.mark.usefixtures("rel")
def test_a_collection_this_transaction_changed_is_selected_once(
    spying: sessionmaker[SpyingSession],
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    with spying() as s:
        s.execute(update(Role).where(Role.id == 1).values(name="root"))  # a bulk write
        parent = s.get(Member, 1)
        with expect_sql(sql, selects=1), expect_commands(redis_counter, {}):
            assert [r.name for r in parent.roles] == ["root", "staff"]


# -- stepping aside -------------------------------------------------------------------------------


@pytest.mark.usefixtures("rel")
def test_an_application_listener_still_sees_every_lazy_load(
    spying: sessionmaker[SpyingSession],
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    seen: list[Any] = []
    with spying() as s:

        @event.listens_for(s, "do_orm_execute")
        def note(state: Any) -> None:
            if state.lazy_loaded_from is not None:
                seen.append(_orm.lazy_loaded_relationship(state))

        assert roles_and_abilities(s) == [("admin", ["read", "write"]), ("staff", ["a"])]
    assert seen == [Member.roles.property, Role.abilities.property, Role.abilities.property]


@pytest.mark.usefixtures("rel")
def test_sessions_without_the_cache_get_sqlalchemys_loader(
    engine: Engine,
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    impl = inspect(Member).class_manager["roles"].impl
    assert getattr(impl.callable_, "_sa_cache_original", None) is not None, "answers first"
    for factory in (
        sessionmaker(engine, class_=CachingSession, cache=None),
        sessionmaker(engine, class_=CachingSession, cache=IdentityCache()),  # not registered
        sessionmaker(engine),
    ):
        with factory() as s:
            parent = s.get(Member, 1)
            with expect_sql(sql, selects=1):
                assert [r.id for r in parent.roles] == [1, 2]


@pytest.mark.usefixtures("rel")
def test_a_level_that_forbids_hits_selects(
    engine: Engine,
    db: str,
    cache: IdentityCache,
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
) -> None:
    if db == "sqlite":
        pytest.skip("SQLite's SERIALIZABLE is its only level")
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    with SpyingSession(serializable, cache=cache) as s:
        parent = s.get(Member, 1)
        s.executed = 0
        with expect_sql(sql, selects=1):
            assert [r.id for r in parent.roles] == [1, 2]
        assert s.executed == 1


@pytest.mark.usefixtures("rel")
def test_session_execution_options_leave_the_load_to_its_select(
    engine: Engine,
    cache: IdentityCache,
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
) -> None:
    if "execution_options" not in vars(PlainSession):
        pytest.skip("Session.execution_options exists from SQLAlchemy 2.1")
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    with SpyingSession(engine, cache=cache, execution_options={"populate_existing": True}) as s:
        parent = s.get(Member, 1)
        s.executed = 0
        with expect_sql(sql, selects=1):
            assert [r.id for r in parent.roles] == [1, 2]
        assert s.executed == 1
