"""Eager relationships of a hit: what a load of a cached row would have loaded with it, and how
a hit loads the same from the cache.

A load of a row also loads its ``joined``, ``selectin``, ``subquery`` and ``immediate``
relationships, and theirs in turn, stopping where SQLAlchemy stops: at a relationship whose
target's class is already on the path (the whole load path for the post-loaders, the part in
its own SELECT for ``joined``), unless its ``join_depth`` allows that many levels. A hit must
leave the same attributes
loaded, holding the same objects, with the same ``load_path``, or later lazy loads and
``session.close()`` would see a different object graph than after a load.

:func:`plan` says, per mapper, which relationships those are and how each is served (memoised
in :attr:`sa_cache.registry.Registry.eager_plans`, cleared by every registration). :func:`complete`
serves them level by level: one store read for the collections of every instance of a level,
together with the rows of the members this process last saw in them and of the many-to-one
targets (a guess of keys, never an answer: :class:`~sa_cache.relationships.MemberGuesses`), and
one more for the rows of members not guessed, if any; the instances placed become the next
level. Whatever the cache cannot answer exactly (a collection or row it lacks, a member in
the session with expired attributes, a relationship it does not cache) is loaded by SQLAlchemy
itself, one attribute at a time: the looked-up row's ``joined`` ones in one refresh with the
row's SQL expressions (a first hit costs no more SQL than its miss), the others by the lazy
loader along the load's path; both fill the cache for the next time. A collection is never
filled in part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from sqlalchemy.orm import InstanceState, Mapper, RelationshipDirection, RelationshipProperty
from sqlalchemy.orm.attributes import instance_state

from . import _orm
from .kinds import CachedKind, Hit
from .lookup import FillRule, Lookups
from .registry import Registry
from .relationships import CachedRelationship
from .rows import CachedModel

#: The relationship strategies a load carries out with its row.
EAGER_STRATEGIES: Final = frozenset({"joined", "selectin", "subquery", "immediate"})
#: The lazy strategies an option may give an instance a loader of its own for.
LAZY_STRATEGIES: Final = frozenset({"select", "raise", "raise_on_sql"})

#: Whether the session's rules let a lookup of this class read the cache.
MayRead = Callable[[Mapper[Any]], bool]
#: Loads the named attributes (and the SQL expressions) of a row placed from the cache, False
#: if the row is gone.
Refresh = Callable[[Any, list[str]], bool]
#: Places a cached row's answer (answer, mapper, identity key, load path) as a load would: the
#: instance, or ``_orm.KNOWN_ABSENT``.
Place = Callable[[Any, Mapper[Any], Any, Any], Any]


class Step(NamedTuple):
    """One relationship of a mapper a load of its row sets, and how.

    :param strategy: ``joined``, ``selectin``, ``subquery`` or ``immediate`` (loaded with the
        row), ``noload`` (set empty), or ``select`` / ``raise`` / ``raise_on_sql`` (a lazy
        loader of the instance's own, which an option sets)
    :param element: the loader option's load element that set the strategy, if one did (then
        SQLAlchemy does not stop at a cycle)
    :param collection: its cached collections (a collection read, then its members' rows)
    :param row: for a many-to-one whose target is loaded by primary key, the target's cached
        rows, and ``fk_attrs``, the parent's attributes holding that key in key order
    Neither: SQLAlchemy loads it."""

    key: str
    prop: RelationshipProperty[Any]
    collection: CachedRelationship | None
    row: CachedModel | None
    fk_attrs: tuple[str, ...]
    strategy: str
    element: Any

    @property
    def eager(self) -> bool:
        return self.strategy in EAGER_STRATEGIES

    def runs_at(self, path: Any, start: int) -> bool:
        """Whether a load that reached this row along ``path`` (its load path: the mappers and
        relationships from the row the first load started at) loads this relationship, by
        SQLAlchemy's rule against cycles, which an option at the path lifts: a ``joined``
        relationship looks at the mappers of its own SELECT (from the ``start``-th on), the
        others at the whole path."""
        if self.element is not None:
            return True
        mappers = _orm.path_mappers(path)
        if self.strategy == "joined":
            mappers = mappers[start:]
        depth = self.prop.join_depth
        if depth:
            return len(mappers) <= depth
        target = self.prop.mapper
        return not any(mapper.isa(target) for mapper in mappers)

    def start_after(self, path: Any, start: int) -> int:
        """Where the SELECT that loads this relationship's targets starts on their path: the
        same SELECT for ``joined``, their own for the others."""
        return start if self.strategy == "joined" else len(_orm.path_mappers(path))


def plan(
    registry: Registry,
    mapper: Mapper[Any],
    context: _orm.LoadContext | None = None,
    path: Any = None,
) -> tuple[Step, ...]:
    """The relationships of ``mapper`` a hit at ``path`` sets as a load with the loader options
    of ``context`` would (those ``Session.refresh`` loads with the row's SQL expressions are
    left out: see :func:`sa_cache._orm.eager_plan`). Memoised by mapper, and by mapper, options
    and path where an option names one of its relationships there."""
    loaders = None
    if context is not None and path is not None:
        loaders = context.loaders.get(_orm.natural_path(path))
    memo: Any = mapper if not loaders else (mapper, context.key, _orm.natural_path(path))  # type: ignore[union-attr]
    found = registry.eager_plans.get(memo)
    if found is None:
        steps = []
        for prop in mapper.relationships:
            element = None if loaders is None else loaders.get(prop.key)
            strategy = None if element is None else _orm.option_strategy(element)
            if strategy is None:
                strategy = _orm.default_strategy(prop)
            if strategy in EAGER_STRATEGIES:
                if element is None and _orm.refreshed_with_row(prop):
                    continue
            elif strategy == "noload" or (
                element is not None
                and strategy in LAZY_STRATEGIES
                and _orm.is_instance_level(prop, strategy)
            ):
                steps.append(Step(prop.key, prop, None, None, (), strategy, element))
                continue
            else:
                continue
            collection = registry.relationship_kind(prop)
            row: CachedModel | None = None
            fk_attrs: tuple[str, ...] = ()
            if collection is None and prop.direction is RelationshipDirection.MANYTOONE:
                fk_attrs = _orm.primary_key_attrs_of_target(prop) or ()
                row = registry.model_for(prop.mapper) if fk_attrs else None
            steps.append(Step(prop.key, prop, collection, row, fk_attrs, strategy, element))
        found = tuple(steps)
        registry.eager_plans[memo] = found
    return found


class _Todo(NamedTuple):
    state: InstanceState[Any]
    step: Step
    path: Any
    start: int


def complete(
    lookups: Lookups,
    placed: Sequence[tuple[Any, Any]],
    place: Place,
    fill_rule: FillRule,
    may_read: MayRead,
    refresh: Refresh | None = None,
    context: _orm.LoadContext | None = None,
) -> bool:
    """Load the eager relationships of ``placed`` (instances a hit just put in the session,
    each with its load path) and of every instance that brings in, as a load with the loader
    options of ``context`` would have loaded them, reading only the classes ``may_read`` allows
    (the session's rules). The instances it places get the options as their ``load_options``;
    every instance it reaches gets the ``noload`` and per-instance lazy loaders of the options
    where the attribute is not loaded, as a load sets them on the rows it creates and on the
    unloaded attributes of those the session held already.

    With ``refresh``, ``placed`` are the rows a lookup asked for: their ``joined``
    relationships the cache cannot answer are loaded as a load loads them, with the row, by one
    ``refresh`` of each (with its SQL expressions), which returns False when the row is gone;
    then so does this. Misses are remembered with ``fill_rule``, so the loads that follow fill
    what they load."""
    registry = lookups.cache.registry
    level = [
        (instance_state(instance), path, len(_orm.path_mappers(path)) - 1)
        for instance, path in placed
    ]
    seen: set[int] = set()
    first = True
    while level:
        todo: list[_Todo] = []
        for state, path, start in level:
            if id(state) in seen:
                continue
            seen.add(id(state))
            for step in plan(registry, state.mapper, context, path):
                if step.key in state.dict:
                    continue
                if not step.eager:
                    if step.strategy == "noload":
                        _orm.set_not_loaded(state, step.prop)
                    else:
                        _orm.set_instance_lazy_loader(state, step.prop, step.strategy, step.element)
                elif step.runs_at(path, start):
                    todo.append(_Todo(state, step, path, start))
                elif step.strategy == "immediate":  # as SQLAlchemy at a cycle: no SQL
                    _orm.load_along(state, step.prop, path, from_session_only=True)
        defer = refresh is not None and first
        level, deferred = _serve(lookups, todo, place, fill_rule, may_read, defer, context)
        if defer:
            assert refresh is not None
            for instance, _ in placed:
                keys = [item.step.key for item in deferred if item.state.obj() is instance]
                if not refresh(instance, keys):
                    return False
            _fill_refreshed(lookups, deferred)
        first = False
    return True


def _fill_refreshed(lookups: Lookups, deferred: list[_Todo]) -> None:
    """Fill the collections a refresh loaded whose misses were remembered (as a lazy load of
    them fills them: the list of their members' primary keys)."""
    for item in deferred:
        kind = item.step.collection
        if kind is None or item.state.key is None:
            continue
        pk = kind.parent.normalise(item.state.key[1])
        if pk is None or (kind, pk) not in lookups.pending:
            continue
        members = []
        for member in item.state.dict.get(item.step.key, ()):
            identity = instance_state(member).key
            target = None if identity is None else kind.target.normalise(identity[1])
            if target is None:
                lookups.pending.pop((kind, pk), None)
                break
            members.append(target)
        else:
            lookups.loaded((kind, pk), members)
            kind.guesses.remember(pk, members)


def _serve(
    lookups: Lookups,
    todo: list[_Todo],
    place: Place,
    fill_rule: FillRule,
    may_read: MayRead,
    defer_joined: bool,
    context: _orm.LoadContext | None,
) -> tuple[list[tuple[InstanceState[Any], Any, int]], list[_Todo]]:
    """Serve one level: the instances it brought into the session, each with its path, and
    (``defer_joined``) the ``joined`` relationships it left for the caller's refresh."""
    changes = lookups.changes
    fallback: list[_Todo] = []
    collections: list[tuple[_Todo, str, tuple[Any, ...]]] = []
    references: list[tuple[_Todo, tuple[Any, ...] | None]] = []
    for item in todo:
        state, step = item.state, item.step
        if not may_read(step.prop.mapper):
            pass  # the session's rules send this class to the database
        elif step.collection is not None and _collection_readable(
            lookups, step.collection, state, context
        ):
            kind = step.collection
            pk = kind.parent.normalise(state.key[1])  # type: ignore[index]
            key = None if pk is None else kind.key_for_parent(pk)
            if pk is not None and key not in changes.keys:
                collections.append((item, key, pk))  # type: ignore[arg-type]
                continue
        elif step.row is not None and step.row not in changes.bulk_models:
            values = [state.dict.get(attr, _MISSING) for attr in step.fk_attrs]
            if _MISSING not in values:
                if all(value is None for value in values):
                    references.append((item, None))
                    continue
                target = step.row.normalise(values) if None not in values else None
                if target is not None:
                    references.append((item, target))
                    continue
        fallback.append(item)

    session = todo[0].state.session if todo else None
    identity_map = None if session is None else session.identity_map
    members: dict[_Todo, list[tuple[Any, ...]]] = {}
    along = None
    if collections:
        kinds: list[CachedKind] = [item.step.collection for item, _, _ in collections]  # type: ignore[misc]
        along_kinds, along_rows = _rows_along(lookups, collections, references, identity_map)
        lists, along = lookups.read_kinds_along(
            kinds,
            [(key, pk, (kind, pk)) for kind, (_, key, pk) in zip(kinds, collections, strict=True)],
            fill_rule,
            None,
            along_kinds,
            along_rows,
        )
        for (item, _, _), answer in zip(collections, lists, strict=True):
            if type(answer) is Hit:
                members[item] = answer.value
            else:
                fallback.append(item)

    # every member and target: from the session, or from the row cache (what the collections'
    # round trip read along, and the rest in one read)
    wanted: dict[tuple[Mapper[Any], tuple[Any, ...]], Any] = {}
    rows: list[tuple[CachedModel, Mapper[Any], tuple[Any, ...], Any, str]] = []
    blocked: set[tuple[Mapper[Any], tuple[Any, ...]]] = set()

    def want(model: CachedModel, mapper: Mapper[Any], pk: tuple[Any, ...]) -> None:
        if (mapper, pk) in wanted or (mapper, pk) in blocked:
            return
        identity_key = mapper.identity_key_from_primary_key(pk)
        held = None if identity_map is None else identity_map.get(identity_key)
        if held is not None:
            held_state = instance_state(held)
            if held_state.expired_attributes or not isinstance(held, mapper.class_):
                blocked.add((mapper, pk))  # a load would refresh it, or not return it
            else:
                wanted[(mapper, pk)] = held
            return
        key = model.keys.row_key(pk)
        if key in changes.keys:
            blocked.add((mapper, pk))
            return
        wanted[(mapper, pk)] = None
        rows.append((model, mapper, pk, identity_key, key))

    for item, pks in members.items():
        collection = item.step.collection
        assert collection is not None
        for pk in pks:
            want(collection.target, item.step.prop.mapper, pk)
    for item, target in references:
        if target is not None:
            assert item.step.row is not None
            want(item.step.row, item.step.prop.mapper, target)

    answers: dict[tuple[Mapper[Any], tuple[Any, ...]], Any] = {}
    if rows:
        read = lookups.read_kinds(
            [model for model, *_ in rows],
            [(key, pk, identity_key) for *_, pk, identity_key, key in rows],
            fill_rule,
            None,
            along,
        )
        for (_, mapper, pk, _, _), answer in zip(rows, read, strict=True):
            if type(answer) is Hit and answer.shape.mapper.isa(mapper):
                answers[(mapper, pk)] = answer
            else:
                blocked.add((mapper, pk))
    identity_keys = {(mapper, pk): identity_key for _, mapper, pk, identity_key, _ in rows}

    def resolve(item: _Todo, pks: list[tuple[Any, ...]]) -> list[Any] | None:
        """The members, placing those the cache answered; None (and nothing placed) if the
        cache lacks any of them: then SQLAlchemy loads the whole attribute."""
        mapper = item.step.prop.mapper
        if any((mapper, pk) in blocked for pk in pks):
            return None
        found = []
        for pk in pks:
            instance = wanted[(mapper, pk)]
            if instance is None:
                path = _orm.child_path(item.path, item.step.prop)
                instance = place(answers[(mapper, pk)], mapper, identity_keys[(mapper, pk)], path)
                if instance is _orm.KNOWN_ABSENT:  # gone meanwhile: its refresh found nothing
                    blocked.add((mapper, pk))
                    return None
                if context is not None:
                    _orm.set_load_options(instance_state(instance), context.options)
                wanted[(mapper, pk)] = instance
            found.append(instance)
        return found

    brought: list[tuple[InstanceState[Any], Any, int]] = []
    for item, pks in [*members.items(), *((i, [t]) for i, t in references if t is not None)]:
        found = resolve(item, pks)
        if found is None:
            fallback.append(item)
            continue
        if item.step.prop.uselist:
            _orm.set_loaded(item.state, item.step.key, found)
        else:
            _orm.set_loaded(item.state, item.step.key, found[0] if found else None)
        child = _orm.child_path(item.path, item.step.prop)
        start = item.step.start_after(item.path, item.start)
        brought.extend((instance_state(instance), child, start) for instance in found)
    for item, target in references:
        if target is None:
            _orm.set_loaded(item.state, item.step.key, None)
    deferred = []
    for item in fallback:  # SQLAlchemy's own loader: its SELECT fills the cache
        if defer_joined and item.step.strategy == "joined":
            deferred.append(item)  # loaded with its row, as a load loads it
        else:
            _load_along(item, context)
            # SQLAlchemy's lazy load runs no eager loads of the instances the session held
            # (``_invoke_all_eagers``), which this load does: they are the next level too
            value = item.state.dict.get(item.step.key)
            found = list(value) if item.step.prop.uselist and value is not None else [value]
            child = _orm.child_path(item.path, item.step.prop)
            start = item.step.start_after(item.path, item.start)
            brought.extend((instance_state(i), child, start) for i in found if i is not None)
    return brought, deferred


def _rows_along(
    lookups: Lookups,
    collections: list[tuple[_Todo, str, tuple[Any, ...]]],
    references: list[tuple[_Todo, tuple[Any, ...] | None]],
    identity_map: Any,
) -> tuple[list[CachedKind], list[tuple[str, tuple[Any, ...], Any]]]:
    """The rows to read in the round trip of a level's collections: those of the members this
    process last saw in each (:class:`~sa_cache.relationships.MemberGuesses`: a guess of which
    keys the level needs, never an answer) and the targets of its many-to-ones, which the
    session lacks and the transaction did not write."""
    written = lookups.changes.keys
    kinds: list[CachedKind] = []
    rows: list[tuple[str, tuple[Any, ...], Any]] = []
    seen: set[str] = set()

    def add(model: CachedModel, mapper: Mapper[Any], pk: tuple[Any, ...]) -> None:
        identity_key = mapper.identity_key_from_primary_key(pk)
        if identity_map is not None and identity_key in identity_map:
            return
        key = model.keys.row_key(pk)
        if key in written or key in seen:
            return
        seen.add(key)
        kinds.append(model)
        rows.append((key, pk, identity_key))

    for item, _, pk in collections:
        kind = item.step.collection
        assert kind is not None
        for member in kind.guesses.guess(pk) or ():
            add(kind.target, item.step.prop.mapper, member)
    for item, target in references:
        if target is not None:
            assert item.step.row is not None
            add(item.step.row, item.step.prop.mapper, target)
    return kinds, rows
def _load_along(item: _Todo, context: _orm.LoadContext | None) -> None:
    """Load ``item`` with SQLAlchemy's lazy loader along the load's path, with the load's
    options: those of the SELECT a ``joined``, ``selectin`` or ``subquery`` load runs, which an
    instance the session held may not have been loaded with (an ``immediate`` load runs with
    the instance's own, as SQLAlchemy's does)."""
    state, prop = item.state, item.step.prop
    options = () if context is None else context.options
    own = state.load_options
    if item.step.strategy == "immediate" or _same(own, options):
        _orm.load_along(state, prop, item.path)
        return
    _orm.set_load_options(state, options)
    try:
        _orm.load_along(state, prop, item.path)
    finally:
        _orm.set_load_options(state, own)


def _collection_readable(
    lookups: Lookups,
    kind: CachedRelationship,
    state: InstanceState[Any],
    context: _orm.LoadContext | None,
) -> bool:
    """Whether the cache may answer this parent's collection (as ``cache_lazy_load`` decides:
    a persistent parent without loader options other than the load's, nothing this
    transaction changed in bulk)."""
    bulk = lookups.changes.bulk_models
    return (
        state.key is not None
        and state.key[2] is None
        and (
            not state.load_options
            or context is not None
            and _same(state.load_options, context.options)
        )
        and kind not in bulk
        and kind.target not in bulk
    )


def _same(options: Any, others: tuple[Any, ...]) -> bool:
    """Whether ``options`` are the very ``others``."""
    given = tuple(options)
    return len(given) == len(others) and all(a is b for a, b in zip(given, others, strict=True))


_MISSING: Final = object()
