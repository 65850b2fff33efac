"""A store behind the guards every store call needs, applied in one place.

:class:`GuardedStore` wraps any :class:`~sa_cache.store.Store` with:

- the **circuit breaker** (:mod:`sa_cache.breaker`): while it is open, calls are not sent and
  the lookup goes to the database. A store partitioned into failure domains
  (``Capabilities.domains``: a Redis Cluster's primaries) gets one breaker per domain, so a
  failed node costs only the keys it serves: a key whose domain is refused, or whose eviction
  (or its kind's) is journaled, reads as a miss that does not fill, while every other key hits;
- **error handling and health logging**: a store error is counted (per kind and in total) and
  never raised to the application; the first error of an outage and the recovery are logged once,
  with credentials redacted;
- the **eviction journal**: evictions that could not be written are kept and written before the
  next read, so a row changed during an outage is never served from an entry older than it; past
  :attr:`GuardedStore.journal_limit` keys, the kinds' generations are replaced instead. Other
  processes read the shared store without that replay, so the journal is also **delivered**: a
  daemon thread ("sa_cache-journal") writes it as soon as the breaker lets a probe through,
  whether or not this process reads again, and at interpreter exit a bounded flush tries once
  more and logs one ERROR line naming the models whose evictions never reached the store;
- the dogpile region's **key mangler**;
- **signing** (:mod:`sa_cache.signing`): values are sealed on the way in and opened on the way
  out; an entry with a bad signature reads as bytes no entry decodes from (a ``rejected`` miss).

Callers (:mod:`sa_cache.lookup`, :class:`sa_cache.IdentityCache`) speak in unmangled keys and
unsigned payloads; the store underneath sees only mangled keys and stored bytes.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from typing import Any, Final, TypeVar, cast

from . import codec
from .breaker import CircuitBreaker
from .errors import describe_error
from .forecast import MissForecast
from .kinds import CachedKind
from .protocol import GENERATION_TTL, eviction_writes, hold_writes
from .signing import Signer
from .store import Clock, DomainFailure, DomainStore, Fill, Release, Store, Write

log = logging.getLogger("sa_cache")

R = TypeVar("R")

#: Evictions kept for replay while the store is unreachable; past this, generations are replaced.
JOURNAL_LIMIT: Final = 10_000
#: Seconds the journal's delivery waits after a failed attempt, doubling up to the breaker's
#: cooldown (at least :data:`DELIVERY_BACKOFF_CAP_FLOOR`, so a zero cooldown never spins).
DELIVERY_FIRST_BACKOFF: Final = 0.05
DELIVERY_BACKOFF_CAP_FLOOR: Final = 0.5
#: Seconds the flush at interpreter exit keeps trying to deliver the journal.
EXIT_FLUSH_TIMEOUT: Final = 5.0
#: Random bytes in a lease's owner token.
LEASE_TOKEN_BYTES: Final = 8
#: Seconds between two log lines about entries with bad signatures.
FORGERY_LOG_INTERVAL: Final = 60.0
#: What an entry with a bad signature reads as: bytes that decode to no entry.
_UNTRUSTED: Final = b""
#: What a key of a failed domain, or with an eviction still journaled, reads as: a hold, a miss
#: that no one fills over (:func:`sa_cache.protocol.may_fill_over`).
_UNREADABLE: Final = codec.new_hold()


class _Unavailable:
    """Returned by a guarded call that was not made (breaker open) or failed."""


UNAVAILABLE: Final = _Unavailable()


class GuardedStore:
    """See the module docstring. ``tombstone_ttl`` is how long an eviction marker lives."""

    def __init__(
        self,
        store: Store,
        *,
        breaker: CircuitBreaker,
        tombstone_ttl: float,
        mangle: Callable[[str], str] | None = None,
        signer: Signer | None = None,
        exit_flush_timeout: float = EXIT_FLUSH_TIMEOUT,
    ) -> None:
        self.store = store
        self.breaker = breaker
        self.tombstone_ttl = tombstone_ttl
        self._mangle = mangle
        self._signer = signer
        self.errors = 0
        self.bypassed = 0
        self.journal_limit = JOURNAL_LIMIT
        self._healthy = True
        self._lock = threading.Lock()
        self._journal: dict[str, CachedKind] = {}
        self._journal_kinds: set[CachedKind] = set()
        self._journal_writes = 0  # bumped by every journaling: a replay forgets only what it sent
        self.exit_flush_timeout = exit_flush_timeout
        #: How the delivery thread waits ``seconds`` before its next attempt (tests hold it).
        self.delivery_wait: Callable[[float], object] = time.sleep
        self._delivery: threading.Thread | None = None  # the running "sa_cache-journal" thread
        self._process_hooks = False  # the at-fork and at-exit hooks are registered
        self._forgery_logged_at = -FORGERY_LOG_INTERVAL
        #: one breaker per failure domain of a store declaring ``capabilities.domains``
        self.domain_breakers: dict[Hashable, CircuitBreaker] = {}
        self._failed_domains: set[Hashable] = set()  # logged as unavailable, not yet as back
        #: which reads will most likely miss (told of every eviction written here)
        self.forecast = MissForecast()

    # -- the one guard around every store call ----------------------------------------------------

    def _call(
        self,
        who: Collection[CachedKind],
        operation: Callable[..., R],
        *args: Any,
        force: bool = False,
    ) -> R | _Unavailable:
        """``force``: send even while the breaker is open (a caller that chose to wait)."""
        if not force and not self.breaker.allow():
            self.bypassed += 1
            return UNAVAILABLE
        try:
            result = operation(*args)
        except Exception as exc:
            self._failed(exc, who)
            return UNAVAILABLE
        self.breaker.succeeded()
        if not self._healthy:
            self._healthy = True
            log.warning("sa_cache: cache backend available again")
        return result

    def _failed(
        self,
        exc: BaseException,
        who: Collection[CachedKind],
        breakers: Iterable[CircuitBreaker] | None = None,
    ) -> None:
        """Count a store error; log the first of an outage only (for a store of failure
        domains, :meth:`_domains_failed` logs per domain)."""
        self.errors += 1
        for breaker in (self.breaker,) if breakers is None else breakers:
            breaker.failed(exc)
        for kind in set(who):
            kind.stats.errors += 1
        if self._healthy and breakers is None:
            self._healthy = False
            log.warning(
                "sa_cache: cache backend unavailable, serving from the database (%s)",
                describe_error(exc),
            )

    # -- failure domains: one breaker each ------------------------------------------------------

    def _domain_store(self) -> DomainStore | None:
        store = self.store
        return cast(DomainStore, store) if store.capabilities.domains else None

    def breaker_for(self, domain: Hashable) -> CircuitBreaker:
        """The breaker of ``domain``, made on first use with the store breaker's settings."""
        breaker = self.domain_breakers.get(domain)
        if breaker is None:
            with self._lock:
                breaker = self.domain_breakers.setdefault(
                    domain, CircuitBreaker(self.breaker.threshold, self.breaker.cooldown)
                )
        return breaker

    def _allowed(self, domains: Iterable[Hashable], force: bool) -> dict[Hashable, bool]:
        """Each domain's breaker asked once (a cooled-down breaker lets one probe through)."""
        allowed: dict[Hashable, bool] = {}
        for domain in domains:
            if domain not in allowed:
                allowed[domain] = force or self.breaker_for(domain).allow()
        return allowed

    def _call_domains(
        self,
        store: DomainStore,
        who: Collection[CachedKind],
        store_keys: Sequence[str],
        operation: Callable[[list[int]], Sequence[Any]],
        *,
        force: bool = False,
        whole: bool = False,
    ) -> list[Any]:
        """Run ``operation`` on the indexes of ``store_keys`` whose domain's breaker lets them
        through, and return per index its reply, or UNAVAILABLE where its domain was refused
        or failed. ``whole``: all or nothing (every domain is let through, or nothing is sent);
        ``operation`` then returns one reply, the first of the list returned."""
        domains = [store.domain_of(key) for key in store_keys]
        allowed = self._allowed(domains, force)
        results: list[Any] = [UNAVAILABLE] * len(store_keys)
        if whole and not all(allowed.values()):
            for domain in allowed:
                if allowed[domain]:
                    self.breaker_for(domain).cancel_probe()
            self.bypassed += 1
            return results
        sent = [i for i, domain in enumerate(domains) if allowed[domain]]
        if len(sent) < len(store_keys):
            self.bypassed += 1
        if not sent:
            return results
        involved = {domains[i] for i in sent}
        try:
            replies = operation(sent)
        except DomainFailure as failure:
            if len(failure.results) != len(sent):  # a wrapper that did not map its indexes
                self._domains_failed({d: failure for d in involved}, involved, who)
                return results
            failed = {domains[sent[at]] for at in failure.failed} | set(failure.errors)
            self._domains_failed(failure.errors, failed, who)
            self._domains_succeeded(involved - failed)
            for at, index in enumerate(sent):
                if at not in failure.failed and not whole:
                    results[index] = failure.results[at]
            return results
        except Exception as exc:
            self._domains_failed(dict.fromkeys(involved, exc), involved, who)
            return results
        self._domains_succeeded(involved)
        if whole:
            return [replies[0]]
        for at, index in enumerate(sent):
            results[index] = replies[at]
        return results

    def _domains_failed(
        self,
        errors: dict[Hashable, BaseException],
        failed: Collection[Hashable],
        who: Collection[CachedKind],
    ) -> None:
        """Count the error once, fail each domain's breaker, and log each domain's first
        failure of an outage (by its name: a node's address, never credentials)."""
        first = next(iter(errors.values()))
        self._failed(first, who, [self.breaker_for(domain) for domain in failed])
        for domain in failed:
            if domain not in self._failed_domains:
                self._failed_domains.add(domain)
                log.warning(
                    "sa_cache: cache backend %s unavailable, serving its keys from the database"
                    " (%s)",
                    domain,
                    describe_error(errors.get(domain, first)),
                )

    def _domains_succeeded(self, domains: Collection[Hashable]) -> None:
        for domain in domains:
            self.breaker_for(domain).succeeded()
            if domain in self._failed_domains:
                self._failed_domains.discard(domain)
                log.warning("sa_cache: cache backend %s available again", domain)

    def _journaled(self, key: str, kind: CachedKind) -> bool:
        return key in self._journal or kind in self._journal_kinds

    def _retry_in(self) -> float:
        """Seconds until some breaker that refuses now lets a probe through."""
        if self._domain_store() is None:
            return self.breaker.retry_in()
        waits = [b.retry_in() for b in list(self.domain_breakers.values()) if b.is_open]
        return min(waits, default=0.0)

    # -- keys and signatures -----------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return key if self._mangle is None else self._mangle(key)

    def _seal(self, key: str, value: bytes, ttl: float | None) -> bytes:
        return value if self._signer is None else self._signer.sign(key, value, ttl)

    def _open(self, keys: Sequence[str], stored: list[bytes | None]) -> list[bytes | None]:
        if self._signer is None:
            return stored
        opened: list[bytes | None] = []  # only with a signer: _read skips this otherwise
        for key, value in zip(keys, stored, strict=True):
            if value is None:
                opened.append(None)
                continue
            payload = self._signer.verify(key, value)
            if payload is None:
                self._forgery(key)
                payload = _UNTRUSTED
            opened.append(payload)
        return opened

    def _forgery(self, key: str) -> None:
        now = time.monotonic()
        if now - self._forgery_logged_at >= FORGERY_LOG_INTERVAL:
            self._forgery_logged_at = now
            log.warning("sa_cache: rejected an entry with a bad or missing signature at %s", key)

    # -- operations ----------------------------------------------------------------------------

    def read(
        self, kinds: Sequence[CachedKind], keys: Sequence[str]
    ) -> tuple[list[bytes], list[bytes | None], list[bytes | None]] | None:
        """The generations of ``kinds`` and, for ``keys``, the stored bytes and their opened
        payloads, in one round trip (two the first time a generation is created). None if the
        store is unavailable."""
        store = self.store  # _domain_store(), inline: every hit passes here
        if store.capabilities.domains:
            return self._read_domains(cast(DomainStore, store), kinds, keys)
        if (self._journal or self._journal_kinds) and not self._replay_journal():
            self._ensure_delivery()  # a forked child restarts the delivery it did not inherit
            return None
        read = self._call(kinds, self._read, kinds, keys)
        return None if read is UNAVAILABLE else read  # type: ignore[return-value]

    def _read(
        self, kinds: Sequence[CachedKind], keys: Sequence[str]
    ) -> tuple[list[bytes], list[bytes | None], list[bytes | None]]:
        count = len(kinds)
        gen_keys = [kind.keys.generation_key for kind in kinds]
        store_keys = gen_keys + list(keys)
        if self._mangle is not None:  # the hit path of most applications skips this
            store_keys = [self._mangle(key) for key in store_keys]
            gen_keys = store_keys[:count]
        values = self.store.get_many(store_keys)
        generations: list[Any] = values[:count]
        if None in generations:  # a kind's first read: its generation is created first
            generations = list(generations)
            for i, value in enumerate(generations):
                if value is None:
                    generations[i] = self.store.init_generation(
                        gen_keys[i], codec.new_generation(), GENERATION_TTL
                    )
        stored = values[count:]
        return generations, stored, stored if self._signer is None else self._open(keys, stored)

    def _read_domains(
        self, store: DomainStore, kinds: Sequence[CachedKind], keys: Sequence[str]
    ) -> tuple[list[bytes], list[bytes | None], list[bytes | None]] | None:
        """:meth:`read` on a store of failure domains: the journal is written where it can be,
        a key still journaled or of a refused or failed domain reads as a hold (a miss no one
        fills), and only a kind's generation that cannot be read (or is journaled) makes the
        whole read unavailable."""
        if (self._journal or self._journal_kinds) and not self._replay_journal():
            self._ensure_delivery()  # a forked child restarts the delivery it did not inherit
        if any(kind in self._journal_kinds for kind in kinds):
            return None
        gen_keys = [self._k(kind.keys.generation_key) for kind in kinds]
        store_keys = [*gen_keys, *(self._k(key) for key in keys)]
        values = self._call_domains(
            store, kinds, store_keys, lambda sent: store.get_many([store_keys[i] for i in sent])
        )
        generations: list[bytes] = []
        for kind, gen_key, value in zip(kinds, gen_keys, values, strict=False):
            if value is None:
                value = self._call_domains(
                    store, (kind,), [gen_key], functools.partial(self._new_generation, gen_key)
                )[0]
            if value is UNAVAILABLE:
                return None
            generations.append(value)
        stored: list[bytes | None] = []
        readable: list[bytes | None] = []
        for key, value in zip(keys, values[len(kinds) :], strict=True):
            if value is UNAVAILABLE or key in self._journal:
                stored.append(_UNREADABLE)
            else:
                stored.append(value)
                readable.append(value)
        if self._signer is None:
            return generations, stored, stored
        read_keys = [k for k, value in zip(keys, stored, strict=True) if value is not _UNREADABLE]
        opened = iter(self._open(read_keys, readable))
        return generations, stored, [v if v is _UNREADABLE else next(opened) for v in stored]

    def _new_generation(self, gen_key: str, _: object = None) -> list[bytes]:
        return [self.store.init_generation(gen_key, codec.new_generation(), GENERATION_TTL)]

    def expects_miss(self, kind: CachedKind, key: str) -> bool:
        """Whether a read of ``key`` should take its lease along (see
        :mod:`sa_cache.forecast`): never while the journal waits, which only :meth:`read`
        replays before reading."""
        return self._journal_empty() and self.forecast.expects_miss(kind, key)

    def acquire(
        self,
        kind: CachedKind,
        key: str,
        lease_key: str,
        ttl: float,
        timed: bool = False,
        ttls: bool = False,
    ) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None, Clock | None] | None:
        """Take the lease ``lease_key`` unless someone holds it, and read ``key`` and its kind's
        generation again, in one round trip: (the lease's owner token if this call took it,
        generation, stored, payload, clock), or None if the store is unavailable. ``timed``:
        read the store's :class:`~sa_cache.store.Clock` too, where the store has one
        (``capabilities.clock``; otherwise clock is None), with ``ttls`` the generation's
        remaining TTL and then the key's. None too while an eviction of the key or its kind is
        journaled: the fill would compare against a value the eviction has not replaced."""
        if self._journaled(key, kind):
            return None
        token = os.urandom(LEASE_TOKEN_BYTES)
        read = [self._k(kind.keys.generation_key), self._k(key)]
        clock = None
        domain_store = self._domain_store()
        if domain_store is not None:
            taken = self._call_domains(
                domain_store,
                (kind,),
                [self._k(lease_key), *read],
                lambda _: [domain_store.acquire(self._k(lease_key), token, ttl, read)],
                whole=True,
            )[0]
            if taken is UNAVAILABLE:
                return None
            acquired, (generation, stored) = taken
        elif timed and self.store.capabilities.clock:
            timed_result = self._call(
                (kind,), self.store.acquire_timed, self._k(lease_key), token, ttl, read, ttls
            )
            if isinstance(timed_result, _Unavailable):
                return None
            acquired, (generation, stored), clock = timed_result
        else:
            result = self._call((kind,), self.store.acquire, self._k(lease_key), token, ttl, read)
            if isinstance(result, _Unavailable):
                return None
            acquired, (generation, stored) = result
        owned = token if acquired else None
        return owned, generation, stored, self._open([key], [stored])[0], clock

    def date_generation(self, kind: CachedKind, generation: bytes) -> None:
        """Give ``kind``'s generation its TTL if it still holds ``generation``: a compare-and-set
        of the same token, so a generation replaced meanwhile is left alone. From then on its
        write time reads as the time of this call, later than its true one: safe for the proof
        of later fills, which only trusts values written early enough."""
        gen_key = self._k(kind.keys.generation_key)
        fills = [Fill(gen_key, generation, generation, GENERATION_TTL)]
        domain_store = self._domain_store()
        if domain_store is not None:
            self._call_domains(
                domain_store, (kind,), [gen_key], lambda _: domain_store.fill_many(fills)
            )
            return
        self._call((kind,), self.store.fill_many, fills)

    def fill(
        self, fills: Sequence[tuple[CachedKind, Fill]], release: Sequence[Release] = ()
    ) -> None:
        """Apply conditional fills and release leases (only if still the caller's) in one round
        trip; failures are counted, never raised. A fill whose key or kind has an eviction
        journaled is dropped: it compares against a value that eviction has not replaced yet."""
        if self._journal or self._journal_kinds:
            fills = [(kind, f) for kind, f in fills if not self._journaled(f.key, kind)]
        sealed = [
            Fill(self._k(f.key), f.expected, self._seal(f.key, f.value, f.ttl), f.ttl)
            for _, f in fills
        ]
        releases = [Release(self._k(key), token) for key, token in release]
        domain_store = self._domain_store()
        if domain_store is not None:
            if not sealed and not releases:
                return
            store_keys = [f.key for f in sealed] + [r.key for r in releases]
            n = len(sealed)

            def fill_and_release(sent: list[int]) -> list[Any]:
                filled = domain_store.fill_many(
                    [sealed[i] for i in sent if i < n], [releases[i - n] for i in sent if i >= n]
                )
                return [*filled, *(None for i in sent if i >= n)]

            replies = self._call_domains(
                domain_store, [kind for kind, _ in fills], store_keys, fill_and_release
            )
            stored: Any = [reply is True for reply in replies[:n]]
        else:
            stored = self._call(
                [kind for kind, _ in fills], self.store.fill_many, sealed, releases
            )
            if isinstance(stored, _Unavailable):
                return
        for (kind, _), ok in zip(fills, stored, strict=True):
            if ok:
                kind.stats.fills += 1

    def hold(
        self, keys: dict[str, CachedKind], kinds: Collection[CachedKind], ttl: float
    ) -> bool:
        """Write holds for ``keys`` and held generations for ``kinds`` (see
        :func:`~sa_cache.protocol.hold_writes`), in one round trip; whether the store has them.
        Not journaled: the eviction that follows the commit is, and it is what must arrive."""
        holds, generations = hold_writes(keys, kinds, ttl)
        writes = [Write(self._k(w.key), self._seal(w.key, w.value, w.ttl), w.ttl) for w in holds]
        writes += [Write(self._k(w.key), w.value, w.ttl) for w in generations]
        who = list(keys.values()) + list(kinds)
        domain_store = self._domain_store()
        if domain_store is not None and writes:
            written = self._call_domains(
                domain_store,
                who,
                [w.key for w in writes],
                lambda sent: self._write_some(domain_store, writes, sent),
            )
            return UNAVAILABLE not in written
        return bool(writes) and self._call(who, self.store.write_many, writes) is not UNAVAILABLE

    @staticmethod
    def _write_some(store: Store, writes: Sequence[Write], sent: list[int]) -> list[bool]:
        store.write_many([writes[i] for i in sent])
        return [True] * len(sent)

    def evict(self, keys: dict[str, CachedKind], kinds: Collection[CachedKind] = ()) -> bool:
        """Tombstone ``keys`` and replace the generations of ``kinds``, in one round trip.
        Whether the store has them now; if not, they are journaled and written before the next
        read."""
        unwritten_keys, unwritten_kinds = self._write_evictions(keys, set(kinds))
        if unwritten_keys or unwritten_kinds:
            self._journal_evictions(unwritten_keys, unwritten_kinds)
            return False
        return True

    def _write_evictions(
        self, keys: dict[str, CachedKind], kinds: set[CachedKind], *, force: bool = False
    ) -> tuple[dict[str, CachedKind], set[CachedKind]]:
        """Write the evictions; return those not written (on a store of failure domains, those
        of the domains refused or failed; otherwise all or none)."""
        if not keys and not kinds:
            return {}, set()
        ordered_kinds = list(kinds)
        tombstones, generations = eviction_writes(keys, ordered_kinds, self.tombstone_ttl)
        writes = [
            Write(self._k(w.key), self._seal(w.key, w.value, w.ttl), w.ttl) for w in tombstones
        ]
        writes += [Write(self._k(w.key), w.value, w.ttl) for w in generations]
        who = list(keys.values()) + ordered_kinds
        domain_store = self._domain_store()
        if domain_store is None:
            if self._call(who, self.store.write_many, writes, force=force) is UNAVAILABLE:
                return keys, kinds
            written: list[Any] = [True] * len(writes)
        else:
            written = self._call_domains(
                domain_store,
                who,
                [w.key for w in writes],
                lambda sent: self._write_some(domain_store, writes, sent),
                force=force,
            )
        unwritten_keys: dict[str, CachedKind] = {}
        unwritten_kinds: set[CachedKind] = set()
        for (key, kind), ok in zip(keys.items(), written, strict=False):
            if ok is UNAVAILABLE:
                unwritten_keys[key] = kind
            else:
                kind.stats.evictions += 1
        for kind, ok in zip(ordered_kinds, written[len(keys) :], strict=True):
            if ok is UNAVAILABLE:
                unwritten_kinds.add(kind)
            else:
                kind.stats.evictions += 1
        self.forecast.evicted(keys)
        return unwritten_keys, unwritten_kinds

    def journal(self) -> tuple[dict[str, CachedKind], set[CachedKind]]:
        """The evictions waiting to be written: (keys, kinds whose generation is replaced)."""
        with self._lock:
            return dict(self._journal), set(self._journal_kinds)

    def _journal_evictions(self, keys: dict[str, CachedKind], kinds: set[CachedKind]) -> None:
        with self._lock:
            self._journal_writes += 1
            self._journal.update(keys)
            self._journal_kinds.update(kinds)
            if len(self._journal) > self.journal_limit:
                self._journal_kinds.update(self._journal.values())
                self._journal.clear()
        self._ensure_delivery()

    def _replay_journal(self, *, force: bool = False) -> bool:
        """Write the journal (on a store of failure domains, what its domains let through);
        forget what was written. Whether all of it was."""
        with self._lock:
            keys, kinds = dict(self._journal), set(self._journal_kinds)
            writes = self._journal_writes
        unwritten_keys, unwritten_kinds = self._write_evictions(keys, kinds, force=force)
        if len(unwritten_keys) == len(keys) and len(unwritten_kinds) == len(kinds):
            return not keys and not kinds
        with self._lock:
            if writes != self._journal_writes:
                # journaled again meanwhile (maybe the same keys): replay it all later
                return not unwritten_keys and not unwritten_kinds
            for key in keys:
                if key not in unwritten_keys:
                    self._journal.pop(key, None)
            self._journal_kinds.difference_update(kinds - unwritten_kinds)
        return not unwritten_keys and not unwritten_kinds

    # -- delivery: other processes never replay this journal, so it must reach the store -----------

    def _journal_empty(self) -> bool:
        return not self._journal and not self._journal_kinds

    def _ensure_delivery(self) -> None:
        """Start the delivery thread unless it runs: one per store, ending when the journal is
        empty; the next journaling starts another."""
        with self._lock:
            if self._delivery is not None or self._journal_empty():
                return
            if not self._process_hooks:
                self._process_hooks = True
                _register_process_hooks(weakref.ref(self))
            thread = threading.Thread(
                target=self._deliver_in_background,
                name="sa_cache-journal",
                daemon=True,
            )
            try:
                thread.start()
            except RuntimeError:  # interpreter shutdown: the flush at exit delivers instead
                return
            self._delivery = thread

    def _deliver_in_background(self) -> None:
        """The "sa_cache-journal" thread: wait (backing off up to the breaker's cooldown, and
        never less than the breaker's own wait, so each attempt is the probe it lets through),
        write the journal, until it is empty. It holds the store meanwhile: evictions not yet
        written are owed to every other process, so a cache dropped during an outage still
        delivers them, and its flush at exit still runs."""
        backoff = DELIVERY_FIRST_BACKOFF
        try:
            while not self._delivery_finished():
                self.delivery_wait(max(backoff, self._retry_in()))
                delivered = self._replay_journal()
                backoff = DELIVERY_FIRST_BACKOFF if delivered else self._backoff(backoff)
        except BaseException:  # the next journaling or read starts another thread
            with self._lock:
                if self._delivery is threading.current_thread():
                    self._delivery = None
            raise

    def _delivery_finished(self) -> bool:
        """Asked by the delivery thread before each attempt: whether it is done. The journal
        is checked and the thread forgotten under the lock journaling takes, so an eviction
        journaled meanwhile either sees the thread still running or starts a new one."""
        with self._lock:
            if self._delivery is not threading.current_thread():
                return True
            if self._journal_empty():
                self._delivery = None
                return True
            return False

    def _backoff(self, backoff: float) -> float:
        """The wait after another failed attempt: doubled, up to the breaker's cooldown."""
        return min(2 * backoff, max(self.breaker.cooldown, DELIVERY_BACKOFF_CAP_FLOOR))

    def deliver(self, timeout: float) -> bool:
        """Write the journal now, from this thread, trying again until it is written or
        ``timeout`` seconds have passed (an attempt under way may add one socket timeout).
        Not held back by an open breaker: the caller chose to wait. Whether the journal is
        empty."""
        deadline = time.monotonic() + timeout
        backoff = DELIVERY_FIRST_BACKOFF
        while True:
            if self._journal_empty():
                return True
            delivered = self._replay_journal(force=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._journal_empty()
            if not delivered:
                time.sleep(min(backoff, remaining))
                backoff = self._backoff(backoff)

    def _after_fork_in_child(self) -> None:
        """The parent's delivery thread does not exist here, and a lock some thread held at the
        fork (this store's, its breaker's) would never be released: forget them, keep the
        journal (the child's copy is as much owed to everyone else); the child's next journaling
        or read starts its own thread."""
        self._lock = threading.Lock()
        self._delivery = None
        self.breaker.after_fork()
        for breaker in self.domain_breakers.values():
            breaker.after_fork()

    def _flush_at_exit(self, timeout: float) -> None:
        """A last bounded delivery; if the journal is still not written, one ERROR line saying
        what stays stale for other processes (model names and counts: never keys or values)."""
        if self._journal_empty():
            return
        if self.exit_flush_timeout > 0 and self.deliver(max(timeout, 0.0)):
            return
        keys, kinds = self.journal()
        if not keys and not kinds:
            return
        log.error(
            "sa_cache: %d row eviction(s) (models: %s) and %d whole-model eviction(s) (%s) were "
            "not written to the cache backend before exit; other processes may serve those rows "
            "stale until their TTL unless they are evicted by hand "
            "(sa-cache evict MODEL PK..., or sa-cache flush)",
            len(keys),
            ", ".join(sorted({kind.name for kind in keys.values()})) or "none",
            len(kinds),
            ", ".join(sorted(kind.name for kind in kinds)) or "none",
        )

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (unmangled: a key mangler that rewrites prefixes hides
        keys from this); raises what the store raises, so the caller knows it failed."""
        return self.store.delete_prefix(prefix)


# -- the process hooks: each holds its store by a weak reference, so a cache that is dropped (its
# journal empty: the delivery thread holds it otherwise) is collected, and its hooks do nothing ---


#: When the first flush at exit began: every store's flush is bounded from that moment, so an
#: exit waits at most the largest ``exit_flush_timeout``, however many caches it has.
_exit_began: list[float] = []


def _flush_at_exit(ref: weakref.ref[GuardedStore]) -> None:
    store = ref()
    if store is None:
        return
    if not _exit_began:
        _exit_began.append(time.monotonic())
    store._flush_at_exit(_exit_began[0] + store.exit_flush_timeout - time.monotonic())


def _after_fork_in_child(ref: weakref.ref[GuardedStore]) -> None:
    store = ref()
    if store is not None:
        store._after_fork_in_child()


def _register_process_hooks(ref: weakref.ref[GuardedStore]) -> None:
    """Once per store, when it first journals."""
    atexit.register(_flush_at_exit, ref)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: _after_fork_in_child(ref))
