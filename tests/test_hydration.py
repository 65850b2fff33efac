"""Hydration. A hit puts the instance into the identity map exactly as a load would:
persistent and clean, flushes only what changed, expires, refreshes and lazy-loads, leaves
deferred columns to load on access; composite keys and both kinds of inheritance answer as
SQLAlchemy answers, including None for a row of another subclass.

Each test runs the same steps on an instance from a real load (``populate_existing`` never reads
the cache) and on one from a hit, and compares."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import JSON, Integer, inspect
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as PlainSession

from sa_cache import CachingSession, IdentityCache

from .counting import counting_sql, expect_sql
from .models import Address, Car, Employee, Engineer, Manager, Membership, Truck, User, Vehicle


@pytest.fixture
def alice(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add(User(id=1, name="alice", email="a@x", bio="a long biography"))
        s.add_all([Address(id=10, user_id=1, city="Oslo"), Address(id=11, user_id=1)])
        s.commit()
    with Session() as s:
        assert s.get(User, 1) is not None  # fills


def get(s: Any, how: str) -> User:
    """User 1 from the cache ("hit") or from the database ("load")."""
    user: User = s.get(User, 1, populate_existing=how == "load")
    return user


def hit_and_load(test: Any) -> Any:
    return pytest.mark.parametrize("how", ["hit", "load"])(pytest.mark.usefixtures("alice")(test))


@hit_and_load
def test_a_hit_is_persistent_clean_and_loaded_as_a_load_is(Session, sql, cache, how):
    hits = cache.stats()["hits"]
    with Session() as s:
        with expect_sql(sql, selects=0 if how == "hit" else 1):
            user = get(s, how)
        assert cache.stats()["hits"] == hits + (how == "hit")
        state = inspect(user)
        assert state.persistent and not state.modified
        assert state.key == (User, (1,), None) and state.session is s
        assert user not in s.dirty and user not in s.new
        assert not s.is_modified(user)
        assert user.loaded_by_reconstructor is True
        assert s.get(User, 1) is user
        assert {"id", "name", "email", "active", "version"} <= set(state.dict)
        assert "bio" not in state.dict and "bio" not in state.expired_attributes
        assert "bio" in state.unloaded and "addresses" in state.unloaded
        assert "address_count" in state.unloaded  # deferred: loaded on access, after either
        assert (user.name, user.email, user.active, user.version) == ("alice", "a@x", True, 1)


@hit_and_load
def test_a_flush_after_a_hit_updates_only_the_changed_column(Session, sql, engine, how):
    with Session() as s:
        user = get(s, how)
        with expect_sql(sql, ["UPDATE users"]) as flushed:
            user.email = "new@x"
            s.flush()
        (update,) = flushed.statements
        set_clause = re.search(r"SET (.*) WHERE", update, re.S)
        assert set_clause is not None
        assert re.fullmatch(r"email\s*=\s*\S+", set_clause.group(1).strip()), update
        s.commit()
    with PlainSession(engine) as plain:
        row = plain.get(User, 1)
        assert (row.email, row.name, row.bio) == ("new@x", "alice", "a long biography")


@hit_and_load
def test_a_hit_that_is_not_changed_flushes_nothing(Session, sql, how):
    with Session() as s:
        user = get(s, how)
        user.name = "alice"  # the same value: no net change
        with expect_sql(sql, writes=0):
            s.commit()


@hit_and_load
def test_expire_and_refresh_reload_a_hit_with_one_select(Session, sql, engine, how):
    with Session() as s:
        user = get(s, how)
        with engine.begin() as conn:  # a change the cache cannot see
            conn.execute(User.__table__.update().values(name="changed"))
        if how == "load":
            s.commit()  # the load's snapshot (REPEATABLE READ on MariaDB) ends
        with expect_sql(sql, selects=1):
            s.expire(user)
            assert user.name == "changed"
        user.name = "local"
        with expect_sql(sql, selects=1):
            s.refresh(user)
            assert user.name == "changed" and not s.is_modified(user)


@hit_and_load
def test_a_lazy_one_to_many_load_works_after_a_hit(Session, sql, how):
    with Session() as s:
        user = get(s, how)
        with expect_sql(sql, selects=1):
            assert sorted(a.id for a in user.addresses) == [10, 11]
        with expect_sql(sql, selects=0):  # the many-to-one back is the identity map's
            assert all(a.user is user for a in user.addresses)


@hit_and_load
def test_a_deferred_column_loads_alone_on_access(Session, sql, how):
    with Session() as s:
        user = get(s, how)
        with expect_sql(sql, ["SELECT"]) as loaded:
            assert user.bio == "a long biography"
        (select,) = loaded.statements
        columns = select.split("FROM")[0]
        assert "bio" in columns and "name" not in columns and "email" not in columns


@hit_and_load
def test_a_column_property_is_read_fresh_after_a_hit(Session, sql, how):
    with Session() as s:  # a third address: Address is not cached, User 1 is not evicted
        s.add(Address(id=12, user_id=1))
        s.commit()
    with Session() as s:
        user = get(s, how)
        with expect_sql(sql, selects=1):  # deferred: read on access, after a hit or a load
            assert user.address_count == 3
        assert not s.is_modified(user)


@hit_and_load
def test_rollback_after_a_hit_discards_changes_as_after_a_load(Session, sql, engine, how):
    with Session() as s:
        user = get(s, how)
        user.name = "discarded"
        s.rollback()
        assert inspect(user).persistent
        assert user.name == "alice" and not s.is_modified(user)
        s.commit()
    with PlainSession(engine) as plain:
        assert plain.get(User, 1).name == "alice"


@hit_and_load
def test_a_hit_instance_can_be_deleted(Session, sql, engine, how):
    with Session() as s:
        for address in s.query(Address).all():
            s.delete(address)
        s.commit()
    with Session() as s:
        user = get(s, how)
        s.delete(user)
        # the SELECT is SQLAlchemy's own: it loads `addresses` to null their foreign keys
        with expect_sql(sql, ["SELECT", "DELETE"]):
            s.commit()
        assert inspect(user).detached
    with PlainSession(engine) as plain:
        assert plain.get(User, 1) is None
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1) is None  # the eviction reached the cache: the database says so


@hit_and_load
def test_merge_onto_a_hit_flushes_only_the_difference(Session, sql, how):
    with Session() as s:
        if how == "hit":
            merged = s.merge(User(id=1, name="alice", email="merged@x"))
        else:
            get(s, how)
            merged = s.merge(User(id=1, name="alice", email="merged@x"))
        assert s.is_modified(merged)
        with expect_sql(sql, ["UPDATE users"]) as flushed:
            s.flush()
        (update,) = flushed.statements
        assert "email" in update and "name" not in update.split("WHERE")[0]


# -- composite keys and inheritance --------------------------------------------------------------


@pytest.fixture
def staff(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add(Engineer(id=1, name="eng", language="python"))
        s.add(Manager(id=2, name="boss", reports=3))
        s.add(Car(id=1, wheels=4))
        s.add(Truck(id=2, wheels=18))
        s.add(Membership(org="acme", member=7, role="owner"))
        s.commit()


def plain_answer(engine: Any, entity: type[Any], pk: Any, preload: Any = None) -> tuple[Any, int]:
    """SQLAlchemy's own answer and its SQL count, optionally with ``preload`` in the identity
    map first (which is where a hit puts the row)."""
    with PlainSession(engine) as s:
        if preload is not None:
            held = s.get(*preload)
            assert held is not None
        with counting_sql(engine) as counted:
            found = s.get(entity, pk)
            answer = None if found is None else (type(found), inspect(found).identity)
    return answer, counted.count


def answer(s: Any, entity: type[Any], pk: Any) -> Any:
    found = s.get(entity, pk)
    return None if found is None else (type(found), inspect(found).identity)


CASES = [
    # (what is asked, what fills the cache first)
    ((Employee, 1), (Engineer, 1)),
    ((Engineer, 1), (Engineer, 1)),
    ((Manager, 1), (Engineer, 1)),
    ((Engineer, 2), (Manager, 2)),
    ((Employee, 2), (Manager, 2)),
    ((Vehicle, 1), (Vehicle, 1)),
    ((Car, 1), (Vehicle, 1)),
    ((Truck, 1), (Vehicle, 1)),
    ((Vehicle, 2), (Truck, 2)),
    ((Car, 2), (Truck, 2)),
]


@pytest.mark.usefixtures("staff")
@pytest.mark.parametrize("asked,filler", CASES, ids=[f"{a[0].__name__}{a[1]}" for a, _ in CASES])
def test_inheritance_answers_as_sqlalchemy_on_the_miss_and_the_hit_path(
    Session, engine, sql, cache, asked, filler
):
    entity, pk = asked
    expected_cold, cold_sql = plain_answer(engine, entity, pk)
    expected_warm, warm_sql = plain_answer(engine, entity, pk, preload=filler)
    assert expected_cold == expected_warm  # SQLAlchemy's answer does not depend on the session
    assert warm_sql == 0  # with the row in the identity map, SQLAlchemy needs no SQL

    with expect_sql(sql, cold_sql), Session() as s:  # miss path
        assert answer(s, entity, pk) == expected_cold

    with Session() as s:
        s.get(*filler)  # the concrete row is in the cache now
    hits = cache.stats()["hits"]
    with expect_sql(sql, 0), Session() as s:  # hit path
        found = s.get(entity, pk)
        assert (None if found is None else (type(found), inspect(found).identity)) == expected_warm
        if found is not None:
            assert not s.is_modified(found) and inspect(found).persistent
            assert found.name if isinstance(found, Employee) else found.wheels
    assert cache.stats()["hits"] == hits + 1


@pytest.mark.usefixtures("staff")
def test_a_subclass_row_loaded_through_its_base_is_complete_after_a_hit(Session, sql, cache):
    with Session() as s:
        engineer = s.get(Employee, 1)  # joined inheritance: `language` is not loaded yet
        assert type(engineer) is Engineer
        assert "language" not in inspect(engineer).dict
    fills = cache.stats()["fills"]
    assert fills == 0  # a partly loaded state is never cached
    with Session() as s:
        s.get(Engineer, 1)
    assert cache.stats()["fills"] == 1
    with expect_sql(sql, 0), Session() as s:
        engineer = s.get(Employee, 1)
        assert type(engineer) is Engineer
        assert (engineer.name, engineer.language, engineer.kind) == ("eng", "python", "engineer")


@pytest.mark.usefixtures("staff")
@pytest.mark.parametrize(
    "pk",
    [("acme", 7), ["acme", 7], {"org": "acme", "member": 7}, {"member": "7", "org": "acme"}],
    ids=["tuple", "list", "dict", "dict_text_member"],
)
def test_a_composite_key_hits_by_tuple_and_by_dict(Session, sql, cache, pk):
    with expect_sql(sql, selects=1), Session() as s:  # the miss
        assert s.get(Membership, pk).role == "owner"
    with expect_sql(sql, 0):
        for spelling in (pk, ("acme", 7), {"member": 7, "org": "acme"}):
            with Session() as s:
                membership = s.get(Membership, spelling)
                assert inspect(membership).key == (Membership, ("acme", 7), None)
                assert membership.role == "owner" and not s.is_modified(membership)
    assert cache.stats()["models"]["Membership"]["fills"] == 1


def test_an_in_place_change_to_a_mutable_json_column_of_a_hit_is_flushed(engine, sql):
    """sqlalchemy.ext.mutable wraps values in its ``load`` listener: a hit fires that event, so an
    in-place change is tracked, flushed and evicted as after a load."""

    class LocalBase(DeclarativeBase):
        pass

    cache = IdentityCache()

    @cache.register
    class Doc(LocalBase):
        __tablename__ = "hydration_docs"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        data: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSON))

    LocalBase.metadata.create_all(engine)
    try:
        Session = sessionmaker(engine, class_=CachingSession, cache=cache)
        with Session() as s:
            s.add(Doc(id=1, data={"a": 1}))
            s.commit()
        with Session() as s:
            s.get(Doc, 1)  # fills
        with Session() as s:
            with expect_sql(sql, 0):
                doc = s.get(Doc, 1)
            assert isinstance(doc.data, MutableDict)
            doc.data["a"] = 2
            assert s.is_modified(doc)
            s.commit()
        with Session() as s:
            assert s.get(Doc, 1).data == {"a": 2}
        with PlainSession(engine) as plain:
            assert plain.get(Doc, 1).data == {"a": 2}
    finally:
        LocalBase.metadata.drop_all(engine)
