"""The front users hold: :class:`IdentityCache`.

It configures and owns the parts, and does little itself: the store (:mod:`sa_cache.stores`)
behind its guards (:mod:`sa_cache.guarded`), the registered models (:mod:`sa_cache.registry`),
and the settings the lookups of every session read (:mod:`sa_cache.lookup`). Sessions hold the
cache; it never holds a session. The protocol it runs is described in docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast, overload

from dogpile.cache.region import CacheRegion
from sqlalchemy import inspect
from sqlalchemy.orm import InstanceState, Mapper

from .breaker import CircuitBreaker
from .errors import NotRegistered
from .guarded import GuardedStore
from .lookup import listen_for_loads
from .near import NearCache, NearStore
from .protocol import eviction_writes
from .registry import Registry, UniqueSpec, mapper_of
from .relationships import DEFAULT_MAX_COLLECTION
from .rows import CachedModel
from .signing import Signer
from .stats import MODEL_COUNTERS
from .store import FailoverStore, Store, Write
from .stores import memory_region, region_for_url, store_for

__all__ = ["IdentityCache", "NearCache"]

T = TypeVar("T")

#: A fill is dropped once this fraction of ``tombstone_ttl`` has passed since its observation,
#: so the tombstone an eviction wrote after the observation is still alive when the fill runs.
FILL_AGE_FRACTION = 0.25
#: A lease lives ``max(LEASE_TTL_FACTOR * lease_wait, MIN_LEASE_TTL)`` seconds.
LEASE_TTL_FACTOR = 2.0
MIN_LEASE_TTL = 1.0


class IdentityCache:
    """A shared cache of ORM rows by primary key, in front of any :class:`CachingSession`.

    :param backend: None for the in-process backend (the embedded default, one process only);
        a ``redis://``, ``rediss://`` or ``unix://`` URL for dogpile.cache's Redis backend
        (``redis+cluster://`` for Redis Cluster, ``redis+sentinel://`` for Sentinel); or a
        configured :class:`dogpile.cache.region.CacheRegion`, used as it is (its key mangler and
        its read-only dogpile proxies included).
    :param prefix: the first part of every key, so several applications can share one Redis.
    :param ttl: seconds a cached row lives unless its model was registered with its own.
    :param negative_ttl: seconds "this primary key does not exist" is remembered.
    :param tombstone_ttl: seconds an eviction marker lives; a fill whose load took longer than a
        quarter of this is dropped, so no fill can outlive the marker that should stop it.
    :param socket_timeout: Redis connect and read timeout in seconds (URL backends only).
    :param retries: Redis retries per command after a connection error (URL backends only);
        a timeout is never retried.
    :param signing_key: a secret, or several (the first signs, all verify), to HMAC-sign every
        value, so entries written by anyone without the secret are rejected as misses.
    :param breaker_threshold: consecutive store errors after which the store is bypassed (a
        timeout opens the breaker at once).
    :param breaker_cooldown: seconds the store is bypassed before one probe call is let through.
    :param lease_wait: seconds a lookup that misses waits for another caller already loading the
        same row (the thundering herd) before reading the database itself, without filling;
        0 turns leases off. A lease lives ``max(2 * lease_wait, 1)`` seconds, so one whose holder
        died (or whose release was lost in an outage) delays that row's lookups at most that long.
    :param max_collection: the longest relationship collection cached; a longer one is loaded
        from the database every time (counted as ``oversized``).
    :param exit_flush_timeout: seconds the process spends at interpreter exit writing evictions
        it could not write during an outage (its journal), shared by every cache of the process;
        what is still unwritten then is logged as one ERROR line. 0: no flush, only the line.
    :param near_cache: True (default settings) or a :class:`~sa_cache.near.NearCache`: answer
        reads from this process's memory, kept coherent by Redis client tracking. A commit of
        this process is never followed by an older answer here; another process's commit may be
        answered by its older value for as long as Redis's message takes to arrive
        (docs/near-cache.md). Redis backends only.
    """

    def __init__(
        self,
        backend: str | CacheRegion | None = None,
        *,
        prefix: str = "sa_cache",
        ttl: float = 3600,
        negative_ttl: float = 60,
        tombstone_ttl: float = 300,
        socket_timeout: float = 0.25,
        retries: int = 1,
        signing_key: str | bytes | Sequence[str | bytes] | None = None,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 5.0,
        lease_wait: float = 0.5,
        exit_flush_timeout: float = 5.0,
        max_collection: int = DEFAULT_MAX_COLLECTION,
        near_cache: bool | NearCache = False,
    ) -> None:
        if backend is None:
            region = memory_region()
        elif isinstance(backend, str):
            region = region_for_url(backend, socket_timeout, retries)
        elif isinstance(backend, CacheRegion):
            region = backend
        else:
            raise TypeError(f"backend must be None, a URL or a CacheRegion, not {backend!r}")
        self.region = region
        self.prefix = prefix
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.tombstone_ttl = tombstone_ttl
        self.max_fill_age = tombstone_ttl * FILL_AGE_FRACTION
        self.lease_wait = lease_wait
        self.lease_ttl = max(LEASE_TTL_FACTOR * lease_wait, MIN_LEASE_TTL)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown)
        store = store_for(region)
        if near_cache:
            settings = near_cache if isinstance(near_cache, NearCache) else NearCache()
            # a key mangler may hash keys: then every key is followed
            followed = prefix + ":" if region.key_mangler is None else ""
            store = NearStore(store, followed, settings)
        self.guarded = GuardedStore(
            store,
            breaker=self.breaker,
            tombstone_ttl=tombstone_ttl,
            mangle=region.key_mangler,
            signer=None if signing_key is None else Signer(signing_key),
            exit_flush_timeout=exit_flush_timeout,
        )
        self.registry = Registry(prefix, max_collection)
        if self.guarded.store.capabilities.failover:
            cast(FailoverStore, self.guarded.store).on_master_change(self._new_generations)

    def _new_generations(self) -> list[Write]:
        """A new generation for every registered kind, keys as stored: what a store that lost
        writes in a change of master (Sentinel) writes first, so nothing older is served."""
        mangle = self.region.key_mangler
        _, generations = eviction_writes((), self.registry.every_kind(), 0)
        return [
            Write(w.key if mangle is None else mangle(w.key), w.value, w.ttl) for w in generations
        ]

    @property
    def store(self) -> Store:
        """The store itself, unguarded. Assigning one (a wrapper around it, say) puts it behind
        the same guards, so every lookup and eviction from then on goes through it."""
        return self.guarded.store

    @store.setter
    def store(self, store: Store) -> None:
        self.guarded.store = store

    def __repr__(self) -> str:
        store = type(self.store).__name__
        return f"<IdentityCache prefix={self.prefix!r} store={store} models={len(self.registry)}>"

    # -- registration -------------------------------------------------------------------------

    @overload
    def register(
        self,
        model: type[T],
        *,
        ttl: float | None = None,
        relationships: Iterable[str] | None = None,
        unique: UniqueSpec = None,
    ) -> type[T]: ...

    @overload
    def register(
        self,
        model: None = None,
        *,
        ttl: float | None = None,
        relationships: Iterable[str] | None = None,
        unique: UniqueSpec = None,
    ) -> Callable[[type[T]], type[T]]: ...

    def register(
        self,
        model: type[T] | None = None,
        *,
        ttl: float | None = None,
        relationships: Iterable[str] | None = None,
        unique: UniqueSpec = None,
    ) -> type[T] | Callable[[type[T]], type[T]]:
        """Opt a mapped class in (usable as a class decorator). Registering any class of an
        inheritance hierarchy caches the whole hierarchy (each concrete class of a concrete
        hierarchy by its own table).

        ``relationships``: which of the hierarchy's relationships have their lazily loaded
        collections cached, by attribute name; None (the default) caches every one whose target
        is registered too and whose membership the cache can evict exactly (docs/protocol.md),
        ``()`` none.

        ``unique``: the unique columns whose lookups are cached (``select(User).where(User.email
        == x)``, ``filter_by(email=x)``; docs/configuration.md): attribute names, each a name or
        a tuple of names for a composite unique, or True for the table's unique constraints and
        unique indexes. Only for a class without inheritance; a column the database does not
        compare by exact value (a case-insensitive collation) is never served.

        Raises :class:`~sa_cache.errors.CacheError`, saying why, for a class the cache cannot
        answer for exactly: one mapped to a ``select()``, subquery, CTE or join."""
        if model is None:
            return lambda cls: self.register(
                cls, ttl=ttl, relationships=relationships, unique=unique
            )
        base = self.registry.add(model, self.ttl if ttl is None else ttl, relationships, unique)
        listen_for_loads(base.class_)
        return model

    def model_for(self, mapper: Mapper[Any]) -> CachedModel | None:
        """The cached rows of ``mapper``'s hierarchy, or None if it is not registered."""
        return self.registry.model_for(mapper)

    # -- explicit eviction ------------------------------------------------------------------------

    def evict(self, target: Any, pk: Any = None) -> bool:
        """Evict one row now: ``evict(instance)`` or ``evict(Model, pk)``. Returns whether the
        store has the eviction now; False means it is journaled: written before this process's
        next read and, in the background, as soon as the store is reachable.

        For changes sa_cache cannot see: ``text()`` SQL, other applications, triggers. Changes
        made through a :class:`CachingSession` are evicted at commit without this call."""
        if isinstance(target, type):
            cached = self.registry.registered(target)
            ident = tuple(pk) if isinstance(pk, tuple | list) else (pk,)
            normalised = cached.normalise(ident)
            if normalised is None:
                raise ValueError(f"{pk!r} is not a valid primary key of {cached.name}")
            key = cached.keys.row_key(normalised)
            # the unique values it holds are not known: those lookups are evicted whole
            return self.guarded.evict({key: cached}, self._unique_kinds_of(cached))
        else:
            state = inspect(target, raiseerr=False)
            if not isinstance(state, InstanceState):  # None, an engine, a mapper, a string...
                raise TypeError(f"{target!r} is neither a mapped instance nor a mapped class")
            if pk is not None:
                raise TypeError("evict(instance) takes no primary key")
            if state.key is None:
                raise ValueError(f"{target!r} is transient or pending: it has no row to evict")
            cached = self.registry.registered(type(target))
            key = cached.keys.row_key(state.key[1], state.key[2])
        keys: dict[str, Any] = {key: cached}
        whole: list[Any] = []
        for unique in self._unique_kinds_of(cached):
            values = unique.normalise([state.dict.get(attr) for attr in unique.attrs])
            if values is None:
                whole.append(unique)  # not loaded (or NULL): the values it held are not known
            else:
                keys[unique.key_for(values)] = unique
        return self.guarded.evict(keys, whole)

    def _unique_kinds_of(self, cached: CachedModel) -> list[Any]:
        return [kind for kind in self.registry.unique_kinds() if kind.model is cached]

    def evict_collection(self, target: Any, attr: str, pk: Any = None) -> bool:
        """Evict a cached collection now: ``evict_collection(user, "roles")`` or
        ``evict_collection(User, "roles", 5)``; ``evict_collection(User, "roles")``: every
        collection of that relationship, in O(1). The return value is as :meth:`evict`'s.

        For membership changes sa_cache cannot see: database-side cascades (``ON DELETE
        CASCADE`` on a link table) and triggers, ``text()`` SQL, other applications."""
        state = None if isinstance(target, type) else inspect(target, raiseerr=False)
        if state is not None and not isinstance(state, InstanceState):
            raise TypeError(f"{target!r} is neither a mapped instance nor a mapped class")
        mapper = state.mapper if state is not None else mapper_of(target)
        prop = mapper.relationships.get(attr)
        kind = None if prop is None else self.registry.relationship_kind(prop)
        if kind is None:
            raise NotRegistered(f"{mapper.class_.__name__}.{attr} is not a cached relationship")
        if state is not None:
            if pk is not None:
                raise TypeError("evict_collection(instance, attr) takes no primary key")
            if state.key is None:
                raise ValueError(f"{target!r} is transient or pending: it has no collection")
            pk = state.key[1]
        elif pk is None:
            return self.guarded.evict({}, [kind])
        ident = tuple(pk) if isinstance(pk, tuple | list) else (pk,)
        normalised = kind.parent.normalise(ident)
        if normalised is None:
            raise ValueError(f"{pk!r} is not a valid primary key of {kind.parent.name}")
        return self.guarded.evict({kind.key_for_parent(normalised): kind})

    def evict_model(self, model: type[Any]) -> bool:
        """Evict every cached row of ``model`` (its whole hierarchy) in O(1); the return value
        is as :meth:`evict`'s."""
        cached = self.registry.registered(model)
        return self.guarded.evict({}, [cached, *self._unique_kinds_of(cached)])

    def flush(self) -> int:
        """Delete every key under this cache's prefix; returns how many. Raises if the store
        fails (an explicit command: the caller must know)."""
        return self.guarded.delete_prefix(self.prefix + ":")

    def deliver_evictions(self, timeout: float = 5.0) -> bool:
        """Write the evictions journaled during an outage now, trying for up to ``timeout``
        seconds; whether none is left. For a worker about to go idle or a script about to exit
        that wants to know (the background delivery and the flush at exit do this unasked)."""
        return self.guarded.deliver(timeout)

    # -- counters --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters of this process: totals and per model; ``journal``: the evictions not yet
        written (row keys, and models to evict whole)."""
        per_model = {m.name: m.stats.as_dict() for m in self.registry.models()}
        # relationship collections, as "Parent.attr"
        per_model.update((k.name, k.stats.as_dict()) for k in self.registry.relationship_kinds())
        per_model.update((k.name, k.stats.as_dict()) for k in self.registry.unique_kinds_made())
        totals = {name: sum(s[name] for s in per_model.values()) for name in MODEL_COUNTERS}
        totals["errors"] = max(totals["errors"], self.guarded.errors)
        totals["bypassed"] = self.guarded.bypassed
        keys, kinds = self.guarded.journal()
        journal = {"keys": len(keys), "models": len(kinds)}
        result = {**totals, "models": per_model, "journal": journal}
        if isinstance(self.guarded.store, NearStore):
            result["near"] = self.guarded.store.stats.as_dict()
        return result
