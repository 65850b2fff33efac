"""Unique-column lookups, the third kind of cached thing: a unique column's value (or a composite
unique's values) as the primary key of the row that holds it, or as "no row holds it".

``select(User).where(User.email == x)`` answered from the cache is two reads: this kind names
the row, and the row comes from the row cache (:mod:`sa_cache.rows`). The entry is never a copy
of the row, so a change to the row's other columns needs no eviction here; what must be evicted
is a change of *which row holds which value*:

- an insert evicts the values the new row holds (all of its kind, when one is not known: a
  server default);
- an update evicts the old and the new values of the columns (from attribute history), and the
  current values on a primary-key change; a value never loaded was not changed by the flush;
- a delete evicts the values the row held;
- bulk and Core statements on the table replace the kind's generation
  (:meth:`sa_cache.registry.Registry.kinds_reading`).

A hit is also checked against the row it names: the cached row must hold exactly the values
asked for, or the lookup goes to the database (a row changed without its old value known, a
row deleted: its row key was evicted). Values are keyed as the caller gave them, coerced by
column type (:func:`sa_cache.keys.coercer_for`); only columns the database compares by exact
value are served (:mod:`sa_cache.collations`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Final, NamedTuple

from sqlalchemy.orm import InstanceState, Mapper

from . import codec
from .codec import AbsentEntry, Tombstone
from .keys import Coercer, KeySpace, coercer_for, normalise
from .kinds import ABSENT, REJECTED, WHOLE_KIND, Answer, CachedKind, Hit
from .rows import CachedModel
from .stats import ModelStats

#: The kind number of :class:`UniqueEntry` in stored values.
UNIQUE: Final = 9


@codec.entry_kind(UNIQUE)
class UniqueEntry(NamedTuple):
    """The primary key (a list of column values) of the row holding a unique value, stored under
    ``generation`` for this ``schema_hash`` of the unique's definition."""

    schema_hash: bytes
    generation: bytes
    pk: list[Any]


class CachedUnique(CachedKind):
    """One unique column set (``columns``, of the mapper's own table) of a registered model:
    ``prefix:{uq:<table>.<col>+<col>:<values>}``, with a generation of its own.

    A :class:`~sa_cache.kinds.Hit` of this kind carries the row's normalised primary key."""

    def __init__(
        self, model: CachedModel, mapper: Mapper[Any], columns: Sequence[Any], prefix: str
    ) -> None:
        self.model = model
        self.mapper = mapper
        self.columns = tuple(columns)
        self.column_set = frozenset(self.columns)
        self.attrs = tuple(mapper.get_property_by_column(c).key for c in self.columns)
        table: Any = mapper.local_table
        names = "+".join(c.name for c in self.columns)
        self.name = f"{mapper.class_.__name__}.unique({', '.join(self.attrs)})"
        self.ttl = model.ttl
        self.stats = ModelStats()
        self.keys = KeySpace.named(prefix, f"uq:{table.name}.{names}")
        self.coercers: tuple[Coercer, ...] = tuple(coercer_for(c) for c in self.columns)
        definition = repr((table.name, names, [repr(c.type) for c in self.columns], self.name))
        self.schema_hash = hashlib.blake2b(definition.encode(), digest_size=8).digest()
        #: the table (by name) whose bulk or Core writes replace this kind's generation
        self.table_names = frozenset({table.name.casefold()})

    def normalise(self, values: Sequence[Any]) -> tuple[Any, ...] | None:
        """The values coerced through their column types; None if any cannot be (or is None:
        ``col == None`` is ``IS NULL``, which a unique constraint does not make unique)."""
        if any(value is None for value in values):
            return None
        return normalise(self.coercers, values)

    def key_for(self, values: tuple[Any, ...]) -> str:
        return self.keys.row_key(values)

    def may_cache_absence(self, mapper: Mapper[Any], dialect: Any) -> bool:
        """Only columns compared exactly are served at all (:mod:`sa_cache.collations`): there
        no other spelling can find a row this absence would hide."""
        return True

    def holds(self, row: dict[str, Any], values: tuple[Any, ...]) -> bool:
        """Whether a row's attribute values are exactly ``values`` (value and type)."""
        for attr, value in zip(self.attrs, values, strict=True):
            held = row.get(attr)
            if type(held) is not type(value) or held != value:
                return False
        return True

    # -- the CachedKind interface -----------------------------------------------------------------

    def answer(
        self, entry: codec.Entry, generation: bytes, ident: tuple[Any, ...]
    ) -> Answer | None:
        kind = type(entry)
        if kind is UniqueEntry:
            if type(entry.generation) is not bytes or type(entry.schema_hash) is not bytes:
                return REJECTED
            if entry.generation != generation or entry.schema_hash != self.schema_hash:
                return None
            pk = self.model.normalise(entry.pk) if type(entry.pk) is list else None
            return REJECTED if pk is None else Hit(None, pk)
        if kind is AbsentEntry:
            if type(entry.generation) is not bytes:
                return REJECTED
            return ABSENT if entry.generation == generation else None
        if kind is Tombstone:
            return None
        return REJECTED

    def fill_entry(self, generation: bytes, loaded: Any) -> UniqueEntry | None:
        """``loaded`` is the normalised primary key of the row found."""
        return UniqueEntry(self.schema_hash, generation, list(loaded))

    def changed_keys(
        self, state: InstanceState[Any], identity_keys: Iterable[Any]
    ) -> Iterable[str]:
        mapper = state.mapper
        if mapper.base_mapper is not self.mapper.base_mapper or self.attrs[0] not in mapper.attrs:
            return [WHOLE_KIND]  # another class writing the table: its values are not known
        current: list[Any] = []
        old: list[Any] = []
        old_known = True
        changed = False
        for attr in self.attrs:
            history = state.attrs[attr].history
            changed = changed or bool(history.added or history.deleted)
            now = history.added or history.unchanged
            current.append(now[0] if now else _UNKNOWN)
            before = history.deleted or history.unchanged
            if before:
                old.append(before[0])
            else:
                old_known = False
        keys = []
        if any(value is _UNKNOWN for value in current):
            if state.key is None or changed:
                # a new row whose value the database gave it, or a composite changed in part
                return [WHOLE_KIND]
        else:
            keys.append(current)
        if old_known:
            keys.append(old)
        found = []
        for values in keys:
            if any(value is None for value in values):
                continue  # NULL is in no unique lookup
            normalised = normalise(self.coercers, values)
            found.append(WHOLE_KIND if normalised is None else self.key_for(normalised))
        return found


_UNKNOWN: Final = object()
