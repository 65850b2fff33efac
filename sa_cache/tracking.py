"""Change tracking: which cached rows a transaction changed, and evicting them when it commits.

- Changes are collected in ``after_flush``, where new rows have their primary keys, foreign-key
  changes made through relationships are visible and a primary-key change shows both identities.
  Only net changes count: an object in ``session.dirty`` whose columns are unchanged is skipped.
- The keys are kept across savepoints (a savepoint rolled back may still have touched rows an
  earlier flush changed; evicting too much is harmless) and forgotten when the outermost
  transaction ends. A rolled-back transaction evicts nothing. One exception: on pysqlite a
  savepoint begun before the transaction's first write is the database's transaction (its
  default mode begins one only at a write), so its release commits: it evicts as a commit does.
- Just before the database commit the keys are held (``sa_cache.connections``): a reader that
  learns of the commit through the database before the eviction must not get the old row.
- The eviction runs in ``after_commit`` of the outermost transaction, registered ahead of every
  other listener, so a listener of the application (a job enqueued on commit) never reads the
  old row from the cache. The holds and the evictions each go to the store in one round trip.
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

from collections.abc import Iterable
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection
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
from sqlalchemy.sql.expression import Alias, Join

from . import _orm, connections
from .kinds import WHOLE_KIND, CachedKind
from .rows import CachedModel


class TransactionChanges:
    """What the current outermost transaction has changed, for eviction at commit."""

    __slots__ = ("keys", "bulk_models", "wrote", "connections")

    def __init__(self) -> None:
        self.keys: dict[str, CachedKind] = {}
        #: kinds evicted whole (their generation replaced) at commit
        self.bulk_models: set[CachedKind] = set()
        self.wrote = False
        #: the connections the transaction runs on, whose commits are held (``connections``)
        self.connections: list[Connection] = []

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
        self.connections.clear()


def listen(session_class: type[Session]) -> None:
    """Install the listeners on a Session subclass (once, on the first one that mixes us in)."""
    event.listen(session_class, "after_begin", _after_begin)
    event.listen(session_class, "after_flush", _after_flush)
    event.listen(session_class, "after_commit", _after_commit, insert=True)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)
    event.listen(session_class, "do_orm_execute", on_orm_execute)


def _lookups(session: Any) -> Any:
    """The session's :class:`~sa_cache.lookup.Lookups`, or None for a session without a cache."""
    return getattr(session, "_sa_cache", None)


def _record(
    changes: TransactionChanges,
    registry: Any,
    session: Session,
    state: InstanceState[Any],
    *identities: Any,
) -> None:
    """Every kind's keys that a change of ``state`` (with these identities) makes stale: its own
    model's, and those of every registered model whose table its class writes too (a second
    class mapped to a cached table, registered or not)."""
    kinds = registry.kinds_for(state.mapper)
    for kind in kinds:
        _note(changes, kind, kind.changed_keys(state, identities))
    mapper = state.mapper
    for model, keys in _other_models_written(registry, session, mapper, kinds, identities):
        changes.evict_at_commit(model, keys)


def _note(changes: TransactionChanges, kind: CachedKind, keys: Iterable[str]) -> None:
    """Evict ``keys`` of ``kind`` at commit; the whole kind where one is :data:`WHOLE_KIND`."""
    for key in keys:
        if key is WHOLE_KIND:
            changes.bulk_models.add(kind)
        else:
            changes.keys[key] = kind


def _other_models_written(
    registry: Any,
    session: Session,
    mapper: Mapper[Any],
    own: tuple[CachedKind, ...],
    identities: tuple[Any, ...],
) -> list[tuple[CachedModel, dict[str, CachedKind] | None]]:
    """Registered models other than ``own`` whose tables ``mapper`` writes, each with the keys an
    instance of these ``identities`` names in it (None: the whole model)."""
    found: list[tuple[CachedModel, dict[str, CachedKind] | None]] = []
    bind: Any = None
    for table in mapper.tables:
        for match in registry.models_for_table(table):
            if match.model in own:
                continue
            if bind is None:
                bind = _bind(session, mapper=mapper)
            if not _same_table(table, bind, match.table, _bind(session, mapper=match.mapper)):
                continue
            keys = _keys_from_identities(match.model, mapper, table, identities)
            found.append((match.model, keys))
    return found


def _keys_from_identities(
    model: CachedModel, mapper: Mapper[Any], table: Any, identities: tuple[Any, ...]
) -> dict[str, CachedKind] | None:
    """The keys of ``model`` that rows of another class (``mapper``, writing ``table``) with
    these identities are: only when ``table`` is the model's own table and the class's primary
    key is that table's primary key, column for column; else None (the whole model)."""
    base = model.base_mapper
    if _name(table) != _name(base.local_table):
        return None
    names = [column.name for column in base.primary_key]
    if [getattr(column, "name", None) for column in mapper.primary_key] != names:
        return None
    if any(getattr(column, "table", None) is not table for column in mapper.primary_key):
        return None
    keys: dict[str, CachedKind] = {}
    for identity in identities:
        pk = model.normalise(identity[1])
        if pk is None:
            return None
        keys[model.keys.row_key(pk, identity[2])] = model
    return keys


def _after_flush(session: Session, flush_context: UOWTransaction) -> None:
    lookups = _lookups(session)
    if lookups is None:
        return
    changes = lookups.changes
    _wrote(session, lookups)
    registry = lookups.cache.registry
    for obj in session.new:
        state = instance_state(obj)
        _record(changes, registry, session, state, state.mapper.identity_key_from_instance(obj))
    for obj in session.dirty:
        state = instance_state(obj)
        if state.key is None or not _may_write_cached_rows(registry, state.mapper):
            continue
        if not session.is_modified(obj, include_collections=False):
            continue
        identity = state.mapper.identity_key_from_instance(obj)
        if identity != state.key:  # primary key changed: the new identity may be negatively cached
            _record(changes, registry, session, state, state.key, identity)
        else:
            _record(changes, registry, session, state, state.key)
    # every row the flush deleted: session.deleted lacks the orphans the flush itself removed
    for state, (isdelete, listonly) in flush_context.states.items():
        if isdelete and not listonly and state.key is not None:
            _record(changes, registry, session, state, state.key)
        # link rows of many-to-many collections, which no instance's columns show
        for kind in registry.kinds_for(state.mapper):
            _note(changes, kind, kind.links_changed(state, isdelete and not listonly))


def _may_write_cached_rows(registry: Any, mapper: Mapper[Any]) -> bool:
    """Whether instances of ``mapper`` may write rows of a registered model (cheap: by name)."""
    return bool(registry.kinds_for(mapper)) or any(
        registry.models_for_table(table) for table in mapper.tables
    )


def _wrote(session: Session, lookups: Any) -> None:
    """The session wrote (or may have): it publishes nothing until its transaction ends, its
    commit is held on every connection it runs on, and on a connection it shares, no other
    session trusts the cache until that connection's transaction ends."""
    changes: TransactionChanges = lookups.changes
    if not changes.wrote:
        changes.wrote = True
        for connection in changes.connections:
            _hold_commit(lookups, connection)
    bind = session.bind
    if isinstance(bind, Connection):
        connections.wrote(bind, session)


def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    lookups = _lookups(session)
    if lookups is None:
        return
    changes = lookups.changes
    if connection in changes.connections:  # a savepoint on it
        return
    changes.connections.append(connection)
    if changes.wrote:
        _hold_commit(lookups, connection)


def _hold_commit(lookups: Any, connection: Connection) -> None:
    """Hold the transaction's keys just before ``connection`` commits it: from the database
    commit until the eviction in ``after_commit``, a reader that learnt of the commit through
    the database (a lock the writer held, a row it wrote) must not get the old row from the
    cache, nor fill it (``sa_cache.connections``)."""
    cache = lookups.cache
    connections.hold_at_commit(connection, cache.guarded, lookups.changes, cache.max_fill_age)


def _after_commit(session: Session) -> None:
    lookups = _lookups(session)
    if lookups is None:
        return
    if session.in_nested_transaction() and not _orm.released_savepoint_committed(session):
        return  # a savepoint released: nothing is visible to others yet
    changes = lookups.changes
    if changes.keys or changes.bulk_models:
        lookups.cache.guarded.evict(dict(changes.keys), changes.bulk_models)
    bind = session.bind
    if isinstance(bind, Connection):
        if _orm.runs_in_outside_transaction(session):
            # not durable yet: the connection's own commit makes it so (sa_cache.connections)
            if changes.keys or changes.bulk_models:
                connections.defer(
                    bind,
                    lookups.cache.guarded,
                    changes.keys,
                    changes.bulk_models,
                    lookups.cache.max_fill_age,
                )
        else:
            connections.after_commit(bind)  # what sessions joined to ours changed
    changes.reset()


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        lookups = _lookups(session)
        if lookups is not None:
            lookups.transaction_ended()


_READ_ONLY_SQL = ("SELECT", "WITH", "SHOW", "EXPLAIN", "VALUES")


def on_orm_execute(state: ORMExecuteState) -> Any:
    """Bulk and Core statements through the session: note what they write. (A lazy load of a
    relationship is handed to the session's ``cache_lazy_load``, any other SELECT to its
    ``cache_unique_lookup``: the one listener sa_cache installs answers them too, so a listener
    of the application is always another one.)"""
    if state.is_select:
        if state.lazy_loaded_from is not None:
            answer = getattr(state.session, "cache_lazy_load", None)
        else:  # a lookup by a unique column, perhaps
            answer = getattr(state.session, "cache_unique_lookup", None)
        return None if answer is None else answer(state)
    if not (state.is_update or state.is_delete or state.is_insert):
        if isinstance(state.statement, TextClause):
            lookups = _lookups(state.session)
            sql = state.statement.text.lstrip().upper()
            if lookups is not None and not sql.startswith(_READ_ONLY_SQL):
                _wrote(state.session, lookups)  # rows unknown: never publish what it wrote
        return None
    session = state.session
    lookups = _lookups(session)
    if lookups is None:
        return None
    changes = lookups.changes
    _wrote(session, lookups)  # whatever table it writes: publish nothing until the transaction ends
    registry = lookups.cache.registry
    statement: Any = _orm.dml_statement(state.statement)
    target, *others = _tables_written(statement, state.is_update)
    for table in (target, *others):  # relationship collections reading a table written
        changes.bulk_models.update(registry.kinds_reading(table))
    translate = state.execution_options.get("schema_translate_map")
    bind = _bind(session, **state.bind_arguments)
    # models of the other tables a multi-table UPDATE sets: their rows are not known
    for table in others:
        for match in _matching(registry, session, table, bind, translate):
            changes.bulk_models.add(match.model)
    matches = _matching(registry, session, target, bind, translate)
    if not matches:
        return None
    mapper = state.bind_mapper if state.is_orm_statement else None
    if mapper is not None and any(m.model not in registry.kinds_for(mapper) for m in matches):
        # an ORM statement of another class on a cached table: evict the whole model
        for match in matches:
            changes.bulk_models.add(match.model)
        return None
    model = matches[0].model
    if state.is_insert:
        # an upsert or INSERT OR REPLACE may change or delete rows its parameters do not name;
        # a Core INSERT names the model's rows only on the model's own table
        if (
            _orm.rewrites_other_rows(statement)
            or (mapper is None and _name(target) != _name(model.base_mapper.local_table))
        ):
            keys = None
        else:
            keys = _keys_from_parameters(model, mapper, state.parameters, target)
    elif mapper is not None and _returning_may_report_rows(state, mapper, target):
        # the caller's synchronize_session is kept: rows come back only where SQLAlchemy itself
        # asked for them ("fetch", or "auto" on criteria Python cannot evaluate)
        result: Any = state.invoke_statement()
        keys = _keys_from_returned_rows(model, target, result.returned_defaults_rows)
        changes.evict_at_commit(model, keys)
        return result
    elif mapper is not None and state.is_executemany:  # ORM bulk UPDATE/DELETE by primary key
        keys = _keys_from_parameters(model, mapper, state.parameters, target)
    else:  # Core UPDATE/DELETE, or no way to learn the rows: evict the model
        keys = None
    for match in matches:
        changes.evict_at_commit(match.model, keys if match.model is model else None)
    return None


def _matching(
    registry: Any, session: Session, table: Any, bind: Any, translate: Any
) -> list[Any]:
    """The registered models' tables (``TableMatch``) that ``table``, written on ``bind``, may
    be: the same name, schema and database."""
    return [
        match
        for match in registry.models_for_table(table)
        if _same_table(table, bind, match.table, _bind(session, mapper=match.mapper), translate)
    ]


def _tables_written(statement: Any, is_update: bool) -> list[Any]:
    """The tables a DML statement writes, its target first: an UPDATE also writes the tables of
    the columns it SETs (MySQL/MariaDB ``UPDATE a, b SET a.x = .., b.y = ..``)."""
    tables = _tables_of(statement.table)
    if is_update:
        seen = {(_name(table), table.schema) for table in tables}
        for column in _orm.update_set_columns(statement):
            table = getattr(column, "table", None)
            if table is not None:
                for written in _tables_of(table):
                    if (_name(written), written.schema) not in seen:  # an ORM target is annotated
                        seen.add((_name(written), written.schema))
                        tables.append(written)
    return tables


def _tables_of(selectable: Any) -> list[Any]:
    """The tables behind a DML target or a column's table: itself, what an alias
    (``aliased(Model)``, ``table.alias()``) stands for, both sides of a join."""
    while isinstance(selectable, Alias):
        selectable = selectable.element
    if isinstance(selectable, Join):
        return _tables_of(selectable.left) + _tables_of(selectable.right)
    return [selectable]


def _name(table: Any) -> str:
    return str(table.name).casefold()


def _bind(session: Session, **arguments: Any) -> Any:
    """The engine or connection ``session`` runs a statement on; None when it has none, or when
    the application routes binds itself (its own ``get_bind``, which must not be called more
    often than SQLAlchemy calls it): unknown, so every table of that name matches."""
    get_bind = session.get_bind
    if getattr(get_bind, "__func__", None) is not Session.get_bind:  # a subclass's, a patch's
        return None
    try:
        return get_bind(**arguments)
    except Exception:  # no bind: SQLAlchemy's own error follows, or the table is unknown
        return None


def _same_table(
    written: Any, bind: Any, mapped: Any, mapped_bind: Any, translate: Any = None
) -> bool:
    """Whether ``written`` (run on ``bind``) and ``mapped`` (a registered model's table, on
    ``mapped_bind``) may be the same database table: the same name (already compared), the same
    schema (None being the connection's default) and the same database. Whatever is unknown
    matches: evicting too much is harmless, too little is a stale read."""
    if bind is None or mapped_bind is None:
        return True
    engine, mapped_engine = bind.engine, mapped_bind.engine
    if engine is not mapped_engine:
        url, mapped_url = engine.url, mapped_engine.url
        if (url.get_backend_name(), url.host, url.port) != (
            mapped_url.get_backend_name(),
            mapped_url.host,
            mapped_url.port,
        ):
            return False
        # on MySQL/MariaDB a schema is a database: another URL database may hold the table
        if engine.dialect.name not in ("mysql", "mariadb") and url.database != mapped_url.database:
            return False
    schema = _schema(written, engine, translate)
    mapped_schema = _schema(mapped, mapped_engine, None)
    return schema is None or mapped_schema is None or schema == mapped_schema


def _schema(table: Any, engine: Any, translate: Any) -> str | None:
    """The schema ``table`` lives in on ``engine``, casefolded; None when not known."""
    schema = table.schema
    for mapping in (translate, engine.get_execution_options().get("schema_translate_map")):
        if mapping and schema in mapping:
            schema = mapping[schema]
            break
    if schema is None:
        schema = engine.dialect.default_schema_name  # known once the engine has connected
    return None if schema is None else str(schema).casefold()


def bulk_mappings(session: Session, mapper: Mapper[Any], mappings: list[dict[str, Any]]) -> None:
    """``bulk_insert_mappings`` / ``bulk_update_mappings`` is about to write ``mappings``."""
    lookups = _lookups(session)
    if lookups is None:
        return
    changes = lookups.changes
    _wrote(session, lookups)  # as after a flush: publish nothing until commit
    registry = lookups.cache.registry
    model = registry.model_for(mapper)
    if model is not None:
        changes.evict_at_commit(model, _keys_from_parameters(model, mapper, mappings, None))
    own = registry.kinds_for(mapper)
    for other, _ in _other_models_written(registry, session, mapper, own, ()):
        changes.bulk_models.add(other)
    for table in mapper.tables:  # relationship collections reading its tables
        changes.bulk_models.update(registry.kinds_reading(table))


def bulk_objects(session: Session, objects: list[Any]) -> None:
    """``bulk_save_objects`` is about to insert or update ``objects``.

    Reads only what the objects already hold (their identity, their ``__dict__``): loading an
    expired attribute would autoflush the session and change what the bulk method does."""
    lookups = _lookups(session)
    if lookups is None:
        return
    changes = lookups.changes
    _wrote(session, lookups)
    registry = lookups.cache.registry
    for obj in objects:
        state = inspect(obj, raiseerr=False)
        if not isinstance(state, InstanceState):
            continue  # not a mapped instance: SQLAlchemy's own error follows
        mapper = state.mapper
        # the bulk method writes the primary key its __dict__ holds (an update: WHERE pk = it)
        values = [state.dict.get(mapper.get_property_by_column(c).key) for c in mapper.primary_key]
        token = state.key[2] if state.key is not None else None
        identities = [] if state.key is None else [state.key]
        if any(value is None for value in values):  # not known: the database may assign it
            for kind in registry.kinds_for(mapper):
                changes.bulk_models.add(kind)
            for other, _ in _other_models_written(registry, session, mapper, (), ()):
                changes.bulk_models.add(other)
            if not identities:
                continue
        else:
            identities.append((mapper.class_, tuple(values), token))
        _record(changes, registry, session, state, *identities)


def _returning_may_report_rows(state: ORMExecuteState, mapper: Mapper[Any], target: Any) -> bool:
    """Whether SQLAlchemy may report the primary keys an ORM UPDATE/DELETE matched (its "fetch"
    synchronisation, through RETURNING); the caller's ``synchronize_session`` decides."""
    statement: Any = _orm.dml_statement(state.statement)
    if state.is_executemany or _orm.has_own_returning(statement) or mapper.inherits is not None:
        return False
    if mapper.base_mapper.polymorphic_on is not None:
        return False
    if state.execution_options.get("synchronize_session", "auto") not in ("auto", "fetch"):
        return False
    if list(target.primary_key) != list(mapper.primary_key):
        return False
    bind = _bind(state.session, **state.bind_arguments)
    if bind is None:
        return False
    dialect = bind.dialect
    return bool(dialect.update_returning if state.is_update else dialect.delete_returning)


def _keys_from_returned_rows(
    model: CachedModel, target: Any, rows: Any
) -> dict[str, CachedKind] | None:
    """The keys of the rows SQLAlchemy's "fetch" synchronisation returned (None: it returned
    none, having synchronised by evaluation, or a key cannot be read: the whole model)."""
    if rows is None:
        return None
    keys: dict[str, CachedKind] = {}
    columns = list(target.primary_key)
    for row in rows:
        try:
            values = [row._mapping[column] for column in columns]
        except KeyError:
            return None
        if not _add_key(keys, model, values):
            return None
    return keys


def _add_key(keys: dict[str, CachedKind], model: CachedModel, values: list[Any]) -> bool:
    """Add the key of the row whose primary-key values are ``values``; False if they cannot be
    normalised (the caller then evicts the whole model)."""
    pk = model.normalise(values)
    if pk is None:
        return False
    keys[model.keys.row_key(pk)] = model
    return True


def _keys_from_parameters(
    model: CachedModel, mapper: Mapper[Any] | None, parameters: Any, target: Any
) -> dict[str, CachedKind] | None:
    """Keys named by an executemany's parameter sets (ORM bulk UPDATE by primary key, INSERT with
    explicit keys), or None when any set lacks the primary key. ORM parameters name attributes
    (or columns) of ``mapper``; Core parameters name the columns of ``target``, the model's table
    under any metadata, matched to the model's primary key by column name."""
    if not parameters:
        return None
    param_sets = parameters if isinstance(parameters, list) else [parameters]
    base = model.base_mapper
    if mapper is not None:
        names = [(base.get_property_by_column(c).key, c.key) for c in base.primary_key]
    else:
        by_name = {column.name: column.key for column in target.c}
        names = []
        for column in base.primary_key:
            key = by_name.get(column.name)
            if key is None:
                return None
            names.append((key, key))
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
        if not _add_key(keys, model, values):
            return None
    return keys
