"""Which mapped classes are cached, and as which kinds.

Registering a class caches its whole inheritance hierarchy, because identity keys name the base
mapper. Lookups ask by mapper; Core statements ask by table (a subclass mapped after registration
included).
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from sqlalchemy import inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper
from sqlalchemy.schema import Table
from sqlalchemy.sql.expression import TableClause

from .errors import CacheError, NotRegistered
from .kinds import CachedKind
from .rows import CachedModel, identity_mapper


class Registry:
    """The registered models of one :class:`~sa_cache.IdentityCache`.

    One :class:`~sa_cache.rows.CachedModel` per identity class (:func:`rows.identity_mapper`): a
    hierarchy's base, and each concrete class of a concrete hierarchy, keyed and evicted by its
    own table (all of one hierarchy share its generation). ``_models`` holds them parents
    first."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._models: dict[Mapper[Any], CachedModel] = {}
        #: by table name (casefolded): the registered models mapping a table of that name
        self._by_table: dict[str, tuple[TableMatch, ...]] = {}
        #: registered hierarchies (by base mapper): their TTL
        self._ttls: dict[Mapper[Any], float] = {}
        #: memos of model_for and kinds_for, by the mapper asked about
        self._served: dict[Mapper[Any], CachedModel | None] = {}
        self._kinds: dict[Mapper[Any], tuple[CachedKind, ...]] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._models)

    def models(self) -> list[CachedModel]:
        return list(self._models.values())

    def add(self, model: type[Any], ttl: float) -> Mapper[Any]:
        """Cache ``model``'s whole hierarchy (again: with this TTL) and return its base mapper;
        raises :class:`~sa_cache.errors.CacheError` for a hierarchy whose rows the cache cannot
        key, naming the class and why."""
        base = mapper_of(model).base_mapper
        for mapper in base.self_and_descendants:
            reason = unservable(mapper)
            if reason is not None and not _has_concrete_subclasses(mapper):
                raise CacheError(f"{mapper.class_.__name__} cannot be cached: {reason}")
        with self._lock:
            self._ttls[base] = ttl
            for mapper in base.self_and_descendants:  # parents first
                if identity_mapper(mapper) is mapper:
                    self._new_model(mapper, ttl)
            self._forget()
        return base

    def _new_model(self, root: Mapper[Any], ttl: float) -> CachedModel | None:
        if not isinstance(root.local_table, Table):
            return None  # an abstract base mapped to a polymorphic union: no rows of its own
        cached = CachedModel(root, self.prefix, ttl, root.base_mapper.local_table)
        self._models[root] = cached
        return cached

    def _forget(self) -> None:
        self._by_table.clear()  # filled lazily: subclasses may be mapped after registration
        self._served.clear()
        self._kinds.clear()

    def _model_of(self, mapper: Mapper[Any]) -> CachedModel | None:
        """The model of ``mapper``'s identity class (made now for a concrete class mapped after
        its hierarchy was registered), or None if its hierarchy is not registered."""
        root = identity_mapper(mapper)
        cached = self._models.get(root)
        if cached is None:
            ttl = self._ttls.get(mapper.base_mapper)
            if ttl is None:
                return None
            with self._lock:
                cached = self._models.get(root) or self._new_model(root, ttl)
                self._by_table.clear()
        return cached

    def model_for(self, mapper: Mapper[Any]) -> CachedModel | None:
        """The rows kind that answers lookups of ``mapper``: None if its hierarchy is not
        registered or its lookups cannot be answered exactly (:func:`unservable`). On every
        lookup, hence the memo."""
        try:
            return self._served[mapper]
        except KeyError:
            pass
        served = None
        if mapper.base_mapper in self._ttls and unservable(mapper) is None:
            served = self._model_of(mapper)
        self._served[mapper] = served
        return served

    def kinds_for(self, mapper: Mapper[Any]) -> tuple[CachedKind, ...]:
        """Every kind whose entries a change to an instance of ``mapper`` may make stale."""
        try:
            return self._kinds[mapper]
        except KeyError:
            pass
        cached = self._model_of(mapper) if mapper.base_mapper in self._ttls else None
        kinds: tuple[CachedKind, ...] = () if cached is None else (cached,)
        self._kinds[mapper] = kinds
        return kinds

    def models_for_table(self, table: Any) -> tuple[TableMatch, ...]:
        """Every registered model that maps a table named as ``table`` (a ``Table`` of any
        metadata, a lightweight ``table()``), with the mapper and the table it maps under that
        name. Names compare case-insensitively (SQLite's do); whether schema and bind name the
        same database table is the caller's to decide (it knows the binds)."""
        if not isinstance(table, TableClause):
            return ()
        name = table.name.casefold()
        found = self._by_table.get(name)
        if found is None:
            matches: dict[tuple[CachedModel, Any], TableMatch] = {}
            for model in list(self._models.values()):
                for mapper in model.base_mapper.self_and_descendants:  # the base first
                    if mapper.concrete and mapper is not model.base_mapper:
                        continue  # a concrete class: its rows are its own model's
                    for mapped in mapper.tables:
                        if mapped.name.casefold() == name:
                            matches.setdefault((model, mapped), TableMatch(model, mapper, mapped))
            found = tuple(matches.values())
            self._by_table[name] = found  # unregistered names too: asked on every statement
        return found

    def registered(self, target: Any) -> CachedModel:
        mapper = mapper_of(target)
        cached = self._model_of(mapper) if mapper.base_mapper in self._ttls else None
        if cached is None:
            raise NotRegistered(f"{target!r} is not registered with this IdentityCache")
        return cached


def mapper_of(target: Any) -> Mapper[Any]:
    try:
        mapper = inspect(target)
    except NoInspectionAvailable:
        raise TypeError(f"{target!r} is not a mapped class") from None
    if not isinstance(mapper, Mapper):
        raise TypeError(f"{target!r} is not a mapped class")
    return mapper


class TableMatch(NamedTuple):
    """A registered model that maps a table of the name asked for: through ``mapper``, as
    ``table``."""

    model: CachedModel
    mapper: Mapper[Any]
    table: Any  # a Table, or what else a mapper maps (mapper.tables)


def _has_concrete_subclasses(mapper: Mapper[Any]) -> bool:
    return any(m.concrete for m in mapper.self_and_descendants if m is not mapper)


def unservable(mapper: Mapper[Any]) -> str | None:
    """Why lookups of ``mapper`` cannot be answered from the cache exactly, or None if they can.

    - A class mapped to a ``select()``, subquery, CTE or join: its rows are keyed by no one table,
      and the cache would not see changes made to the tables underneath.
    - A class that loads its concrete subclasses polymorphically (a base over a
      ``polymorphic_union``): its lookup reads rows of several identity classes, one per
      concrete table (SQLAlchemy raises when two share the key). Its concrete subclasses are
      cached, each by its own table; its own lookups always read the database. (A base with
      concrete subclasses but no polymorphic loading reads only its own table: cached.)
    """
    if _has_concrete_subclasses(mapper) and (
        mapper.with_polymorphic is not None or mapper.polymorphic_on is not None
    ):
        return "it loads its concrete subclasses polymorphically, from several tables"
    for table in (identity_mapper(mapper).local_table, mapper.local_table):
        if not isinstance(table, Table):
            kind = type(table).__name__
            return (
                f"it is mapped to a {kind}, not a table: its rows would be keyed by no one "
                "table, and changes to the tables underneath would not evict them"
            )
    return None
