"""Session interception: where a primary-key lookup that missed the identity map asks the cache,
and where a row loaded after a cache miss is written back.

``sessionmaker(engine, class_=CachingSession, cache=cache)`` configures a whole factory; users
with their own Session subclass mix in :class:`CachingSessionMixin` instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import event, inspect, select, tuple_
from sqlalchemy.orm import Mapper, Query, Session
from sqlalchemy.orm.state import InstanceState

from . import _orm, tracking
from .backend import Fill
from .cache import Hit, IdentityCache, Observation
from .keys import coercer_for, normalise
from .models import CachedModel

T = TypeVar("T")

_IN_CHUNK = 500


class CachingSessionMixin(_orm.IdentityLookupHooks):
    """Adds the cache to a :class:`~sqlalchemy.orm.Session` subclass: ``cache=`` at construction.

    A session without a cache (``cache=None``) behaves exactly like its base class.
    """

    cache: IdentityCache | None

    def __init__(self, *args: Any, cache: IdentityCache | None = None, **kwargs: Any) -> None:
        self.cache = cache
        self._sa_cache_tx = tracking.TransactionChanges()
        self._sa_cache_pending: dict[Any, Observation] = {}
        self._sa_cache_batch: list[tuple[CachedModel, Fill]] | None = None
        self._sa_cache_current: Any = None
        super().__init__(*args, **kwargs)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, Session) and not any(
            "_sa_cache_listening" in vars(base) for base in cls.__mro__[1:]
        ):
            cls._sa_cache_listening = True
            tracking.listen(cls)

    # -- lookups ------------------------------------------------------------------------------

    def _cacheable(
        self, mapper: Mapper[Any], identity_token: Any, execution_options: Any
    ) -> CachedModel | None:
        cache = self.cache
        if cache is None:
            return None
        model = cache._models.get(mapper.base_mapper)
        if (
            model is None
            or self._sa_cache_tx.bulk_models
            and model in self._sa_cache_tx.bulk_models
        ):
            return None
        if execution_options.get("populate_existing") or _orm.session_populates_existing(self):
            return None
        if identity_token is not None and type(identity_token) not in (str, int):
            return None
        return model

    def cache_lookup(
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any,
        execution_options: Any,
    ) -> Any:
        model = self._cacheable(mapper, identity_token, execution_options)
        if model is None:
            return None
        pk = model.normalise(primary_key_identity)
        if pk is None:
            return None  # SQLAlchemy's own answer for a value we cannot coerce
        if pk != tuple(primary_key_identity):
            found = self.identity_map_lookup(mapper, pk, identity_token)
            if found is not None:
                return found
        self._sa_cache_lookup_pk = pk
        key = model.keys.row_key(pk, identity_token)
        if key in self._sa_cache_tx.keys:
            return None  # this transaction wrote the row: read our own write from the database
        cache = self.cache
        assert cache is not None
        answer = self._read_and_place(model, mapper, [(key, pk, identity_token)])[0]
        if answer is None:
            identity_key = mapper.identity_key_from_primary_key(pk, identity_token)
            if identity_key in self._sa_cache_pending:
                self._sa_cache_current = identity_key
                if cache.lease_wait > 0:
                    return self._lease_or_wait(model, mapper, pk, identity_key)
        return answer

    def lookup_done(self) -> None:
        """A ``get`` ended: drop its observation if no load consumed it (the load raised, or
        loaded nothing cacheable), releasing its lease so waiters need not time out."""
        identity_key, self._sa_cache_current = self._sa_cache_current, None
        if identity_key is None:
            return
        observation = self._sa_cache_pending.pop(identity_key, None)
        if observation is not None and observation.leased and self.cache is not None:
            self.cache.fill([], [self.cache.lease_key(observation.key)])

    def _lease_or_wait(
        self, model: CachedModel, mapper: Mapper[Any], pk: tuple[Any, ...], identity_key: Any
    ) -> Any:
        """After a miss: take the row's lease and load it, or wait for the caller who has it.

        Taking the lease re-reads the row in the same round trip, so a caller whose miss came
        just before another caller's fill is answered by that fill, not by a second load."""
        cache = self.cache
        assert cache is not None
        observation = self._sa_cache_pending[identity_key]
        lease = cache.acquire_lease(model, observation.key)
        if lease is None:
            return None  # the store failed: load (the fill will most likely fail too)
        acquired, generation, raw = lease
        if generation is not None and (raw, generation) != (
            observation.raw,
            observation.generation,
        ):
            outcome = cache.classify(model, observation.key, generation, raw, pk)
            if outcome is not None:
                del self._sa_cache_pending[identity_key]
                if acquired:
                    cache.fill([], [cache.lease_key(observation.key)])
                model.stats.misses -= 1  # answered from the cache after all
                model.stats.hits += 1
                return self._place(outcome, mapper, identity_key)
            observation = observation._replace(
                raw=raw, generation=generation, observed_at=time.monotonic()
            )
        if acquired:
            self._sa_cache_pending[identity_key] = observation._replace(leased=True)
            return None
        self._sa_cache_pending[identity_key] = observation
        return self._wait_for_fill(model, mapper, pk, identity_key)

    def _wait_for_fill(
        self, model: CachedModel, mapper: Mapper[Any], pk: tuple[Any, ...], identity_key: Any
    ) -> Any:
        """Another caller holds the lease on this row and is loading it: poll the cache for its
        fill. If the lease goes away without a fill, try to take it; if the wait times out, read
        the database without filling (the thundering herd costs one load, not one per caller)."""
        cache = self.cache
        assert cache is not None
        observation = self._sa_cache_pending[identity_key]
        key, lease_key = observation.key, cache.lease_key(observation.key)
        deadline = time.monotonic() + cache.lease_wait
        delay = 0.001
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.025)
            read = cache.read([model], [key, lease_key])
            if read is None:
                break
            generations, (raw, lease) = read
            outcome = cache.classify(model, key, generations[model], raw, pk)
            if outcome is not None:
                del self._sa_cache_pending[identity_key]
                model.stats.misses -= 1  # answered from the cache after all
                model.stats.hits += 1
                return self._place(outcome, mapper, identity_key)
            if lease is None:  # released without a fill: take it over
                self._sa_cache_pending[identity_key] = observation._replace(
                    raw=raw, generation=generations[model], observed_at=time.monotonic()
                )
                return self._lease_or_wait(model, mapper, pk, identity_key)
        self._sa_cache_pending.pop(identity_key, None)  # timed out: load without filling
        return None

    def _place(self, outcome: Hit | str, mapper: Mapper[Any], identity_key: Any) -> Any:
        """The session's answer for a cache hit: the instance, or :data:`_orm.KNOWN_ABSENT`."""
        if type(outcome) is Hit:
            shape = outcome.shape
            if not shape.mapper.isa(mapper):
                return _orm.KNOWN_ABSENT  # a row of another class: SQLAlchemy answers None
            return _orm.place_in_session(
                self,  # type: ignore[arg-type]
                shape.mapper,
                identity_key,
                outcome.values,
                shape.expire_on_hit,
            )
        return _orm.KNOWN_ABSENT

    def _read_and_place(
        self,
        model: CachedModel,
        mapper: Mapper[Any],
        wanted: Sequence[tuple[str, tuple[Any, ...], Any]],
    ) -> list[Any]:
        """Read ``wanted`` (key, pk, token) in one round trip; place hits in the session.

        Returns, per row, the instance, :data:`_orm.KNOWN_ABSENT`, or None for a miss (the miss is
        remembered so the row loaded next can be written back)."""
        cache = self.cache
        assert cache is not None
        now = time.monotonic()
        read = cache.read([model], [key for key, _, _ in wanted])
        if read is None:
            return [None] * len(wanted)
        generations, raws = read
        generation = generations[model]
        may_fill: bool | None = None  # decided at the first miss: hits need none of this
        negative_ok = False
        answers: list[Any] = []
        stats = model.stats
        for (key, pk, token), raw in zip(wanted, raws, strict=True):
            outcome = cache.classify(model, key, generation, raw, pk)
            identity_key = mapper.identity_key_from_primary_key(pk, token)
            if outcome is not None:
                stats.hits += 1
                answers.append(self._place(outcome, mapper, identity_key))
                continue
            stats.misses += 1
            if may_fill is None:
                may_fill = not self._sa_cache_tx.wrote and _orm.next_load_sees_fresh_snapshot(
                    self  # type: ignore[arg-type]
                )
                negative_ok = mapper is model.base_mapper and (
                    not model.string_pk or self._exact_string_comparison(mapper)
                )
            if may_fill:
                self._sa_cache_pending[identity_key] = Observation(
                    model, key, raw, generation, now, negative_ok
                )
            answers.append(None)
        return answers

    def _exact_string_comparison(self, mapper: Mapper[Any]) -> bool:
        """Whether the database compares string keys exactly. MySQL/MariaDB (and SQL Server)
        collations are case- and trailing-space-insensitive by default: ``get(M, "ACME")`` may
        find the row stored as "acme", so an absence cached under "ACME" would outlive the
        insert of "acme", which evicts only its own key. No negative caching there."""
        dialect = self.get_bind(mapper=mapper).dialect.name  # type: ignore[attr-defined]
        return dialect in ("postgresql", "sqlite", "oracle")

    def loaded_nothing(self, mapper: Mapper[Any], primary_key_identity: Any) -> None:
        """A ``get`` went to the database and found no row: remember that (negative caching)."""
        model = self.cache._models.get(mapper.base_mapper) if self.cache else None
        if model is None:
            return
        pk = model.normalise(primary_key_identity)
        if pk is None:
            return
        observation = self._sa_cache_pending.pop(mapper.identity_key_from_primary_key(pk), None)
        if observation is not None and self.cache is not None:
            self._write_back(self._absent_fills([observation]), observation)

    def _write_back(
        self, fills: list[tuple[CachedModel, Fill]], observation: Observation | None = None
    ) -> None:
        """Apply fills in one round trip, releasing the lease the observation held, if any."""
        cache = self.cache
        assert cache is not None
        release = [cache.lease_key(observation.key)] if observation and observation.leased else []
        if fills or release:
            cache.fill(fills, release)

    def _absent_fills(self, observations: Iterable[Observation]) -> list[tuple[CachedModel, Fill]]:
        cache = self.cache
        if cache is None or self._sa_cache_tx.wrote:
            return []
        fills = []
        for observation in observations:
            if observation.negative_ok:
                fill = cache.absent_fill(observation)
                if fill is not None:
                    fills.append((observation.model, fill))
        return fills

    def fill_from_load(self, state: InstanceState[Any]) -> None:
        """Called for every instance a query loads: write it back if a miss was waiting for it."""
        observation = self._sa_cache_pending.pop(state.key, None)
        if observation is None or self.cache is None:
            return
        model = observation.model
        fill = None
        if not self._sa_cache_tx.wrote:
            fill = self.cache.row_fill(observation, model.shape(state.mapper), state.dict)
        if self._sa_cache_batch is not None:
            if fill is not None:
                self._sa_cache_batch.append((model, fill))
        else:
            self._write_back([] if fill is None else [(model, fill)], observation)

    # -- legacy bulk methods ----------------------------------------------------------------------

    def bulk_save_objects(self, objects: Iterable[object], *args: Any, **kwargs: Any) -> None:
        """As :meth:`Session.bulk_save_objects`; its rows are evicted when the transaction
        commits (the method writes below the events a flush fires)."""
        objects = list(objects)
        tracking.bulk_objects(self, objects)  # type: ignore[arg-type]
        super().bulk_save_objects(objects, *args, **kwargs)  # type: ignore[misc]

    def bulk_insert_mappings(
        self, mapper: Any, mappings: Iterable[dict[str, Any]], *args: Any, **kwargs: Any
    ) -> None:
        """As :meth:`Session.bulk_insert_mappings`, with eviction at commit."""
        mappings = list(mappings)
        self._bulk_mappings(mapper, mappings)
        super().bulk_insert_mappings(mapper, mappings, *args, **kwargs)  # type: ignore[misc]

    def bulk_update_mappings(
        self, mapper: Any, mappings: Iterable[dict[str, Any]], *args: Any, **kwargs: Any
    ) -> None:
        """As :meth:`Session.bulk_update_mappings`, with eviction at commit."""
        mappings = list(mappings)
        self._bulk_mappings(mapper, mappings)
        super().bulk_update_mappings(mapper, mappings, *args, **kwargs)  # type: ignore[misc]

    def _bulk_mappings(self, mapper: Any, mappings: list[dict[str, Any]]) -> None:
        target = inspect(mapper, raiseerr=False)
        if isinstance(target, Mapper):  # anything else: SQLAlchemy's own error follows
            tracking.bulk_mappings(self, target, mappings)  # type: ignore[arg-type]

    # -- get_many -------------------------------------------------------------------------------

    def get_many(self, entity: type[T], pks: Iterable[Any]) -> list[T | None]:
        """Instances for ``pks`` in input order (None where no row exists), with at most one
        cache round trip and one SELECT per 500 missing rows, however many are asked for."""
        mapper = inspect(entity)
        if not isinstance(mapper, Mapper):
            raise TypeError(f"{entity!r} is not a mapped class")
        if isinstance(pks, str | bytes):
            raise TypeError("get_many takes an iterable of primary keys, not one string")
        given = list(pks)
        idents = [tuple(pk) if isinstance(pk, tuple | list) else (pk,) for pk in given]
        results: list[Any] = [None] * len(idents)
        model = self._cacheable(mapper, None, {})
        coercers = model.coercers if model else tuple(coercer_for(c) for c in mapper.primary_key)
        missing: dict[tuple[Any, ...], list[int]] = {}
        for index, ident in enumerate(idents):
            pk = normalise(coercers, ident)
            if pk is None:  # as the caller spelled it: a dict names its columns
                results[index] = self.get(entity, given[index])  # type: ignore[attr-defined]
                continue
            if pk in missing:
                missing[pk].append(index)
                continue
            found = self.identity_map_lookup(mapper, pk)
            if found is not None:
                results[index] = found if isinstance(found, mapper.class_) else None
            else:
                missing[pk] = [index]
        if model is not None and missing:
            self._get_many_from_cache(model, mapper, missing, results)
        if missing:
            self._get_many_from_database(model, mapper, missing, results)
        return results

    def _get_many_from_cache(
        self,
        model: CachedModel,
        mapper: Mapper[Any],
        missing: dict[tuple[Any, ...], list[int]],
        results: list[Any],
    ) -> None:
        written = self._sa_cache_tx.keys
        wanted = [
            (key, pk, None) for pk in missing if (key := model.keys.row_key(pk)) not in written
        ]
        if not wanted:
            return
        answers = self._read_and_place(model, mapper, wanted)
        for (_, pk, _), answer in zip(wanted, answers, strict=True):
            if answer is None:
                continue
            for index in missing.pop(pk):
                results[index] = None if answer is _orm.KNOWN_ABSENT else answer

    def _get_many_from_database(
        self,
        model: CachedModel | None,
        mapper: Mapper[Any],
        missing: dict[tuple[Any, ...], list[int]],
        results: list[Any],
    ) -> None:
        pk_columns = mapper.primary_key
        found: dict[tuple[Any, ...], Any] = {}
        self._sa_cache_batch = []
        try:
            pks = list(missing)
            for start in range(0, len(pks), _IN_CHUNK):
                chunk = pks[start : start + _IN_CHUNK]
                if len(pk_columns) == 1:
                    criteria = pk_columns[0].in_([pk[0] for pk in chunk])
                else:
                    criteria = tuple_(*pk_columns).in_(chunk)
                for instance in self.execute(select(mapper).where(criteria)).scalars():  # type: ignore[attr-defined]
                    found[inspect(instance).identity] = instance
            batch = self._sa_cache_batch
        finally:
            self._sa_cache_batch = None
        absent = []
        for pk, indices in missing.items():
            instance = found.get(pk)
            for index in indices:
                results[index] = instance
            observation = self._sa_cache_pending.pop(
                mapper.identity_key_from_primary_key(pk),
                None,
            )
            if instance is None and observation is not None:
                absent.append(observation)
        fills = batch + self._absent_fills(absent)
        if fills:
            self._write_back(fills)  # every write-back of this call in one round trip


class CachingSession(CachingSessionMixin, Session):  # type: ignore[misc]
    """A :class:`~sqlalchemy.orm.Session` whose primary-key lookups go through an
    :class:`~sa_cache.IdentityCache`: ``sessionmaker(engine, class_=CachingSession, cache=c)``."""

    def __init__(self, *args: Any, cache: IdentityCache | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("query_cls", CachingQuery)
        super().__init__(*args, cache=cache, **kwargs)


class CachingQuery(Query[T]):
    """The legacy Query with ``get_many``. ``Query.get`` needs nothing more: it reaches the cache
    through the session's identity lookup. Flask-SQLAlchemy users pass it as ``query_class``."""

    def get_many(self, pks: Iterable[Any]) -> list[T | None]:
        session = self.session
        if not isinstance(session, CachingSessionMixin):
            raise TypeError("get_many needs a session with CachingSessionMixin")
        entity = self.column_descriptions[0]["entity"]
        return session.get_many(entity, pks)


def _on_load(state: InstanceState[Any], context: Any) -> None:
    if context is None:  # placed by the cache itself
        return
    session = context.session
    if isinstance(session, CachingSessionMixin) and session._sa_cache_pending:
        session.fill_from_load(state)


def listen_for_loads(cls: type[Any]) -> None:
    if not event.contains(cls, "load", _on_load):
        event.listen(cls, "load", _on_load, propagate=True, raw=True)
