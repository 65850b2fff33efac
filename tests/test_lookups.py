"""Every primary-key lookup the session makes is served from the cache when the
identity map misses; loads that must see the database never are."""

from __future__ import annotations

import pytest
import sqlalchemy
from sqlalchemy import Integer, event, select
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker
from sqlalchemy.orm import Session as PlainSession

import sa_cache
from sa_cache import CachingSession, IdentityCache

from .conftest import warm
from .counting import expect_commands, expect_sql
from .models import Address, User


@pytest.fixture
def alice(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add(User(id=1, name="alice", email="a@x"))
        s.add(Address(id=10, user_id=1, city="Oslo"))
        s.commit()


@pytest.mark.usefixtures("alice")
def test_a_hit_emits_no_sql_for_session_get(Session, sql):
    warm(Session, 1)
    with expect_sql(sql, 0), Session() as s:
        user = s.get(User, 1)
        assert user.name == "alice" and user.email == "a@x"


@pytest.mark.usefixtures("alice")
def test_the_first_lookup_is_one_select_and_fills(Session, sql, cache):
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "alice"
    assert cache.stats()["models"]["User"]["fills"] == 1


@pytest.mark.usefixtures("alice")
def test_a_get_that_hits_forgets_an_earlier_miss_of_the_same_key(Session, cache):
    """A key an earlier read of the session missed (an eager level's, remembered for its load)
    and another session filled since: the ``get`` that hits it supersedes that observation, so
    no later load of the key fills with the freshness judged at the earlier read."""
    mapper = User.__mapper__
    model = cache.model_for(mapper)
    identity_key = mapper.identity_key_from_primary_key((1,))
    with Session() as s:
        lookups = s._sa_cache
        (missed,) = lookups.read_kinds(
            [model], [(model.keys.row_key((1,)), (1,), identity_key)], s._eager_fill_rule
        )
        assert missed is None and identity_key in lookups.pending
        warm(Session, 1)
        assert s.get(User, 1).name == "alice"
        assert identity_key not in lookups.pending


@pytest.mark.usefixtures("alice")
def test_get_one_query_get_and_merge_are_served_from_the_cache(Session, sql):
    warm(Session, 1)
    with expect_sql(sql, 0):
        with Session() as s:
            assert s.get_one(User, 1).name == "alice"
        with Session() as s:
            assert s.query(User).get(1).name == "alice"
        with Session() as s:
            detached = User(id=1, name="alice", email="a@x")
            merged = s.merge(detached)
            assert merged is not detached and merged.name == "alice"
            assert not s.is_modified(merged)


@pytest.mark.usefixtures("alice")
def test_a_lazy_many_to_one_load_is_served_from_the_cache(Session, sql):
    warm(Session, 1)
    with Session() as s:
        address = s.get(Address, 10)  # Address is not cached: one SELECT
        with expect_sql(sql, 0):
            assert address.user.name == "alice"


@pytest.mark.usefixtures("alice")
def test_a_lazy_load_miss_fills_the_cache_unless_the_snapshot_may_be_old(Session, sql, engine, db):
    with Session() as s:
        address = s.get(Address, 10)  # the transaction has read: its snapshot has begun
        assert address.user.name == "alice"
    # under REPEATABLE READ (MariaDB's default) the lazy load read from a snapshot that may
    # predate the cache's state, so it was not written back (see docs/protocol.md)
    level = engine.dialect.default_isolation_level
    snapshot = db != "sqlite" and level in ("REPEATABLE READ", "SERIALIZABLE")
    with expect_sql(sql, 1 if snapshot else 0), Session() as s:
        assert s.get(User, 1).name == "alice"


@pytest.mark.usefixtures("alice")
@pytest.mark.parametrize(
    "how",
    [
        lambda s: s.get(User, 1, populate_existing=True),
        lambda s: s.get(User, 1, execution_options={"populate_existing": True}),
        lambda s: s.get(User, 1, with_for_update=True),
        lambda s: s.query(User).populate_existing().get(1),
        lambda s: s.query(User).with_for_update().get(1),
    ],
    ids=["param", "execution_option", "for_update", "query_populate", "query_for_update"],
)
def test_loads_that_must_see_the_database_never_use_the_cache(Session, sql, how):
    warm(Session, 1)
    with expect_sql(sql, selects=1), Session() as s:
        assert how(s).name == "alice"


@pytest.mark.usefixtures("alice")
@pytest.mark.skipif(
    sqlalchemy.__version__.startswith("2.0."), reason="Session(execution_options=) is new in 2.1"
)
def test_a_session_with_populate_existing_never_reads_the_cache(engine, cache, sql):
    warm(sessionmaker(engine, class_=CachingSession, cache=cache), 1)
    Session = sessionmaker(
        engine,
        class_=CachingSession,
        cache=cache,
        execution_options={"populate_existing": True},
    )
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "alice"


@pytest.mark.usefixtures("alice")
def test_the_identity_map_answers_before_the_cache(Session, sql, cache):
    warm(Session, 1)
    hits = cache.stats()["hits"]
    with Session() as s:
        first = s.get(User, 1)
        assert s.get(User, 1) is first
        assert s.query(User).get(1) is first
    assert cache.stats()["hits"] == hits + 1


@pytest.mark.usefixtures("alice")
def test_a_query_that_is_not_by_primary_key_always_reads_the_database(Session, sql):
    warm(Session, 1)
    with expect_sql(sql, selects=1), Session() as s:
        assert s.scalars(select(User).where(User.name == "alice")).one().id == 1


@pytest.mark.usefixtures("alice")
def test_get_one_of_a_missing_row_raises_as_sqlalchemy_does(Session):
    for _ in range(2):  # the second time from the negative entry
        with Session() as s, pytest.raises(NoResultFound):
            s.get_one(User, 404)


@pytest.mark.usefixtures("alice")
def test_unregistered_models_are_never_cached(Session, sql):
    with Session() as s:
        s.get(Address, 10)
    with expect_sql(sql, selects=1), Session() as s:
        s.get(Address, 10)


@pytest.mark.usefixtures("alice")
def test_a_session_without_a_cache_is_a_plain_session(engine, sql):
    Session = sessionmaker(engine, class_=CachingSession)
    with expect_sql(sql, selects=2):
        for _ in range(2):
            with Session() as s:
                assert s.get(User, 1).name == "alice"


@pytest.mark.usefixtures("alice")
def test_a_plain_session_is_untouched_by_registration(engine, sql, cache):
    with expect_sql(sql, selects=2):
        for _ in range(2):
            with PlainSession(engine) as s:
                assert s.get(User, 1).name == "alice"
    assert cache.stats()["hits"] == cache.stats()["misses"] == 0


@pytest.mark.usefixtures("alice")
def test_a_hit_does_not_begin_a_database_transaction(Session, engine):
    warm(Session, 1)
    begun = []

    def on_begin(conn):
        begun.append(conn)

    event.listen(engine, "begin", on_begin)
    try:
        with Session() as s:
            s.get(User, 1)
        assert begun == []
    finally:
        event.remove(engine, "begin", on_begin)


def test_get_many_keeps_input_order_with_one_round_trip(Session, sql, cache, redis_counter):
    with Session() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
        s.commit()
    with Session() as s:
        s.get_many(User, [1, 2])  # fill two of them
    # 3, 5 and 404 in one SELECT; 3 and 5 hold the tombstones their INSERT's commit wrote:
    # compare-and-set; 404 was never seen: SET NX of its negative entry
    with (
        expect_sql(sql, selects=1),
        expect_commands(redis_counter, {"MGET": 1, "EVALSHA": 2, "SET": 1}, round_trips=2),
        Session() as s,
    ):
        users = s.get_many(User, [5, 1, 404, "2", 3, 1])
        assert [u.id if u else None for u in users] == [5, 1, None, 2, 3, 1]
        assert users[1] is users[5]
    with expect_sql(sql, 0), Session() as s:
        assert [u.id if u else None for u in s.get_many(User, [5, 404, 3])] == [5, None, 3]


def test_get_many_through_the_legacy_query_keeps_the_order_asked(Session, sql):
    with Session() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 4)])
        s.commit()
    with Session() as s:
        assert [u.name for u in s.query(User).get_many([3, 1])] == ["u3", "u1"]


def test_a_row_filled_by_one_session_factory_is_a_hit_for_another_sharing_the_cache(
    engine, cache: IdentityCache, sql
):
    a = sessionmaker(engine, class_=CachingSession, cache=cache)
    b = sessionmaker(engine, class_=CachingSession, cache=cache)
    with a() as s:
        s.add(User(id=1, name="alice"))
        s.commit()
        s.get(User, 1)
    with a() as s:
        s.get(User, 1)
    with expect_sql(sql, 0), b() as s:
        assert s.get(User, 1).name == "alice"


class AuditedSession(PlainSession):
    """An application's own Session subclass, which the mixin is added to."""

    def audit(self) -> str:
        return "audited"


class CachedAuditedSession(sa_cache.CachingSessionMixin, AuditedSession):
    pass


@pytest.mark.usefixtures("alice")
def test_the_mixin_adds_caching_and_eviction_to_an_existing_session_subclass(engine, cache, sql):
    Session = scoped_session(sessionmaker(engine, class_=CachedAuditedSession, cache=cache))
    Session().get(User, 1)
    Session.remove()
    with expect_sql(sql, 0):
        assert Session().get(User, 1).name == "alice"
        assert Session().audit() == "audited"
    Session().get(User, 1).name = "changed"
    Session().commit()
    Session.remove()
    assert Session().get(User, 1).name == "changed"
    Session.remove()


def test_register_works_as_a_decorator_with_and_without_arguments():
    cache = IdentityCache()

    class LocalBase(DeclarativeBase):
        pass

    @cache.register
    class A(LocalBase):
        __tablename__ = "a"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    @cache.register(ttl=5)
    class B(LocalBase):
        __tablename__ = "b"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    assert cache.model_for(A.__mapper__).ttl == cache.ttl
    assert cache.model_for(B.__mapper__).ttl == 5


def test_a_kinds_first_read_creates_its_generation_in_that_read(cache):
    """The generation a miss observes must exist before the database read (docs/protocol.md,
    "Read"): a kind's first read creates it, and every later read sees the same one."""
    model = cache.model_for(sqlalchemy.inspect(User))
    key, other = model.keys.row_key((1,)), model.keys.row_key((2,))
    assert cache.store.get_many([model.keys.generation_key]) == [None]
    (generation,), stored, _ = cache.guarded.read([model], [key])
    assert type(generation) is bytes and stored == [None]
    assert cache.store.get_many([model.keys.generation_key]) == [generation]
    assert cache.guarded.read([model], [other])[0] == [generation]
