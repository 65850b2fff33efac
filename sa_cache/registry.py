"""Which mapped classes are cached, and as which kinds.

Registering a class caches its whole inheritance hierarchy, because identity keys name the base
mapper. Lookups ask by mapper; Core statements ask by table (a subclass mapped after registration
included).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper
from sqlalchemy.schema import Table

from .errors import NotRegistered
from .kinds import CachedKind
from .rows import CachedModel


class Registry:
    """The registered models of one :class:`~sa_cache.IdentityCache`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._models: dict[Mapper[Any], CachedModel] = {}
        self._by_table: dict[Table, CachedModel | None] = {}

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

    def model_for_table(self, table: Any) -> CachedModel | None:
        """The registered model that maps ``table``, for Core statements that name a table."""
        if table in self._by_table:
            return self._by_table[table]
        cached = None
        for model in list(self._models.values()):
            if any(table in mapper.tables for mapper in model.base_mapper.self_and_descendants):
                cached = model
        self._by_table[table] = cached  # unregistered tables too: asked on every statement
        return cached

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
