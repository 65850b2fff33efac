"""The front users hold: :class:`IdentityCache`, which owns the store, the registered models, the
read / fill / evict protocol and the counters. Sessions call into it; it never holds a session.

The protocol, per row key (see docs/protocol.md for the races it closes):

- read: one MGET of the row key and its model's generation key;
- a row whose generation and schema hash match is a hit; anything else is a miss, and the miss
  remembers the exact bytes it saw (an :class:`Observation`);
- fill: store the loaded row only if the key still holds exactly those bytes (SET NX when it was
  absent, compare-and-set otherwise) and only if the load finished well inside the tombstone TTL;
- evict: overwrite the key with a fresh random tombstone, so any fill that observed the old value
  fails; a whole model is evicted by replacing its generation token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar, overload

from dogpile.cache.region import CacheRegion
from sqlalchemy import inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import InstanceState, Mapper
from sqlalchemy.schema import Table

from . import codec
from .backend import Fill, Store, Write
from .backends import REDIS_SCHEMES, memory_region, redis_region, store_for
from .breaker import CircuitBreaker
from .errors import NotRegistered, redact
from .models import CachedModel, RowShape
from .signing import Signer
from .stats import MODEL_COUNTERS

log = logging.getLogger("sa_cache")

T = TypeVar("T")

_JOURNAL_LIMIT = 10_000
_FORGERY_LOG_INTERVAL = 60.0


class Observation(NamedTuple):
    """What a miss saw in the store: the fill may replace exactly this, and nothing newer."""

    model: CachedModel
    key: str
    raw: bytes | None
    generation: bytes
    observed_at: float
    negative_ok: bool
    leased: bool = False


class Hit(NamedTuple):
    shape: RowShape
    values: dict[str, Any]


ABSENT = "absent"


class IdentityCache:
    """A shared cache of ORM rows by primary key, in front of any :class:`CachingSession`.

    :param backend: None for the in-process backend (the embedded default, one process only);
        a ``redis://``, ``rediss://`` or ``unix://`` URL for dogpile.cache's Redis backend; or a
        configured :class:`dogpile.cache.region.CacheRegion`, used as it is.
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
    ) -> None:
        entries: dict[str, Any] | None = None
        if backend is None:
            region, entries = memory_region()
        elif isinstance(backend, str):
            if not backend.startswith(REDIS_SCHEMES):
                raise ValueError(
                    f"unsupported cache URL {redact(backend)!r}: expected one of "
                    + ", ".join(REDIS_SCHEMES)
                )
            region = redis_region(backend, socket_timeout, retries)
        elif isinstance(backend, CacheRegion):
            region = backend
        else:
            raise TypeError(f"backend must be None, a URL or a CacheRegion, not {backend!r}")
        self.region = region
        self.store: Store = store_for(region, entries)
        self._mangle: Callable[[str], str] | None = region.key_mangler
        self.prefix = prefix
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.tombstone_ttl = tombstone_ttl
        self.max_fill_age = tombstone_ttl / 4
        self.lease_wait = lease_wait
        self.lease_ttl = max(2 * lease_wait, 1.0)
        self._models: dict[Mapper[Any], CachedModel] = {}
        self._by_table: dict[Table, CachedModel | None] = {}
        self._healthy = True
        self._lock = threading.Lock()
        self._journal: dict[str, CachedModel] = {}
        self._journal_models: set[CachedModel] = set()
        self._journal_writes = 0  # bumped by every journaling: a replay forgets only what it sent
        #: evictions kept for replay; past this many keys, their models' generations are bumped
        self.journal_limit = _JOURNAL_LIMIT
        self.errors = 0
        self.bypassed = 0
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown)
        self._signer = None if signing_key is None else Signer(signing_key)
        self._forgery_logged_at = -_FORGERY_LOG_INTERVAL

    def __repr__(self) -> str:
        backend = type(self.store).__name__
        return f"<IdentityCache prefix={self.prefix!r} store={backend} models={len(self._models)}>"

    # -- registration -------------------------------------------------------------------------

    @overload
    def register(self, model: type[T], *, ttl: float | None = None) -> type[T]: ...

    @overload
    def register(
        self, model: None = None, *, ttl: float | None = None
    ) -> Callable[[type[T]], type[T]]: ...

    def register(
        self, model: type[T] | None = None, *, ttl: float | None = None
    ) -> type[T] | Callable[[type[T]], type[T]]:
        """Opt a mapped class in (usable as a class decorator). Registering any class of an
        inheritance hierarchy caches the whole hierarchy, because identity keys name the base."""
        if model is None:
            return lambda cls: self.register(cls, ttl=ttl)
        base = _mapper_of(model).base_mapper
        cached = CachedModel(base, self.prefix, self.ttl if ttl is None else ttl)
        self._models[base] = cached
        self._by_table.clear()  # filled lazily: subclasses may be mapped after registration
        from .session import listen_for_loads

        listen_for_loads(base.class_)
        return model

    def model_for(self, mapper: Mapper[Any]) -> CachedModel | None:
        return self._models.get(mapper.base_mapper)

    def models_for_table(self, table: Any) -> CachedModel | None:
        """The registered model that maps ``table`` (subclasses mapped after registration
        included), for Core statements that name a table."""
        if table in self._by_table:
            return self._by_table[table]
        cached = None
        for model in list(self._models.values()):
            if any(table in mapper.tables for mapper in model.base_mapper.self_and_descendants):
                cached = model
        self._by_table[table] = cached  # unregistered tables too: asked on every statement
        return cached

    def _registered(self, target: Any) -> CachedModel:
        cached = self._models.get(_mapper_of(target).base_mapper)
        if cached is None:
            raise NotRegistered(f"{target!r} is not registered with this IdentityCache")
        return cached

    # -- the protocol ---------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return key if self._mangle is None else self._mangle(key)

    def read(
        self, models: Sequence[CachedModel], keys: Sequence[str]
    ) -> tuple[dict[CachedModel, bytes], list[bytes | None]] | None:
        """Generations of ``models`` and raw values of ``keys``, in one round trip (two the first
        time a model's generation is created). None if the store failed."""
        if not self.breaker.allow():
            self.bypassed += 1
            return None
        if (self._journal or self._journal_models) and not self._replay_journal():
            return None
        gen_keys = [self._k(m.keys.generation_key) for m in models]
        try:
            raws = self.store.get_many(gen_keys + [self._k(k) for k in keys])
            generations: dict[CachedModel, bytes] = {}
            for model, gen_key, raw in zip(models, gen_keys, raws, strict=False):
                if raw is None:
                    raw = self.store.init_generation(gen_key, codec.new_generation())
                generations[model] = raw
        except Exception as exc:
            self.failed(exc, models)
            return None
        self._succeeded()
        return generations, raws[len(models) :]

    def classify(
        self,
        model: CachedModel,
        key: str,
        generation: bytes,
        raw: bytes | None,
        pk: tuple[Any, ...],
    ) -> Hit | str | None:
        """A :class:`Hit`, :data:`ABSENT`, or None for a miss."""
        if raw is None:
            return None
        if self._signer is not None:
            opened = self._signer.verify(key, raw)
            if opened is None:
                self._forgery(model, key)
                return None
            raw = opened
        entry = codec.decode(raw)
        kind = entry[1] if entry is not codec.CORRUPT else None
        if kind == codec.ROW and len(entry) == 6 and entry[3] != generation:
            if type(entry[3]) is bytes:
                return None  # written under an earlier generation: a plain miss
        elif kind == codec.ROW and len(entry) == 6:
            shape = model.shape_for_tag(entry[4])
            values = entry[5]
            if (
                shape is not None
                and entry[2] == shape.schema_hash
                and type(values) is list
                and len(values) == len(shape.attrs)
            ):
                if shape.plain:  # stored values are the attribute values: check the key first
                    if _same_key(pk, values, shape.pk_positions):
                        return Hit(shape, dict(zip(shape.attrs, values, strict=True)))
                else:
                    try:
                        hydrated = shape.hydrate(values)
                    except Exception:
                        hydrated = None
                    if hydrated is not None and _same_key(
                        pk, list(hydrated.values()), shape.pk_positions
                    ):
                        return Hit(shape, hydrated)
        elif kind == codec.ABSENT and len(entry) == 3 and type(entry[2]) is bytes:
            return ABSENT if entry[2] == generation else None
        elif kind == codec.TOMBSTONE:
            return None
        model.stats.rejected += 1
        return None

    def row_fill(
        self, observation: Observation, shape: RowShape, state_dict: dict[str, Any]
    ) -> Fill | None:
        """The conditional write that caches a freshly loaded row, or None if it must not be."""
        if time.monotonic() - observation.observed_at > self.max_fill_age:
            return None
        values = shape.dehydrate(state_dict)
        if values is None:
            return None  # not fully loaded (load_only, a subclass loaded through its base...)
        try:
            value = codec.encode_row(
                shape.schema_hash, observation.generation, shape.class_tag, values
            )
        except (TypeError, ValueError, OverflowError) as exc:
            log.warning("sa_cache: not caching %s: %s", observation.model.name, exc)
            return None
        ttl = observation.model.ttl
        return Fill(
            self._k(observation.key), observation.raw, self._seal(observation.key, value, ttl), ttl
        )

    def absent_fill(self, observation: Observation) -> Fill | None:
        if time.monotonic() - observation.observed_at > self.max_fill_age:
            return None
        value = self._seal(
            observation.key, codec.encode_absent(observation.generation), self.negative_ttl
        )
        return Fill(self._k(observation.key), observation.raw, value, self.negative_ttl)

    def _seal(self, key: str, value: bytes, ttl: float | None) -> bytes:
        return value if self._signer is None else self._signer.sign(key, value, ttl)

    def _forgery(self, model: CachedModel, key: str) -> None:
        model.stats.rejected += 1
        now = time.monotonic()
        if now - self._forgery_logged_at >= _FORGERY_LOG_INTERVAL:
            self._forgery_logged_at = now
            log.warning("sa_cache: rejected an entry with a bad or missing signature at %s", key)

    @staticmethod
    def lease_key(key: str) -> str:
        """The lease on a row: inside the row's hash tag, so in the row's cluster slot."""
        return key + ":lease"

    def acquire_lease(
        self, model: CachedModel, key: str
    ) -> tuple[bool, bytes | None, bytes | None] | None:
        """Try to become the one caller that loads this row; in the same round trip, read the
        row again (another caller may have filled it since our miss).

        Returns (acquired, generation, raw row), or None if the store failed."""
        if not self.breaker.allow():
            self.bypassed += 1
            return None
        try:
            acquired, (generation, raw) = self.store.acquire(
                self._k(self.lease_key(key)),
                b"1",
                self.lease_ttl,
                [self._k(model.keys.generation_key), self._k(key)],
            )
        except Exception as exc:
            self.failed(exc, [model])
            return None
        self._succeeded()
        return acquired, generation, raw

    def fill(self, fills: Sequence[tuple[CachedModel, Fill]], release: Sequence[str] = ()) -> None:
        """Apply conditional fills in one round trip; failures are counted, never raised."""
        if not self.breaker.allow():
            self.bypassed += 1
            return
        try:
            stored = self.store.fill_many(
                [fill for _, fill in fills], [self._k(key) for key in release]
            )
        except Exception as exc:
            self.failed(exc, [model for model, _ in fills])
            return
        self._succeeded()
        for (model, _), ok in zip(fills, stored, strict=True):
            if ok:
                model.stats.fills += 1

    def evict_keys(self, keys: dict[str, CachedModel], models: Iterable[CachedModel] = ()) -> bool:
        """Tombstone ``keys`` and replace the generation of ``models``, in one round trip.

        If the store fails, the evictions are journaled and replayed before the next read, so
        a row changed during an outage is never served from an entry written before it."""
        models = set(models)
        if not self.breaker.allow():
            self.bypassed += 1
            self._journal_evictions(keys, models)
            return False
        return self._write_evictions(keys, models)

    def _write_evictions(self, keys: dict[str, CachedModel], models: set[CachedModel]) -> bool:
        ttl = self.tombstone_ttl
        writes = [Write(self._k(k), self._seal(k, codec.new_tombstone(), ttl), ttl) for k in keys]
        writes += [
            Write(self._k(m.keys.generation_key), codec.new_generation(), None) for m in models
        ]
        if not writes:
            return True
        try:
            self.store.write_many(writes)
        except Exception as exc:
            self.failed(exc, list(keys.values()) + list(models))
            self._journal_evictions(keys, models)
            return False
        self._succeeded()
        for model in keys.values():
            model.stats.evictions += 1
        for model in models:
            model.stats.evictions += 1
        return True

    def _journal_evictions(self, keys: dict[str, CachedModel], models: set[CachedModel]) -> None:
        with self._lock:
            self._journal_writes += 1
            self._journal.update(keys)
            self._journal_models.update(models)
            if len(self._journal) > self.journal_limit:
                self._journal_models.update(self._journal.values())
                self._journal.clear()

    def _replay_journal(self) -> bool:
        with self._lock:
            keys, models = dict(self._journal), set(self._journal_models)
            writes = self._journal_writes
        if not self._write_evictions(keys, models):
            return False
        with self._lock:
            if writes != self._journal_writes:
                return True  # journaled again meanwhile (maybe the same keys): replay it all later
            for key in keys:
                self._journal.pop(key, None)
            self._journal_models.difference_update(models)
        return True

    # -- errors -----------------------------------------------------------------------------

    def failed(self, exc: BaseException, models: Iterable[CachedModel] = ()) -> None:
        """Count a store error; log the first of an outage only."""
        self.errors += 1
        self.breaker.failed(exc)
        for model in set(models):
            model.stats.errors += 1
        if self._healthy:
            self._healthy = False
            log.warning(
                "sa_cache: cache backend unavailable, serving from the database (%s: %s)",
                type(exc).__name__,
                redact(str(exc)),
            )

    def _succeeded(self) -> None:
        self.breaker.succeeded()
        if not self._healthy:
            self._healthy = True
            log.warning("sa_cache: cache backend available again")

    # -- public API ------------------------------------------------------------------------------

    def evict(self, target: Any, pk: Any = None) -> None:
        """Evict one row now: ``evict(instance)`` or ``evict(Model, pk)``.

        For changes sa_cache cannot see: ``text()`` SQL, other applications, triggers. Changes
        made through a :class:`CachingSession` are evicted at commit without this call."""
        if isinstance(target, type):
            cached = self._registered(target)
            ident = tuple(pk) if isinstance(pk, tuple | list) else (pk,)
            normalised = cached.normalise(ident)
            if normalised is None:
                raise ValueError(f"{pk!r} is not a valid primary key of {cached.name}")
            key = cached.keys.row_key(normalised)
        else:
            state = inspect(target, raiseerr=False)
            if not isinstance(state, InstanceState):  # None, an engine, a mapper, a string...
                raise TypeError(f"{target!r} is neither a mapped instance nor a mapped class")
            if pk is not None:
                raise TypeError("evict(instance) takes no primary key")
            if state.key is None:
                raise ValueError(f"{target!r} is transient or pending: it has no row to evict")
            cached = self._registered(type(target))
            key = cached.keys.row_key(state.key[1], state.key[2])
        self.evict_keys({key: cached})

    def evict_model(self, model: type[Any]) -> None:
        """Evict every cached row of ``model`` (its whole hierarchy) in O(1)."""
        self.evict_keys({}, [self._registered(model)])

    def stats(self) -> dict[str, Any]:
        """Counters of this process: totals and per model."""
        per_model = {m.name: m.stats.as_dict() for m in self._models.values()}
        totals = {name: sum(s[name] for s in per_model.values()) for name in MODEL_COUNTERS}
        totals["errors"] = max(totals["errors"], self.errors)
        totals["bypassed"] = self.bypassed
        return {**totals, "models": per_model}




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


def _mapper_of(target: Any) -> Mapper[Any]:
    try:
        mapper = inspect(target)
    except NoInspectionAvailable:
        raise TypeError(f"{target!r} is not a mapped class") from None
    if not isinstance(mapper, Mapper):
        raise TypeError(f"{target!r} is not a mapped class")
    return mapper
