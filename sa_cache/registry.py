"""Which mapped classes are cached, and as which kinds.

Registering a class caches its whole inheritance hierarchy, because identity keys name the base
mapper. Lookups ask by mapper; Core statements ask by table (a subclass mapped after registration
included).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper
from sqlalchemy.schema import Table
from sqlalchemy.sql.expression import TableClause

from .errors import NotRegistered
from .kinds import CachedKind
from .rows import CachedModel


class Registry:
    """The registered models of one :class:`~sa_cache.IdentityCache`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._models: dict[Mapper[Any], CachedModel] = {}
        #: by table name (casefolded): the registered models mapping a table of that name
        self._by_table: dict[str, tuple[TableMatch, ...]] = {}

    def __len__(self) -> int:
        return len(self._models)

    def models(self) -> list[CachedModel]:
        return list(self._models.values())

    def add(self, model: type[Any], ttl: float) -> CachedModel:
        base = mapper_of(model).base_mapper
        cached = CachedModel(base, self.prefix, ttl)
        self._models[base] = cached
        self._by_table.clear()  # filled lazily: subclasses may be mapped after registration
        return cached

    def model_for(self, mapper: Mapper[Any]) -> CachedModel | None:
        """The rows kind of ``mapper``'s hierarchy, if it is registered (on every lookup)."""
        return self._models.get(mapper.base_mapper)

    def kinds_for(self, mapper: Mapper[Any]) -> tuple[CachedKind, ...]:
        """Every kind whose entries a change to an instance of ``mapper`` may make stale."""
        model = self._models.get(mapper.base_mapper)
        return () if model is None else (model,)

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
        cached = self._models.get(mapper_of(target).base_mapper)
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
