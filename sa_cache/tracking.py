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

from .models import CachedModel


class TransactionChanges:
    """What the current outermost transaction has changed, for eviction at commit."""

    __slots__ = ("keys", "bulk_models", "wrote")

    def __init__(self) -> None:
        self.keys: dict[str, CachedModel] = {}
        self.bulk_models: set[CachedModel] = set()
        self.wrote = False

    def evict_at_commit(self, model: CachedModel, keys: dict[str, CachedModel] | None) -> None:
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
    event.listen(session_class, "do_orm_execute", _do_orm_execute)


def _changes(session: Any) -> TransactionChanges | None:
    if getattr(session, "cache", None) is None:
        return None
    changes: TransactionChanges = session._sa_cache_tx
    return changes


def _after_flush(session: Session, flush_context: UOWTransaction) -> None:
    changes = _changes(session)
    if changes is None:
        return
    changes.wrote = True
    cache = session.cache  # type: ignore[attr-defined]
    keys = changes.keys
    for obj in session.new:
        state = instance_state(obj)
        model = cache.model_for(state.mapper)
        if model is not None:
            identity = state.mapper.identity_key_from_instance(obj)
            keys[_row_key(model, identity)] = model
    for obj in session.dirty:
        state = instance_state(obj)
        model = cache.model_for(state.mapper)
        if model is None or state.key is None:
            continue
        if not session.is_modified(obj, include_collections=False):
            continue
        keys[_row_key(model, state.key)] = model
        identity = state.mapper.identity_key_from_instance(obj)
        if identity != state.key:  # primary key changed: the new identity may be negatively cached
            keys[_row_key(model, identity)] = model
    # every row the flush deleted: session.deleted lacks the orphans the flush itself removed
    for state, (isdelete, listonly) in flush_context.states.items():
        if not isdelete or listonly or state.key is None:
            continue
        model = cache.model_for(state.mapper)
        if model is not None:
            keys[_row_key(model, state.key)] = model


def _row_key(model: CachedModel, identity_key: Any) -> str:
    """The cache key of a row the flush touched, its primary key normalised as a lookup's is: an
    instance may hold ``"09"`` (or a UUID in capitals) for the row a lookup calls ``9``."""
    pk = model.normalise(identity_key[1])
    return model.keys.row_key(identity_key[1] if pk is None else pk, identity_key[2])


def _after_commit(session: Session) -> None:
    changes = _changes(session)
    if changes is None or session.in_nested_transaction():
        return  # a savepoint released: nothing is visible to others yet
    if changes.keys or changes.bulk_models:
        session.cache.evict_keys(dict(changes.keys), changes.bulk_models)  # type: ignore[attr-defined]
    changes.reset()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        changes = _changes(session)
        if changes is not None:
            changes.reset()
            session._sa_cache_pending.clear()  # type: ignore[attr-defined]


_READ_ONLY_SQL = ("SELECT", "WITH", "SHOW", "EXPLAIN", "VALUES")


def _do_orm_execute(state: ORMExecuteState) -> Any:
    if not (state.is_update or state.is_delete or state.is_insert):
        if isinstance(state.statement, TextClause):
            changes = _changes(state.session)
            sql = state.statement.text.lstrip().upper()
            if changes is not None and not sql.startswith(_READ_ONLY_SQL):
                changes.wrote = True  # rows unknown: at least never publish what it wrote
        return None
    session = state.session
    changes = _changes(session)
    if changes is None:
        return None
    cache = session.cache  # type: ignore[attr-defined]
    statement: Any = state.statement
    model = cache.models_for_table(statement.table)
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
    changes = _changes(session)
    if changes is None:
        return
    changes.wrote = True  # as after a flush: whatever it wrote, publish nothing until commit
    model = session.cache.model_for(mapper)  # type: ignore[attr-defined]
    if model is None:
        return
    changes.evict_at_commit(model, _keys_from_parameters(model, mapper, mappings))


def bulk_objects(session: Session, objects: list[Any]) -> None:
    """``bulk_save_objects`` is about to insert or update ``objects``."""
    changes = _changes(session)
    if changes is None:
        return
    changes.wrote = True
    cache = session.cache  # type: ignore[attr-defined]
    for obj in objects:
        state = inspect(obj, raiseerr=False)
        if not isinstance(state, InstanceState):
            continue  # not a mapped instance: SQLAlchemy's own error follows
        model = cache.model_for(state.mapper)
        if model is None:
            continue
        identity = state.mapper.identity_key_from_instance(obj)
        if any(value is None for value in identity[1]):  # the database will assign it
            changes.bulk_models.add(model)
        else:
            changes.keys[_row_key(model, identity)] = model


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
) -> dict[str, CachedModel] | None:
    """Keys named by an executemany's parameter sets (ORM bulk UPDATE by primary key, INSERT with
    explicit keys), or None when any set lacks the primary key."""
    if not parameters:
        return None
    param_sets = parameters if isinstance(parameters, list) else [parameters]
    base = model.base_mapper
    names = [(base.get_property_by_column(c).key, c.key) for c in base.primary_key]
    keys = {}
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
