"""Rows, the first kind of cached thing: a registered model's rows by primary key.

What the cache knows about each registered model: its key space, how its primary keys are
normalised, and the shape of its cached rows (which attributes, in which order, with which
schema hash). Built once at registration and on first use of each concrete mapper, so the hot path
only indexes tuples."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import types as sqltypes
from sqlalchemy.orm import InstanceState, Mapper
from sqlalchemy.schema import Column

from . import codec
from .codec import AbsentEntry, RowEntry, Tombstone
from .keys import Coercer, KeySpace, coercer_for, normalise
from .kinds import ABSENT, REJECTED, Answer, CachedKind, Hit
from .stats import ModelStats


class RowShape:
    """The cached form of one concrete mapper: its plain column attributes, in a fixed order.

    Deferred columns are left out (absent after a hit, so access loads just them, as after a real
    load). ``column_property`` expressions and columns of other tables are never cached, because
    their values depend on other rows; they are expired on a hit, so access reloads them.
    """

    __slots__ = (
        "mapper",
        "class_tag",
        "attrs",
        "to_store",
        "from_store",
        "expire_on_hit",
        "schema_hash",
        "pk_positions",
        "cacheable",
        "plain",
    )

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.mapper = mapper
        self.class_tag = mapper.polymorphic_identity
        tables = set(mapper.tables)
        cached: list[tuple[str, Column[Any]]] = []
        expire: list[str] = []
        for prop in mapper.column_attrs:
            plain = all(isinstance(c, Column) and c.table in tables for c in prop.columns)
            if plain and not prop.deferred:
                cached.append((prop.key, prop.columns[0]))  # type: ignore[arg-type]
            elif not prop.deferred:
                expire.append(prop.key)
        self.attrs = tuple(attr for attr, _ in cached)
        adapters = [codec.column_adapters(column) for _, column in cached]
        self.to_store = tuple(a[0] for a in adapters)
        self.from_store = tuple(a[1] for a in adapters)
        self.plain = not any(self.from_store)
        self.expire_on_hit = frozenset(expire)
        cls = mapper.class_
        self.schema_hash = codec.schema_hash(f"{cls.__module__}.{cls.__qualname__}", cached)
        pk_attrs = [mapper.get_property_by_column(col).key for col in mapper.primary_key]
        self.pk_positions = tuple(self.attrs.index(attr) for attr in pk_attrs)
        self.cacheable = all(attr in self.attrs for attr in pk_attrs)

    def dehydrate(self, state_dict: dict[str, Any]) -> list[Any] | None:
        """Column values from a loaded instance's ``__dict__``; None if any is not loaded."""
        values = []
        for attr, to_store in zip(self.attrs, self.to_store, strict=True):
            if attr not in state_dict:
                return None
            value = state_dict[attr]
            values.append(value if to_store is None else to_store(value))
        return values

    def hydrate(self, values: list[Any]) -> dict[str, Any]:
        if self.plain:  # no column needs an adapter: the common case, at C speed
            return dict(zip(self.attrs, values, strict=True))
        return {
            attr: value if from_store is None else from_store(value)
            for attr, from_store, value in zip(self.attrs, self.from_store, values, strict=True)
        }


class CachedModel(CachedKind):
    """The rows of one registered mapper hierarchy (identity keys always name the base mapper).

    A :class:`~sa_cache.kinds.Hit` of this kind carries the :class:`RowShape` and the attribute
    values to place in the session."""

    def __init__(self, base_mapper: Mapper[Any], prefix: str, ttl: float) -> None:
        self.base_mapper = base_mapper
        self.name = base_mapper.class_.__name__
        self.ttl = ttl
        self.keys = KeySpace(prefix, base_mapper.local_table)  # type: ignore[arg-type]
        self.coercers: tuple[Coercer, ...] = tuple(coercer_for(c) for c in base_mapper.primary_key)
        self.string_pk = any(isinstance(c.type, sqltypes.String) for c in base_mapper.primary_key)
        self.stats = ModelStats()
        self._shapes: dict[Mapper[Any], RowShape] = {}
        self._by_tag: dict[Any, RowShape] = {}
        self._lock = threading.Lock()

    def shape(self, mapper: Mapper[Any]) -> RowShape:
        shape = self._shapes.get(mapper)
        if shape is None:
            with self._lock:
                shape = RowShape(mapper)
                self._shapes[mapper] = shape
                self._by_tag[shape.class_tag] = shape
        return shape

    def shape_for_tag(self, tag: Any) -> RowShape | None:
        if not _hashable(tag):
            return None  # decoded from the store: a list or a map is no class of ours
        shape = self._by_tag.get(tag)
        if shape is None:
            mapper: Mapper[Any] | None = (
                self.base_mapper if tag is None else self.base_mapper.polymorphic_map.get(tag)
            )
            if mapper is None:
                return None
            shape = self.shape(mapper)
        return shape

    def normalise(self, pk: Sequence[Any]) -> tuple[Any, ...] | None:
        """Primary-key values coerced through their column types, or None if any cannot be."""
        return normalise(self.coercers, pk)

    def may_cache_absence(self, mapper: Mapper[Any], dialect: Any) -> bool:
        """Whether a lookup of ``mapper`` that found no row may cache "no such row" on
        ``dialect``: only when the database compares this key exactly as the cache does.

        Not for a subclass lookup (the row may exist as a sibling class). Not for string keys on
        MySQL/MariaDB (and SQL Server): their collations are case- and trailing-space-insensitive
        by default, so ``get(M, "ACME")`` may find the row stored as "acme", and an absence cached
        under "ACME" would outlive the insert of "acme", which evicts only its own key."""
        if mapper is not self.base_mapper:
            return False
        return not self.string_pk or dialect.name in ("postgresql", "sqlite", "oracle")

    def key_for_identity(self, identity_key: Any) -> str:
        """The key of a row an instance holds, its primary key normalised as a lookup's is: an
        instance may hold ``"09"`` (or a UUID in capitals) for the row a lookup calls ``9``."""
        pk = self.normalise(identity_key[1])
        return self.keys.row_key(identity_key[1] if pk is None else pk, identity_key[2])

    # -- the CachedKind interface -----------------------------------------------------------------

    def answer(
        self, entry: codec.Entry, generation: bytes, ident: tuple[Any, ...]
    ) -> Answer | None:
        kind = type(entry)
        if kind is RowEntry:
            if entry.generation != generation:
                # written under an earlier generation: a plain miss
                return None if type(entry.generation) is bytes else REJECTED
            shape = self.shape_for_tag(entry.class_tag)
            values = entry.values
            if (
                shape is None
                or entry.schema_hash != shape.schema_hash
                or type(values) is not list
                or len(values) != len(shape.attrs)
            ):
                return REJECTED
            if shape.plain:  # stored values are the attribute values: check the key first
                if _same_key(ident, values, shape.pk_positions):
                    return Hit(shape, dict(zip(shape.attrs, values, strict=True)))
                return REJECTED
            try:
                hydrated = shape.hydrate(values)
            except Exception:
                return REJECTED
            if _same_key(ident, list(hydrated.values()), shape.pk_positions):
                return Hit(shape, hydrated)
            return REJECTED
        if kind is AbsentEntry:
            if type(entry.generation) is not bytes:
                return REJECTED
            return ABSENT if entry.generation == generation else None
        if kind is Tombstone:
            return None
        return REJECTED

    def fill_entry(self, generation: bytes, loaded: Any) -> RowEntry | None:
        """``loaded`` is the :class:`~sqlalchemy.orm.InstanceState` of a freshly loaded
        instance."""
        shape = self.shape(loaded.mapper)
        values = shape.dehydrate(loaded.dict)
        if values is None:
            return None  # not fully loaded (load_only, a subclass loaded through its base...)
        return RowEntry(shape.schema_hash, generation, shape.class_tag, values)

    def changed_keys(
        self, state: InstanceState[Any], identity_keys: Iterable[Any]
    ) -> Iterable[str]:
        return [self.key_for_identity(identity) for identity in identity_keys]


def _same_key(pk: tuple[Any, ...], values: list[Any], positions: tuple[int, ...]) -> bool:
    """Whether a cached row's primary-key values (``values`` at ``positions``) are ``pk`` exactly:
    equal and of the same types, so a row stored with ``id=True`` or ``id=1.0`` is no row of
    ``get(Model, 1)``. On the hit path of every key, hence the single-column shortcut."""
    if len(pk) != len(positions):
        return False
    if len(positions) == 1:
        stored = values[positions[0]]
        return type(stored) is type(pk[0]) and stored == pk[0]
    return all(
        type(values[i]) is type(a) and values[i] == a for a, i in zip(pk, positions, strict=True)
    )


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
