"""Which mapped classes are cached, and as which kinds.

Registering a class caches its whole inheritance hierarchy, because identity keys name the base
mapper. Lookups ask by mapper; Core statements ask by table (a subclass mapped after registration
included).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

from sqlalchemy import inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.schema import Table
from sqlalchemy.sql.expression import TableClause

from .errors import CacheError, NotRegistered
from .kinds import CachedKind
from .relationships import DEFAULT_MAX_COLLECTION, CachedRelationship, uncacheable
from .rows import CachedModel, identity_mapper


class Registry:
    """The registered models of one :class:`~sa_cache.IdentityCache`.

    One :class:`~sa_cache.rows.CachedModel` per identity class (:func:`rows.identity_mapper`): a
    hierarchy's base, and each concrete class of a concrete hierarchy, keyed and evicted by its
    own table (all of one hierarchy share its generation). ``_models`` holds them parents
    first."""

    def __init__(self, prefix: str, max_collection: int = DEFAULT_MAX_COLLECTION) -> None:
        self.prefix = prefix
        self.max_collection = max_collection
        #: registered hierarchies (by base mapper): the relationships chosen (None: all)
        self._chosen: dict[Mapper[Any], frozenset[str] | None] = {}
        #: every relationship kind ever made, kept so its counters survive a re-registration
        self._made: dict[RelationshipProperty[Any], CachedRelationship] = {}
        #: the cached relationships, found on first use after a registration (None: not yet)
        self._relationships: dict[RelationshipProperty[Any], CachedRelationship] | None = None
        self._reading: dict[str, tuple[CachedRelationship, ...]] = {}
        self._models: dict[Mapper[Any], CachedModel] = {}
        #: by table name (casefolded): the registered models mapping a table of that name
        self._by_table: dict[str, tuple[TableMatch, ...]] = {}
        #: registered hierarchies (by base mapper): their TTL
        self._ttls: dict[Mapper[Any], float] = {}
        #: memos of model_for and kinds_for, by the mapper asked about
        self._served: dict[Mapper[Any], CachedModel | None] = {}
        self._kinds: dict[Mapper[Any], tuple[CachedKind, ...]] = {}
        #: :func:`sa_cache.eager.plan`'s memo, by mapper (cleared by every registration)
        self.eager_plans: dict[Mapper[Any], Any] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._models)

    def models(self) -> list[CachedModel]:
        return list(self._models.values())

    def add(
        self, model: type[Any], ttl: float, relationships: Iterable[str] | None = None
    ) -> Mapper[Any]:
        """Cache ``model``'s whole hierarchy (again: with this TTL) and return its base mapper;
        raises :class:`~sa_cache.errors.CacheError` for a hierarchy whose rows the cache cannot
        key, naming the class and why. ``relationships``: the names of the hierarchy's
        relationships whose collections are cached (None: every one to a registered class that
        :func:`~sa_cache.relationships.uncacheable` allows)."""
        if isinstance(relationships, str):
            raise TypeError("relationships takes attribute names, not one string")
        chosen = None if relationships is None else frozenset(relationships)
        base = mapper_of(model).base_mapper
        if chosen and base.configured:  # else: checked by nothing, the mappers being incomplete
            known = {prop.key for m in base.self_and_descendants for prop in m.relationships}
            if chosen - known:
                names = ", ".join(sorted(chosen - known))
                raise CacheError(f"{base.class_.__name__} has no relationship named {names}")
        for mapper in base.self_and_descendants:
            reason = unservable(mapper)
            if reason is not None and not _has_concrete_subclasses(mapper):
                raise CacheError(f"{mapper.class_.__name__} cannot be cached: {reason}")
        with self._lock:
            self._ttls[base] = ttl
            self._chosen[base] = chosen
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
        self._relationships = None
        self.eager_plans.clear()
        self._reading = {}

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
        kinds += tuple(
            kind
            for kind in self._cached_relationships().values()
            if _takes_part(mapper, kind)
        )
        self._kinds[mapper] = kinds
        return kinds

    # -- relationships ----------------------------------------------------------------------------

    def relationship_kind(self, prop: Any) -> CachedRelationship | None:
        """The cached collections of ``prop``, or None if its lazy loads are not cached."""
        return self._cached_relationships().get(prop)

    def relationship_kinds(self) -> list[CachedRelationship]:
        """The relationship kinds made so far, for their counters: asking does not configure
        the mappers (``stats()`` may be called before every mapped class is defined)."""
        return list(self._made.values())

    def every_kind(self) -> list[CachedKind]:
        """Every registered kind: the models' rows and every cached relationship (configuring the
        mappers if need be), for an eviction of everything (a Sentinel change of master)."""
        return [*self.models(), *self._cached_relationships().values()]

    def kinds_reading(self, table: Any) -> tuple[CachedRelationship, ...]:
        """The relationship kinds whose collections a write to a table named as ``table`` may
        change (by name, case-insensitively: evicting too much is harmless)."""
        if not isinstance(table, TableClause):
            return ()
        name = table.name.casefold()
        found = self._reading.get(name)
        if found is None:
            found = tuple(
                kind
                for kind in self._cached_relationships().values()
                if name in kind.table_names
            )
            self._reading[name] = found
        return found

    def _cached_relationships(self) -> dict[RelationshipProperty[Any], CachedRelationship]:
        """Every cached relationship: between two registered classes, chosen at registration,
        and not :func:`~sa_cache.relationships.uncacheable`. Found on first use (the mappers
        are configured by then), again after each registration."""
        found = self._relationships
        if found is not None:
            return found
        with self._lock:
            found = {}
            for model in list(self._models.values()):
                for mapper in model.base_mapper.self_and_descendants:
                    chosen = self._chosen.get(mapper.base_mapper)
                    for prop in mapper.relationships:
                        if prop.parent is not mapper:
                            continue  # inherited: found on the mapper that declares it
                        if chosen is not None and prop.key not in chosen:
                            continue
                        kind = self._relationship(prop)
                        if kind is not None:
                            found[prop] = kind
            self._relationships = found
        return found

    def _relationship(self, prop: RelationshipProperty[Any]) -> CachedRelationship | None:
        parent = self.model_for(prop.parent)
        target = self.model_for(prop.mapper)
        if parent is None or target is None or uncacheable(prop) is not None:
            return None
        kind = self._made.get(prop)
        if kind is None or kind.parent is not parent or kind.target is not target:
            ttl = self._ttls[prop.parent.base_mapper]
            kind = CachedRelationship(
                prop, parent, target, self.prefix, ttl, self.max_collection
            )
            self._made[prop] = kind
        return kind

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


def _takes_part(mapper: Mapper[Any], kind: CachedRelationship) -> bool:
    """Whether a change to an instance of ``mapper`` may change ``kind``'s collections: it is
    the parent, a target, or writes the link table through a relationship of its own."""
    prop = kind.prop
    if mapper.isa(prop.parent) or mapper.base_mapper is prop.mapper.base_mapper:
        return True
    secondary = kind.secondary
    return secondary is not None and any(
        rel.secondary is not None and getattr(rel.secondary, "name", None) == secondary.name
        for rel in mapper.relationships
    )


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
