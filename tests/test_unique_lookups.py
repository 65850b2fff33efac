"""Lookups by a unique column (issue 13, points 2 and 4): ``register(Account, unique=[...])``
caches ``select(Account).where(Account.email == x)`` in its plain forms as "this value names
this primary key" (or no row), and serves the row through the row cache; a change of the column
evicts the old and the new value; a column the database compares loosely is never served.

Each scenario is differential: the same read through a plain session and through the cache,
cold and warm, must agree, on SQLite, PostgreSQL and MariaDB, with Redis and the in-process
store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import and_, create_engine, delete, event, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import load_only, sessionmaker
from sqlalchemy.pool import StaticPool

from sa_cache import CachingSession, IdentityCache, collations
from sa_cache.errors import CacheError

from .counting import RedisCounter, SQLCounter, expect_commands, expect_sql
from .models import Employee
from .models_unique import Account, Invoice, Profile, ensure_tables
from .test_async import run

Read = Callable[[Any], Any]


@pytest.fixture
def uq(engine: Engine, cache: IdentityCache) -> Iterator[None]:
    ensure_tables(engine)
    cache.register(Account, unique=["email", "login", ("tenant", "handle")])
    cache.register(Invoice)
    cache.register(Profile)
    with sessionmaker(engine)() as s:
        s.add_all(
            [
                Account(id=1, email="a@x", login="ann", tenant=1, handle="ann", name="Ann"),
                Account(id=2, email="b@x", login="bob", tenant=1, handle="bob", name="Bob"),
                Account(id=3, email="c@x", login=None, tenant=2, handle="ann", name="Cy"),
            ]
        )
        s.flush()
        s.add_all(
            [Invoice(id=1, account_email="c@x", total=10), Profile(id=1, account_id=1, bio="hi")]
        )
        s.commit()
    yield


@pytest.fixture
def plain(engine: Engine) -> sessionmaker[PlainSession]:
    return sessionmaker(engine)


def seen(obj: Any) -> Any:
    """An account as the tests compare it."""
    return None if obj is None else (obj.id, obj.email, obj.name)


def outcome(factory: Callable[[], Any], read: Read) -> Any:
    with factory() as session:
        return read(session)


def agree(plain: Any, cached: Any, read: Read) -> Any:
    """The plain answer, after checking the cache's cold and warm answers are the same."""
    expected = outcome(plain, read)
    for attempt in ("cold", "warming", "warm"):
        assert outcome(cached, read) == expected, attempt
    return expected


def settle(factory: Callable[[], Any], read: Read, sql: SQLCounter, runs: int = 10) -> None:
    """Run ``read`` until a run costs no SQL: a lookup's first run caches which row holds the
    value, its second the row itself (unless a ``get`` cached it already). Under MariaDB's
    REPEATABLE READ a miss after the transaction's first SELECT fills only what the store's
    clock proves no older than the snapshot (docs/protocol.md), so a read of several values
    may warm one of them per run."""
    for _ in range(runs):
        sql.reset()
        outcome(factory, read)
        if not sql.statements:
            return
    raise AssertionError(f"still {sql.statements} after {runs} runs")


#: the recognised forms of one lookup by email, each returning an account or None
FORMS: dict[str, Callable[[str], Read]] = {
    "where.scalar_one_or_none": lambda v: lambda s: seen(
        s.execute(select(Account).where(Account.email == v)).scalar_one_or_none()
    ),
    "filter_by.first": lambda v: lambda s: seen(
        (s.execute(select(Account).filter_by(email=v)).first() or [None])[0]
    ),
    "scalars.first": lambda v: lambda s: seen(
        s.scalars(select(Account).where(Account.email == v)).first()
    ),
    "query.filter.first": lambda v: lambda s: seen(
        s.query(Account).filter(Account.email == v).first()
    ),
    "query.filter_by.one_or_none": lambda v: lambda s: seen(
        s.query(Account).filter_by(email=v).one_or_none()
    ),
}


def by_email(value: str) -> Read:
    return FORMS["where.scalar_one_or_none"](value)


# -- reads ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("uq")
@pytest.mark.parametrize("form", list(FORMS))
def test_every_plain_form_of_a_lookup_by_email_answers_as_the_database(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
    form: str,
) -> None:
    for value in ("a@x", "nobody@x"):
        read = FORMS[form](value)
        agree(plain, Session, read)
        settle(Session, read, sql)
    with expect_sql(sql, 0):
        assert outcome(Session, FORMS[form]("a@x")) == (1, "a@x", "Ann")
        assert outcome(Session, FORMS[form]("nobody@x")) is None


@pytest.mark.usefixtures("uq")
def test_a_warm_lookup_costs_no_sql_and_two_store_round_trips(
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    settle(Session, by_email("a@x"), sql)
    settle(Session, by_email("nobody@x"), sql)
    with expect_sql(sql, 0), expect_commands(redis_counter, round_trips=2):
        assert outcome(Session, by_email("a@x")) == (1, "a@x", "Ann")
    # a cached absence needs no row
    with expect_sql(sql, 0), expect_commands(redis_counter, round_trips=1):
        assert outcome(Session, by_email("nobody@x")) is None


@pytest.mark.usefixtures("uq")
def test_the_instance_the_session_holds_is_the_one_returned(
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    settle(Session, by_email("a@x"), sql)
    with Session() as s:
        held = s.get(Account, 1)
        with expect_sql(sql, 0), expect_commands(redis_counter, round_trips=1):
            found = s.execute(select(Account).where(Account.email == "a@x")).scalar_one()
        assert found is held
        held.name = "changed, not flushed"
        s.expire(held, ["name"])  # expired: a SELECT would load it; so does the cache's answer
        with expect_sql(sql, selects=1):
            assert s.query(Account).filter_by(email="a@x").one() is held


@pytest.mark.usefixtures("uq")
def test_a_composite_unique_is_looked_up_by_all_its_columns(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    def both(s: Any) -> Any:
        one = s.execute(
            select(Account).where(and_(Account.tenant == 2, Account.handle == "ann"))
        ).scalar_one_or_none()
        two = s.query(Account).filter_by(handle="ann", tenant=1).first()
        return seen(one), seen(two)

    assert agree(plain, Session, both) == ((3, "c@x", "Cy"), (1, "a@x", "Ann"))
    settle(Session, both, sql)


@pytest.mark.usefixtures("uq")
@pytest.mark.parametrize(
    "shape",
    ["order_by", "extra criterion", "for update", "load_only", "populate_existing", "columns"],
)
def test_a_lookup_with_anything_more_is_left_to_the_database(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
    shape: str,
) -> None:
    statement = {
        "order_by": select(Account).where(Account.email == "a@x").order_by(Account.id),
        "extra criterion": select(Account).where(Account.email == "a@x", Account.name == "Ann"),
        "for update": select(Account).where(Account.email == "a@x").with_for_update(),
        "load_only": select(Account)
        .where(Account.email == "a@x")
        .options(load_only(Account.name, Account.email)),
        "populate_existing": select(Account)
        .where(Account.email == "a@x")
        .execution_options(populate_existing=True),
        "columns": select(Account.id).where(Account.email == "a@x"),
    }[shape]

    def read(s: Any) -> Any:
        return [tuple(row) if shape == "columns" else seen(row[0]) for row in s.execute(statement)]

    settle(Session, by_email("a@x"), sql)
    agree(plain, Session, read)
    with expect_sql(sql, selects=1):
        outcome(Session, read)


@pytest.mark.usefixtures("uq")
def test_pending_changes_leave_the_lookup_to_the_autoflush(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    settle(Session, by_email("d@x"), sql)  # cached: no such account

    def read(s: Any) -> Any:
        s.add(Account(id=4, email="d@x", tenant=3, handle="d", name="Di"))
        found = seen(s.execute(select(Account).where(Account.email == "d@x")).scalar_one())
        s.rollback()
        return found

    assert agree(plain, Session, read) == (4, "d@x", "Di")


# -- eviction -------------------------------------------------------------------------------------


def lookups(s: Any) -> Any:
    return [
        seen(s.query(Account).filter_by(email=value).one_or_none())
        for value in ("a@x", "b@x", "z@x")
    ]


def warm_lookups(Session: Any, sql: SQLCounter) -> None:  # noqa: N803
    settle(Session, lookups, sql)


@pytest.mark.usefixtures("uq")
@pytest.mark.parametrize(
    "change",
    [
        "update email",
        "swap emails",
        "delete",
        "insert",
        "bulk update",
        "core update",
        "core insert",
    ],
)
def test_a_committed_change_of_who_holds_a_value_is_seen(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
    change: str,
) -> None:
    warm_lookups(Session, sql)
    table = Account.__table__
    with Session() as s:
        if change == "update email":
            s.get(Account, 1).email = "z@x"  # old value a@x, new value z@x (cached absent)
        elif change == "swap emails":
            a, b = s.get(Account, 1), s.get(Account, 2)
            a.email = "tmp@x"
            s.flush()
            b.email = "a@x"
            s.flush()
            a.email = "b@x"
        elif change == "delete":
            s.delete(s.get(Account, 2))
        elif change == "insert":
            s.add(Account(id=9, email="z@x", tenant=9, handle="z", name="Zed"))
        elif change == "bulk update":
            s.execute(update(Account).where(Account.id == 1).values(email="z@x"))
        elif change == "core update":
            s.execute(update(table).where(table.c.id == 2).values(email="z@x"))
        elif change == "core insert":
            s.execute(insert(table).values(id=9, email="z@x", tenant=9, handle="z", name="Zed"))
        s.commit()
    expected = outcome(plain, lookups)
    assert expected != [(1, "a@x", "Ann"), (2, "b@x", "Bob"), None]  # the change changed it
    counters = cache.stats()["models"]["Account.unique(email)"]
    assert outcome(Session, lookups) == expected
    after = cache.stats()["models"]["Account.unique(email)"]
    # every value the change named was evicted: read from the database, not the cache
    evicted = {"update email": 2, "swap emails": 2, "delete": 1, "insert": 1}.get(change, 3)
    assert after["misses"] - counters["misses"] == evicted
    assert outcome(Session, lookups) == expected


@pytest.mark.usefixtures("uq")
def test_a_change_whose_old_value_was_never_loaded_is_caught_by_the_row_it_names(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    warm_lookups(Session, sql)
    with Session() as s:
        account = s.get(Account, 1)
        s.expire(account, ["email"])
        account.email = "y@x"  # history knows the new value only: a@x is not evicted
        s.commit()
    with Session() as s:
        s.get(Account, 1)  # the row cache holds the row as it is now
    assert agree(plain, Session, lookups) == [None, (2, "b@x", "Bob"), None]


@pytest.mark.usefixtures("uq")
def test_a_rolled_back_change_evicts_nothing_and_the_writer_reads_its_own_write(
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
) -> None:
    warm_lookups(Session, sql)
    with Session() as s:
        s.get(Account, 1).email = "z@x"
        s.flush()
        assert seen(s.query(Account).filter_by(email="z@x").one_or_none()) == (1, "z@x", "Ann")
        assert s.query(Account).filter_by(email="a@x").one_or_none() is None
        s.rollback()
    with expect_sql(sql, 0):
        assert outcome(Session, lookups) == [(1, "a@x", "Ann"), (2, "b@x", "Bob"), None]


@pytest.mark.usefixtures("uq")
def test_explicit_eviction_reaches_unique_lookups(
    Session: sessionmaker[CachingSession],  # noqa: N803
    cache: IdentityCache,
    engine: Engine,
    sql: SQLCounter,
) -> None:
    for evict in ("instance", "model", "pk"):
        warm_lookups(Session, sql)
        with engine.begin() as conn:  # behind the cache's back
            conn.execute(update(Account.__table__).where(Account.id == 1).values(email="z@x"))
        if evict == "instance":
            with Session() as s:
                instance = s.execute(select(Account).where(Account.id == 1)).scalar_one()
                instance.email = "a@x"  # what it held when cached, as the caller knows it
                s.expunge(instance)
                cache.evict(instance)
                # the value it holds now, too
                cache.evict(Account, 1)
        elif evict == "model":
            cache.evict_model(Account)
        else:
            cache.evict(Account, 1)
        assert outcome(Session, lookups) == [None, (2, "b@x", "Bob"), (1, "z@x", "Ann")]
        with engine.begin() as conn:
            conn.execute(update(Account.__table__).where(Account.id == 1).values(email="a@x"))
        cache.evict_model(Account)


# -- collations -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("uq")
def test_a_column_the_database_compares_loosely_is_never_served(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    engine: Engine,
    db: str,
    sql: SQLCounter,
) -> None:
    # SQLite NOCASE, PostgreSQL char(20), MariaDB's default collation: each finds "ann" by one
    # of these spellings, which a key by exact value would not
    spellings = {"sqlite": "ANN", "postgresql": "ann  ", "mariadb": "ANN "}[db]

    def read(s: Any) -> Any:
        return [
            seen(s.query(Account).filter_by(login=value).one_or_none())
            for value in ("ann", spellings)
        ]

    assert agree(plain, Session, read) == [(1, "a@x", "Ann"), (1, "a@x", "Ann")]
    before = cache.stats()["models"]["Account.unique(login)"]["skipped"]
    with expect_sql(sql, selects=2):
        outcome(Session, read)
    assert cache.stats()["models"]["Account.unique(login)"]["skipped"] == before + 2

    def zed(s: Any) -> Any:
        return [seen(s.query(Account).filter_by(login=v).one_or_none()) for v in ("ZED", "zed ")]

    agree(plain, Session, zed)  # no such login: an absence a key by exact value would keep
    with Session() as s:
        s.add(Account(id=7, email="z@x", login="zed", tenant=7, handle="z", name="Zed"))
        s.commit()
    found = agree(plain, Session, zed)
    assert found[{"sqlite": 0, "postgresql": 1, "mariadb": 0}[db]] == (7, "z@x", "Zed")
    assert not collations.compares_exactly(engine, Account.__table__.c.login)
    assert collations.compares_exactly(engine, Account.__table__.c.email)


@pytest.mark.usefixtures("uq")
def test_an_exact_column_finds_no_row_by_another_spelling(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    for value in ("A@x", "a@x ", "a@X"):
        assert agree(plain, Session, by_email(value)) is None
        settle(Session, by_email(value), sql)
    assert outcome(Session, by_email("a@x")) == (1, "a@x", "Ann")


# -- relationships --------------------------------------------------------------------------------


@pytest.mark.usefixtures("uq")
def test_a_many_to_one_through_a_unique_column_is_served_from_the_cache(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    def read(s: Any) -> Any:
        return seen(s.get(Invoice, 1).account)

    assert agree(plain, Session, read) == (3, "c@x", "Cy")
    settle(Session, read, sql)
    with Session() as s:  # a change of the account's row is seen through the relationship
        s.get(Account, 3).name = "Cyd"
        s.commit()
    assert agree(plain, Session, read) == (3, "c@x", "Cyd")
    with Session() as s:  # the invoice moves to another account
        s.get(Invoice, 1).account_email = "b@x"
        s.commit()
    assert agree(plain, Session, read) == (2, "b@x", "Bob")
    settle(Session, read, sql)


@pytest.mark.usefixtures("uq")
def test_the_reverse_of_a_one_to_one_is_served_as_a_collection(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    def read(s: Any) -> Any:
        profile = s.get(Account, 1).profile
        return None if profile is None else (profile.id, profile.bio)

    assert agree(plain, Session, read) == (1, "hi")
    settle(Session, read, sql)
    with Session() as s:
        s.delete(s.get(Profile, 1))
        s.commit()
    assert agree(plain, Session, read) is None


# -- registration ---------------------------------------------------------------------------------


def test_registering_a_unique_that_is_no_column_or_on_a_hierarchy_is_refused() -> None:
    cache = IdentityCache()
    with pytest.raises(CacheError, match="nope"):
        cache.register(Account, unique=["nope"])
    with pytest.raises(CacheError, match="inheritance"):
        cache.register(Employee, unique=["name"])
    with pytest.raises(TypeError):
        cache.register(Account, unique="email")  # type: ignore[arg-type]


def test_unique_true_means_the_tables_unique_constraints() -> None:
    cache = IdentityCache()
    cache.register(Account, unique=True)
    found = {tuple(sorted(c.name for c in kind.columns)) for kind in cache.registry.unique_kinds()}
    assert found == {("email",), ("login",), ("handle", "tenant")}


@pytest.mark.usefixtures("uq")
def test_a_delete_statement_evicts_the_values_it_removes(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    warm_lookups(Session, sql)
    with Session() as s:
        s.execute(delete(Invoice))
        s.execute(delete(Profile))
        s.execute(delete(Account).where(Account.id == 2))
        s.commit()
    assert agree(plain, Session, lookups) == [(1, "a@x", "Ann"), None, None]


def test_the_collation_probe_never_rolls_back_a_transaction_on_a_shared_connection() -> None:
    # in-memory SQLite on a StaticPool: every checkout is the one DBAPI connection
    engine = create_engine("sqlite://", poolclass=StaticPool)
    ensure_tables(engine)
    cache = IdentityCache()
    cache.register(Account, unique=["email"])
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
    with Session() as s:
        s.add(Account(id=1, email="a@x", tenant=1, handle="a", name="Ann"))
        s.flush()  # written, not committed: a probe on a connection of its own would undo it
        assert s.query(Account).filter_by(email="a@x").one().id == 1  # the first lookup: probe
        s.commit()
    with Session() as s:
        assert s.get(Account, 1) is not None
    engine.dispose()


@pytest.mark.usefixtures("uq")
def test_an_async_session_looks_up_by_a_unique_column_as_a_session_does(
    db: str, engine: Engine, cache: IdentityCache, redis_counter: RedisCounter
) -> None:
    async def scenario(Session: async_sessionmaker[AsyncSession], sql: SQLCounter) -> None:
        async def lookup() -> Any:
            async with Session() as s:
                found = await s.execute(select(Account).where(Account.email == "a@x"))
                return seen(found.scalar_one_or_none())

        for _ in range(10):  # the value's row, then the row (one per run under REPEATABLE READ)
            sql.reset()
            assert await lookup() == (1, "a@x", "Ann")
            if not sql.statements:
                break
        with expect_sql(sql, 0), expect_commands(redis_counter, round_trips=2):
            assert await lookup() == (1, "a@x", "Ann")

    run(db, engine, cache, scenario)


@pytest.mark.usefixtures("uq")
@pytest.mark.parametrize("found", ["absent", "a row"])
def test_a_commit_between_a_misses_select_and_its_fill_wins(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    db: str,
    found: str,
) -> None:
    """The stale-fill race, forced: the reader's SELECT of a value runs, then (hooked right
    after it) a writer gives the value to another row and commits, then the reader fills what
    it loaded. The fill must fail against the writer's eviction."""
    if db == "sqlite":
        pytest.skip("the reader's open cursor holds SQLite's lock: the writer cannot commit")
    value = "new@x" if found == "absent" else "b@x"
    fired: list[bool] = []

    def writer(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired or "WHERE uq_accounts.email" not in statement:
            return
        fired.append(True)
        with Session() as w:
            if found == "absent":  # the reader saw no row: now there is one
                w.add(Account(id=8, email=value, tenant=8, handle="n", name="New"))
            else:  # the reader saw Bob: now the value is Ann's
                w.get(Account, 2).email = "bob@x"
                w.flush()
                w.get(Account, 1).email = value
            w.commit()

    read = by_email(value)
    event.listen(engine, "after_cursor_execute", writer)
    try:
        outcome(Session, read)  # the miss, its SELECT, the writer's commit, the fill
    finally:
        event.remove(engine, "after_cursor_execute", writer)
    assert fired
    expected = outcome(plain, read)
    assert expected == ((8, value, "New") if found == "absent" else (1, value, "Ann"))
    assert outcome(Session, read) == expected
    assert outcome(Session, read) == expected


@pytest.mark.usefixtures("uq")
def test_a_lookup_by_email_inside_a_savepoint_begins_the_savepoint_as_the_load_would(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    """On SQLite a savepoint's SAVEPOINT, sent with its first statement, begins the database
    transaction (pysqlite begins none before a write); a hit that sent none would let a later
    savepoint's release commit what the session's rollback undoes (as for ``get``, in
    test_eviction.py)."""
    settle(Session, by_email("a@x"), sql)

    def scenario(session: Any) -> Any:
        savepoint = session.begin_nested()
        found = by_email("a@x")(session)
        savepoint.rollback()
        with session.begin_nested():
            session.get(Account, 2).name = "released"
        session.rollback()
        return found

    assert agree(plain, Session, scenario) == (1, "a@x", "Ann")
    assert agree(plain, Session, lambda s: s.get(Account, 2).name) == "Bob"
