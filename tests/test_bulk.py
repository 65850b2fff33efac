"""Bulk statements. ORM-enabled ``update()`` / ``delete()`` evict exactly the affected
rows (RETURNING where the dialect has it); otherwise, and for Core ``update(table)`` /
``delete(table)`` run through the session, the whole model is evicted in O(1) (a per-model
generation, not a key scan). The legacy bulk methods (``bulk_save_objects``,
``bulk_insert_mappings``, ``bulk_update_mappings``) evict the rows they name, or the model when
the database assigns a key. ``text()`` is opaque: ``cache.evict`` / ``cache.evict_model`` exist
for what sa_cache cannot see."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import ForeignKey, Integer, String, delete, insert, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sa_cache import CachingSession, IdentityCache, NotRegistered, codec

from .counting import SQLCounter, expect_commands, expect_sql
from .entries import entry_kind, generation
from .extra_models import Account, Ticket, ensure_tables
from .models import Address, Employee, Engineer, User


def cached(Session: sessionmaker[CachingSession], sql: SQLCounter, pks: list[int]) -> list[int]:
    """Which of ``pks`` a fresh session gets from the cache without SQL (each in its own
    session, so every miss refills; a REPEATABLE READ session fills only its first load)."""
    hits = []
    for pk in pks:
        before = sql.count
        with Session() as s:
            s.get(User, pk)
        if sql.count == before:
            hits.append(pk)
    return hits


@pytest.mark.usefixtures("users")
def test_an_orm_update_evicts_exactly_the_rows_it_matched_where_update_has_returning(
    Session, sql, cache, engine, redis_counter
):
    """With synchronize_session="fetch" SQLAlchemy itself reads the matched keys (RETURNING);
    "auto" and "evaluate" report none: tests/test_fidelity_writes.py."""
    gen = generation(cache, User)
    exact = engine.dialect.update_returning
    with Session() as s:
        stmt = update(User).where(User.id.in_([1, 2])).values(name="x")
        result = s.execute(stmt.execution_options(synchronize_session="fetch"))
        assert result.rowcount == 2
        with expect_commands(redis_counter, {"SET": 4 if exact else 2}, round_trips=2):
            s.commit()
    assert (generation(cache, User) == gen) is exact
    assert cached(Session, sql, [1, 2, 3]) == ([3] if exact else [])
    with Session() as s:
        assert [u.name for u in s.get_many(User, [1, 2, 3])] == ["x", "x", "u3"]


@pytest.mark.usefixtures("users")
def test_an_orm_delete_evicts_exactly_the_rows_it_matched_where_delete_has_returning(
    Session, sql, cache, engine, redis_counter
):
    gen = generation(cache, User)
    exact = engine.dialect.delete_returning
    with Session() as s:
        stmt = delete(User).where(User.name.in_(["u1", "u2"]))
        result = s.execute(stmt.execution_options(synchronize_session="fetch"))
        assert result.rowcount == 2
        with expect_commands(redis_counter, {"SET": 4 if exact else 2}, round_trips=2):
            s.commit()
    assert (generation(cache, User) == gen) is exact
    if exact:
        assert entry_kind(cache, User, 1) == entry_kind(cache, User, 2) == codec.Tombstone
    assert cached(Session, sql, [1, 2, 3]) == ([3] if exact else [])
    with Session() as s:
        assert [u.name if u else None for u in s.get_many(User, [1, 2, 3])] == [None, None, "u3"]


@pytest.mark.usefixtures("users")
def test_an_orm_bulk_update_by_primary_key_evicts_exactly_those_rows(
    Session, sql, cache, redis_counter
):
    gen = generation(cache, User)
    with Session() as s:
        s.execute(update(User), [{"id": 1, "name": "y"}])
        with expect_commands(redis_counter, {"SET": 2}, round_trips=2):
            s.commit()
    assert generation(cache, User) == gen
    assert entry_kind(cache, User, 1) == codec.Tombstone
    assert cached(Session, sql, [1, 2, 3]) == [2, 3]
    with Session() as s:
        assert s.get(User, 1).name == "y"


@pytest.mark.usefixtures("users")
def test_an_orm_update_with_its_own_returning_evicts_the_whole_model_and_keeps_its_rows(
    Session, sql, cache
):
    with Session() as s:
        if not s.get_bind().dialect.update_returning:
            pytest.skip("the dialect has no UPDATE ... RETURNING")
        stmt = update(User).where(User.id == 1).values(name="z").returning(User.id, User.name)
        assert s.execute(stmt).all() == [(1, "z")]
        s.commit()
    assert cached(Session, sql, [1, 2, 3]) == []


@pytest.mark.usefixtures("users")
def test_an_orm_update_without_session_synchronisation_evicts_the_whole_model(Session, sql, cache):
    with Session() as s:
        stmt = update(User).where(User.id == 1).values(name="nosync")
        assert s.execute(stmt.execution_options(synchronize_session=False)).rowcount == 1
        s.commit()
    assert cached(Session, sql, [1, 2, 3]) == []


def test_an_orm_update_of_an_inheriting_class_evicts_the_whole_hierarchy(Session, sql, cache):
    with Session() as s:
        s.add_all([Engineer(id=5, name="eve", language="py"), Employee(id=6, name="bob")])
        s.commit()
    for pk in (5, 6):
        with Session() as s:
            s.get(Engineer if pk == 5 else Employee, pk)
    with Session() as s:
        s.execute(update(Engineer).where(Engineer.id == 5).values(language="go"))
        s.commit()
    with expect_sql(sql, selects=2):
        with Session() as s:
            assert s.get(Engineer, 5).language == "go"
        with Session() as s:
            assert s.get(Employee, 6).name == "bob"


@pytest.mark.usefixtures("users")
@pytest.mark.parametrize(
    "statement",
    [
        lambda: update(User.__table__).where(User.__table__.c.id == 1).values(name="core"),
        lambda: delete(User.__table__).where(User.__table__.c.id == 1),
    ],
    ids=["update", "delete"],
)
def test_a_core_statement_on_the_table_evicts_the_whole_model(
    Session, sql, cache, redis_counter, statement
):
    gen = generation(cache, User)
    with Session() as s:
        assert s.execute(statement()).rowcount == 1
        with expect_commands(redis_counter, {"SET": 2}, round_trips=2):
            s.commit()
    assert generation(cache, User) not in (gen, None)
    assert cached(Session, sql, [1, 2, 3]) == []


def test_a_whole_model_eviction_is_one_key_however_many_rows_are_cached(
    Session, sql, cache, redis_counter
):
    with Session() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 201)])
        s.commit()
    with Session() as s:
        s.get_many(User, range(1, 201))
    assert cached(Session, sql, [1, 200]) == [1, 200]
    # the generation key (held, then replaced); no SCAN, KEYS, DEL
    with expect_commands(redis_counter, {"SET": 2}, round_trips=2), Session() as s:
        s.execute(update(User.__table__).values(active=False))
        s.commit()
    assert cached(Session, sql, [1, 100, 200]) == []
    with Session() as s:
        assert s.get(User, 100).active is False


@pytest.mark.usefixtures("users")
def test_a_bulk_statement_on_a_subclass_table_evicts_the_hierarchy(Session, sql, cache):
    with Session() as s:
        s.add(Engineer(id=5, name="eve", language="py"))
        s.commit()
    with Session() as s:
        s.get(Engineer, 5)  # through its base, the subclass columns are not loaded: no fill
    with expect_sql(sql, 0), Session() as s:
        s.get(Employee, 5)
    with Session() as s:
        s.execute(update(Engineer.__table__).values(language="rust"))
        s.commit()
    with Session() as s:
        assert s.get(Employee, 5).language == "rust"


@pytest.mark.usefixtures("users")
def test_text_sql_is_not_seen_until_evicted_by_hand(Session, sql, cache):
    with Session() as s:
        result = s.execute(text("UPDATE users SET name = 'raw' WHERE id = 1"))
        assert result.rowcount == 1
        s.commit()
    with expect_sql(sql, 0), Session() as s:
        assert s.get(User, 1).name == "u1"  # stale: sa_cache cannot see text()
    cache.evict(User, 1)
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "raw"


@pytest.mark.usefixtures("users")
def test_a_bulk_insert_through_the_session_evicts_the_negative_entries_of_its_keys(
    Session, sql, cache
):
    with Session() as s:
        assert s.get_many(User, [8, 9]) == [None, None]
    with Session() as s:
        s.execute(insert(User), [{"id": 8, "name": "eight"}])
        s.execute(insert(User.__table__).values(id=9, name="nine"))
        s.commit()
    with Session() as s:
        assert [u.name for u in s.get_many(User, [8, 9])] == ["eight", "nine"]


@pytest.mark.usefixtures("users")
def test_legacy_query_update_and_delete_evict_their_rows(Session, sql, cache):
    with Session() as s:
        query = s.query(User)
        assert query.filter(User.id == 1).update({"name": "queried"}, "fetch") == 1
        assert query.filter_by(id=2).delete(synchronize_session="fetch") == 1
        s.commit()
    assert cached(Session, sql, [3]) == ([3] if exact_returning(Session) else [])
    with Session() as s:
        assert [u and u.name for u in s.get_many(User, [1, 2, 3])] == ["queried", None, "u3"]


def exact_returning(Session: sessionmaker[CachingSession]) -> bool:
    """Whether both UPDATE and DELETE report their rows (else the model is evicted)."""
    with Session() as s:
        dialect = s.get_bind().dialect
    return bool(dialect.update_returning and dialect.delete_returning)


@pytest.mark.usefixtures("users")
def test_the_legacy_bulk_methods_evict_exactly_the_rows_they_name(
    Session, sql, cache, redis_counter
):
    with Session() as s:
        assert s.get_many(User, [8, 9]) == [None, None]  # cached as absent
    with Session() as s:
        detached = s.get(User, 2)
    detached.name = "saved"
    with Session() as s:
        s.bulk_update_mappings(User, [{"id": 1, "name": "mapped"}])
        s.bulk_insert_mappings(User, [{"id": 8, "name": "eight"}])
        s.bulk_save_objects([detached, User(id=9, name="nine")])
        with expect_commands(redis_counter, {"SET": 8}, round_trips=2):
            s.commit()
    assert cached(Session, sql, [3]) == [3]  # a row no bulk method named stays cached
    with Session() as s:
        rows = s.get_many(User, [1, 2, 8, 9])
        assert [u.name for u in rows] == ["mapped", "saved", "eight", "nine"]


@pytest.mark.usefixtures("users")
def test_a_bulk_method_reads_its_own_rows_from_the_database_and_a_rollback_evicts_nothing(
    Session, sql, cache
):
    with Session() as s:
        s.bulk_update_mappings(User, [{"id": 1, "name": "uncommitted"}])
        with expect_sql(sql, selects=1):
            assert s.get(User, 1).name == "uncommitted"
        s.rollback()
    assert cached(Session, sql, [1]) == [1]
    with Session() as s:
        assert s.get(User, 1).name == "u1"


@pytest.mark.parametrize("method", ["bulk_save_objects", "bulk_insert_mappings"])
def test_a_bulk_insert_whose_key_the_database_assigns_evicts_the_model(
    engine, Session, sql, cache, method
):
    ensure_tables(engine)
    cache.register(Ticket)
    with Session() as s:
        s.add(Ticket(id=1_000_001, title="old"))  # far above the keys the database assigns
        s.commit()
    with Session() as s:
        s.get(Ticket, 1_000_001)
    before = generation(cache, Ticket)
    with Session() as s:
        if method == "bulk_save_objects":
            s.bulk_save_objects([Ticket(title="new")])
        else:
            s.bulk_insert_mappings(Ticket, [{"title": "new"}])
        s.commit()
    assert generation(cache, Ticket) != before  # an absent entry for the new key may exist
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Ticket, 1_000_001).title == "old"


def upsert(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (email) DO UPDATE / ON DUPLICATE KEY UPDATE of Account.name."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(Account)
        return stmt.on_conflict_do_update(
            index_elements=["email"], set_={"name": stmt.excluded.name}
        )
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(Account)
        return stmt.on_conflict_do_update(
            index_elements=["email"], set_={"name": stmt.excluded.name}
        )
    from sqlalchemy.dialects.mysql import insert as mysql_insert

    stmt = mysql_insert(Account)
    return stmt.on_duplicate_key_update(name=stmt.inserted.name)


@pytest.fixture
def account(engine: Any, Session: sessionmaker[CachingSession], cache: IdentityCache) -> None:
    ensure_tables(engine)
    cache.register(Account)
    with Session() as s:
        s.add(Account(id=1, email="a@x", name="old"))
        s.commit()
    with Session() as s:
        s.get(Account, 1)


@pytest.mark.usefixtures("account")
@pytest.mark.parametrize("form", ["parameters", "values"])
def test_an_upsert_evicts_the_row_it_updated_through_another_unique_key(Session, sql, engine, form):
    stmt = upsert(engine.dialect.name)
    row = {"id": 2, "email": "a@x", "name": "new"}  # id 2 conflicts with row 1 on email
    with Session() as s:
        if form == "parameters":
            s.execute(stmt, [row])
        else:
            s.execute(stmt.values(**row))
        s.commit()
    with expect_sql(sql, selects=2), Session() as s:
        assert s.get(Account, 1).name == "new"
        assert s.get(Account, 2) is None


@pytest.mark.usefixtures("account")
def test_an_insert_or_replace_evicts_the_row_it_replaced(Session, sql, engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("INSERT OR REPLACE is SQLite's")
    with Session() as s:
        s.execute(
            insert(Account).prefix_with("OR REPLACE"), [{"id": 2, "email": "a@x", "name": "r"}]
        )
        s.commit()
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Account, 1) is None  # deleted by the replace


# -- manual eviction ------------------------------------------------------------------------------


@pytest.mark.usefixtures("users")
def test_evict_an_instance_evicts_its_row(Session, sql, cache, redis_counter):
    with Session() as s:
        user = s.get(User, 1)
        with expect_commands(redis_counter, {"SET": 1}):
            cache.evict(user)
    assert entry_kind(cache, User, 1) == codec.Tombstone
    assert cached(Session, sql, [1, 2, 3]) == [2, 3]


@pytest.mark.usefixtures("users")
def test_evict_a_model_and_primary_key_evicts_that_row(Session, sql, cache):
    cache.evict(User, 2)
    cache.evict(User, "3")  # normalised like a lookup
    assert cached(Session, sql, [1, 2, 3]) == [1]


@pytest.mark.usefixtures("users")
def test_evict_model_evicts_every_row_of_the_model_and_no_other(Session, sql, cache):
    with Session() as s:
        s.add(Engineer(id=5, name="eve"))
        s.commit()
    with Session() as s:
        s.get(Engineer, 5)  # through its base, the subclass columns are not loaded: no fill
    with expect_sql(sql, 0), Session() as s:
        s.get(Employee, 5)
    cache.evict_model(User)
    assert cached(Session, sql, [1, 2, 3]) == []
    with Session() as s:
        s.get(Engineer, 5)
    with expect_sql(sql, 0), Session() as s:
        s.get(Employee, 5)  # Employee rows were not evicted with User's


@pytest.mark.usefixtures("users")
def test_evict_model_of_a_subclass_evicts_its_whole_hierarchy(Session, sql, cache):
    with Session() as s:
        s.add(Engineer(id=5, name="eve"))
        s.commit()
    with Session() as s:
        s.get(Engineer, 5)  # through its base, the subclass columns are not loaded: no fill
    with expect_sql(sql, 0), Session() as s:
        s.get(Employee, 5)
    cache.evict_model(Engineer)
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Employee, 5).name == "eve"


def test_evict_of_a_transient_instance_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="transient or pending"):
        cache.evict(User(id=1, name="nobody"))


@pytest.mark.usefixtures("users")
def test_evict_of_an_unregistered_model_is_a_clear_error(Session, cache):
    with Session() as s:
        s.add(Address(id=1, user_id=1))
        s.commit()
        address = s.get(Address, 1)
        with pytest.raises(NotRegistered, match="not registered"):
            cache.evict(address)
    with pytest.raises(NotRegistered, match="not registered"):
        cache.evict(Address, 1)
    with pytest.raises(NotRegistered, match="not registered"):
        cache.evict_model(Address)


@pytest.mark.parametrize("target", [object(), "User", 42], ids=["object", "str", "int"])
def test_evict_of_something_that_is_not_mapped_is_a_clear_error(cache, target):
    with pytest.raises(TypeError, match="mapped"):
        cache.evict(target)
    with pytest.raises(TypeError, match="mapped"):
        cache.evict_model(target)


def test_evict_of_a_class_that_is_not_mapped_is_a_clear_error(cache):
    with pytest.raises(TypeError, match="not a mapped class"):
        cache.evict(dict, 1)


def test_evict_with_an_invalid_primary_key_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="not a valid primary key"):
        cache.evict(User, "one")


def test_a_core_statement_on_a_subclass_mapped_after_registration_evicts_the_model(engine):
    class LocalBase(DeclarativeBase):
        pass

    class Animal(LocalBase):
        __tablename__ = "late_animals"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}

    cache = IdentityCache()
    cache.register(Animal)  # before the subclass exists

    class Dog(Animal):
        __tablename__ = "late_dogs"
        id: Mapped[int] = mapped_column(ForeignKey("late_animals.id"), primary_key=True)
        bark: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_identity": "dog"}

    LocalBase.metadata.create_all(engine)
    try:
        Session = sessionmaker(engine, class_=CachingSession, cache=cache)
        with Session() as s:
            s.add(Dog(id=1, bark="woof"))
            s.commit()
        with Session() as s:
            assert s.get(Dog, 1).bark == "woof"  # cached
        with Session() as s:
            s.execute(update(Dog.__table__).values(bark="WOOF"))
            s.commit()
        with Session() as s:
            assert s.get(Dog, 1).bark == "WOOF"
    finally:
        LocalBase.metadata.drop_all(engine)
