"""Pins every SQLAlchemy behaviour sa_cache/_orm.py and tracking.py rely on, on a plain Session,
so an SQLAlchemy upgrade that changes one fails here first, by name."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import and_, create_engine, event, inspect, select, update
from sqlalchemy.orm import Session, aliased, defer, lazyload, sessionmaker
from sqlalchemy.orm.base import PassiveFlag

from sa_cache import _orm

from .models import Address, Base, User
from .models_unique import Account, Invoice, UniqueBase


class RecordingSession(Session):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lookups: list[tuple[Any, ...]] = []
        self.loads: list[Any] = []

    def _identity_lookup(
        self, mapper: Any, primary_key_identity: Any, *args: Any, **kw: Any
    ) -> Any:
        self.lookups.append((mapper.class_, tuple(primary_key_identity), kw.get("passive")))
        return super()._identity_lookup(mapper, primary_key_identity, *args, **kw)

    def _get_impl(self, entity: Any, pk: Any, db_load_fn: Any, **kw: Any) -> Any:
        def load(session: Any, statement: Any, ident: Any, **load_kw: Any) -> Any:
            result = db_load_fn(session, statement, ident, **load_kw)
            self.loads.append(result)
            return result

        return super()._get_impl(entity, pk, load, **kw)


@pytest.fixture(scope="module")
def Sessions() -> Any:  # noqa: N802
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1, name="a"))
        s.add(Address(id=1, user_id=1))
        s.commit()
    return sessionmaker(engine, class_=RecordingSession)


def test_get_get_one_query_get_and_merge_pass_through_identity_lookup(Sessions):
    for call in (
        lambda s: s.get(User, 1),
        lambda s: s.get_one(User, 1),
        lambda s: s.query(User).get(1),
        lambda s: s.merge(User(id=1, name="a")),
    ):
        with Sessions() as s:
            call(s)
            assert s.lookups[0][:2] == (User, (1,))


def test_a_lazy_many_to_one_load_passes_through_identity_lookup_with_sql_allowed(Sessions):
    with Sessions() as s:
        address = s.get(Address, 1)
        s.lookups.clear()
        assert address.user.name == "a"
        assert s.lookups[0][:2] == (User, (1,))
        passive = s.lookups[0][2]
        assert passive & PassiveFlag.SQL_OK and passive & PassiveFlag.RELATED_OBJECT_OK


def test_populate_existing_and_for_update_skip_identity_lookup(Sessions):
    with Sessions() as s:
        s.get(User, 1, populate_existing=True)
        s.get(User, 1, with_for_update=True)
        assert s.lookups == []


def test_the_populate_existing_execution_option_skips_identity_lookup_only_from_2_1(Sessions):
    with Sessions() as s:
        s.get(User, 1, execution_options={"populate_existing": True})
        # CachingSession checks the option itself, so both behaviours are safe
        assert bool(s.lookups) == sqlalchemy.__version__.startswith("2.0.")


@pytest.mark.skipif(
    sqlalchemy.__version__.startswith("2.0."), reason="Session(execution_options=) is new in 2.1"
)
def test_the_session_level_populate_existing_option_does_not_skip_identity_lookup(Sessions):
    with Sessions(execution_options={"populate_existing": True}) as s:
        s.get(User, 1)
        assert s.lookups  # which is why CachingSession checks session.execution_options itself


def test_get_impl_calls_the_load_function_only_after_a_miss_and_it_returns_none_for_no_row(
    Sessions,
):
    with Sessions() as s:
        s.get(User, 404)
        s.get(User, 1)
        s.get(User, 1)
        assert s.loads[0] is None and isinstance(s.loads[1], User) and len(s.loads) == 2


def test_place_in_session_makes_a_persistent_clean_instance_and_fires_load(Sessions):
    loads = []

    def on_load(target: Any, context: Any) -> None:
        loads.append(context)

    event.listen(User, "load", on_load)
    try:
        with Sessions() as s:
            mapper = inspect(User)
            key = mapper.identity_key_from_primary_key((5,))
            values = {"id": 5, "name": "n", "email": None, "active": True, "version": 1}
            user = _orm.place_in_session(s, mapper, key, values, frozenset())
            state = inspect(user)
            assert state.persistent and state.key == key and s.identity_map[key] is user
            assert not state.modified and user not in s.dirty
            assert user.loaded_by_reconstructor is True
            assert loads == [None]
    finally:
        event.remove(User, "load", on_load)


def test_a_load_records_its_load_path_and_options_before_its_load_event(Sessions):
    """place_in_session records both where SQLAlchemy's load does: listeners see them."""
    seen = []

    def on_load(target: Any, context: Any) -> None:
        state = inspect(target)
        seen.append((state.load_path, tuple(state.load_options)))

    options = (lazyload(User.addresses),)
    event.listen(User, "load", on_load)
    try:
        with Sessions() as s:
            s.get(User, 1, options=list(options))
        with Sessions() as s:
            mapper = inspect(User)
            key = mapper.identity_key_from_primary_key((5,))
            values = {"id": 5, "name": "n", "email": None, "active": True, "version": 1}
            _orm.place_in_session(
                s, mapper, key, values, frozenset(), _orm.root_path(mapper), options
            )
        assert seen == [(_orm.root_path(mapper), options)] * 2
    finally:
        event.remove(User, "load", on_load)


def test_after_commit_fires_for_a_savepoint_release_inside_a_nested_transaction(Sessions):
    seen = []
    with Sessions() as s:
        event.listen(s, "after_commit", lambda sess: seen.append(sess.in_nested_transaction()))
        s.get(User, 1)
        with s.begin_nested():
            pass
        s.commit()
    assert seen == [True, False]


def test_on_pysqlite_a_savepoint_before_the_first_write_commits_at_its_release(Sessions):
    seen = []
    with Sessions() as s:

        @event.listens_for(s, "after_commit")
        def committed(sess: Any) -> None:
            seen.append((sess.in_nested_transaction(), _orm.released_savepoint_committed(sess)))

        s.get(User, 1)  # a SELECT: pysqlite begins no transaction for it
        with s.begin_nested():
            s.get(User, 1).name = "released"
        s.rollback()
        assert s.get(User, 1).name == "released"  # the rollback undid nothing
        s.get(User, 1).name = "a"
        s.flush()  # now the transaction has begun: a savepoint's release commits nothing
        with s.begin_nested():
            pass
        s.commit()
    assert seen == [(True, True), (True, False), (False, True)]  # the last: after COMMIT


def test_aiosqlite_behind_sqlalchemys_adapter_tells_when_a_release_committed(tmp_path):
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    seen = []

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/pin.sqlite")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(User.__table__.insert(), [{"id": 1, "name": "a"}])
        async with AsyncSession(engine) as s:

            @event.listens_for(s.sync_session, "after_commit")
            def committed(sess: Any) -> None:
                seen.append(_orm.released_savepoint_committed(sess))

            await s.get(User, 1)
            async with s.begin_nested():
                (await s.get(User, 1)).name = "released"
            await s.rollback()
            assert (await s.get(User, 1)).name == "released"  # the rollback undid nothing
        await engine.dispose()

    asyncio.run(main())
    assert seen == [True]


def test_fetch_synchronization_reports_matched_primary_keys_through_returning(Sessions):
    with Sessions() as s:
        engine_dialect = s.get_bind().dialect
        if not engine_dialect.update_returning:
            pytest.skip("this SQLite has no UPDATE .. RETURNING")
        captured = []

        @event.listens_for(s, "do_orm_execute")
        def capture(state: Any) -> Any:
            if state.is_update:
                state.update_execution_options(synchronize_session="fetch")
                result = state.invoke_statement()
                captured.append([tuple(r) for r in result.returned_defaults_rows])
                return result
            return None

        s.execute(update(User).where(User.id == 1).values(name="b"))
        assert captured == [[(1,)]]
        s.rollback()


def test_a_session_transaction_lists_its_connections_once_it_has_read(Sessions):
    with Sessions() as s:
        assert s.get_transaction() is None
        s.get(User, 1)
        connections = s.get_transaction()._connections
        assert connections and all(entry[0] is s.connection() for entry in connections.values())
        assert connections[s.connection()][0].default_isolation_level


def test_an_upsert_and_a_prefixed_insert_are_told_apart_from_a_plain_insert():
    from sqlalchemy import insert
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    plain = insert(User).values(id=1, name="a")
    assert not _orm.rewrites_other_rows(plain)
    assert _orm.rewrites_other_rows(insert(User).prefix_with("OR REPLACE").values(id=1))
    upsert = (
        pg_insert(User)
        .values(id=1, name="a")
        .on_conflict_do_update(index_elements=[User.id], set_={"name": "b"})
    )
    assert _orm.rewrites_other_rows(upsert)


def test_the_columns_an_update_sets_are_read_from_its_values():
    statement = update(User).values({User.name: "x", "email": "y"})
    table = User.__table__
    assert _orm.update_set_columns(statement) == [table.c.name, table.c.email]
    assert _orm.update_set_columns(update(User)) == []


def test_a_statement_with_its_own_returning_is_told_apart():
    assert not _orm.has_own_returning(update(User).values(name="x"))
    assert _orm.has_own_returning(update(User).values(name="x").returning(User.id))


def test_a_lazy_load_passes_the_state_it_started_from_and_its_load_options(Sessions):
    from sqlalchemy.orm import defaultload

    seen: list[Any] = []

    class Watching(Session):
        def _identity_lookup(self, mapper: Any, pk: Any, *args: Any, **kw: Any) -> Any:
            seen.append(kw.get("lazy_loaded_from"))
            return super()._identity_lookup(mapper, pk, *args, **kw)

    engine = Sessions.kw["bind"]
    with Watching(engine) as s:
        address = s.get(Address, 1, options=[defaultload(Address.user)])
        seen.clear()
        address.user  # noqa: B018 - the lazy many-to-one load
        assert seen and seen[-1] is inspect(address)
        assert seen[-1].load_options  # the options it was loaded with travel with it


def test_autoflush_is_the_flush_a_select_runs_first(Sessions):
    with Sessions() as s:
        s.add(User(id=77, name="pending"))
        _orm.autoflush(s)
        assert not s.new
        s.rollback()
        s.add(User(id=78, name="pending"))
        with s.no_autoflush:
            _orm.autoflush(s)
        assert s.new
        s.rollback()


def test_an_orm_dml_run_from_a_select_is_found_inside_it():
    from sqlalchemy import select

    dml = update(User).where(User.id == 1).values(name="x").returning(User)
    assert _orm.dml_statement(select(User).from_statement(dml)) is dml
    assert _orm.dml_statement(dml) is dml


def test_a_polymorphic_on_expression_is_no_instrumented_attribute():
    from sqlalchemy import Column, Integer, MetaData, String, Table, case
    from sqlalchemy.orm import registry

    table = Table("pinned_people", MetaData(), Column("id", Integer, primary_key=True),
                  Column("type", String(1)))  # fmt: skip

    class Person:
        pass

    mapper = registry().map_imperatively(
        Person, table, polymorphic_on=case({"P": "p"}, value=table.c.type), polymorphic_identity="p"
    )
    assert "_sa_polymorphic_on" in [p.key for p in mapper.column_attrs]
    assert "_sa_polymorphic_on" not in mapper.class_manager
    assert _orm.eager_plan(mapper, frozenset({"_sa_polymorphic_on"})) == _orm.NO_EAGER_LOADS


def test_a_session_tells_a_transaction_it_joined_from_one_it_began(Sessions):
    engine = Sessions.kw["bind"]
    with engine.connect() as conn, Session(bind=conn) as s:
        assert not _orm.runs_in_outside_transaction(s)  # nothing begun on the connection
        s.get(User, 1)
        assert s.get_transaction()._connections[conn][2] is True  # the session's to commit
        assert not _orm.runs_in_outside_transaction(s)
    with engine.connect() as conn:
        conn.execute(update(User).where(User.id == 1).values(name="a"))  # the connection begins
        with Session(bind=conn) as s:
            assert _orm.runs_in_outside_transaction(s)
            s.get(User, 1)
            assert s.get_transaction()._connections[conn][2] is False  # joined, not its own
            assert _orm.runs_in_outside_transaction(s)
        with Session(bind=conn, join_transaction_mode="create_savepoint") as s:
            s.get(User, 1)
            entry = s.get_transaction()._connections[conn]
            assert entry[2] is True  # its savepoint is its own to release...
            assert entry[1]._is_root is False  # ...but its root is a savepoint in another's
            assert _orm.runs_in_outside_transaction(s)
        conn.rollback()
    with Session(engine) as s:
        assert not _orm.runs_in_outside_transaction(s)


def test_code_that_asyncsession_runs_knows_it_and_can_await_on_the_loop():
    """``sqlalchemy.util.concurrency``: the synchronous code ``greenlet_spawn`` runs (as
    ``AsyncSession`` runs the session) sees ``in_greenlet()`` true and can await on the running
    loop; outside it, neither."""
    import asyncio

    from sqlalchemy.util import greenlet_spawn

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    def inside() -> tuple[bool, int]:
        return _orm.under_asyncio(), _orm.await_(answer())

    async def main() -> tuple[bool, int]:
        return await greenlet_spawn(inside)

    assert asyncio.run(main()) == (True, 42)
    assert _orm.under_asyncio() is False


def test_synchronous_calls_under_asyncsession_run_together_each_in_its_own_greenlet():
    """``greenlet_spawn`` nests: code under it spawns more greenlets, gathered on the loop, so
    their awaits overlap (two 0.2 s waits take about 0.2 s) and an exception comes back as the
    call's outcome, not raised."""
    import asyncio
    import time

    from sqlalchemy.util import greenlet_spawn

    def wait() -> str:
        _orm.await_(asyncio.sleep(0.2))
        return "waited"

    def fail() -> str:
        raise KeyError("x")

    def inside() -> tuple[list[object], float]:
        began = time.monotonic()
        outcomes = _orm.run_together([wait, wait, fail])
        return outcomes, time.monotonic() - began

    async def main() -> tuple[list[object], float]:
        return await greenlet_spawn(inside)

    (first, second, third), took = asyncio.run(main())
    assert (first, second, type(third)) == ("waited", "waited", KeyError)
    assert took < 0.35


def test_a_lazy_collection_load_is_a_do_orm_execute_a_result_can_answer(Sessions):
    """``LazyLoader._emit_lazyload`` runs ``session.execute`` with ``_lazy_loaded_from`` and the
    relationship last on the path; the listener's result becomes the collection
    (``.unique().scalars().all()``); loader options reach the parent's ``load_options`` and the
    statement's ``_with_options``; ``_autoflush`` says whether the SELECT would autoflush."""
    seen: list[Any] = []
    answer: list[Any] = []
    engine = Sessions.kw["bind"]

    def listener(state: Any) -> Any:
        if state.is_select and state.lazy_loaded_from is not None:
            seen.append(
                (
                    _orm.lazy_loaded_relationship(state),
                    state.lazy_loaded_from.load_options,
                    _orm.plain_lazy_load(state),
                    _orm.load_autoflushes(state),
                )
            )
            return _orm.instances_result(answer) if answer else None
        return None

    with Session(engine) as s:
        event.listen(s, "do_orm_execute", listener)
        assert [a.id for a in s.get(User, 1).addresses] == [1]
        relationship, load_options, plain, autoflushes = seen.pop()
        assert relationship is User.addresses.property
        assert load_options == () and plain and autoflushes
        assert not _orm.target_correlates_to_parent(relationship)
    with Session(engine) as s:
        event.listen(s, "do_orm_execute", listener)
        stand_in = Address(id=99)
        answer.append(stand_in)
        answer.append(stand_in)  # uniqued by identity, as an ORM result is
        assert s.get(User, 1).addresses == [stand_in]
        answer.clear()
    with Session(engine) as s:
        event.listen(s, "do_orm_execute", listener)
        user = s.scalars(sqlalchemy.select(User).options(sqlalchemy.orm.defer(User.name))).one()
        assert [a.id for a in user.addresses] == [1]
        _, load_options, plain, _ = seen.pop()
        assert load_options and not plain


def _criteria_of(Sessions: Any, run: Any, answer: Any = None) -> list[Any]:  # noqa: N803
    """What :func:`_orm.unique_lookup_criteria` makes of each SELECT ``run`` sends (answering it
    with ``answer(state)`` when given)."""
    found: list[Any] = []
    with Sessions() as s:

        @event.listens_for(s, "do_orm_execute")
        def recognise(state: Any) -> Any:
            if state.is_select:
                criteria = _orm.unique_lookup_criteria(state)
                found.append(None if criteria is None else (criteria.columns, criteria.values))
                if answer is not None and criteria is not None:
                    return answer(state)
            return None

        run(s)
    return found


def test_the_plain_forms_of_a_lookup_by_columns_share_one_statement_cache_key(Sessions):
    name = User.__table__.c.name
    for run in (
        lambda s: s.execute(select(User).where(User.name == "a")).scalar_one_or_none(),
        lambda s: s.execute(select(User).filter_by(name="a")).first(),
        lambda s: s.scalars(select(User).where(User.name == "a")).first(),
        lambda s: s.query(User).filter(User.name == "a").first(),  # adds LIMIT 1
        lambda s: s.query(User).filter_by(name="a").one_or_none(),
    ):
        assert _criteria_of(Sessions, run) == [((name,), ("a",))]
    both = ((name, User.__table__.c.id), ("a", 1))
    for run in (
        lambda s: s.execute(select(User).where(User.name == "a", User.id == 1)).first(),
        lambda s: s.execute(select(User).where(and_(User.name == "a", User.id == 1))).first(),
        lambda s: s.query(User).filter_by(name="a", id=1).first(),
    ):
        assert _criteria_of(Sessions, run) == [both]


def test_anything_more_in_the_statement_changes_its_cache_key(Sessions):
    where = User.name == "a"
    other = aliased(User)
    for run in (
        lambda s: s.execute(select(User).where(where).order_by(User.id)).first(),
        lambda s: s.execute(select(User).where(where).with_for_update()).first(),
        lambda s: s.execute(select(User).where(where).options(defer(User.email))).first(),
        lambda s: s.execute(select(User).where(where).offset(1)).first(),
        lambda s: s.execute(select(User).where(where).limit(0)).first(),
        lambda s: s.execute(select(User).where(where).distinct()).first(),
        lambda s: s.execute(select(User).where(User.name != "a")).first(),
        lambda s: s.execute(select(User).where(User.name.in_(["a"]))).first(),
        lambda s: s.execute(select(User.id).where(where)).first(),
        lambda s: s.execute(select(other).where(other.name == "a")).first(),
        lambda s: s.execute(
            select(User).where(where).execution_options(populate_existing=True)
        ).first(),
        lambda s: s.query(User).filter(where).populate_existing().first(),
        lambda s: s.query(User).filter(where).yield_per(5).first(),
    ):
        assert _criteria_of(Sessions, run) == [None]


def test_a_result_of_objects_answers_every_plain_form_as_the_select_would(Sessions):
    with Sessions() as s:
        user = s.get(User, 1)

        @event.listens_for(s, "do_orm_execute")
        def answer(state: Any) -> Any:
            return _orm.entity_result([user], ("User",))

        assert s.execute(select(User).where(User.name == "a")).scalar_one_or_none() is user
        assert s.execute(select(User).where(User.name == "a")).first()._mapping["User"] is user
        assert s.scalars(select(User).where(User.name == "a")).first() is user
        assert s.query(User).filter_by(name="a").first() is user  # reads Result._attributes
        assert s.query(User).filter_by(name="a").one() is user
        assert s.query(User).filter_by(name="a").all() == [user]


def test_a_lazy_many_to_one_by_another_column_passes_the_parents_values_as_parameters():
    engine = create_engine("sqlite://")
    UniqueBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Account(id=1, email="a@x", tenant=1, handle="a", name="A"))
        s.flush()
        s.add(Invoice(id=1, account_email="a@x", total=1))
        s.commit()
    seen: list[Any] = []
    with Session(engine) as s:
        invoice = s.get(Invoice, 1)

        @event.listens_for(s, "do_orm_execute")
        def record(state: Any) -> None:
            prop = _orm.lazy_loaded_relationship(state)
            where = state.statement.whereclause
            seen.append((prop, where.right.value, _orm.plain_lazy_load(state)))
            seen.append(_orm.column_equalities(where, Account.__table__, state.parameters))

        assert invoice.account.id == 1
    assert seen == [
        (Invoice.account.property, None, True),  # the value is no bound value of the clause
        ((Account.__table__.c.email,), ("a@x",)),
    ]


# -- eager relationships of a hit (sa_cache/eager.py) ----------------------------------------------


@pytest.fixture(scope="module")
def EagerSessions() -> Any:  # noqa: N802
    from .models_eager import Ability, EagerBase, LazyAbility, LazyRole, LazyUser, Post, Role
    from .models_eager import User as EagerUser

    engine = create_engine("sqlite://")
    EagerBase.metadata.create_all(engine)
    with Session(engine) as s:
        role = Role(id=1, name="r", abilities=[Ability(id=1, name="a")])
        s.add(EagerUser(id=1, name="u", roles=[role]))
        s.flush()
        s.add(Post(id=1, author_id=1))
        s.add(LazyUser(id=2, name="creator"))
        s.flush()
        lazy_role = LazyRole(id=1, name="r", creator_id=2, abilities=[LazyAbility(id=1, name="a")])
        s.add(LazyUser(id=1, name="u", roles=[lazy_role]))
        s.commit()
    return sessionmaker(engine)


def test_a_load_records_the_path_the_eager_path_helpers_build(EagerSessions):
    from .models_eager import Ability, Role
    from .models_eager import User as EagerUser

    with EagerSessions() as s:
        user = s.get(EagerUser, 1)
        role = inspect(user).dict["roles"][0]
        ability = inspect(role).dict["abilities"][0]
        root = _orm.root_path(inspect(EagerUser))
        assert inspect(user).load_path == root
        roles = _orm.child_path(root, EagerUser.roles.property)
        assert inspect(role).load_path == roles
        assert inspect(ability).load_path == _orm.child_path(roles, Role.abilities.property)
        assert _orm.path_mappers(inspect(ability).load_path) == [
            inspect(EagerUser),
            inspect(Role),
            inspect(Ability),
        ]
        # the cycle rule: Role.users (selectin) is not loaded from a user
        assert "users" not in inspect(role).dict


def test_a_lazy_load_runs_on_the_path_of_its_statement_and_many_to_ones_by_get(EagerSessions):
    from .models_eager import Post, Role
    from .models_eager import User as EagerUser

    assert _orm.primary_key_attrs_of_target(Post.author.property) == ("author_id",)
    assert _orm.primary_key_attrs_of_target(EagerUser.roles.property) is None
    with EagerSessions() as s:
        post = s.get(Post, 1)
        s.expire(post, ["author"])
        paths = []

        @event.listens_for(s, "do_orm_execute")
        def record(state: Any) -> None:
            if state.lazy_loaded_from is not None:
                paths.append(_orm.lazy_load_children_path(state))

        role = s.get(Role, 1)
        s.expire(role, ["abilities"])
        along = _orm.child_path(_orm.root_path(inspect(EagerUser)), EagerUser.roles.property)
        _orm.load_along(inspect(role), Role.abilities.property, along)
        assert [a.id for a in inspect(role).dict["abilities"]] == [1]
        assert paths == [_orm.child_path(along, Role.abilities.property)]
        ability = inspect(role).dict["abilities"][0]
        assert inspect(ability).load_path == paths[0]  # a new load: not refreshed here
        assert _orm.lazy_load_path(inspect(post), inspect(EagerUser)) == _orm.child_path(
            _orm.root_path(inspect(Post)), Post.author.property
        )


def test_set_loaded_leaves_a_state_as_a_load_leaves_it(EagerSessions):
    from .models_eager import Role
    from .models_eager import User as EagerUser

    with EagerSessions() as s:
        user = s.get(EagerUser, 1)
        role = s.get(Role, 1)
        state = inspect(user)
        del state.dict["roles"]
        _orm.set_loaded(state, "roles", [role])
        assert "roles" not in state.unloaded and not state.modified
        assert not s.dirty
        path = _orm.child_path(_orm.root_path(inspect(EagerUser)), EagerUser.roles.property)
        assert path.path == (inspect(EagerUser), EagerUser.roles.property, inspect(Role))


def test_only_an_inner_joined_relationship_is_refreshed_with_its_row():
    from .models_eager import Board, Post

    assert not _orm.refreshed_with_row(Board.posts.property)  # joined, outer
    assert not _orm.refreshed_with_row(Post.author.property)
    assert _orm.eager_plan(inspect(Board), frozenset()).trigger == ("posts", "notes", "tags")


def _lazy_first_models() -> Any:
    """A parent with one-to-manys (lazy, raise, raise_on_sql and uselist=False forms to one
    class, joined to another) and a subclass, on a mapping of its own: the loaders replaced
    here are no one else's."""
    from sqlalchemy import Column, ForeignKey, Integer, String
    from sqlalchemy.orm import DeclarativeBase, relationship

    class LazyBase(DeclarativeBase):
        pass

    class Kid(LazyBase):
        __tablename__ = "pin_kids"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("pin_parents.id"))

    class Toy(LazyBase):
        __tablename__ = "pin_toys"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("pin_parents.id"))

    class Parent(LazyBase):
        __tablename__ = "pin_parents"
        id = Column(Integer, primary_key=True)
        kind = Column(String(10), default="parent")
        kids = relationship(Kid, order_by=Kid.id)
        raising = relationship(Kid, lazy="raise", viewonly=True)
        raising_on_sql = relationship(Kid, lazy="raise_on_sql", viewonly=True)
        joined = relationship(Toy, lazy="joined")
        one = relationship(Kid, uselist=False, viewonly=True)
        __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "parent"}

    class Child(Parent):
        __mapper_args__ = {"polymorphic_identity": "child"}

    engine = create_engine("sqlite://")
    LazyBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Parent(id=1, kids=[Kid(id=1), Kid(id=2)]), Child(id=2, kids=[Kid(id=3)])])
        s.commit()
    return engine, Parent, Child, Kid


class AnsweringSession(Session):
    """Answers a replaced loader with ``answer`` (None: SQLAlchemy's loader), recording how
    it was asked."""

    answer: list[Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[Any, ...]] = []

    def cache_lazy_collection(self, state: Any, prop: Any, autoflushes: bool, load: Any) -> Any:
        self.asked.append((state, prop, autoflushes))
        return load() if self.answer is None else self.answer


def test_a_lazy_relationships_class_level_loader_is_its_strategys_load_for_state():
    """``AttributeImpl.callable_`` is ``_LazyLoader._load_for_state`` bound to the strategy for
    lazy and eager relationships alike; the strategy says ``raise``/``raise_on_sql`` and which
    parent columns its SELECT reads (``_bind_to_col``)."""
    _, Parent, Child, Kid = _lazy_first_models()
    for mapper in (inspect(Parent), inspect(Child)):
        for key, raises in [
            ("kids", (False, False)),
            ("raising", (True, False)),
            ("raising_on_sql", (False, True)),
            ("joined", (False, False)),
            ("one", (False, False)),
        ]:
            loader = mapper.class_manager[key].impl.callable_
            assert loader.__func__ is _orm._LAZY_LOADER._load_for_state
            strategy = loader.__self__
            assert isinstance(strategy, _orm._LAZY_LOADER)
            assert (strategy._raise_always, strategy._raise_on_sql) == raises
            assert list(strategy._bind_to_col.values()) == [Parent.__table__.c.id]
    assert Child.kids.impl is not Parent.kids.impl, "each class mapping it has its own loader"


def test_a_replaced_loader_answers_a_plain_access_as_the_lazy_loader_does():
    """The replacement is asked with ``PASSIVE_OFF`` on a plain access; what it returns is set
    as the loaded collection (committed: no history); a session's ``no_autoflush`` is the
    session's to honour (``autoflushes`` says what the load's passive flags allow)."""
    engine, Parent, Child, Kid = _lazy_first_models()
    prop = Parent.kids.property
    _orm.answer_lazy_loads_first(prop)
    _orm.answer_lazy_loads_first(prop)  # idempotent
    for mapper in (inspect(Parent), inspect(Child)):
        replaced = mapper.class_manager["kids"].impl.callable_
        assert replaced._sa_cache_original.__func__ is _orm._LAZY_LOADER._load_for_state
    _orm.answer_lazy_loads_first(Parent.raising.property)
    _orm.answer_lazy_loads_first(Parent.one.property)
    for key in ("raising", "one"):  # never replaced
        assert inspect(Parent).class_manager[key].impl.callable_.__func__ is (
            _orm._LAZY_LOADER._load_for_state
        )
    with AnsweringSession(engine) as s:
        parent = s.get(Parent, 1)
        stand_in = s.get(Kid, 3)
        s.answer = [stand_in]
        assert parent.kids == [stand_in]
        assert s.asked == [(inspect(parent), prop, True)]
        history = inspect(parent).attrs.kids.history
        assert (history.added, history.unchanged, history.deleted) == ((), [stand_in], ())
        assert not s.dirty
        child = s.get(Child, 2)
        s.answer = None
        with s.no_autoflush:  # the session's own setting: still asked, autoflushes=True
            assert [k.id for k in child.kids] == [3]
        assert s.asked[-1] == (inspect(child), prop, True)
        assert "kids" in inspect(child).dict


def test_loads_a_replaced_loader_must_leave_to_sqlalchemy_never_reach_it():
    """Per-instance loaders (``lazyload`` with criteria: ``_LoadLazyAttribute``,
    ``LoadLazyAttribute`` in 2.0, in ``InstanceState.callables``) are called before the class
    one; history reads pass flags other than ``PASSIVE_OFF``; an expired primary key must be
    refreshed first; a pending parent has no collection in the database."""
    from sqlalchemy.orm import lazyload

    engine, Parent, Child, Kid = _lazy_first_models()
    _orm.answer_lazy_loads_first(Parent.kids.property)
    with AnsweringSession(engine) as s:
        s.answer = []
        parent = s.scalars(
            select(Parent).where(Parent.id == 1).options(lazyload(Parent.kids.and_(Kid.id > 1)))
        ).unique().one()
        per_instance = inspect(parent).callables["kids"]
        assert type(per_instance).__name__ in ("_LoadLazyAttribute", "LoadLazyAttribute")
        assert [k.id for k in parent.kids] == [2]
        parent = s.get(Child, 2)
        assert inspect(parent).attrs.kids.history == ((), (), ())  # PASSIVE_NO_INITIALIZE
        s.expire(parent, ["id"])
        assert [k.id for k in parent.kids] == [3]  # refreshed, then SQLAlchemy's SELECT
        pending = Parent(id=5)
        s.add(pending)
        assert pending.kids == []
        assert s.asked == []


def test_the_load_path_of_a_lazy_collections_members_is_the_parents_mapper_path():
    """:func:`_orm.lazy_collection_path` is what a ``do_orm_execute`` listener reads from the
    lazy load's statement (:func:`_orm.lazy_load_children_path`), from a subclass too."""
    engine, Parent, Child, Kid = _lazy_first_models()
    seen: list[Any] = []
    with Session(engine) as s:
        event.listen(
            s,
            "do_orm_execute",
            lambda state: seen.append(_orm.lazy_load_children_path(state))
            if _orm.lazy_loaded_relationship(state) is Parent.kids.property
            else None,
        )
        for pk in (1, 2):
            parent = s.get(Parent, pk)
            kids = parent.kids
            expected = _orm.lazy_collection_path(inspect(parent), Parent.kids.property)
            assert seen.pop() == expected
            assert inspect(kids[0]).load_path == expected


def test_session_execution_options_are_empty_before_2_1():
    engine = create_engine("sqlite://")
    assert _orm.session_execution_options(Session(engine)) == {}
    if "execution_options" in vars(Session):
        options = {"populate_existing": True}
        assert _orm.session_execution_options(Session(engine, execution_options=options)) == (
            options
        )


# -- loader options of a hit (sa_cache/eager.py) ---------------------------------------------------


def _reached(root: Any) -> list[Any]:
    """The states a load left reachable from ``root`` through loaded relationships."""
    found: dict[int, Any] = {}
    held = []  # the instances, while their states are read
    todo = [inspect(root)]
    while todo:
        state = todo.pop()
        if id(state) in found:
            continue
        found[id(state)] = state
        held.append(state.obj())
        for rel in state.mapper.relationships:
            value = state.dict.get(rel.key)
            members = value if rel.uselist and value is not None else [value]
            todo.extend(inspect(m) for m in members if m is not None)
    return list(found.values())


def _option_sets() -> list[tuple[Any, list[Any]]]:
    from sqlalchemy.orm import (
        Load,
        defaultload,
        lazyload,
        noload,
        selectinload,
        subqueryload,
    )

    from .models_eager import LazyRole, LazyUser, Role
    from .models_eager import User as EagerUser

    return [
        (LazyUser, [selectinload(LazyUser.roles).selectinload(LazyRole.abilities)]),
        (LazyUser, [Load(LazyUser).joinedload(LazyUser.roles).selectinload(LazyRole.abilities)]),
        (LazyUser, [subqueryload(LazyUser.roles).immediateload(LazyRole.creator)]),
        (LazyUser, [selectinload(LazyUser.roles).selectinload(LazyRole.users)]),  # a cycle
        (LazyUser, [selectinload(LazyUser.roles).raiseload(LazyRole.abilities)]),
        (EagerUser, [lazyload(EagerUser.roles)]),
        (EagerUser, [noload(EagerUser.roles)]),
        (EagerUser, [defaultload(EagerUser.roles).raiseload(Role.abilities, sql_only=True)]),
        (EagerUser, [selectinload(EagerUser.roles).selectinload(Role.users)]),
    ]


@pytest.mark.parametrize("index", range(9))
def test_load_context_resolves_options_as_the_load_applies_them(EagerSessions, index):
    """Per instance a real load with the options reached, per relationship: what the load
    did is what the strategy :func:`_orm.load_context` resolves at its load path names."""
    model, options = _option_sets()[index]
    context = _orm.load_context(options, inspect(model))
    assert context is not None
    assert context.options == tuple(options)
    applied = 0
    with EagerSessions() as s:
        root = s.get(model, 1, options=options)  # (held: the identity map holds it weakly)
        for state in _reached(root):
            assert state.load_options == tuple(options)
            loaders = context.loaders.get(_orm.natural_path(state.load_path), {})
            for rel in state.mapper.relationships:
                element = loaders.get(rel.key)
                if element is None:
                    continue  # the mapping's own strategy, cycles and all
                applied += 1
                strategy = _orm.option_strategy(element) or _orm.default_strategy(rel)
                if strategy in ("joined", "selectin", "subquery", "immediate"):
                    assert rel.key in state.dict, (strategy, rel)
                elif strategy == "noload":
                    assert state.dict[rel.key] == ([] if rel.uselist else None)
                elif _orm.is_instance_level(rel, strategy):
                    assert state.callables[rel.key].strategy_key == (("lazy", strategy),)
                    assert rel.key not in state.dict
                else:
                    assert rel.key not in state.dict and rel.key not in state.callables
    assert applied == sum(len(by_key) for by_key in context.loaders.values())


def test_load_context_refuses_what_a_hit_cannot_carry_out():
    from sqlalchemy.orm import (
        defaultload,
        joinedload,
        load_only,
        selectin_polymorphic,
        selectinload,
        with_loader_criteria,
    )

    from .models_eager import Board, LazyRole, LazyUser

    mapper = inspect(LazyUser)
    for options in (
        [selectinload(LazyUser.roles.and_(LazyRole.id > 1))],
        [selectinload("*")],
        [selectinload(LazyUser.roles).load_only(LazyRole.name)],
        [load_only(LazyUser.name)],
        [joinedload(LazyUser.roles, innerjoin=True)],
        [with_loader_criteria(LazyRole, LazyRole.id > 1)],
        [defaultload(LazyUser.roles).subqueryload(LazyRole.abilities)],
        [selectinload(Board.posts)],  # not of this mapper: SQLAlchemy's load raises
        [selectin_polymorphic(LazyUser, [])],
    ):
        assert _orm.load_context(options, mapper) is None, options


def test_a_lazy_loader_of_an_instance_and_noload_are_set_as_a_load_sets_them(EagerSessions):
    from sqlalchemy.orm import raiseload

    from .models_eager import LazyRole, LazyUser

    options = [raiseload(LazyUser.roles)]
    with EagerSessions() as s:
        held = [s.get(LazyUser, 1, options=options), s.get(LazyUser, 2)]
        loaded, placed = (inspect(user) for user in held)
        prop = LazyUser.roles.property
        assert _orm.is_instance_level(prop, "raise") and not _orm.is_instance_level(prop, "select")
        element = _orm.load_context(options, inspect(LazyUser)).loaders[(inspect(LazyUser),)]
        _orm.set_instance_lazy_loader(placed, prop, "raise", element["roles"])
        _orm.set_load_options(placed, tuple(options))
        assert placed.callables["roles"].strategy_key == loaded.callables["roles"].strategy_key
        assert placed.load_options == loaded.load_options
        for state in (loaded, placed):
            with pytest.raises(sqlalchemy.exc.InvalidRequestError, match="raise"):
                state.obj().roles  # noqa: B018
        held.append(s.get(LazyRole, 1))
        role = inspect(held[-1])
        _orm.set_not_loaded(role, LazyRole.abilities.property)
        _orm.set_not_loaded(role, LazyRole.creator.property)
        assert role.dict["abilities"] == [] and role.dict["creator"] is None
        assert not role.modified


def test_a_lazy_load_from_an_instance_loaded_with_options_carries_them_along_its_path(
    EagerSessions,
):
    from sqlalchemy.orm import defaultload

    from .models_eager import LazyRole, LazyUser

    options = [defaultload(LazyUser.roles).defaultload(LazyRole.creator)]
    seen = []
    with EagerSessions() as s:

        @event.listens_for(s, "do_orm_execute")
        def record(state: Any) -> None:
            if state.lazy_loaded_from is not None:
                parent_options = tuple(state.lazy_loaded_from.load_options)
                seen.append(
                    (
                        _orm.plain_lazy_load(state, parent_options),
                        _orm.plain_lazy_load(state),
                        _orm.lazy_load_children_path(state),
                    )
                )

        user = s.get(LazyUser, 1, options=options)
        role = user.roles[0]
        user_state = inspect(user)
        assert seen == [
            (True, False, _orm.child_path(user_state.load_path, LazyUser.roles.property))
        ]
        role_state = inspect(role)
        assert role_state.load_path == seen[0][2]
        assert _orm.lazy_load_path(role_state, inspect(LazyUser), along_load_path=True) == (
            _orm.child_path(role_state.load_path, LazyRole.creator.property)
        )
        assert inspect(role.creator).load_path == _orm.child_path(
            role_state.load_path, LazyRole.creator.property
        )
