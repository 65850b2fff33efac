"""Relationship collections, the second kind of cached thing: ``parent.attr`` as the list of its
targets' primary keys, in load order.

A collection is never a copy of its rows: a hit names the targets, and their rows come from the
row cache (:mod:`sa_cache.rows`), so a change to a target's columns needs no eviction here. The
rows are read in the list's own round trip where this process guesses them
(:class:`MemberGuesses`: the members the list had when last seen here), in one more read
otherwise. What this kind must evict is a change of *membership* (or of order):

- one-to-many (the target's foreign key names the parent's primary key): any insert, update or
  delete of a target evicts the collections of the parents its old and new foreign-key values
  name (:meth:`CachedRelationship.changed_keys`); where the old value was never loaded, the
  whole relationship (its generation);
- many-to-many through a ``secondary`` table: every link row a flush inserts or deletes, learned
  from the collection history of any relationship that writes that table, evicts the collection
  of the parent the row names (:meth:`CachedRelationship.links_changed`), on either side; a
  deleted target, or an update of a target where order or class decides membership, evicts
  the whole relationship (its parents are not known);
- the parent's own insert, update, delete or primary-key change evicts its collection;
- bulk and Core statements on any table the relationship reads replace its generation
  (:mod:`sa_cache.tracking`, through :meth:`sa_cache.registry.Registry.kinds_reading`).

:func:`uncacheable` says which relationships are never cached, and why.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from sqlalchemy.orm import InstanceState, Mapper, RelationshipDirection, RelationshipProperty
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.schema import Table
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList, ColumnClause

from . import _orm, codec
from .keys import KeySpace
from .kinds import REJECTED, WHOLE_KIND, Answer, CachedKind, Hit
from .rows import CachedModel
from .stats import ModelStats

#: The kind number of :class:`CollectionEntry` in stored values.
COLLECTION: Final = 8
#: Bounds the collections cached by default (``IdentityCache(max_collection=...)``).
DEFAULT_MAX_COLLECTION: Final = 1000
#: The collections of one relationship whose members a process remembers as its guess of the
#: next read's rows (:class:`MemberGuesses`), and the longest list remembered: a longer one
#: would read that many rows for nothing when its guess is wrong, to save one round trip.
GUESSED_COLLECTIONS: Final = 2048
GUESSED_MEMBERS: Final = 64

_MISSING: Final = object()
#: The strategies whose collections are cached: loaded lazily, or with their parent.
_LOADED: Final = frozenset({"select", True, "joined", "selectin", "subquery", "immediate"})


@codec.entry_kind(COLLECTION)
class CollectionEntry(NamedTuple):
    """A cached collection: its targets' primary keys (each a list of column values), in the
    order the load returned them, stored under ``generation`` for this ``schema_hash`` of the
    relationship's definition (a changed join or order never reads an old list)."""

    schema_hash: bytes
    generation: bytes
    targets: list[Any]


class MemberGuesses:
    """The members each collection of one relationship had when this process last read it as a
    hit, keyed by the parent's primary key: a guess of which rows the next read of that
    collection will need, so it can read them in the collection's own round trip.

    A guess only chooses keys to read, never an answer: every answer comes from the entries read
    in the load's own round trip (docs/protocol.md, "Relationship collections"). So a wrong or
    old guess costs a few keys read for nothing, never freshness. Bounded (the least recently
    remembered are forgotten first); shared by the sessions of one cache without a lock: under
    the GIL a race loses a guess at worst."""

    __slots__ = ("_members",)

    def __init__(self) -> None:
        self._members: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}

    def guess(self, pk: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
        """The members the collection of parent ``pk`` last had here, or None."""
        return self._members.get(pk)

    def remember(self, pk: tuple[Any, ...], members: list[tuple[Any, ...]]) -> None:
        """The collection of parent ``pk`` holds ``members`` (a hit read them, or a load)."""
        known = self._members
        known.pop(pk, None)  # re-inserted last: the oldest are forgotten first
        if not members or len(members) > GUESSED_MEMBERS:
            return
        known[pk] = members
        while len(known) > GUESSED_COLLECTIONS:
            try:
                del known[next(iter(known))]
            except (KeyError, RuntimeError, StopIteration):  # another thread got there first
                break


def uncacheable(prop: RelationshipProperty[Any]) -> str | None:
    """Why lazy loads of ``prop`` cannot be answered from the cache exactly, or None.

    - ``dynamic`` and ``write_only`` relationships are queries, never loaded as a collection;
      ``noload`` and ``raise`` never load. ``joined``, ``selectin``, ``subquery`` and
      ``immediate`` ones are: a load loads them with their parent, and a hit from the cache
      (:mod:`sa_cache.eager`), whose collection lists are the ones their lazy loads fill.
    - A many-to-one: its lazy load by primary key already goes through the row cache.
    - A join condition that is not plain equality of the parent's primary key with columns of the
      target (one-to-many) or of a ``secondary`` table that names the target's primary key
      (many-to-many): custom criteria, a non-key parent column, a ``secondary`` that is not a
      table. A change to what such a condition reads could not be matched to the collections it
      changes.
    """
    lazy = prop.lazy
    if lazy in ("dynamic", "write_only"):
        return f"a {lazy} relationship is a query, never a loaded collection"
    if lazy not in _LOADED:
        return f"lazy={lazy!r}: never loaded as a collection"
    if prop.direction is RelationshipDirection.MANYTOONE:
        return "a many-to-one loads its target by primary key through the row cache already"
    if _orm.target_correlates_to_parent(prop):
        return "its target is selected joined to its parent"
    if prop.secondary is None:
        pairs = [(local, remote) for local, remote in prop.local_remote_pairs]
        if _equalities(prop.primaryjoin) != {_pair_key(a, b) for a, b in pairs}:
            return "its join condition is not plain column equality"
        if _attrs(prop.parent, [a for a, _ in pairs]) is None or _attrs(
            prop.mapper, [b for _, b in pairs]
        ) is None:
            return "its join condition reads columns its classes do not map"
        if set(_attrs(prop.parent, [a for a, _ in pairs]) or ()) != set(_pk_attrs(prop.parent)):
            return "it joins on parent columns other than the primary key"
        return None
    if not isinstance(prop.secondary, Table):
        return "its secondary is not a table"
    if prop.secondaryjoin is None:
        return "it has no secondary join"
    parent_pairs, target_pairs = prop.synchronize_pairs, prop.secondary_synchronize_pairs or []
    if _equalities(prop.primaryjoin) != {_pair_key(a, b) for a, b in parent_pairs}:
        return "its join condition is not plain column equality"
    if _equalities(prop.secondaryjoin) != {_pair_key(a, b) for a, b in target_pairs}:
        return "its secondary join condition is not plain column equality"
    parent_attrs = _attrs(prop.parent, [a for a, _ in parent_pairs])
    target_attrs = _attrs(prop.mapper, [a for a, _ in target_pairs])
    if parent_attrs is None or target_attrs is None:
        return "its join condition reads columns its classes do not map"
    if sorted(parent_attrs) != sorted(_pk_attrs(prop.parent)) or sorted(target_attrs) != sorted(
        _pk_attrs(prop.mapper)
    ):
        return "its secondary table does not link the two primary keys"
    return None


class CachedRelationship(CachedKind):
    """The collections of one relationship (``Parent.attr``), keyed by the parent's primary key:
    ``prefix:{rel:<parent table>.<Parent>.<attr>:<pk>}``, with a generation of their own.

    A :class:`~sa_cache.kinds.Hit` of this kind carries the targets' normalised primary keys."""

    def __init__(
        self,
        prop: RelationshipProperty[Any],
        parent: CachedModel,
        target: CachedModel,
        prefix: str,
        ttl: float,
        max_length: int,
    ) -> None:
        self.prop = prop
        self.parent = parent
        self.target = target
        self.name = f"{prop.parent.class_.__name__}.{prop.key}"
        self.ttl = ttl
        self.max_length = max_length
        self.stats = ModelStats()
        #: which rows this process expects each collection's next read to need
        self.guesses = MemberGuesses()
        table: Any = prop.parent.local_table
        self.keys = KeySpace.named(prefix, f"rel:{table.name}.{self.name}")
        self.secondary: Table | None = prop.secondary  # type: ignore[assignment]
        parent_pk = parent.base_mapper.primary_key
        if self.secondary is None:
            by_parent = {
                _pk_attr(prop.parent, local): _pk_attr(prop.mapper, remote)
                for local, remote in prop.local_remote_pairs
            }
            #: one-to-many: the target's foreign-key attributes, in parent primary-key order
            self.fk_attrs = tuple(by_parent[_pk_attr(parent.base_mapper, c)] for c in parent_pk)
            self.parent_links: tuple[str, ...] = ()
        else:
            links = {_pk_attr(prop.parent, a): b.name for a, b in prop.synchronize_pairs}
            self.fk_attrs = ()
            #: many-to-many: the secondary's columns naming the parent, in primary-key order
            self.parent_links = tuple(links[_pk_attr(parent.base_mapper, c)] for c in parent_pk)
        #: many-to-many: whether an update of a target may change a collection it is in (its
        #: order, or its class where the target is a subclass)
        self.order_sensitive = bool(prop.order_by) or prop.mapper is not prop.mapper.base_mapper
        definition = repr(
            (
                self.name,
                str(prop.primaryjoin),
                str(prop.secondaryjoin),
                [str(c) for c in prop.order_by or ()],
                prop.mapper.class_.__qualname__,
            )
        )
        self.schema_hash = hashlib.blake2b(definition.encode(), digest_size=8).digest()
        names = {t.name.casefold() for t in (*prop.parent.tables, *prop.mapper.tables)}
        if self.secondary is not None:
            names.add(self.secondary.name.casefold())
        #: the tables (by name) whose bulk or Core writes replace this kind's generation
        self.table_names = frozenset(names)
        # from now on a caching session answers its lazy loads before SQLAlchemy builds their
        # SELECT (sessions without this kind get SQLAlchemy's loader unchanged)
        _orm.answer_lazy_loads_first(prop)

    def key_for_parent(self, pk: tuple[Any, ...]) -> str:
        return self.keys.row_key(pk)

    def may_cache_absence(self, mapper: Mapper[Any], dialect: Any) -> bool:
        """A collection is never absent (an empty one is a list): for the session's fill rule."""
        return False

    # -- the CachedKind interface -----------------------------------------------------------------

    def answer(
        self, entry: codec.Entry, generation: bytes, ident: tuple[Any, ...]
    ) -> Answer | None:
        kind = type(entry)
        if kind is CollectionEntry:
            if type(entry.generation) is not bytes or type(entry.schema_hash) is not bytes:
                return REJECTED
            if entry.generation != generation or entry.schema_hash != self.schema_hash:
                return None  # an earlier generation, or another definition: a plain miss
            if type(entry.targets) is not list:
                return REJECTED
            pks = []
            for values in entry.targets:
                pk = self.target.normalise(values) if type(values) is list else None
                if pk is None:
                    return REJECTED
                pks.append(pk)
            self.guesses.remember(ident, pks)
            return Hit(None, pks)
        if kind is codec.Tombstone:
            return None
        return REJECTED

    def fill_entry(self, generation: bytes, loaded: Any) -> CollectionEntry | None:
        """``loaded`` is the list of the targets' normalised primary keys, in load order."""
        if len(loaded) > self.max_length:
            self.stats.oversized += 1
            return None
        return CollectionEntry(self.schema_hash, generation, [list(pk) for pk in loaded])

    def changed_keys(
        self, state: InstanceState[Any], identity_keys: Iterable[Any]
    ) -> Iterable[str]:
        keys: list[str] = []
        mapper = state.mapper
        if mapper.isa(self.prop.parent):  # the parent: its own collection
            for identity in identity_keys:
                pk = self.parent.normalise(identity[1])
                keys.append(WHOLE_KIND if pk is None else self.key_for_parent(pk))
        if mapper.base_mapper is self.prop.mapper.base_mapper:  # a target
            if self.secondary is None:
                if mapper.isa(self.prop.mapper):  # (a sibling class is in none of them)
                    keys.extend(self._parents_named_by(state))
            elif self.order_sensitive and state.key is not None:
                keys.append(WHOLE_KIND)  # in which collections, in which place: not known
        return keys

    def links_changed(self, state: InstanceState[Any], deleted: bool) -> Iterable[str]:
        if self.secondary is None:
            return ()
        if deleted and state.mapper.base_mapper is self.prop.mapper.base_mapper:
            return (WHOLE_KIND,)  # a target gone: the collections it was in are not known
        keys: list[str] = []
        for rel in state.mapper.relationships:
            if rel.viewonly or not _same_table(rel.secondary, self.secondary):
                continue
            history = state.attrs[rel.key].history
            members = [*history.added, *history.deleted]
            if not members:
                continue
            own = _link_values(state, rel.synchronize_pairs)
            for member in members:
                theirs = _link_values(instance_state(member), rel.secondary_synchronize_pairs or [])
                if own is None or theirs is None:
                    return (WHOLE_KIND,)
                keys.append(self._key_from_link({**own, **theirs}))
        return keys

    # -- helpers ----------------------------------------------------------------------------------

    def _parents_named_by(self, state: InstanceState[Any]) -> list[str]:
        """The collections a one-to-many target's old and new foreign-key values name."""
        old: list[Any] = []
        new: list[Any] = []
        for attr in self.fk_attrs:
            if attr not in state.mapper.attrs:
                return [WHOLE_KIND]
            history = state.attrs[attr].history
            now = history.added or history.unchanged
            before = history.deleted or history.unchanged
            if not now:
                return [WHOLE_KIND]  # not loaded: which parent it names is not known
            if not before and state.key is not None:
                return [WHOLE_KIND]  # changed from a value never loaded
            new.append(now[0])
            old.append(before[0] if before else None)
        keys = []
        for values in (old, new):
            if any(value is None for value in values):
                continue
            pk = self.parent.normalise(values)
            keys.append(WHOLE_KIND if pk is None else self.key_for_parent(pk))
        return keys

    def _key_from_link(self, row: dict[str, Any]) -> str:
        values = [row.get(name, _MISSING) for name in self.parent_links]
        if any(value is _MISSING for value in values):
            return WHOLE_KIND
        pk = self.parent.normalise(values)
        return WHOLE_KIND if pk is None else self.key_for_parent(pk)


def _link_values(state: InstanceState[Any], pairs: Any) -> dict[str, Any] | None:
    """The secondary-table column values (by name) that ``state``'s side of a link row holds."""
    values = {}
    for column, link in pairs:
        try:
            attr = state.mapper.get_property_by_column(column).key
        except UnmappedColumnError:
            return None
        value = state.dict.get(attr, _MISSING)
        if value is _MISSING:
            return None
        values[link.name] = value
    return values


def _same_table(a: Any, b: Any) -> bool:
    """Whether two ``secondary`` tables may be one database table (by name and schema)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    return bool(
        isinstance(a, Table)
        and isinstance(b, Table)
        and a.name.casefold() == b.name.casefold()
        and a.schema == b.schema
    )


def _pair_key(a: Any, b: Any) -> frozenset[tuple[str, str]]:
    return frozenset((_column_key(a), _column_key(b)))


def _column_key(column: Any) -> tuple[str, str]:
    table = getattr(column, "table", None)
    return (str(getattr(table, "name", "")), str(getattr(column, "name", "")))


def _equalities(clause: Any) -> set[frozenset[tuple[str, str]]] | None:
    """The column pairs a condition made only of ``column = column`` joined by AND compares, or
    None if it is anything else."""
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        found: set[frozenset[tuple[str, str]]] = set()
        for part in clause.clauses:
            pairs = _equalities(part)
            if pairs is None:
                return None
            found |= pairs
        return found
    if (
        isinstance(clause, BinaryExpression)
        and clause.operator is operators.eq
        and isinstance(clause.left, ColumnClause)
        and isinstance(clause.right, ColumnClause)
    ):
        return {_pair_key(clause.left, clause.right)}
    return None


def _pk_attrs(mapper: Mapper[Any]) -> list[str]:
    return [mapper.get_property_by_column(column).key for column in mapper.primary_key]


def _pk_attr(mapper: Mapper[Any], column: Any) -> str:
    return mapper.get_property_by_column(column).key


def _attrs(mapper: Mapper[Any], columns: list[Any]) -> list[str] | None:
    try:
        return [mapper.get_property_by_column(column).key for column in columns]
    except UnmappedColumnError:
        return None
