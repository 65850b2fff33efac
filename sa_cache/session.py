"""Session interception: where a primary-key lookup that missed the identity map asks the cache,
and where the cache's answer is placed in the session as a load would place it.

Only SQLAlchemy interception lives here; the lookup sequence (read, lease, wait, write back) is
:mod:`sa_cache.lookup`, and a session's whole cache state is one
:class:`~sa_cache.lookup.Lookups` (``session._sa_cache``, None without a cache).

``sessionmaker(engine, class_=CachingSession, cache=cache)`` configures a whole factory; users
with their own Session subclass mix in :class:`CachingSessionMixin` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

from sqlalchemy import inspect, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import (
    InstanceState,
    Mapper,
    ORMExecuteState,
    Query,
    RelationshipDirection,
    Session,
)
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.util import EMPTY_DICT

from . import _orm, collations, connections, eager, isolation, tracking
from .cache import IdentityCache
from .keys import coercer_for, normalise
from .kinds import ABSENT, Answer, Hit
from .lookup import Lookups, ReadAlong
from .protocol import Freshness
from .relationships import CachedRelationship
from .rows import CachedModel
from .uniques import CachedUnique

T = TypeVar("T")

#: Primary keys per ``IN (...)`` SELECT of :meth:`CachingSessionMixin.get_many`.
IN_CHUNK: Final = 500


def _pause(seconds: float) -> None:
    if _orm.under_asyncio():
        _orm.await_(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


class CachingSessionMixin(_orm.IdentityLookupHooks):
    """Adds the cache to a :class:`~sqlalchemy.orm.Session` subclass: ``cache=`` at construction.

    A session without a cache (``cache=None``) behaves exactly like its base class.
    """

    cache: IdentityCache | None
    _sa_cache: Lookups | None
    #: a lazy load's parent state, kind and verdict (:meth:`_serve_lazy_collection`) read by
    #: :meth:`cache_lazy_collection` while SQLAlchemy's loader runs its SELECT
    _sa_cache_lazy_read: tuple[Any, CachedRelationship, Any] | None = None
    #: How a lookup waits for another caller's fill (see :mod:`sa_cache.lookup`): a sleep, or
    #: under ``AsyncSession`` an ``asyncio.sleep`` awaited, so the wait never blocks the loop.
    cache_sleep: Callable[[float], None] = staticmethod(_pause)

    def __init__(self, *args: Any, cache: IdentityCache | None = None, **kwargs: Any) -> None:
        self.cache = cache
        self._sa_cache = None if cache is None else Lookups(cache, self.cache_sleep)
        super().__init__(*args, **kwargs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, Session) and not any(
            "_sa_cache_listening" in vars(base) for base in cls.__mro__[1:]
        ):
            cls._sa_cache_listening = True
            tracking.listen(cls)

    # -- lookups ------------------------------------------------------------------------------

    def _cacheable(
        self, mapper: Mapper[Any], identity_token: Any, execution_options: Any
    ) -> CachedModel | None:
        lookups = self._sa_cache
        if lookups is None:
            return None
        model = lookups.cache.registry.model_for(mapper)
        bulk = lookups.changes.bulk_models
        if model is None or bulk and model in bulk:
            return None
        if execution_options.get("populate_existing") or _orm.session_populates_existing(self):
            return None
        bind = self.bind  # type: ignore[attr-defined]
        if isinstance(bind, Connection) and (
            _orm.runs_in_outside_transaction(self)  # type: ignore[arg-type]
            or connections.written_by_others(bind, self)
        ):
            # its connection's transaction may have written (or read a snapshot) unseen: what
            # the cache holds and what the SELECT sees may differ either way
            model.stats.skipped += 1
            return None
        if identity_token is not None and type(identity_token) not in (str, int):
            return None
        if self._isolation_forbids_cache(mapper):
            model.stats.skipped += 1
            return None
        return model

    def _isolation_forbids_cache(self, mapper: Mapper[Any]) -> bool:
        """Whether the lookup's load would run at a level whose promise (first-updater-wins,
        serializability, locking reads) a hit would break: see :mod:`sa_cache.isolation`."""
        for connection in _orm.held_connections(self):  # type: ignore[arg-type]
            if isolation.promises_what_hits_break(connection):
                return True
        try:
            bind = self.get_bind(mapper=mapper)  # type: ignore[attr-defined]
        except Exception:  # no bind: the load raises SQLAlchemy's own error
            return False
        return isolation.promises_what_hits_break(bind)

    def _begin_savepoint_as_the_load_would(self, mapper: Mapper[Any]) -> None:
        """Emit the SAVEPOINT the load would have begun with, where skipping it changes what the
        database commits. SQLAlchemy emits a savepoint's SAVEPOINT with its first statement, and
        a hit has none; on SQLite (pysqlite's default mode, aiosqlite) a SAVEPOINT outside a
        transaction begins one, and without it a later savepoint's release commits at once
        (:func:`sa_cache._orm.released_savepoint_committed`). Elsewhere the SAVEPOINT of a
        savepoint that runs no statement changes nothing, so a hit skips it."""
        if not self.in_nested_transaction():  # type: ignore[attr-defined]
            return
        try:
            bind = self.get_bind(mapper=mapper)  # type: ignore[attr-defined]
        except Exception:  # no bind: the load raises SQLAlchemy's own error
            return
        if bind.dialect.name == "sqlite":
            self.connection(bind_arguments={"bind": bind})  # type: ignore[attr-defined]

    def cache_lookup(
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any,
        execution_options: Any,
        options: tuple[Any, ...],
        autoflush: bool,
    ) -> Any:
        model = self._cacheable(mapper, identity_token, execution_options)
        if model is None:
            return None
        context = None
        if options:
            parent = self._sa_cache_lazy_from
            root = mapper if parent is None else _orm.options_root(parent)
            context = None if root is None else _orm.load_context(options, root)
        if options and context is None or self._rewrites_statements():
            model.stats.skipped += 1  # SQLAlchemy's SELECT may differ from a primary-key load
            return None
        pk = model.normalise(primary_key_identity)
        if pk is None:
            return None  # SQLAlchemy's own answer for a value we cannot coerce
        flushed = autoflush and _orm.autoflush(self)  # type: ignore[arg-type]
        if flushed or pk != tuple(primary_key_identity):
            # the flush may have made a pending row persistent; a normalised key may name an
            # instance the caller's spelling missed
            found = self.identity_map_lookup(mapper, pk, identity_token)
            if found is not None:
                return found
        self._sa_cache_lookup_pk = pk
        key = model.keys.row_key(pk, identity_token)
        lookups = self._sa_cache
        assert lookups is not None
        if key in lookups.changes.keys:
            return None  # this transaction wrote the row: read our own write from the database
        identity_key = mapper.identity_key_from_primary_key(pk, identity_token)
        self._begin_savepoint_as_the_load_would(mapper)
        answer = lookups.read_one(model, key, pk, identity_key, self._fill_rule, mapper)
        return None if answer is None else self._place(answer, mapper, identity_key, context)

    def _rewrites_statements(self) -> bool:
        """Whether a ``do_orm_execute`` listener other than sa_cache's own is installed: it may
        add criteria (the multi-tenant recipe's ``with_loader_criteria``) or options to the
        SELECT a primary-key lookup runs, which a cached row cannot honour."""
        # sa_cache's own (tracking.on_orm_execute) is always one: installed on the class
        return len(self.dispatch.do_orm_execute) > 1  # type: ignore[attr-defined]

    def lookup_done(self) -> None:
        lookups = self._sa_cache
        if lookups is not None and lookups.current is not None:  # a hit left nothing to end
            lookups.done()

    def _fill_rule(self, model: Any, mapper: Mapper[Any]) -> tuple[Freshness, bool]:
        """What a miss's load will read, and whether it may cache an absence. Nothing may be
        filled once the transaction wrote. The load reads data at least as new as the
        observation when no snapshot has begun (it may begin one: then the lookup takes the
        snapshot's lower bound); otherwise it reads an older snapshot, whose fills need a proof
        (docs/protocol.md, "The snapshot hole")."""
        lookups = self._sa_cache
        assert lookups is not None
        bind = self.get_bind(mapper=mapper)  # type: ignore[attr-defined]
        if lookups.changes.wrote:
            freshness = Freshness.NEVER
        elif _orm.next_load_sees_fresh_snapshot(self):  # type: ignore[arg-type]
            begins = isolation.begins_snapshot(bind)
            freshness = Freshness.BEGINS_SNAPSHOT if begins else Freshness.FRESH
        else:
            freshness = Freshness.IN_SNAPSHOT
        return freshness, model.may_cache_absence(mapper, bind.dialect)

    def _place(
        self,
        answer: Answer,
        mapper: Mapper[Any],
        identity_key: Any,
        context: _orm.LoadContext | None = None,
        complete: bool = True,
    ) -> Any:
        """The session's answer for a cache hit: the instance, or :data:`_orm.KNOWN_ABSENT`.
        ``complete``: load what a load of it would have loaded with it (its load path: a
        ``get``'s, or a lazy many-to-one load's), with the loader options of ``context``."""
        if not complete:
            return self._place_row(answer, mapper, identity_key)
        path = _orm.root_path(mapper)
        parent = self._sa_cache_lazy_from
        if parent is not None and type(answer) is Hit:
            path = _orm.lazy_load_path(parent, mapper, along_load_path=context is not None)
            if path is None and (
                context is not None
                or _orm.eager_plan(answer.shape.mapper, answer.shape.expire_on_hit).trigger
            ):
                return None  # its eager loads depend on a path not known: SQLAlchemy loads it
        lookups = self._sa_cache
        assert lookups is not None
        options = () if context is None else context.options
        if type(answer) is not Hit or not eager.plan(
            lookups.cache.registry, answer.shape.mapper, context, path
        ):
            return self._place_row(answer, mapper, identity_key, path, True, options)
        instance = self._place_row(answer, mapper, identity_key, path, False, options)
        if instance is _orm.KNOWN_ABSENT:
            return instance
        if not eager.complete(
            lookups,
            [(instance, path)],
            self._place_row,
            self._eager_fill_rule,
            self._may_read,
            self._refresh_hit,
            context,
        ):
            return _orm.KNOWN_ABSENT
        return instance

    def _place_row(
        self,
        answer: Answer,
        mapper: Mapper[Any],
        identity_key: Any,
        path: Any = None,
        refresh: bool = True,
        options: tuple[Any, ...] = (),
    ) -> Any:
        """A hit placed with its SQL expressions refreshed, its eager relationships not loaded
        yet (:meth:`_complete_eager`), with ``path`` (default: a ``get``'s) as its load path and
        ``options`` as its load options."""
        if type(answer) is not Hit:
            return _orm.KNOWN_ABSENT
        shape = answer.shape
        if not shape.mapper.isa(mapper):
            return _orm.KNOWN_ABSENT  # a row of another class: SQLAlchemy answers None
        instance = _orm.place_in_session(
            self,  # type: ignore[arg-type]
            shape.mapper,
            identity_key,
            answer.value,
            shape.expire_on_hit,
            path or _orm.root_path(mapper),
            options,
        )
        if not refresh:
            return instance
        plan = _orm.eager_plan(shape.mapper, shape.expire_on_hit)
        if plan.refresh and not _orm.complete_like_a_load(self, instance, plan):  # type: ignore[arg-type]
            return _orm.KNOWN_ABSENT
        return instance

    def _complete_eager(
        self, placed: list[tuple[Any, Any]], context: _orm.LoadContext | None = None
    ) -> None:
        """Load the eager relationships of instances just placed from the cache (with their
        load paths, and the loader options of ``context``), from the cache where it holds
        them: see :mod:`sa_cache.eager`."""
        lookups = self._sa_cache
        assert lookups is not None
        registry = lookups.cache.registry
        if any(eager.plan(registry, instance_state(i).mapper, context, p) for i, p in placed):
            eager.complete(
                lookups,
                placed,
                self._place_row,
                self._eager_fill_rule,
                self._may_read,
                context=context,
            )

    def _refresh_hit(self, instance: Any, relationships: list[str]) -> bool:
        """Load what a ``get``'s SELECT loads with the row and the cache did not answer: its SQL
        expressions and ``relationships`` (``joined`` ones), in one refresh; False if the row
        is gone meanwhile."""
        lookups = self._sa_cache
        assert lookups is not None
        mapper = instance_state(instance).mapper
        model = lookups.cache.registry.model_for(mapper)
        expressions = frozenset() if model is None else model.shape(mapper).expire_on_hit
        names = list(_orm.eager_plan(mapper, expressions).refresh)
        if relationships:
            names = (names or [mapper.get_property_by_column(mapper.primary_key[0]).key]) + [
                key for key in relationships if key not in names
            ]
        if not names:
            return True
        plan = _orm.EagerPlan(tuple(names), ())
        return _orm.complete_like_a_load(self, instance, plan)  # type: ignore[arg-type]

    def _may_read(self, mapper: Mapper[Any]) -> bool:
        """Whether the session's rules (:meth:`_cacheable`) let a lookup of ``mapper`` read the
        cache: for the members and targets of a hit's eager relationships (their bind's
        isolation level may differ from the parent's)."""
        return self._cacheable(mapper, None, EMPTY_DICT) is not None

    def _eager_fill_rule(self, kind: Any, context: Any) -> tuple[Freshness, bool]:
        """:meth:`_fill_rule` for the collections and rows an eager completion reads (never an
        absence: a member or a target is read because a row names it)."""
        mapper = kind.prop.mapper if isinstance(kind, CachedRelationship) else kind.base_mapper
        return self._fill_rule(kind, mapper)[0], False

    # -- lazy collection loads --------------------------------------------------------------------

    def cache_lazy_load(self, state: ORMExecuteState) -> Any:
        """A lazy load of a relationship (from ``do_orm_execute``): the collection from the cache
        (a result the lazy loader consumes as it would the SELECT's), or the SELECT's result
        after caching the collection, or None: SQLAlchemy runs the SELECT untouched. A load
        :meth:`cache_lazy_collection` read the cache for already comes with its verdict."""
        lookups = self._sa_cache
        prop = _orm.lazy_loaded_relationship(state)
        if lookups is None or prop is None:
            return None
        kind = lookups.cache.registry.relationship_kind(prop)
        if kind is None:
            return self._lazy_unique_load(state, prop)
        parent: Any = state.lazy_loaded_from
        read_first = self._sa_cache_lazy_read
        if read_first is not None and read_first[0] is parent and read_first[1] is kind:
            self._sa_cache_lazy_read = None
            waiting = read_first[2]
            return None if waiting is None else self._fill_lazy_collection(state, kind, waiting)
        _orm.answer_lazy_loads_first(prop)  # a class mapped since the kind was made, too
        options = tuple(parent.load_options)
        path = _orm.lazy_load_children_path(state)
        # the parent's options travel to the load, applied along its path from where it starts
        context = _orm.load_context(options, _orm.path_mappers(path)[0]) if options else None
        if (
            parent.key is None  # pending: its collection is not in the database
            or parent.key[2] is not None
            or (options and context is None)  # options a list cannot honour
            or not _orm.plain_lazy_load(state, options)
            or self._rewrites_statements()
        ):
            kind.stats.skipped += 1
            return None
        served = self._serve_lazy_collection(
            kind, parent, path, state.execution_options, _orm.load_autoflushes(state), context
        )
        if isinstance(served, list):
            return _orm.instances_result(served)
        return None if served is None else self._fill_lazy_collection(state, kind, served)

    def cache_lazy_collection(
        self,
        parent: InstanceState[Any],
        prop: Any,
        autoflushes: bool,
        load: Callable[[], Any],
    ) -> Any:
        """A lazy load of a cached collection asked before SQLAlchemy builds its SELECT (the
        relationship's loader, :func:`sa_cache._orm.answer_lazy_loads_first`, for a plain
        access of a persistent parent): the collection from the cache, or ``load()`` (SQLAlchemy's
        loader: its SELECT reaches :meth:`cache_lazy_load`, told this read's verdict, so a miss
        fills what this read observed). Where the SELECT's path decides from the statement
        (options, criteria, another ``do_orm_execute`` listener, session execution options),
        ``load()`` alone: that path decides as before."""
        lookups = self._sa_cache
        kind = None if lookups is None else lookups.cache.registry.relationship_kind(prop)
        key = parent.key
        if (
            lookups is None
            or kind is None
            or key is None
            or key[2] is not None
            or parent.load_options
            or _orm.session_execution_options(self)
            or self._rewrites_statements()
        ):
            return load()
        served = self._serve_lazy_collection(
            kind, parent, _orm.lazy_collection_path(parent, prop), EMPTY_DICT, autoflushes
        )
        if isinstance(served, list):
            return served
        outer, self._sa_cache_lazy_read = self._sa_cache_lazy_read, (parent, kind, served)
        try:
            return load()
        finally:
            self._sa_cache_lazy_read = outer
            observation = None if served is None else lookups.pending.pop(served, None)
            if observation is not None:  # SQLAlchemy answered without its SELECT
                lookups.write_back([], observation)  # releases its lease, if it holds one

    def _serve_lazy_collection(
        self,
        kind: CachedRelationship,
        parent: Any,
        path: Any,
        execution_options: Any,
        autoflushes: bool,
        context: _orm.LoadContext | None = None,
    ) -> list[Any] | tuple[CachedRelationship, tuple[Any, ...]] | None:
        """The cache's answer to a lazy load of ``kind`` from ``parent`` that may use it as far
        as its statement tells: the collection's members (a hit, placed with the load path
        ``path`` and the parent's loader options, ``context``); or the miss whose observation
        (``(kind, pk)`` in ``lookups.pending``) waits for the SELECT's load; or None:
        SQLAlchemy's SELECT answers, untouched."""
        lookups = self._sa_cache
        assert lookups is not None
        target = kind.prop.mapper
        if self._cacheable(target, None, execution_options) is None:
            return None  # the session's own rules, counted on the target's model
        if autoflushes:
            _orm.autoflush(self)  # type: ignore[arg-type]
        changes = lookups.changes
        pk = kind.parent.normalise(parent.key[1])
        if pk is None or kind in changes.bulk_models or kind.target in changes.bulk_models:
            return None  # this transaction changed it: read its own writes from the database
        key = kind.key_for_parent(pk)
        if key in changes.keys:
            return None
        waiting = (kind, pk)  # where the miss's observation waits for the load
        self._begin_savepoint_as_the_load_would(target)
        # the key's lease, as a get takes it (in a snapshot, with the clock that may prove the
        # fill fresh); the get under way, if this load runs inside one, keeps its own
        outer = lookups.current
        try:
            answer, along = self._read_collection(kind, key, pk, waiting)
        finally:
            lookups.current = outer
        if type(answer) is Hit:
            # a target the row cache lacks: the SELECT, whose load fills it
            return self._hydrate(kind, answer.value, path, along, context)
        if waiting not in lookups.pending:
            return None  # nothing to fill (the transaction wrote, an old snapshot...)
        return waiting

    def _fill_lazy_collection(
        self,
        state: ORMExecuteState,
        kind: CachedRelationship,
        waiting: tuple[CachedRelationship, tuple[Any, ...]],
    ) -> Any:
        """Run the lazy load's SELECT and fill the collection it found, as the miss observed
        at ``waiting`` allows; its result for the lazy loader."""
        lookups = self._sa_cache
        assert lookups is not None
        try:
            frozen = state.invoke_statement().freeze()
            loaded = frozen().unique().scalars().all()
            pks = []
            for instance in loaded:
                identity = inspect(instance).key
                target_pk = None if identity is None else kind.target.normalise(identity[1])
                if target_pk is None:
                    return frozen()
                pks.append(target_pk)
            lookups.loaded(waiting, pks)
            kind.guesses.remember(waiting[1], pks)  # the rows its next read will most likely need
            return frozen()
        finally:
            observation = lookups.pending.pop(waiting, None)
            if observation is not None:
                lookups.write_back([], observation)  # releases its lease, if it holds one

    # -- lookups by a unique column ---------------------------------------------------------------

    def cache_unique_lookup(self, state: ORMExecuteState) -> Any:
        """A SELECT of one registered class by its unique columns (from ``do_orm_execute``):
        its result from the cache, or the SELECT's result after caching which row it found, or
        None: SQLAlchemy runs the SELECT untouched."""
        lookups = self._sa_cache
        if lookups is None or not lookups.cache.registry.has_uniques():
            return None
        registry = lookups.cache.registry
        criteria = _orm.unique_lookup_criteria(state, registry.unique_mapper)
        if criteria is None:
            return None
        kind = registry.unique_kind(criteria.mapper, frozenset(criteria.columns))
        if kind is None:
            return None
        by_column = dict(zip(criteria.columns, criteria.values, strict=True))
        values = tuple(by_column[column] for column in kind.columns)
        return self._unique_answer(
            state, kind, values, lambda found: _orm.entity_result(found, criteria.keys)
        )

    def _lazy_unique_load(self, state: ORMExecuteState, prop: Any) -> Any:
        """A lazy many-to-one through a foreign key to a unique column of its target (not its
        primary key): answered as the lookup by that column."""
        lookups = self._sa_cache
        assert lookups is not None
        if prop.direction is not RelationshipDirection.MANYTOONE or prop.secondary is not None:
            return None
        target = prop.mapper
        found = _orm.column_equalities(
            state.statement.whereclause,  # type: ignore[attr-defined]
            target.local_table,
            state.parameters,
        )
        if found is None:
            return None
        columns, given = found
        if {remote for _, remote in prop.local_remote_pairs} != set(columns):
            return None
        kind = lookups.cache.registry.unique_kind(target, frozenset(columns))
        if kind is None:
            return None
        parent: Any = state.lazy_loaded_from
        if (
            parent.key is None
            or parent.key[2] is not None  # an identity token: the target's keys carry one too
            or parent.load_options
            or not _orm.plain_lazy_load(state)
        ):
            kind.stats.skipped += 1
            return None
        by_column = dict(zip(columns, given, strict=True))
        values = tuple(by_column[column] for column in kind.columns)
        return self._unique_answer(state, kind, values, _orm.instances_result)

    def _unique_answer(
        self,
        state: ORMExecuteState,
        kind: CachedUnique,
        given: tuple[Any, ...],
        result: Callable[[list[Any]], Any],
    ) -> Any:
        lookups = self._sa_cache
        assert lookups is not None
        mapper = kind.mapper
        if self._cacheable(mapper, None, state.execution_options) is None:
            return None  # the session's own rules, counted on the model
        if self._rewrites_statements() or self.new or self.dirty or self.deleted:  # type: ignore[attr-defined]
            # another listener may rewrite the SELECT; pending changes: its autoflush decides
            kind.stats.skipped += 1
            return None
        values = kind.normalise(given)
        if values is None or any(
            type(a) is not type(b) for a, b in zip(values, given, strict=True)
        ):
            return None  # a value the database converts: its own answer
        bind = self.get_bind(mapper=mapper)  # type: ignore[attr-defined]

        def own_connection() -> Any:
            return self.connection(bind_arguments={"mapper": mapper})  # type: ignore[attr-defined]

        if not all(
            collations.compares_exactly(bind.engine, c, own_connection) for c in kind.columns
        ):
            kind.stats.skipped += 1  # equal in the database is not equal in the cache
            return None
        changes = lookups.changes
        if kind in changes.bulk_models or kind.model in changes.bulk_models:
            return None  # this transaction changed it: read its own writes from the database
        key = kind.key_for(values)
        if key in changes.keys:
            return None
        waiting = (kind, values)
        self._begin_savepoint_as_the_load_would(mapper)
        outer = lookups.current
        try:
            answer = lookups.read(kind, [(key, values, waiting)], self._fill_rule, mapper)[0]
            if answer is None and waiting in lookups.pending:
                answer = lookups.lease_or_wait(kind, values, waiting)
            if answer is ABSENT:
                return result([])
            if type(answer) is Hit:
                return self._unique_hit(state, kind, answer.value, values, result)
            if waiting not in lookups.pending:
                return None  # nothing to fill (the transaction wrote, an old snapshot...)
            frozen = state.invoke_statement().freeze()
            loaded = frozen().unique().scalars().all()
            if len(loaded) > 1:
                return frozen()
            if not loaded:
                lookups.loaded_nothing(waiting)
                return frozen()
            identity = inspect(loaded[0]).key
            pk = None if identity is None else kind.model.normalise(identity[1])
            if pk is not None:
                lookups.loaded(waiting, pk)
            return frozen()
        finally:
            lookups.current = outer
            observation = lookups.pending.pop(waiting, None)
            if observation is not None:
                lookups.write_back([], observation)  # releases its lease, if it holds one

    def _unique_hit(
        self,
        state: ORMExecuteState,
        kind: CachedUnique,
        pk: tuple[Any, ...],
        values: tuple[Any, ...],
        result: Callable[[list[Any]], Any],
    ) -> Any:
        """The row a cached unique value names: the instance the session holds, or the row
        cache's, if it holds exactly ``values``; otherwise the SELECT (whose load fills the
        row cache)."""
        lookups = self._sa_cache
        assert lookups is not None
        mapper, model = kind.mapper, kind.model
        identity_key = mapper.identity_key_from_primary_key(pk)
        instance = self.identity_map.get(identity_key)  # type: ignore[attr-defined]
        if instance is not None:
            held = inspect(instance)
            if not held.expired_attributes and kind.holds(held.dict, values):
                return result([instance])
            return None  # the SELECT refreshes it, or finds another row
        key = model.keys.row_key(pk)
        if key in lookups.changes.keys:
            return None
        try:
            answer = lookups.read(model, [(key, pk, identity_key)], self._fill_rule, mapper)[0]
            if type(answer) is Hit and kind.holds(answer.value, values):
                placed = self._place(answer, mapper, identity_key)
                if placed is not _orm.KNOWN_ABSENT:
                    return result([placed])
            if type(answer) is Hit:
                kind.stats.rejected += 1  # the row no longer holds the value: the SELECT
            frozen = state.invoke_statement().freeze()  # its load fills the row, if it may
            return frozen()
        finally:
            observation = lookups.pending.pop(identity_key, None)
            if observation is not None:
                lookups.write_back([], observation)

    def _read_collection(
        self, kind: CachedRelationship, key: str, pk: tuple[Any, ...], waiting: Any
    ) -> tuple[Answer | None, ReadAlong | None]:
        """The collection's entry, with the rows of the members this process last saw in it
        (those the session lacks) read in the same round trip: the guess only chooses which
        keys to read; the entry read names the members, and :meth:`_hydrate` answers from
        what was read along only for those it names."""
        lookups = self._sa_cache
        assert lookups is not None
        guess = kind.guesses.guess(pk)
        plan = None if guess is None else self._rows_to_read(kind, guess)
        along = () if plan is None else plan[1]
        return lookups.read_one_along(
            kind, key, pk, waiting, self._fill_rule, kind.prop.mapper, kind.target, along
        )

    def _rows_to_read(
        self, kind: CachedRelationship, pks: list[tuple[Any, ...]]
    ) -> tuple[list[Any], list[tuple[str, tuple[Any, ...], Any]], list[int]] | None:
        """For members ``pks`` of a cached collection: the instances the identity map holds (a
        None where a row must be read), the rows to read (key, pk, identity key) and their
        places; None if a load would not take the session's instance as it is (expired, of
        another class) or the transaction wrote a row: then the SELECT answers."""
        lookups = self._sa_cache
        assert lookups is not None
        mapper, model = kind.prop.mapper, kind.target
        found: list[Any] = []
        wanted: list[tuple[str, tuple[Any, ...], Any]] = []
        places: list[int] = []
        for pk in pks:
            identity_key = mapper.identity_key_from_primary_key(pk)
            instance = self.identity_map.get(identity_key)  # type: ignore[attr-defined]
            if instance is not None:
                if inspect(instance).expired_attributes or not isinstance(instance, mapper.class_):
                    return None  # the SELECT would refresh it, or not return it
                found.append(instance)
                continue
            key = model.keys.row_key(pk)
            if key in lookups.changes.keys:
                return None
            places.append(len(found))
            found.append(None)
            wanted.append((key, pk, identity_key))
        return found, wanted, places

    def _hydrate(
        self,
        kind: CachedRelationship,
        pks: list[tuple[Any, ...]],
        path: Any,
        along: ReadAlong | None = None,
        context: _orm.LoadContext | None = None,
    ) -> list[Any] | None:
        """The instances of a cached collection: those in the identity map as they are, the
        others from the row cache (those ``along`` holds from the collection's own round trip,
        the rest in one more read) and placed as a load (with the loader options of
        ``context``) places them; None if any is not there (or not loaded, or of another
        class), so the SELECT answers instead."""
        lookups = self._sa_cache
        assert lookups is not None
        plan = self._rows_to_read(kind, pks)
        if plan is None:
            return None
        found, wanted, places = plan
        if not wanted:
            return found
        mapper = kind.prop.mapper
        answers = lookups.read_along(along, kind.target, wanted, self._fill_rule, mapper)
        if any(type(answer) is not Hit for answer in answers):
            return None
        placed = []
        options = () if context is None else context.options
        for (_, _, identity_key), answer, place in zip(wanted, answers, places, strict=True):
            instance = self._place_row(answer, mapper, identity_key, path, options=options)  # type: ignore[arg-type]
            if instance is _orm.KNOWN_ABSENT:
                return None
            found[place] = instance
            placed.append((instance, path))
        self._complete_eager(placed, context)
        return found

    def loaded_nothing(self, mapper: Mapper[Any], primary_key_identity: Any) -> None:
        """A ``get`` went to the database and found no row: remember that (negative caching)."""
        lookups = self._sa_cache
        model = None if lookups is None else lookups.cache.registry.model_for(mapper)
        if model is None or lookups is None:
            return
        pk = model.normalise(primary_key_identity)
        if pk is not None:
            lookups.loaded_nothing(mapper.identity_key_from_primary_key(pk))

    # -- legacy bulk methods ----------------------------------------------------------------------

    def bulk_save_objects(self, objects: Iterable[object], *args: Any, **kwargs: Any) -> None:
        """As :meth:`Session.bulk_save_objects`; its rows are evicted when the transaction
        commits (the method writes below the events a flush fires)."""
        objects = list(objects)
        tracking.bulk_objects(self, objects)  # type: ignore[arg-type]
        super().bulk_save_objects(objects, *args, **kwargs)  # type: ignore[misc]

    def bulk_insert_mappings(
        self, mapper: Any, mappings: Iterable[dict[str, Any]], *args: Any, **kwargs: Any
    ) -> None:
        """As :meth:`Session.bulk_insert_mappings`, with eviction at commit."""
        mappings = list(mappings)
        self._bulk_mappings(mapper, mappings)
        super().bulk_insert_mappings(mapper, mappings, *args, **kwargs)  # type: ignore[misc]

    def bulk_update_mappings(
        self, mapper: Any, mappings: Iterable[dict[str, Any]], *args: Any, **kwargs: Any
    ) -> None:
        """As :meth:`Session.bulk_update_mappings`, with eviction at commit."""
        mappings = list(mappings)
        self._bulk_mappings(mapper, mappings)
        super().bulk_update_mappings(mapper, mappings, *args, **kwargs)  # type: ignore[misc]

    def _bulk_mappings(self, mapper: Any, mappings: list[dict[str, Any]]) -> None:
        target = inspect(mapper, raiseerr=False)
        if isinstance(target, Mapper):  # anything else: SQLAlchemy's own error follows
            tracking.bulk_mappings(self, target, mappings)  # type: ignore[arg-type]

    # -- get_many -------------------------------------------------------------------------------

    def get_many(self, entity: type[T], pks: Iterable[Any]) -> list[T | None]:
        """Instances for ``pks`` in input order (None where no row exists), with at most one
        cache round trip and one SELECT per 500 missing rows, however many are asked for."""
        mapper = inspect(entity)
        if not isinstance(mapper, Mapper):
            raise TypeError(f"{entity!r} is not a mapped class")
        if isinstance(pks, str | bytes):
            raise TypeError("get_many takes an iterable of primary keys, not one string")
        given = list(pks)
        idents = [tuple(pk) if isinstance(pk, tuple | list) else (pk,) for pk in given]
        results: list[Any] = [None] * len(idents)
        model = self._cacheable(mapper, None, {})
        coercers = model.coercers if model else tuple(coercer_for(c) for c in mapper.primary_key)
        missing: dict[tuple[Any, ...], list[int]] = {}
        flushed = False
        for index, ident in enumerate(idents):
            pk = normalise(coercers, ident)
            if pk is None:  # as the caller spelled it: a dict names its columns
                results[index] = self.get(entity, given[index])  # type: ignore[attr-defined]
                continue
            if pk in missing:
                missing[pk].append(index)
                continue
            found = self.identity_map_lookup(mapper, pk)
            if found is None and not flushed:
                # the first key that a get would SELECT autoflushes, as that get would; the
                # keys after it see the flushed session (a pending row now in the identity map)
                _orm.autoflush(self)  # type: ignore[arg-type]
                flushed = True
                found = self.identity_map_lookup(mapper, pk)
            if found is not None:
                results[index] = found if isinstance(found, mapper.class_) else None
            else:
                missing[pk] = [index]
        if model is not None and missing:
            self._get_many_from_cache(model, mapper, missing, results)
        if missing:
            self._get_many_from_database(model, mapper, missing, results)
        return results

    def _get_many_from_cache(
        self,
        model: CachedModel,
        mapper: Mapper[Any],
        missing: dict[tuple[Any, ...], list[int]],
        results: list[Any],
    ) -> None:
        lookups = self._sa_cache
        assert lookups is not None
        if self._rewrites_statements() or any(
            _orm.eager_plan(m, model.shape(m).expire_on_hit) != _orm.NO_EAGER_LOADS
            for m in mapper.self_and_descendants
        ):
            # one SELECT for all of them does what a hit would do once per row
            model.stats.skipped += len(missing)
            return
        written = lookups.changes.keys
        wanted = [
            (key, pk, mapper.identity_key_from_primary_key(pk))
            for pk in missing
            if (key := model.keys.row_key(pk)) not in written
        ]
        if not wanted:
            return
        self._begin_savepoint_as_the_load_would(mapper)
        answers = lookups.read(model, wanted, self._fill_rule, mapper)
        for (_, pk, identity_key), answer in zip(wanted, answers, strict=True):
            if answer is None:
                continue
            placed = self._place(answer, mapper, identity_key, complete=False)
            for index in missing.pop(pk):
                results[index] = None if placed is _orm.KNOWN_ABSENT else placed

    def _get_many_from_database(
        self,
        model: CachedModel | None,
        mapper: Mapper[Any],
        missing: dict[tuple[Any, ...], list[int]],
        results: list[Any],
    ) -> None:
        pk_columns = mapper.primary_key
        found: dict[tuple[Any, ...], Any] = {}
        lookups = self._sa_cache
        if lookups is not None:
            lookups.batch = []
        try:
            pks = list(missing)
            for start in range(0, len(pks), IN_CHUNK):
                chunk = pks[start : start + IN_CHUNK]
                if len(pk_columns) == 1:
                    criteria = pk_columns[0].in_([pk[0] for pk in chunk])
                else:
                    criteria = tuple_(*pk_columns).in_(chunk)
                rows = self.execute(select(mapper).where(criteria))  # type: ignore[attr-defined]
                for instance in rows.unique().scalars():  # joined collections repeat rows
                    found[inspect(instance).identity] = instance
            batch = [] if lookups is None else lookups.batch or []
        finally:
            if lookups is not None:
                lookups.batch = None
        for pk, indices in missing.items():
            instance = found.get(pk)
            for index in indices:
                results[index] = instance
        if lookups is None:
            return
        absent = []
        for pk in missing:
            observation = lookups.pending.pop(mapper.identity_key_from_primary_key(pk), None)
            if pk not in found and observation is not None:
                absent.append(observation)
        fills = batch + lookups.absent_fills(absent)
        if fills:
            lookups.write_back(fills)  # every write-back of this call in one round trip


class CachingSession(CachingSessionMixin, Session):  # type: ignore[misc]
    """A :class:`~sqlalchemy.orm.Session` whose primary-key lookups go through an
    :class:`~sa_cache.IdentityCache`: ``sessionmaker(engine, class_=CachingSession, cache=c)``."""

    def __init__(self, *args: Any, cache: IdentityCache | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("query_cls", CachingQuery)
        super().__init__(*args, cache=cache, **kwargs)


class CachingQuery(Query[T]):
    """The legacy Query with ``get_many``. ``Query.get`` needs nothing more: it reaches the cache
    through the session's identity lookup. Flask-SQLAlchemy users pass it as ``query_class``."""

    def get_many(self, pks: Iterable[Any]) -> list[T | None]:
        session = self.session
        if not isinstance(session, CachingSessionMixin):
            raise TypeError("get_many needs a session with CachingSessionMixin")
        entity = self.column_descriptions[0]["entity"]
        return session.get_many(entity, pks)
