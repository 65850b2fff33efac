"""Change tracking: which cached rows a transaction changed, and evicting them when it commits.

- Changes are collected in ``after_flush``, where new rows have their primary keys, foreign-key
  changes made through relationships are visible and a primary-key change shows both identities.
  Only net changes count: an object in ``session.dirty`` whose columns are unchanged is skipped.
- The keys are kept across savepoints (a savepoint rolled back may still have touched rows an
  earlier flush changed; evicting too much is harmless) and forgotten when the outermost
  transaction ends. A rolled-back transaction evicts nothing.
- The eviction runs in ``after_commit`` of the outermost transaction, registered ahead of every
  other listener, so a listener of the application (a job enqueued on commit) never reads the
  old row from the cache. All of a commit's evictions go to the store in one round trip.
- Bulk statements (``update()``, ``delete()``, ``insert()`` through ``Session.execute``) are seen
  in ``do_orm_execute``. ORM-enabled UPDATE/DELETE on a dialect with RETURNING evict exactly the
  rows they matched; anything else replaces the model's generation, which evicts it in O(1).
- The legacy bulk methods (``bulk_save_objects``, ``bulk_insert_mappings``,
  ``bulk_update_mappings``) run their statements below the session's events; the caching session
  overrides them to report their rows here first: the primary keys they name, or the whole model
  when a row's primary key is not known yet (an insert whose key the database assigns).
- Until commit, rows this transaction changed are read from the database, never from the cache,
  and once it has written anything it fills nothing: it must not publish uncommitted data.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.orm import (
    InstanceState,
    Mapper,
    ORMExecuteState,
    Session,
    SessionTransaction,
    UOWTransaction,
)
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.elements import TextClause

from .kinds import CachedKind
from .rows import CachedModel


class TransactionChanges:
    """What the current outermost transaction has changed, for eviction at commit."""

    __slots__ = ("keys", "bulk_models", "wrote")

    def __init__(self) -> None:
        self.keys: dict[str, CachedKind] = {}
        #: kinds evicted whole (their generation replaced) at commit
        self.bulk_models: set[CachedKind] = set()
        self.wrote = False

    def evict_at_commit(self, model: CachedKind, keys: dict[str, CachedKind] | None) -> None:
        """Evict ``keys`` when the transaction commits, or the whole model if they are unknown."""
        if keys is None:
            self.bulk_models.add(model)
        else:
            self.keys.update(keys)

    def reset(self) -> None:
        self.keys.clear()
        self.bulk_models.clear()
        self.wrote = False


def listen(session_class: type[Session]) -> None:
    """Install the listeners on a Session subclass (once, on the first one that mixes us in)."""
    event.listen(session_class, "after_flush", _after_flush)
    event.listen(session_class, "after_commit", _after_commit, insert=True)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)
    event.listen(session_class, "do_orm_execute", on_orm_execute)


def _lookups(session: Any) -> Any:
    """The session's :class:`~sa_cache.lookup.Lookups`, or None for a session without a cache."""
    return getattr(session, "_sa_cache", None)


def _changes(session: Any) -> TransactionChanges | None:
    lookups = _lookups(session)
    return None if lookups is None else lookups.changes


def _record(
    changes: TransactionChanges, registry: Any, state: InstanceState[Any], *identities: Any
) -> None:
    """Every kind's keys that a change of ``state`` (with these identities) makes stale."""
    for kind in registry.kinds_for(state.mapper):
        for key in kind.changed_keys(state, identities):
            changes.keys[key] = kind


def _after_flush(session: Session, flush_context: UOWTransaction) -> None:
    lookups = _lookups(session)
    if lookups is None:
        return
    changes = lookups.changes
    changes.wrote = True
    registry = lookups.cache.registry
    for obj in session.new:
        state = instance_state(obj)
        _record(changes, registry, state, state.mapper.identity_key_from_instance(obj))
    for obj in session.dirty:
        state = instance_state(obj)
        if state.key is None or not registry.kinds_for(state.mapper):
            continue
        if not session.is_modified(obj, include_collections=False):
            continue
        identity = state.mapper.identity_key_from_instance(obj)
        if identity != state.key:  # primary key changed: the new identity may be negatively cached
            _record(changes, registry, state, state.key, identity)
        else:
            _record(changes, registry, state, state.key)
    # every row the flush deleted: session.deleted lacks the orphans the flush itself removed
    for state, (isdelete, listonly) in flush_context.states.items():
        if isdelete and not listonly and state.key is not None:
            _record(changes, registry, state, state.key)


def _after_commit(session: Session) -> None:
    lookups = _lookups(session)
    if lookups is None or session.in_nested_transaction():
        return  # a savepoint released: nothing is visible to others yet
    changes = lookups.changes
    if changes.keys or changes.bulk_models:
        lookups.cache.guarded.evict(dict(changes.keys), changes.bulk_models)
    changes.reset()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        lookups = _lookups(session)
        if lookups is not None:
            lookups.transaction_ended()


_READ_ONLY_SQL = ("SELECT", "WITH", "SHOW", "EXPLAIN", "VALUES")


def on_orm_execute(state: ORMExecuteState) -> Any:
    """Bulk and Core statements through the session: note what they write."""
    if not (state.is_update or state.is_delete or state.is_insert):
        if isinstance(state.statement, TextClause):
            changes = _changes(state.session)
            sql = state.statement.text.lstrip().upper()
            if changes is not None and not sql.startswith(_READ_ONLY_SQL):
                changes.wrote = True  # rows unknown: at least never publish what it wrote
        return None
    session = state.session
    lookups = _lookups(session)
    if lookups is None:
        return None
    changes = lookups.changes
    statement: Any = state.statement
    model = lookups.cache.registry.model_for_table(statement.table)
    if model is None:
        return None
    changes.wrote = True
    mapper = state.bind_mapper if state.is_orm_statement else None
    if state.is_insert:
        # an upsert or INSERT OR REPLACE may change or delete rows its parameters do not name
        if statement._post_values_clause is not None or statement._prefixes:
            keys = None
        else:
            keys = _keys_from_parameters(model, mapper, state.parameters)
    elif mapper is not None and _returning_matches_rows(state, mapper, statement):
        state.update_execution_options(synchronize_session="fetch")
        result: Any = state.invoke_statement()
        rows = result.returned_defaults_rows
        if rows is not None:
            for row in rows:
                pk = model.normalise(tuple(row))
                if pk is None:
                    break
                changes.keys[model.keys.row_key(pk)] = model
            else:
                return result
        changes.bulk_models.add(model)
        return result
    elif mapper is not None and state.is_executemany:  # ORM bulk UPDATE/DELETE by primary key
        keys = _keys_from_parameters(model, mapper, state.parameters)
    else:  # Core UPDATE/DELETE, or no way to learn the rows: evict the model
        keys = None
    changes.evict_at_commit(model, keys)
    return None


def bulk_mappings(session: Session, mapper: Mapper[Any], mappings: list[dict[str, Any]]) -> None:
    """``bulk_insert_mappings`` / ``bulk_update_mappings`` is about to write ``mappings``."""
    lookups = _lookups(session)
    if lookups is None:
        return
    lookups.changes.wrote = True  # as after a flush: publish nothing until commit
    model = lookups.cache.registry.model_for(mapper)
    if model is None:
        return
    lookups.changes.evict_at_commit(model, _keys_from_parameters(model, mapper, mappings))


def bulk_objects(session: Session, objects: list[Any]) -> None:
    """``bulk_save_objects`` is about to insert or update ``objects``."""
    lookups = _lookups(session)
    if lookups is None:
        return
    changes = lookups.changes
    changes.wrote = True
    registry = lookups.cache.registry
    for obj in objects:
        state = inspect(obj, raiseerr=False)
        if not isinstance(state, InstanceState):
            continue  # not a mapped instance: SQLAlchemy's own error follows
        identity = state.mapper.identity_key_from_instance(obj)
        if any(value is None for value in identity[1]):  # the database will assign it
            changes.bulk_models.update(registry.kinds_for(state.mapper))
        else:
            _record(changes, registry, state, identity)


def _returning_matches_rows(state: ORMExecuteState, mapper: Mapper[Any], statement: Any) -> bool:
    """Whether an ORM UPDATE/DELETE can report the primary keys it matched through RETURNING."""
    if state.is_executemany or statement._returning or mapper.inherits is not None:
        return False
    if mapper.base_mapper.polymorphic_on is not None:
        return False
    if state.execution_options.get("synchronize_session", "auto") is False:
        return False
    if list(statement.table.primary_key) != list(mapper.primary_key):
        return False
    dialect = state.session.get_bind(**state.bind_arguments).dialect
    return bool(dialect.update_returning if state.is_update else dialect.delete_returning)


def _keys_from_parameters(
    model: CachedModel, mapper: Mapper[Any] | None, parameters: Any
) -> dict[str, CachedKind] | None:
    """Keys named by an executemany's parameter sets (ORM bulk UPDATE by primary key, INSERT with
    explicit keys), or None when any set lacks the primary key."""
    if not parameters:
        return None
    param_sets = parameters if isinstance(parameters, list) else [parameters]
    base = model.base_mapper
    names = [(base.get_property_by_column(c).key, c.key) for c in base.primary_key]
    keys: dict[str, CachedKind] = {}
    for params in param_sets:
        values = []
        for attr, column_key in names:
            if attr in params:
                values.append(params[attr])
            elif column_key in params:
                values.append(params[column_key])
            else:
                return None
        pk = model.normalise(values)
        if pk is None:
            return None
        keys[model.keys.row_key(pk)] = model
    return keys
