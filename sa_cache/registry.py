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
from sqlalchemy.schema import Column, Table
from sqlalchemy.sql.expression import TableClause

from .errors import CacheError, NotRegistered
from .kinds import CachedKind
from .relationships import DEFAULT_MAX_COLLECTION, CachedRelationship, uncacheable
from .rows import CachedModel, identity_mapper
from .uniques import CachedUnique

#: ``register(unique=...)``: None (no unique lookups), True (the table's unique constraints and
#: unique indexes), or attribute names, each a name or a tuple of names (a composite unique).
UniqueSpec = bool | Iterable[str | tuple[str, ...]] | None


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
        self._reading: dict[str, tuple[CachedKind, ...]] = {}
        self._models: dict[Mapper[Any], CachedModel] = {}
        #: by table name (casefolded): the registered models mapping a table of that name
        self._by_table: dict[str, tuple[TableMatch, ...]] = {}
        #: registered hierarchies (by base mapper): their TTL
        self._ttls: dict[Mapper[Any], float] = {}
        #: memos of model_for and kinds_for, by the mapper asked about
        self._served: dict[Mapper[Any], CachedModel | None] = {}
        self._kinds: dict[Mapper[Any], tuple[CachedKind, ...]] = {}
        #: registered hierarchies (by base mapper): their ``unique=`` as given
        self._unique_specs: dict[Mapper[Any], Any] = {}
        #: the unique kinds, by base mapper then by column set; found on first use (None: not yet)
        self._uniques: dict[Mapper[Any], dict[frozenset[Any], CachedUnique]] | None = None
        #: every unique kind ever made, by (mapper, columns): counters survive a re-registration
        self._made_uniques: dict[tuple[Mapper[Any], tuple[Any, ...]], CachedUnique] = {}
        #: :func:`sa_cache.eager.plan`'s memo, by mapper, or by mapper, loader options and
        #: load path (cleared by every registration)
        self.eager_plans: dict[Any, Any] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._models)

    def models(self) -> list[CachedModel]:
        return list(self._models.values())

    def add(
        self,
        model: type[Any],
        ttl: float,
        relationships: Iterable[str] | None = None,
        unique: UniqueSpec = None,
    ) -> Mapper[Any]:
        """Cache ``model``'s whole hierarchy (again: with this TTL) and return its base mapper;
        raises :class:`~sa_cache.errors.CacheError` for a hierarchy whose rows the cache cannot
        key, naming the class and why. ``relationships``: the names of the hierarchy's
        relationships whose collections are cached (None: every one to a registered class that
        :func:`~sa_cache.relationships.uncacheable` allows). ``unique``: see :data:`UniqueSpec`."""
        if isinstance(relationships, str):
            raise TypeError("relationships takes attribute names, not one string")
        if isinstance(unique, str):
            raise TypeError("unique takes a list of attribute names (or True), not one string")
        spec = unique if unique is None or isinstance(unique, bool) else [
            (names,) if isinstance(names, str) else tuple(names) for names in unique
        ]
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
        if spec:
            reason = unique_unservable(base)
            if reason is not None:
                raise CacheError(f"{base.class_.__name__}: {reason}")
            unique_column_sets(base, spec)  # a name that is no column raises now
        with self._lock:
            self._ttls[base] = ttl
            self._chosen[base] = chosen
            self._unique_specs[base] = spec
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
        self._uniques = None

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
        tables = {t.name.casefold() for t in mapper.tables if isinstance(t, TableClause)}
        kinds += tuple(kind for kind in self.unique_kinds() if kind.table_names & tables)
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
        return [*self.models(), *self._cached_relationships().values(), *self.unique_kinds()]

    def kinds_reading(self, table: Any) -> tuple[CachedKind, ...]:
        """The relationship and unique kinds whose entries a write to a table named as ``table``
        may change (by name, case-insensitively: evicting too much is harmless)."""
        if not isinstance(table, TableClause):
            return ()
        name = table.name.casefold()
        found = self._reading.get(name)
        if found is None:
            kinds: list[CachedRelationship | CachedUnique] = [
                *self._cached_relationships().values(),
                *self.unique_kinds(),
            ]
            found = tuple(kind for kind in kinds if name in kind.table_names)
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

    # -- unique columns ---------------------------------------------------------------------------

    def unique_kind(self, mapper: Mapper[Any], columns: frozenset[Any]) -> CachedUnique | None:
        """The cached lookups of ``mapper`` by exactly these ``columns``, or None."""
        by_columns = self._cached_uniques().get(mapper)
        return None if by_columns is None else by_columns.get(columns)

    def has_uniques(self) -> bool:
        """Whether any class was registered with ``unique=`` (asked on every SELECT)."""
        return bool(self._cached_uniques())

    def unique_mapper(self, columns: frozenset[Any]) -> Mapper[Any] | None:
        """The class whose lookups by exactly ``columns`` are cached, or None (asked on every
        SELECT by columns: a scan of the few unique kinds)."""
        for kind in self.unique_kinds():
            if kind.column_set == columns:
                return kind.mapper
        return None

    def unique_kinds(self) -> list[CachedUnique]:
        """Every unique kind (configuring the mappers if need be)."""
        return [kind for found in self._cached_uniques().values() for kind in found.values()]

    def unique_kinds_made(self) -> list[CachedUnique]:
        """The unique kinds made so far, for their counters (configures nothing)."""
        return list(self._made_uniques.values())

    def _cached_uniques(self) -> dict[Mapper[Any], dict[frozenset[Any], CachedUnique]]:
        found = self._uniques
        if found is not None:
            return found
        with self._lock:
            found = {}
            for base, spec in list(self._unique_specs.items()):
                if not spec:
                    continue
                model = self.model_for(base)
                if model is None or unique_unservable(base) is not None:
                    continue  # refused at registration; a later subclass may change this
                kinds = {}
                for columns in unique_column_sets(base, spec):
                    made = self._made_uniques.get((base, columns))
                    if made is None or made.model is not model:
                        made = CachedUnique(model, base, columns, self.prefix)
                        self._made_uniques[(base, columns)] = made
                    kinds[frozenset(columns)] = made
                found[base] = kinds
            self._uniques = found
        return found

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


def unique_unservable(mapper: Mapper[Any]) -> str | None:
    """Why lookups of ``mapper`` by a unique column are not cached, or None: only a class
    mapped alone to one table (no inheritance), whose lookup reads that table's rows only."""
    if mapper.inherits is not None or mapper.polymorphic_on is not None:
        return "unique lookups are cached for classes without inheritance only"
    if any(m is not mapper for m in mapper.self_and_descendants):
        return "unique lookups are cached for classes without inheritance only"
    if not isinstance(mapper.local_table, Table):
        return "it is not mapped to a table"
    return None


def unique_column_sets(mapper: Mapper[Any], spec: Any) -> list[tuple[Any, ...]]:
    """The column sets ``spec`` names: attribute names (each a name or a tuple), or True for
    the table's unique constraints and unique indexes of plain columns. Raises
    :class:`~sa_cache.errors.CacheError` for a name that is no column of the class's table."""
    table: Any = mapper.local_table
    if spec is True:
        found: list[tuple[Any, ...]] = []
        for column in table.columns:
            if column.unique:
                found.append((column,))
        for constraint in table.constraints:
            if type(constraint).__name__ == "UniqueConstraint":
                found.append(tuple(constraint.columns))
        for index in table.indexes:
            if index.unique and all(isinstance(e, Column) for e in index.expressions):
                found.append(tuple(index.columns))
        sets = [cols for cols in found if cols and all(_mapped(mapper, c) for c in cols)]
    else:
        sets = []
        for names in spec:
            columns = []
            for name in names:
                column = mapper.columns.get(name)
                if not isinstance(column, Column) or column.table is not table:
                    raise CacheError(
                        f"{mapper.class_.__name__}.{name} is not a column of {table.name}"
                    )
                columns.append(column)
            sets.append(tuple(columns))
    unique: dict[frozenset[Any], tuple[Any, ...]] = {}
    for cols in sets:
        if not set(cols) >= set(table.primary_key.columns):  # a primary key is no unique lookup
            unique.setdefault(frozenset(cols), cols)
    return list(unique.values())


def _mapped(mapper: Mapper[Any], column: Any) -> bool:
    try:
        mapper.get_property_by_column(column)
    except Exception:
        return False
    return True


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
