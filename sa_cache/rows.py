"""Rows, the first kind of cached thing: a registered model's rows by primary key.

What the cache knows about each registered model: its key space, how its primary keys are
normalised, and the shape of its cached rows (which attributes, in which order, with which
schema hash). Built once at registration and on first use of each concrete mapper, so the hot path
only indexes tuples."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Final

from sqlalchemy import types as sqltypes
from sqlalchemy.orm import InstanceState, Mapper
from sqlalchemy.schema import Column

from . import codec
from .codec import AbsentEntry, RowEntry, Tombstone
from .keys import Coercer, KeySpace, coercer_for, normalise
from .kinds import ABSENT, REJECTED, Answer, CachedKind, Hit
from .stats import ModelStats

#: Rows a model keeps decoded, by their stored bytes (:meth:`CachedModel.recall`): the oldest
#: kept is dropped first. Bytes longer than ``DECODED_PAYLOAD`` are decoded every time (where
#: msgpack's own time matters least), so a model keeps at most about 2 MiB: the bytes, and the
#: values decoded from them.
DECODED_ROWS: Final = 1024
DECODED_PAYLOAD: Final = 1024
_IMMUTABLE = codec.IMMUTABLE_TYPES
_new_tuple = tuple.__new__  # a NamedTuple without its Python-level __new__


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
        "dialect_bound",
        "dialect",
        "verify",
    )

    def __init__(self, mapper: Mapper[Any], dialect: Any = None) -> None:
        self.mapper = mapper
        self.class_tag = mapper.polymorphic_identity
        tables = set(mapper.tables)
        cached: list[tuple[str, Column[Any]]] = []
        expire: list[str] = []
        for prop in mapper.column_attrs:
            plain = all(isinstance(c, Column) and c.table in tables for c in prop.columns)
            if not plain and mapper.concrete and prop.columns[0] is mapper.polymorphic_on:
                continue  # a concrete class's discriminator from its union: no load sets it
            if plain and not codec.column_cacheable(prop.columns[0]):  # type: ignore[arg-type]
                plain = False  # a type whose load the cache cannot mirror: loads on access
            if plain and not prop.deferred:
                cached.append((prop.key, prop.columns[0]))  # type: ignore[arg-type]
            elif not prop.deferred:
                expire.append(prop.key)
        self.attrs = tuple(attr for attr, _ in cached)
        self.dialect_bound = any(codec.needs_dialect(column) for _, column in cached)
        self.dialect = dialect if self.dialect_bound else None
        adapters = [codec.column_adapters(column, self.dialect) for _, column in cached]
        self.to_store = tuple(a[0] for a in adapters)
        self.from_store = tuple(a[1] for a in adapters)
        self.plain = not any(self.from_store)
        #: the types of TypeDecorator columns, whose values a fill reads back before storing them
        self.verify = tuple(
            column.type if self.dialect_bound and codec.needs_dialect(column) else None
            for _, column in cached
        )
        self.expire_on_hit = frozenset(expire)
        cls = mapper.class_
        path = f"{cls.__module__}.{cls.__qualname__}"
        if self.dialect_bound:  # values are the database's, as this dialect's types bind them
            path += "@" + ("" if dialect is None else dialect.name)
        self.schema_hash = codec.schema_hash(path, cached)
        pk_attrs = [mapper.get_property_by_column(col).key for col in mapper.primary_key]
        self.pk_positions = tuple(self.attrs.index(attr) for attr in pk_attrs if attr in self.attrs)
        self.cacheable = all(attr in self.attrs for attr in pk_attrs)

    def dehydrate(self, state_dict: dict[str, Any]) -> list[Any] | None:
        """Column values from a loaded instance's ``__dict__`` (for a TypeDecorator column, the
        database value its type binds); None if any is not loaded, or if a TypeDecorator's
        result processing does not give back exactly the loaded value from the value it binds
        (a type that is not its own inverse: the row is not cached rather than served wrong)."""
        values = []
        for attr, to_store in zip(self.attrs, self.to_store, strict=True):
            if attr not in state_dict:
                return None
            value = state_dict[attr]
            values.append(value if to_store is None else to_store(value))
        if self.dialect_bound:
            for value, attr, from_store, col_type in zip(
                values, self.attrs, self.from_store, self.verify, strict=True
            ):
                if col_type is None:
                    continue
                loaded = state_dict[attr]
                again = from_store(value)  # type: ignore[misc]
                if type(again) is not type(loaded) or not col_type.compare_values(again, loaded):
                    return None  # the type does not give back what it was loaded as: not cached
        return values

    def hydrate(self, values: list[Any]) -> dict[str, Any]:
        if self.plain:  # no column needs an adapter: the common case, at C speed
            return dict(zip(self.attrs, values, strict=True))
        return {
            attr: value if from_store is None else from_store(value)
            for attr, from_store, value in zip(self.attrs, self.from_store, values, strict=True)
        }


class CachedModel(CachedKind):
    """The rows of one identity class: a registered mapper hierarchy, or one concrete class of a
    concrete-inheritance hierarchy (each concrete class has its own table and identity).

    ``base_mapper`` is the mapper whose class identity keys name (SQLAlchemy's identity class):
    the hierarchy's base, or the concrete mapper. A :class:`~sa_cache.kinds.Hit` of this kind
    carries the :class:`RowShape` and the attribute values to place in the session."""

    def __init__(
        self,
        base_mapper: Mapper[Any],
        prefix: str,
        ttl: float,
        generation_table: Any = None,
    ) -> None:
        self.base_mapper = base_mapper
        self.name = base_mapper.class_.__name__
        self.ttl = ttl
        table: Any = base_mapper.local_table
        self.keys = KeySpace(prefix, table, generation_table)
        self.coercers: tuple[Coercer, ...] = tuple(coercer_for(c) for c in base_mapper.primary_key)
        self.stats = ModelStats()
        self._shapes: dict[Any, RowShape] = {}
        self._by_tag: dict[Any, RowShape] = {}
        #: shapes of TypeDecorator columns, by schema hash (one per dialect that stored them)
        self._by_hash: dict[bytes, RowShape] = {}
        #: the dialects sessions used with this model, by name, learned on their first miss
        self._dialects: dict[str, Any] = {}
        self._absence: dict[str, bool] = {}
        self._lock = threading.Lock()
        #: stored bytes -> (generation, shape, stored values, attribute values): see recall
        self._decoded: dict[bytes, tuple[bytes, RowShape, list[Any], dict[str, Any]]] = {}

    def shape(self, mapper: Mapper[Any], dialect: Any = None) -> RowShape:
        """The shape of ``mapper``'s rows; for a mapper with TypeDecorator columns, the shape of
        its rows as ``dialect`` stores them (without one: a shape whose values cannot be read)."""
        shape = self._shapes.get(mapper)
        if shape is None:
            with self._lock:
                shape = RowShape(mapper)
                self._shapes[mapper] = shape
                self._by_tag[shape.class_tag] = shape
        if shape.dialect_bound and dialect is not None:
            return self._dialect_shape(mapper, dialect)
        return shape

    def _dialect_shape(self, mapper: Mapper[Any], dialect: Any) -> RowShape:
        key = (mapper, dialect.name)
        shape = self._shapes.get(key)
        if shape is None:
            with self._lock:
                self._dialects.setdefault(dialect.name, dialect)
                shape = RowShape(mapper, self._dialects[dialect.name])
                self._shapes[key] = shape
                self._by_hash[shape.schema_hash] = shape
        return shape

    def _stored_shape(self, shape: RowShape, schema_hash: Any) -> RowShape | None:
        """The shape a TypeDecorator row was stored in, from its schema hash: the shape of
        ``shape.mapper`` for one of the dialects this process has used (None: not known yet)."""
        found = self._by_hash.get(schema_hash) if type(schema_hash) is bytes else None
        if found is None:
            for dialect in list(self._dialects.values()):
                candidate = self._dialect_shape(shape.mapper, dialect)
                if candidate.schema_hash == schema_hash:
                    found = candidate
        if found is None or found.mapper is not shape.mapper:
            return None
        return found

    def shape_for_tag(self, tag: Any) -> RowShape | None:
        if not _hashable(tag):
            return None  # decoded from the store: a list or a map is no class of ours
        shape = self._by_tag.get(tag)
        if shape is None:
            mapper: Mapper[Any] | None = (
                self.base_mapper if tag is None else self.base_mapper.polymorphic_map.get(tag)
            )
            if mapper is None or identity_mapper(mapper) is not self.base_mapper:
                return None  # a class of another identity (a concrete sibling): not our row
            shape = self.shape(mapper)
        return shape

    def normalise(self, pk: Sequence[Any]) -> tuple[Any, ...] | None:
        """Primary-key values coerced through their column types, or None if any cannot be."""
        return normalise(self.coercers, pk)

    def may_cache_absence(self, mapper: Mapper[Any], dialect: Any) -> bool:
        """Whether a lookup of ``mapper`` that found no row may cache "no such row" on
        ``dialect``: only when the database compares every key column exactly as the cache
        does, so that no other spelling of the key can find a row this absence would hide
        (:func:`compares_exactly`).

        Not for a subclass lookup (the row may exist as a sibling class). Also where the session's
        dialect is learned (TypeDecorator values are read back with it)."""
        if dialect.name not in self._dialects:
            with self._lock:
                self._dialects.setdefault(dialect.name, dialect)
        if mapper is not self.base_mapper:
            return False
        allowed = self._absence.get(dialect.name)
        if allowed is None:
            allowed = all(compares_exactly(c, dialect) for c in self.base_mapper.primary_key)
            self._absence[dialect.name] = allowed
        return allowed

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
            if shape is not None and shape.dialect_bound:
                stored = self._stored_shape(shape, entry.schema_hash)
                if stored is None:
                    # stored for a dialect this process has not used yet (it learns it at the
                    # miss) or of another schema: a miss either way
                    return None if type(entry.schema_hash) is bytes else REJECTED
                shape = stored
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

    def recall(self, payload: bytes, generation: bytes, ident: tuple[Any, ...]) -> Answer | None:
        """The hit of a row already decoded from exactly ``payload``: a dict lookup instead of
        msgpack, its extension types and the shape checks of :meth:`answer`. Those bytes decide
        everything :meth:`answer` decides but the generation they were read under and the key
        looked up, checked here as :meth:`answer` checks them; a mismatch is not answered here
        (None), so the full way decides and counts it. The kept values are shared by every hit
        of those bytes: :meth:`remember` keeps only rows whose values nothing can change in
        place, and each hit gets a dict of its own."""
        known = self._decoded.get(payload) if type(payload) is bytes else None
        if known is None:
            return None
        stored_generation, shape, values, by_attr = known
        if stored_generation != generation or not _same_key(ident, values, shape.pk_positions):
            return None
        return _new_tuple(Hit, (shape, by_attr.copy()))

    def remember(self, payload: bytes, entry: codec.Entry, answer: Answer) -> None:
        """Keep a hit decoded for :meth:`recall`: a row whose stored values are its attribute
        values (no column adapter) and are all immutable (:data:`codec.IMMUTABLE_TYPES`)."""
        if type(answer) is not Hit or type(payload) is not bytes or len(payload) > DECODED_PAYLOAD:
            return
        shape = answer.shape
        values = entry.values
        if not shape.plain or not all(type(value) in _IMMUTABLE for value in values):
            return
        decoded = self._decoded
        while len(decoded) >= DECODED_ROWS:
            try:
                del decoded[next(iter(decoded))]
            except (KeyError, RuntimeError, StopIteration):  # another thread got there first
                break
        decoded[payload] = (entry.generation, shape, values, dict(answer.value))

    def fill_entry(self, generation: bytes, loaded: Any) -> RowEntry | None:
        """``loaded`` is the :class:`~sqlalchemy.orm.InstanceState` of a freshly loaded
        instance."""
        mapper = loaded.mapper
        shape = self.shape(mapper)
        if shape.dialect_bound:
            dialect = _dialect_of(loaded)
            if dialect is None:
                return None
            shape = self._dialect_shape(mapper, dialect)
        try:
            values = shape.dehydrate(loaded.dict)
        except Exception:
            return None  # a TypeDecorator that cannot bind its own value: not cached
        if values is None:
            return None  # not fully loaded (load_only, a subclass loaded through its base...)
        return RowEntry(shape.schema_hash, generation, shape.class_tag, values)

    def changed_keys(
        self, state: InstanceState[Any], identity_keys: Iterable[Any]
    ) -> Iterable[str]:
        return [self.key_for_identity(identity) for identity in identity_keys]


def identity_mapper(mapper: Mapper[Any]) -> Mapper[Any]:
    """The mapper whose class identity keys of ``mapper``'s rows name: the nearest concrete
    mapper at or above it, else its hierarchy's base (SQLAlchemy's identity class)."""
    while not mapper.concrete and mapper.inherits is not None:
        mapper = mapper.inherits
    return mapper


def compares_exactly(column: Any, dialect: Any) -> bool:
    """Whether ``dialect``'s database finds a row of this key column only by the one value the
    cache keys it as (after :func:`~sa_cache.keys.coercer_for`), so an absence cached under
    that key can be hidden by no other spelling of it.

    Integers (normalised to one int) and UUIDs kept as ``uuid.UUID`` compare exactly everywhere.
    Strings only on PostgreSQL, SQLite and Oracle with no collation of their own (MySQL and SQL
    Server collations ignore case and trailing spaces; SQLite ``NOCASE``/``RTRIM`` and
    nondeterministic PostgreSQL collations ignore case or spaces) and not as ``CHAR`` where it is
    blank-padded. A UUID kept as a string is compared by the database as a UUID (PostgreSQL) or
    in a case-insensitive collation, so "ABC..." finds the row stored as "abc...". Anything else
    (dates, numbers, TypeDecorators) is left to the database: no absence cached."""
    col_type = column.type
    if isinstance(col_type, sqltypes.TypeDecorator):
        return False
    try:
        col_type = col_type.dialect_impl(dialect)  # a with_variant type: the dialect's own
        ddl = column.type.compile(dialect=dialect).upper()  # as the table declares it
    except Exception:
        return False
    if isinstance(col_type, sqltypes.Boolean):
        return False
    if isinstance(col_type, sqltypes.Integer):
        return True
    if isinstance(col_type, sqltypes.Uuid):
        return bool(col_type.as_uuid)
    if isinstance(col_type, sqltypes.String) and not isinstance(col_type, sqltypes.Enum):
        if dialect.name not in ("postgresql", "sqlite", "oracle") or " COLLATE " in ddl:
            return False
        blank_padded = ddl.startswith(("CHAR", "NCHAR", "BPCHAR")) and "VAR" not in ddl
        return dialect.name == "sqlite" or not blank_padded
    return False


def _dialect_of(state: Any) -> Any:
    """The dialect a freshly loaded instance was loaded with (its session's bind for its
    mapper), or None if the session cannot say."""
    session = state.session
    if session is None:
        return None
    try:
        return session.get_bind(mapper=state.mapper).dialect
    except Exception:
        return None


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
