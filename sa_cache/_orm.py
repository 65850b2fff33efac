"""Every use of an SQLAlchemy internal, in one place.

``tests/test_orm_internals.py`` pins each behaviour relied on here, so an SQLAlchemy upgrade that
changes one fails there first, by name.

1. ``Session._identity_lookup`` is the one method that ``Session.get``, ``Session.get_one``,
   ``Query.get``, ``Session.merge`` and lazy many-to-one loads ("use_get") all pass through, and
   SQLAlchemy itself skips it for ``populate_existing``, ``with_for_update`` and
   ``always_refresh`` mappers: exactly the loads a cache must not answer. The horizontal-sharding
   extension overrides it for the same reason.
2. ``Session._get_impl`` receives the function that runs the SELECT after the identity lookup
   missed. Wrapping it lets a cached "this row does not exist" answer without SQL, and lets a
   SELECT that found nothing be remembered.
3. :func:`next_load_sees_fresh_snapshot` reads the connections a session's transaction holds,
   to refuse fills from a REPEATABLE READ snapshot older than the cache's state.
4. :func:`place_in_session` puts a cached row into the identity map the way
   ``loading._instance`` does for a fresh row (measured at ~4 µs against ~15 µs for
   ``make_transient_to_detached`` + ``Session.add``), records its ``load_path`` and
   ``load_options`` where the load records them (before its events), then fires the same
   ``load`` and ``loaded_as_persistent`` events, so ``@reconstructor`` and user listeners see a
   cache hit as a load; it sets ``lazy="noload"`` relationships as that strategy's row
   processor does (``attributes.init_state_collection``, or None).
5. ``Session._identity_lookup`` receives ``lazy_loaded_from`` (the state a lazy load started
   from, whose ``load_options`` travel to the load) and ``Session._get_impl`` the ``options`` of a
   ``get``: a hit carries out the loader options :func:`load_context` resolves, and skips the
   cache for the others.
6. :func:`autoflush` is ``Session._autoflush``, the flush a lookup's SELECT runs first.
7. :func:`complete_like_a_load` loads what a load fills in beyond the columns with
   ``Session.refresh`` with attribute names (SQL expressions, and the ``joined`` relationships
   the cache did not answer).
8. DML statements: :func:`rewrites_other_rows`, :func:`update_set_columns`,
   :func:`has_own_returning` and :func:`dml_statement` read ``Insert._post_values_clause`` /
   ``_prefixes``, ``Update._values``, ``_returning`` and ``FromStatement.element``.
9. :func:`eager_plan` skips attributes that are not instrumented (``Mapper.class_manager``).
10. :func:`runs_in_outside_transaction` reads ``SessionTransaction._connections`` to tell a
    transaction the session began from one it joined; :func:`held_connections` lists the
    connections there, whose isolation levels decide fills and hits.
11. :func:`under_asyncio` and :func:`await_` are ``sqlalchemy.util.concurrency``'s
    ``in_greenlet`` and ``await_`` (``await_only`` before 2.1): the bridge by which SQLAlchemy's
    asyncio drivers run beneath the synchronous ``Session`` that ``AsyncSession`` drives, and by
    which the cache's own Redis I/O is awaited on the event loop instead of blocking it;
    :func:`run_together` runs several such synchronous calls at once, each in its own
    ``greenlet_spawn`` (a Cluster batch's node pipelines).
12. Lazy collection loads: ``LazyLoader._emit_lazyload`` runs ``session.execute(select(Target))``
    with ``_lazy_loaded_from`` in its load options and the relationship last on its
    ``_current_path``; a ``do_orm_execute`` listener that returns a ``Result`` answers it
    without SQL (consumed as ``.unique().scalars().all()``). :func:`lazy_loaded_relationship`,
    :func:`plain_lazy_load` (``Select._with_options``, ``load_options._populate_existing``),
    :func:`load_autoflushes` (``load_options._autoflush``), :func:`instances_result`
    (``SimpleResultMetaData._create_unique_filters``, ``_unique_filters`` in 2.0) and
    :func:`target_correlates_to_parent` (``RelationshipProperty._target_correlates_to_parent``).
13. Unique-column lookups: :func:`unique_lookup_criteria` compares a SELECT's statement cache key
    (``_generate_cache_key``) with canonical ones (``Query._statement_20`` for the legacy form),
    reads ``Select._limit``, the ``load_options`` overrides (``vars()``), and columns through
    ``_deannotate``; :func:`entity_result` sets ``Result._attributes`` (``is_single_entity``,
    ``filtered``), which the legacy ``Query`` reads to return scalars, uniqued.
14. Eager relationships of a hit (:mod:`sa_cache.eager`): load paths are ``PathRegistry``
    objects (:func:`root_path` is ``Mapper._path_registry``, :func:`child_path` indexes it by
    relationship and target, :func:`path_mappers` reads ``PathRegistry.path``), recorded on
    ``InstanceState.load_path`` (by :func:`place_in_session`); :func:`load_along` is what
    ``ImmediateLoader`` does (``LazyLoader._load_for_state`` with ``alternate_effective_path``);
    :func:`lazy_load_children_path` reads a lazy load's ``loader_strategy_path``;
    :func:`primary_key_attrs_of_target` reads ``LazyLoader.use_get``; :func:`set_loaded` is
    ``set_committed_value``.
15. A lazy collection load answered before SQLAlchemy builds its SELECT:
    :func:`answer_lazy_loads_first` replaces a relationship's class-level loader callable
    (``AttributeImpl.callable_``, the strategy's ``_LazyLoader._load_for_state``; ``LazyLoader``
    in 2.0) on every class that maps it, by one that asks the session first
    (``cache_lazy_collection``) and calls the original otherwise. ``AttributeImpl`` consults
    ``InstanceState.callables`` (the per-instance loaders of loader options,
    ``_LoadLazyAttribute``; ``LoadLazyAttribute`` in 2.0) before it, so those loads never reach
    it; :func:`load_along` calls the strategy directly, past it. The strategy's
    ``_raise_always``, ``_raise_on_sql`` and ``_bind_to_col`` (the parent columns its SELECT
    reads) say which loads it may answer.
16. Loader options of a hit: :func:`load_context` resolves options with the compile state of
    ``Query(mapper).options(...)`` (``Query._compile_state``: its ``attributes`` hold each load
    element under ``("loader", natural path)``, where the strategies look them up), reading
    ``Load.context`` / ``additional_source_entities`` and the elements' ``strategy``,
    ``local_opts``, ``_extra_criteria``, ``_of_type`` and ``path``, keyed by
    ``_generate_cache_key``; :func:`set_instance_lazy_loader` is what
    ``LazyLoader.create_row_processor`` does for a strategy that is not the class's
    (``is_class_level``: ``_LoadLazyAttribute`` through
    ``InstanceState._instance_level_callable_processor``); :func:`set_not_loaded` is what
    ``NoLoader`` does; :func:`set_load_options` records ``InstanceState.load_options``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from inspect import signature
from typing import Any, Final, NamedTuple, Protocol, TypeVar, cast

from sqlalchemy import and_, inspect, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Result
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import (
    InstanceState,
    Mapper,
    ORMExecuteState,
    Query,
    RelationshipDirection,
    RelationshipProperty,
    Session,
    strategies,
    strategy_options,
)
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.orm.attributes import init_state_collection, instance_state, set_committed_value
from sqlalchemy.orm.base import ATTR_WAS_SET, LoaderCallableStatus, PassiveFlag
from sqlalchemy.orm.context import FromStatement
from sqlalchemy.schema import Column
from sqlalchemy.sql import Select, operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ColumnClause,
)
from sqlalchemy.util import EMPTY_DICT, immutabledict
from sqlalchemy.util import concurrency as _concurrency

from .isolation import PER_STATEMENT_SNAPSHOTS

R = TypeVar("R")

_SQL_ALLOWED: Final = PassiveFlag.SQL_OK | PassiveFlag.RELATED_OBJECT_OK

#: Returned by :meth:`IdentityLookupHooks.cache_lookup` when the cache knows the row is absent.
KNOWN_ABSENT: Final = object()


class IdentityLookupHooks:
    """Session mixin that turns SQLAlchemy's identity lookups into two plain hooks.

    ``cache_lookup`` is asked after the identity map missed and when SQL would be allowed; it
    returns an instance, None (go to the database) or :data:`KNOWN_ABSENT`. ``loaded_nothing`` is
    told when a ``get`` went to the database and found no row.
    """

    _sa_cache_last_absent: Any = None
    #: the normalised primary key the cache was asked for during the current ``get``
    _sa_cache_lookup_pk: Any = None
    #: the loader options of the ``get`` under way
    _sa_cache_get_options: tuple[Any, ...] = ()
    #: the state a lazy many-to-one load under way started from (None for a ``get``)
    _sa_cache_lazy_from: Any = None

    def cache_lookup(
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any,
        execution_options: Any,
        options: tuple[Any, ...],
        autoflush: bool,
    ) -> Any:
        """What SQLAlchemy's own lookup would do next, as far as a cache must know it:
        ``options``, the loader options that apply to the row (``get(..., options=[...])``, or
        the ``load_options`` the parent of a lazy load was loaded with); ``autoflush``, whether
        the SELECT it would run next autoflushes first (not for a lazy load from a pending
        object, nor with ``NO_AUTOFLUSH``)."""
        return None

    def loaded_nothing(self, mapper: Mapper[Any], primary_key_identity: Any) -> None:
        return None

    def lookup_done(self) -> None:
        """Called when a ``get`` returns or raises, whatever happened in between."""
        return None

    def identity_map_lookup(
        self, mapper: Mapper[Any], primary_key_identity: Any, identity_token: Any = None
    ) -> Any:
        """The identity map alone (expired instances are refreshed, as SQLAlchemy does)."""
        return Session._identity_lookup(self, mapper, primary_key_identity, identity_token)  # type: ignore[arg-type]

    def _identity_lookup(
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any = None,
        passive: PassiveFlag = PassiveFlag.PASSIVE_OFF,
        **kw: Any,
    ) -> Any:
        found = super()._identity_lookup(  # type: ignore[misc]
            mapper, primary_key_identity, identity_token, passive, **kw
        )
        if found is not None or passive & _SQL_ALLOWED != _SQL_ALLOWED:
            return found
        parent = kw.get("lazy_loaded_from")  # the InstanceState a lazy load started from
        if parent is None:
            options, autoflush = self._sa_cache_get_options, True
        else:
            options, autoflush = tuple(parent.load_options), parent.key is not None
        outer, self._sa_cache_lazy_from = self._sa_cache_lazy_from, parent
        try:
            answer = self.cache_lookup(
                mapper,
                primary_key_identity,
                identity_token,
                kw.get("execution_options") or EMPTY_DICT,
                options,
                autoflush and not passive & PassiveFlag.NO_AUTOFLUSH,
            )
        finally:
            self._sa_cache_lazy_from = outer
        if answer is KNOWN_ABSENT:
            self._sa_cache_last_absent = primary_key_identity
            return None
        return answer

    def _get_impl(
        self, entity: Any, primary_key_identity: Any, db_load_fn: Callable[..., Any], **kw: Any
    ) -> Any:
        self._sa_cache_last_absent = None
        self._sa_cache_lookup_pk = None
        outer_options = self._sa_cache_get_options
        options = kw.get("options")
        self._sa_cache_get_options = tuple(options) if options else ()

        try:
            return super()._get_impl(  # type: ignore[misc]
                entity,
                primary_key_identity,
                partial(_load_unless_known_absent, entity, db_load_fn),
                **kw,
            )
        finally:
            self._sa_cache_get_options = outer_options
            self.lookup_done()


def _load_unless_known_absent(
    entity: Any,
    db_load_fn: Callable[..., Any],
    session: Any,
    statement: Any,
    pk: Any,
    **load_kw: Any,
) -> Any:
    """The SELECT of a ``get`` the identity lookup missed (``db_load_fn``, called with the
    session first), unless the cache knew the row absent; with the key the cache was asked for
    (a ``partial``, not a closure: made on every ``get``)."""
    if session._sa_cache_last_absent is not None:
        session._sa_cache_last_absent = None
        return None
    if session._sa_cache_lookup_pk is not None:
        # load what the cache was asked for, so a cold and a warm cache agree
        pk = list(session._sa_cache_lookup_pk)
    result = db_load_fn(session, statement, pk, **load_kw)
    if result is None:
        session.loaded_nothing(inspect(entity), pk)
    return result


def next_load_sees_fresh_snapshot(session: Session) -> bool:
    """Whether the session's next SELECT reads data at least as new as "now".

    True when its transaction holds no connection yet (the load will begin the snapshot), when
    every connection it holds takes a snapshot per statement (READ COMMITTED and weaker), or for a
    pysqlite connection that has not begun a transaction (its default mode runs each SELECT
    outside one). False for REPEATABLE READ and SERIALIZABLE transactions that have already read:
    their snapshot may predate an eviction the cache has already seen, and filling from it would
    put an old row back (``SessionTransaction._connections`` holds the connections).
    """
    for connection in held_connections(session):
        level = connection.get_execution_options().get("isolation_level")
        if (level or connection.default_isolation_level) in PER_STATEMENT_SNAPSHOTS:
            continue
        if connection.dialect.name == "sqlite" and not getattr(
            connection.connection.dbapi_connection, "in_transaction", True
        ):
            continue
        return False
    return True


def released_savepoint_committed(session: Session) -> bool:
    """Whether releasing the session's savepoint committed its database transaction: true when a
    pysqlite connection the session holds is out of any transaction just after the release.
    pysqlite's default mode begins a transaction only before an INSERT, UPDATE or DELETE, so a
    SAVEPOINT issued before the transaction's first write begins it, and its RELEASE commits:
    what the session wrote is durable, and the rollback SQLAlchemy may still run undoes none
    of it. The same holds for aiosqlite, which runs pysqlite's default mode in a thread."""
    for connection in held_connections(session):
        if connection.dialect.name != "sqlite" or connection.closed or connection.invalidated:
            continue
        dbapi = connection.connection.dbapi_connection
        # aiosqlite's connection tells it too, behind SQLAlchemy's adapter (``_connection``)
        in_transaction = getattr(dbapi, "in_transaction", None)
        if in_transaction is None:
            in_transaction = getattr(getattr(dbapi, "_connection", None), "in_transaction", None)
        if in_transaction is False:
            return True
    return False


def held_connections(session: Session) -> list[Connection]:
    """The connections the session's transaction holds (none before its first statement); its
    ``SessionTransaction._connections`` maps each bind to ``(connection, transaction,
    should_commit, autoclose)``."""
    transaction = session.get_transaction()
    if transaction is None:
        return []
    return [entry[0] for entry in transaction._connections.values()]


def autoflush(session: Session) -> bool:
    """Flush as the SELECT of a lookup would before running (``Session._autoflush``: honours
    ``autoflush=False`` and ``no_autoflush``, and wraps errors as a query-invoked autoflush).
    Returns whether the session had anything to flush (``Session._is_clean``)."""
    if session._is_clean():
        return False
    session._autoflush()
    return True


def runs_in_outside_transaction(session: Session) -> bool:
    """Whether the session runs on a ``Connection`` whose transaction it did not begin (the
    "session inside an external transaction" recipe, sessions sharing one connection). That
    transaction may have written, or read a snapshot, without the session: the session cannot
    tell what its SELECTs see (``SessionTransaction._connections`` entries are ``(connection,
    transaction, should_commit, autoclose)``; a joined transaction is not the session's to
    commit, and a session joined with a savepoint holds a ``NestedTransaction`` for its root,
    whose ``_is_root`` is False)."""
    bind = session.bind
    if not isinstance(bind, Connection):
        return False
    transaction = session.get_transaction()  # the root one
    entry = None if transaction is None else transaction._connections.get(bind)
    if entry is None:  # the session has not used the connection yet
        return bind.in_transaction()
    # joined without a savepoint (not the session's to commit), or with one
    # (``join_transaction_mode="create_savepoint"``: the session's root is a savepoint)
    return not entry[2] or not entry[1]._is_root


def session_execution_options(session: Any) -> Any:
    """The session's own execution options (``Session.execution_options``, from SQLAlchemy
    2.1; none in 2.0): merged into every statement's, ``populate_existing`` and ``autoflush``
    among them."""
    return getattr(session, "execution_options", None) or EMPTY_DICT


def session_populates_existing(session: Any) -> bool:
    """Whether the session was configured with ``execution_options={"populate_existing": True}``.

    ``Session.execution_options`` exists from SQLAlchemy 2.1; in 2.0 no session has it."""
    options = getattr(session, "execution_options", None)
    return bool(options and options.get("populate_existing"))


class EagerPlan(NamedTuple):
    """What a load of one mapper fills in beyond its cached columns that a hit asks
    ``Session.refresh`` for (the eager relationships are :mod:`sa_cache.eager`'s).

    :param refresh: attributes one ``Session.refresh`` loads in one SELECT: SQL expressions
        (``column_property``, ``query_expression``) and ``lazy="joined"`` relationships with
        ``innerjoin=True`` (see :func:`refreshed_with_row`).
    :param trigger: every other ``joined`` / ``selectin`` / ``subquery`` / ``immediate``
        relationship: a hit completes them (:func:`sa_cache.eager.complete`), so a hit with
        any of them is no plain placement (``get_many`` sends those to the database).

    A hit that carries these out costs at most the SQL of a miss, and leaves the instance as a
    load leaves it (no attribute left to load after the session closes).
    """

    refresh: tuple[str, ...]
    trigger: tuple[str, ...]


#: The plan of a mapper whose load fills in nothing beyond its columns.
NO_EAGER_LOADS: Final = EagerPlan((), ())
_EAGER_LOADERS: Final = frozenset({"joined", "selectin", "subquery", "immediate"})
#: by mapper, for the life of the process as mappers are (a plain dict: asked on every hit)
_plans: dict[Mapper[Any], EagerPlan] = {}


def refreshed_with_row(prop: RelationshipProperty[Any]) -> bool:
    """Whether a hit loads ``prop`` with ``Session.refresh`` of its row: a ``joined``
    relationship with ``innerjoin=True``, whose INNER JOIN makes a ``get`` find no row at all
    when the collection is empty or the reference NULL; the refresh finds nothing then too."""
    return prop.lazy == "joined" and bool(prop.innerjoin)


def eager_plan(mapper: Mapper[Any], expressions: frozenset[str]) -> EagerPlan:
    """The :class:`EagerPlan` of ``mapper``; ``expressions`` are its column attributes a cached
    row does not hold."""
    plan: EagerPlan | None = _plans.get(mapper)
    if plan is None:
        # only instrumented attributes: a polymorphic_on expression (``_sa_polymorphic_on``) is
        # no attribute of the instance, and a load does not fill it
        expressions = frozenset(key for key in expressions if key in mapper.class_manager)
        joined = [r.key for r in mapper.relationships if refreshed_with_row(r)]
        trigger = [
            r.key
            for r in mapper.relationships
            if r.lazy in _EAGER_LOADERS and not refreshed_with_row(r)
        ]
        refresh = tuple(sorted(expressions)) + tuple(joined)
        if refresh:  # a refresh must load at least one table column: the key is one
            refresh = (mapper.get_property_by_column(mapper.primary_key[0]).key, *refresh)
        plan = EagerPlan(refresh, tuple(trigger))
        if plan == NO_EAGER_LOADS:
            plan = NO_EAGER_LOADS  # one object: the hit path compares by identity
        _plans[mapper] = plan
    return plan


def complete_like_a_load(session: Session, instance: Any, plan: EagerPlan) -> bool:
    """Load what ``plan.refresh`` names on a freshly placed hit; False if the row is gone
    meanwhile (a refresh found nothing: SQLAlchemy's SELECT would have found nothing too)."""
    if plan.refresh:
        try:
            session.refresh(instance, attribute_names=plan.refresh)
        except sa_exc.InvalidRequestError:
            if instance_state(instance).key is None or instance not in session:
                raise
            session.expunge(instance)
            return False
    return True


# -- eager relationships of a hit (sa_cache.eager) -------------------------------------------------


def primary_key_attrs_of_target(prop: RelationshipProperty[Any]) -> tuple[str, ...] | None:
    """For a many-to-one whose lazy load is a primary-key lookup of its target
    (``LazyLoader.use_get``), the parent's attributes holding that key, in the target's
    primary-key order; None otherwise."""
    lazy = prop._get_strategy((("lazy", "select"),))
    if not getattr(lazy, "use_get", False):
        return None
    by_remote = {remote: local for local, remote in prop.local_remote_pairs}
    attrs = []
    for column in prop.mapper.primary_key:
        local = by_remote.get(column)
        if local is None:
            return None
        try:
            attrs.append(prop.parent.get_property_by_column(local).key)
        except Exception:  # not mapped on the parent
            return None
    return tuple(attrs)


def root_path(mapper: Mapper[Any]) -> Any:
    """The load path of a row loaded by a ``get`` of ``mapper`` (``Mapper._path_registry``)."""
    return mapper._path_registry


def child_path(path: Any, prop: RelationshipProperty[Any]) -> Any:
    """The load path of the rows an eager load of ``prop`` brings in from a row at ``path``."""
    return path[prop][prop.mapper]


def path_mappers(path: Any) -> list[Mapper[Any]]:
    """The mappers along a load path (its even elements, ``PathRegistry.path``)."""
    return [entity.mapper for entity in path.path[::2]]


def lazy_load_path(
    parent: InstanceState[Any], mapper: Mapper[Any], along_load_path: bool = False
) -> Any:
    """The load path of the row a lazy many-to-one load from ``parent`` brings in
    (``LazyLoader._emit_lazyload``: the parent's mapper path, or with ``along_load_path``, for
    a parent loaded with options, its ``load_path``; the relationship; the target), or None
    when more than one relationship of the parent could be the one loading."""
    found = [
        prop
        for prop in parent.mapper.relationships
        if prop.direction is RelationshipDirection.MANYTOONE and mapper.isa(prop.mapper)
    ]
    if len(found) != 1:
        return None
    start = parent.load_path if along_load_path else parent.mapper._path_registry
    return start[found[0]][found[0].mapper]


def load_along(
    state: InstanceState[Any],
    prop: RelationshipProperty[Any],
    path: Any,
    from_session_only: bool = False,
) -> None:
    """Load ``prop`` of ``state`` with SQLAlchemy's lazy loader as an eager load of a row at
    ``path`` does (``ImmediateLoader._load_for_path``: ``LazyLoader._load_for_state`` with
    ``alternate_effective_path``), so what it brings in gets the load paths, and stops at the
    cycles, of that load rather than of a lazy load started from ``state`` alone.
    ``from_session_only``: as ``ImmediateLoader`` at a cycle (``PASSIVE_NO_FETCH_RELATED``):
    no SQL, a many-to-one set from the identity map if its target is there."""
    lazy: Any = prop._get_strategy((("lazy", "select"),))
    flags = PassiveFlag.PASSIVE_NO_FETCH_RELATED if from_session_only else PassiveFlag.PASSIVE_OFF
    value = lazy._load_for_state(
        state,
        flags | PassiveFlag.NO_RAISE,
        alternate_effective_path=path,
    )
    if value not in (ATTR_WAS_SET, LoaderCallableStatus.PASSIVE_NO_RESULT):
        state.get_impl(prop.key).set_committed_value(state, state.dict, value)  # type: ignore[no-untyped-call]


def lazy_load_children_path(state: ORMExecuteState) -> Any:
    """The load path of the rows a lazy load brings in: its statement's current path (the
    relationship's, from the parent's mapper or from the eager load it stands in for) and the
    relationship's target."""
    path: Any = state.loader_strategy_path
    return path[path.path[-1].mapper]


def set_loaded(state: InstanceState[Any], key: str, value: Any) -> None:
    """Set a relationship as loaded, as a load's populator does (``set_committed_value``)."""
    set_committed_value(state.obj(), key, value)


#: by mapper, for the life of the process as mappers are: its ``lazy="noload"`` relationships
_noloads: dict[Mapper[Any], tuple[tuple[str, bool], ...]] = {}


def _noload_relationships(mapper: Mapper[Any]) -> tuple[tuple[str, bool], ...]:
    """``mapper``'s ``lazy="noload"`` relationships as (key, uselist): a load sets each without
    SQL, a collection to an empty one and a reference to None (the strategy's row processor,
    ``invoke_no_load``), so a hit sets them too rather than leave them unloaded."""
    found = _noloads.get(mapper)
    if found is None:
        found = _noloads[mapper] = tuple(
            (r.key, bool(r.uselist)) for r in mapper.relationships if r.lazy in ("noload", None)
        )
    return found


def place_in_session(
    session: Session,
    mapper: Mapper[Any],
    identity_key: Any,
    values: dict[str, Any],
    expired: frozenset[str],
    load_path: Any = None,
    load_options: tuple[Any, ...] = (),
) -> Any:
    """Make ``values`` a persistent instance of ``mapper`` in ``session``, as a load would:
    with ``load_path`` (default: a ``get``'s, :func:`root_path`) and ``load_options`` recorded
    as a load records them (``InstanceState.load_path``, ``load_options``), before the events."""
    instance = mapper.class_manager.new_instance()
    state = instance_state(instance)
    state_dict = state.dict
    state_dict.update(values)
    for key, uselist in _noload_relationships(mapper):
        if uselist:
            init_state_collection(state, state_dict, key)
        else:
            state_dict[key] = None
    if expired:
        state.expired_attributes.update(expired)
    state.key = identity_key
    state.identity_token = identity_key[2]
    state.session_id = session.hash_key
    state.load_path = mapper._path_registry if load_path is None else load_path
    if load_options:
        state.load_options = load_options
    session.identity_map._add_unpresent(state, identity_key)
    if state.manager.dispatch.load:
        state.manager.dispatch.load(state, None)
    if session.dispatch.loaded_as_persistent:
        session.dispatch.loaded_as_persistent(session, state)
    return instance


# -- statements: what a DML statement says about the rows it writes --------------------------------


def rewrites_other_rows(insert: Any) -> bool:
    """Whether an INSERT may change or delete rows its parameters do not name: an upsert
    (``on_conflict_do_update``, ``on_duplicate_key_update``: ``Insert._post_values_clause``) or a
    prefixed INSERT such as SQLite's ``INSERT OR REPLACE`` (``Insert._prefixes``)."""
    return insert._post_values_clause is not None or bool(insert._prefixes)


def update_set_columns(update: Any) -> list[Any]:
    """The column objects an UPDATE's ``values()`` sets (``Update._values``, whose keys
    SQLAlchemy has already turned into columns of the target where names were given)."""
    values = update._values or {}
    return [
        key.__clause_element__() if hasattr(key, "__clause_element__") else key
        for key in values
        if not isinstance(key, str)
    ]


def dml_statement(statement: Any) -> Any:
    """The INSERT / UPDATE / DELETE itself, also when the ORM runs it wrapped as
    ``select(Model).from_statement(dml.returning(...))`` (``FromStatement.element``)."""
    return statement.element if isinstance(statement, FromStatement) else statement


def has_own_returning(statement: Any) -> bool:
    """Whether the caller gave the statement its own ``returning()`` (``_returning``)."""
    return bool(statement._returning)


#: ``await_`` from SQLAlchemy 2.1, ``await_only`` in 2.0 (kept as an alias in 2.1).
_await: Callable[[Any], Any] = getattr(_concurrency, "await_", None) or _concurrency.await_only


def under_asyncio() -> bool:
    """Whether this code runs inside the greenlet ``AsyncSession`` (``greenlet_spawn``) runs the
    synchronous session in: there :func:`await_` may await on the event loop."""
    return bool(_concurrency.in_greenlet())


def await_(awaitable: Any) -> Any:
    """Await ``awaitable`` on the event loop from synchronous code under :func:`under_asyncio`,
    suspending this greenlet (not the loop) until it completes."""
    return _await(awaitable)


def run_together(functions: Sequence[Callable[[], R]]) -> list[R | BaseException]:
    """Run synchronous ``functions`` that await through :func:`await_`, concurrently on the
    event loop, from synchronous code under :func:`under_asyncio`: each in a greenlet of its own
    (``greenlet_spawn``, as ``AsyncSession`` runs a session), gathered. Per function, its result
    or the exception it raised."""

    async def gather() -> list[R | BaseException]:
        spawned = [_concurrency.greenlet_spawn(function) for function in functions]
        return list(await asyncio.gather(*spawned, return_exceptions=True))

    return cast("list[R | BaseException]", await_(gather()))


# -- lazy collection loads ------------------------------------------------------------------------


def lazy_loaded_relationship(state: ORMExecuteState) -> RelationshipProperty[Any] | None:
    """The relationship a lazy load runs for (the last element of its loader path), or None
    when the statement is no lazy load of a relationship."""
    if state.lazy_loaded_from is None:
        return None
    path = state.loader_strategy_path
    elements = () if path is None else path.path
    last = elements[-1] if elements else None
    return last if isinstance(last, RelationshipProperty) else None


def plain_lazy_load(state: ORMExecuteState, options: tuple[Any, ...] = ()) -> bool:
    """Whether a lazy load runs the relationship's own SELECT with no loader options or
    criteria added to it but ``options`` (``Select._with_options``: the parent's
    ``load_options``, the ``with_loader_criteria`` of an option) and no ``populate_existing``
    (``load_options._populate_existing``)."""
    statement: Any = state.statement
    given = tuple(statement._with_options)
    return (
        len(given) == len(options)
        and all(a is b for a, b in zip(given, options, strict=True))
        and not state.load_options._populate_existing
    )


def load_autoflushes(state: ORMExecuteState) -> bool:
    """Whether the SELECT would autoflush first (``load_options._autoflush``: False for a lazy
    load from a pending object or under ``no_autoflush``); the session's own ``autoflush``
    setting is honoured by :func:`autoflush`."""
    return bool(state.load_options._autoflush)


#: how ``SimpleResultMetaData`` takes the unique filters ORM results use (by identity: an
#: instance may be unhashable): ``_create_unique_filters`` from 2.1, ``_unique_filters`` in 2.0
_UNIQUE_BY_IDENTITY: Final[dict[str, Any]] = (
    {"_create_unique_filters": lambda _: [id]}
    if "_create_unique_filters" in signature(SimpleResultMetaData.__init__).parameters
    else {"_unique_filters": [id]}
)


def instances_result(objects: list[Any]) -> Result[Any]:
    """A result whose rows are ``objects``, as a lazy load consumes the result of its SELECT
    (``.unique().scalars().all()``), uniqued by identity as ORM results are."""
    metadata = SimpleResultMetaData(["entity"], **_UNIQUE_BY_IDENTITY)
    return IteratorResult(metadata, iter([(obj,) for obj in objects]))


def target_correlates_to_parent(prop: RelationshipProperty[Any]) -> bool:
    """Whether a relationship's target (a LATERAL subquery) is selected joined to its parent."""
    return bool(getattr(prop, "_target_correlates_to_parent", False))


#: SQLAlchemy's lazy loader strategy: ``_LazyLoader`` from 2.1, ``LazyLoader`` in 2.0
_LAZY_LOADER: Final[type[Any]] = (
    vars(strategies).get("_LazyLoader") or vars(strategies)["LazyLoader"]
)
#: the passive flags of a plain attribute access (``PASSIVE_OFF``) and those that change nothing
#: about what its load selects (``NO_AUTOFLUSH`` is honoured by the session; ``NO_RAISE`` only
#: matters to ``lazy="raise"``, never answered)
_PLAIN_ACCESS: Final = PassiveFlag.PASSIVE_OFF
_FLAGS_ANSWERED: Final = PassiveFlag.NO_AUTOFLUSH | PassiveFlag.NO_RAISE


class LazyCollectionAnswer(Protocol):
    """A session's ``cache_lazy_collection``: the loaded collection from the cache, or what
    ``load`` (SQLAlchemy's own loader, unchanged) returns."""

    def __call__(
        self,
        state: InstanceState[Any],
        prop: RelationshipProperty[Any],
        autoflushes: bool,
        load: Callable[[], Any],
    ) -> Any: ...


def answer_lazy_loads_first(prop: RelationshipProperty[Any]) -> None:
    """Let a session answer ``prop``'s lazy collection loads before SQLAlchemy builds their
    SELECT: its loader callable (``AttributeImpl.callable_``) on every class mapping it asks
    the session's ``cache_lazy_collection`` first, for a plain load of a persistent parent only
    (a plain attribute access, the relationship not set yet, the parent's columns its SELECT
    reads loaded and unchanged: otherwise SQLAlchemy would refresh them, or read their new
    values, first). Any other session, or any other load, gets the original loader unchanged.
    Idempotent; a no-op for ``uselist=False`` (its loader takes the first row, warning of
    more), ``raise``/``raise_on_sql`` strategies, and classes mapped after the call (their
    loads reach the cache through ``do_orm_execute`` as before)."""
    if not prop.uselist:
        return
    for mapper in prop.parent.self_and_descendants:
        if mapper._props.get(prop.key) is not prop:
            continue
        impl: Any = mapper.class_manager[prop.key].impl
        loader = impl.callable_
        strategy = getattr(loader, "__self__", None)
        if (
            getattr(loader, "__func__", None) is not _LAZY_LOADER._load_for_state
            or not isinstance(strategy, _LAZY_LOADER)
            or strategy._raise_always
            or strategy._raise_on_sql
        ):
            continue  # answered already, or not SQLAlchemy's own lazy loader
        try:
            read = tuple(
                mapper.get_property_by_column(column).key
                for column in strategy._bind_to_col.values()
            )
        except orm_exc.UnmappedColumnError:  # an unmapped parent column: SQLAlchemy loads
            continue
        impl.callable_ = _cache_first(loader, prop, read)


def _cache_first(
    loader: Callable[[InstanceState[Any], PassiveFlag], Any],
    prop: RelationshipProperty[Any],
    read: tuple[str, ...],
) -> Callable[[InstanceState[Any], PassiveFlag], Any]:
    key = prop.key

    def load_cached_first(state: InstanceState[Any], passive: PassiveFlag) -> Any:
        answer: LazyCollectionAnswer | None = getattr(state.session, "cache_lazy_collection", None)
        if (
            answer is None
            or passive & ~_FLAGS_ANSWERED != _PLAIN_ACCESS
            or key in state.dict
            or state.key is None
        ):
            return loader(state, passive)
        values, changed = state.dict, state.committed_state
        for name in read:
            if name not in values or name in changed:
                return loader(state, passive)
        return answer(
            state,
            prop,
            not passive & PassiveFlag.NO_AUTOFLUSH,
            lambda: loader(state, passive),
        )

    load_cached_first._sa_cache_original = loader  # type: ignore[attr-defined]
    return load_cached_first


def lazy_collection_path(state: InstanceState[Any], prop: RelationshipProperty[Any]) -> Any:
    """The load path of the rows a lazy load of ``prop`` from ``state`` brings in, as
    ``LazyLoader._emit_lazyload`` builds it for a parent without load options (the parent's
    mapper path, the relationship) and :func:`lazy_load_children_path` reads it."""
    return state.mapper._path_registry[prop][prop.mapper]


# -- unique-column lookups ------------------------------------------------------------------------

#: execution options a plain ``session.execute(select(...))``, ``Query`` or ``AsyncSession``
#: (``prebuffer_rows``: the result is read before it is returned) carries by itself
_PLAIN_EXECUTION_OPTIONS: Final = frozenset(
    {"_result_disable_adapt_to_context", "_sa_orm_load_options", "prebuffer_rows"}
)
#: load options a plain statement may carry: the legacy Query's uniquing, ``no_autoflush``
_PLAIN_LOAD_OPTIONS: Final = frozenset({"_legacy_uniquing", "_autoflush"})
#: by (class, columns): the cache keys of the statements recognised as a lookup by them
_shapes: dict[tuple[Any, tuple[Any, ...]], dict[Any, bool]] = {}


class ColumnCriteria(NamedTuple):
    """A SELECT of one mapped class by equality of columns of its own table with values."""

    mapper: Mapper[Any]
    columns: tuple[Any, ...]
    values: tuple[Any, ...]
    #: the result's keys (``Row._mapping``), as the SELECT's would be
    keys: tuple[str, ...]


def unique_lookup_criteria(
    state: ORMExecuteState, wanted: Callable[[frozenset[Any]], Mapper[Any] | None] | None = None
) -> ColumnCriteria | None:
    """The columns and values of a statement that is exactly ``select(E).where(E.a == x)``
    (``and_`` of several, ``filter_by``, the legacy ``Query.filter`` and ``filter_by``), with
    at most the ``LIMIT`` ``Query.first()`` adds; None for anything else.

    "Exactly" is SQLAlchemy's own statement cache key (``_generate_cache_key``), which covers
    every clause, option, hint and compile option a SELECT carries: it must equal the key of the
    canonical statement built here (bound values aside). Execution and load options are those a
    plain ``session.execute`` or ``Query`` sets itself (``_sa_orm_load_options`` overrides).
    ``wanted(columns)``: the mapper whose lookups by these columns are of interest, or None (then
    nothing more of the statement is looked at: the cheap checks come first, as every SELECT is
    asked)."""
    statement: Any = state.statement
    if type(statement) is not Select or state.is_column_load or state.is_relationship_load:
        return None
    found = column_equalities(statement.whereclause, None, state.parameters)
    if found is None:
        return None
    columns, values = found
    wanted_mapper = None if wanted is None else wanted(frozenset(columns))
    if wanted is not None and wanted_mapper is None:
        return None
    if not _PLAIN_EXECUTION_OPTIONS.issuperset(state.execution_options):
        return None
    load_options = state.load_options
    if not isinstance(load_options, type) and not _PLAIN_LOAD_OPTIONS.issuperset(
        vars(load_options)
    ):
        return None
    descriptions = statement.column_descriptions
    if len(descriptions) != 1:
        return None
    entity = descriptions[0]["entity"]
    if entity is None or descriptions[0]["expr"] is not entity or not isinstance(entity, type):
        return None  # a column, an aliased class
    mapper: Any = inspect(entity, raiseerr=False)
    if not isinstance(mapper, Mapper) or columns[0].table is not mapper.local_table:
        return None
    if wanted_mapper is not None and mapper is not wanted_mapper:
        return None
    shapes = _shapes.get((entity, columns))
    if shapes is None:
        shapes = _canonical_shapes(entity, mapper, columns)
        _shapes[(entity, columns)] = shapes
    key = statement._generate_cache_key()
    limited = None if key is None else shapes.get(key.key)
    if limited is None:
        return None
    if limited and not (isinstance(statement._limit, int) and statement._limit >= 1):
        return None
    keys = tuple(str(d["name"]) for d in descriptions)
    return ColumnCriteria(mapper, columns, values, keys)


def _canonical_shapes(
    entity: Any, mapper: Mapper[Any], columns: tuple[Any, ...]
) -> dict[Any, bool]:
    """The cache keys of the recognised statements by ``columns``: whether each has a LIMIT."""
    attrs = [getattr(entity, mapper.get_property_by_column(c).key) for c in columns]
    criteria = [attr == _Placeholder() for attr in attrs]
    shapes: dict[Any, bool] = {}
    # several criteria (``filter_by(a=, b=)``, ``where(a, b)``), or one ``and_`` of them
    for where in (criteria, [and_(*criteria)]) if len(criteria) > 1 else (criteria,):
        for statement, limited in (
            (select(entity).where(*where), False),
            (select(entity).where(*where).limit(1), True),
            (Query(entity).filter(*where)._statement_20(), False),
            (Query(entity).filter(*where).limit(1)._statement_20(), True),
        ):
            key = statement._generate_cache_key()
            if key is not None:
                shapes[key.key] = limited
    return shapes


class _Placeholder:
    """A value for the canonical statements: bound, never sent."""


def column_equalities(
    whereclause: Any, table: Any, parameters: Any
) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
    """(columns of ``table``, values) of a WHERE that is one ``column = value`` or an ``and_``
    of them, each column once; a value is the bound parameter's, or ``parameters``' for its key
    (a lazy load passes the parent's values so). None for any other WHERE. ``table`` None: the
    columns of any one table."""
    if whereclause is None:
        return None
    if isinstance(whereclause, BooleanClauseList):
        if whereclause.operator is not operators.and_:
            return None
        clauses = list(whereclause.clauses)
    else:
        clauses = [whereclause]
    columns: list[Any] = []
    values: list[Any] = []
    given = parameters if isinstance(parameters, dict) else {}
    for clause in clauses:
        if not isinstance(clause, BinaryExpression) or clause.operator is not operators.eq:
            return None
        left, right = clause.left, clause.right
        if isinstance(left, BindParameter):
            left, right = right, left
        if not isinstance(right, BindParameter) or right.expanding or clause.modifiers:
            return None
        column = left._deannotate() if isinstance(left, ColumnClause) else None
        if table is None and isinstance(column, Column):
            table = column.table
        if not isinstance(column, Column) or column.table is not table:
            return None
        if any(seen is column for seen in columns):  # (``in`` would build SQL expressions)
            return None
        columns.append(column)
        values.append(given.get(right.key, right.effective_value))
    return tuple(columns), tuple(values)


def entity_result(objects: list[Any], keys: tuple[str, ...]) -> Result[Any]:
    """A result of ``objects`` as the SELECT of one entity returns them to ``first()``,
    ``one()``, ``scalar_one_or_none()``, ``scalars()`` and the legacy ``Query`` (which reads
    ``_attributes``: one entity, uniqued)."""
    metadata = SimpleResultMetaData(list(keys), **_UNIQUE_BY_IDENTITY)
    rows = iter(objects)  # one entity: the rows are the objects themselves
    result: IteratorResult[Any] = IteratorResult(metadata, rows, _source_supports_scalars=True)
    result._attributes = immutabledict({"filtered": True, "is_single_entity": True})
    return result


# -- loader options of a hit (sa_cache.eager) ------------------------------------------------------

#: the relationship strategies an option may set for a hit to be served from the cache
_SERVED_STRATEGIES: Final = frozenset(
    {"select", "joined", "selectin", "subquery", "immediate", "noload", "raise", "raise_on_sql"}
)
#: by (mapper, the options' cache keys): what :func:`load_context` resolved, None if unserved
_contexts: dict[tuple[Mapper[Any], Any], LoadContext | None] = {}


class LoadContext(NamedTuple):
    """Loader options resolved as the compile state of a load resolves them.

    :param key: the options' cache keys, by which plans are memoised
    :param options: what a load records as ``InstanceState.load_options`` (the options that
        propagate to later loads)
    :param loaders: by the natural load path of a parent (``PathRegistry.natural_path``), the
        options' load elements by relationship key: their ``strategy`` (None: the mapper's own,
        as ``defaultload``) and the element a lazy loader set per instance is given
    """

    key: Any
    options: tuple[Any, ...]
    loaders: dict[tuple[Any, ...], dict[str, Any]]


def load_context(options: Sequence[Any], mapper: Mapper[Any]) -> LoadContext | None:
    """The :class:`LoadContext` of a load of ``mapper`` with ``options``, or None when an option
    is one a hit cannot carry out exactly: anything but relationship loader chains
    (``Load`` / ``selectinload(...)...`` of ``joined``, ``selectin``, ``subquery``,
    ``immediate``, ``select``, ``noload``, ``raise``, ``defaultload``) without criteria
    (``and_``), ``of_type``, wildcards, ``innerjoin`` or ``recursion_depth``, and no
    ``subqueryload`` below the first level; and none that does not apply to ``mapper``
    (SQLAlchemy's own load raises its error).

    The options are resolved by SQLAlchemy itself: the compile state of ``Query(mapper)`` with
    them (``Query._compile_state``) records each load element under ``("loader", natural
    path)`` in ``attributes``, where the strategies of a load look them up
    (``StrategizedProperty._get_context_loader``); elements are ``Load.context``'s
    ``_AttributeStrategyLoad`` (``strategy``, ``local_opts``, ``_extra_criteria``,
    ``_of_type``)."""
    keys = []
    for option in options:
        if type(option) is not strategy_options.Load:
            return None
        key = option._generate_cache_key()
        if key is None or key.bindparams:
            return None
        keys.append(key.key)
    memo = (mapper, tuple(keys))
    if memo in _contexts:
        context = _contexts[memo]
    else:
        context = _contexts[memo] = _resolve(options, mapper, memo[1])
    if context is None:
        return None
    # these very options, not the equal ones the resolution was memoised with
    return context._replace(options=tuple(o for o in options if o.propagate_to_loaders))


def _resolve(options: Sequence[Any], mapper: Mapper[Any], key: Any) -> LoadContext | None:
    for option in options:
        if option.additional_source_entities:
            return None
        for element in option.context:
            if type(element) is not strategy_options._AttributeStrategyLoad:
                return None
            if element._extra_criteria or element._of_type is not None:
                return None
            if not element.propagate_to_loaders or any(element.local_opts.values()):
                return None
            props = element.path.path[1::2]  # (mapper, relationship, mapper, ...)
            prop = props[-1] if props else None
            if not isinstance(prop, RelationshipProperty) or refreshed_with_row(prop):
                return None
            strategy = element.strategy
            if strategy is not None and (
                len(strategy) != 1
                or strategy[0][0] != "lazy"
                or strategy[0][1] not in _SERVED_STRATEGIES
            ):
                return None
    try:
        attributes = Query(mapper).options(*options)._compile_state().attributes
    except sa_exc.SQLAlchemyError:
        return None
    loaders: dict[tuple[Any, ...], dict[str, Any]] = {}
    for name, element in attributes.items():
        if not (isinstance(name, tuple) and name and name[0] == "loader"):
            continue
        path = name[1]
        prop = path[-1]
        if not isinstance(prop, RelationshipProperty) or any(isinstance(e, str) for e in path):
            return None  # a wildcard, a column option
        if len(path) > 2 and option_strategy(element) == "subquery":
            # below the first level: when the hit loads its parent's collection with the lazy
            # loader, SQLAlchemy's subquery loader under it records load paths that start at
            # the parent, where the load's start at the root
            return None
        loaders.setdefault(tuple(path[:-1]), {})[prop.key] = element
    propagated = tuple(option for option in options if option.propagate_to_loaders)
    return LoadContext(key, propagated, loaders)


def options_root(state: InstanceState[Any]) -> Mapper[Any] | None:
    """The mapper the load of ``state`` started at, which its ``load_options`` apply from (the
    first element of its ``load_path``), or None if it has no load path."""
    mappers = path_mappers(state.load_path)
    return mappers[0] if mappers else None


def natural_path(path: Any) -> tuple[Any, ...]:
    """The path by which a load's options are looked up (``PathRegistry.natural_path``)."""
    return tuple(path.natural_path)


def option_strategy(element: Any) -> str | None:
    """The strategy a load element sets (``("lazy", name)``), None for the mapper's own."""
    strategy = element.strategy
    return None if strategy is None else str(strategy[0][1])


def default_strategy(prop: RelationshipProperty[Any]) -> str:
    """The strategy a relationship's mapping sets, by name (``lazy=True`` is ``"select"``,
    ``False`` ``"joined"``, None ``"noload"``)."""
    lazy: Any = prop.lazy
    names: dict[Any, str] = {True: "select", False: "joined", None: "noload"}
    return names.get(lazy, str(lazy))


def is_instance_level(prop: RelationshipProperty[Any], strategy: str) -> bool:
    """Whether a load of an instance sets a lazy loader of its own for ``prop`` with
    ``strategy`` (``select``, ``raise``, ``raise_on_sql``): one not the class's
    (``LoaderStrategy.is_class_level``), as ``LazyLoader.create_row_processor`` does."""
    loader: Any = prop._get_strategy((("lazy", strategy),))
    return not loader.is_class_level


def set_instance_lazy_loader(
    state: InstanceState[Any], prop: RelationshipProperty[Any], strategy: str, element: Any
) -> None:
    """Give ``state`` the lazy loader of its own a load sets (``_LoadLazyAttribute`` in
    ``InstanceState.callables``, by ``InstanceState._instance_level_callable_processor``), so
    a later access loads (or raises) as after that load."""
    loader: Any = prop._get_strategy((("lazy", strategy),))
    private = hasattr(strategies, "_LoadLazyAttribute")  # ``LoadLazyAttribute`` in 2.0
    make: Any = getattr(strategies, "_LoadLazyAttribute" if private else "LoadLazyAttribute")
    callable_ = make(prop.key, loader, element, strategies._NO_EXTRA_CRITERIA)
    set_callable: Any = InstanceState._instance_level_callable_processor(
        state.manager, callable_, prop.key
    )
    set_callable(state, state.dict, None)


def set_not_loaded(state: InstanceState[Any], prop: RelationshipProperty[Any]) -> None:
    """Set ``prop`` as a ``noload`` load sets it (``NoLoader``): an empty collection, or None."""
    set_committed_value(state.obj(), prop.key, [] if prop.uselist else None)


def set_load_options(state: InstanceState[Any], options: tuple[Any, ...]) -> None:
    """Record the options a load records (``InstanceState.load_options``, its propagated
    ones): later lazy loads, and refreshes, of the instance apply them along its load path."""
    state.load_options = options
