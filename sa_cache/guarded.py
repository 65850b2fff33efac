"""A store behind the guards every store call needs, applied in one place.

:class:`GuardedStore` wraps any :class:`~sa_cache.store.Store` with:

- the **circuit breaker** (:mod:`sa_cache.breaker`): while it is open, calls are not sent and
  the lookup goes to the database;
- **error handling and health logging**: a store error is counted (per kind and in total) and
  never raised to the application; the first error of an outage and the recovery are logged once,
  with credentials redacted;
- the **eviction journal**: evictions that could not be written are kept and written before the
  next read, so a row changed during an outage is never served from an entry older than it; past
  :attr:`GuardedStore.journal_limit` keys, the kinds' generations are replaced instead;
- the dogpile region's **key mangler**;
- **signing** (:mod:`sa_cache.signing`): values are sealed on the way in and opened on the way
  out; an entry with a bad signature reads as bytes no entry decodes from (a ``rejected`` miss).

Callers (:mod:`sa_cache.lookup`, :class:`sa_cache.IdentityCache`) speak in unmangled keys and
unsigned payloads; the store underneath sees only mangled keys and stored bytes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final, TypeVar

from . import codec
from .breaker import CircuitBreaker
from .errors import describe_error
from .kinds import CachedKind
from .protocol import eviction_writes
from .signing import Signer
from .store import Fill, Release, Store, Write

log = logging.getLogger("sa_cache")

R = TypeVar("R")

#: Evictions kept for replay while the store is unreachable; past this, generations are replaced.
JOURNAL_LIMIT: Final = 10_000
#: Random bytes in a lease's owner token.
LEASE_TOKEN_BYTES: Final = 8
#: Seconds between two log lines about entries with bad signatures.
FORGERY_LOG_INTERVAL: Final = 60.0
#: What an entry with a bad signature reads as: bytes that decode to no entry.
_UNTRUSTED: Final = b""


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
        self._forgery_logged_at = -FORGERY_LOG_INTERVAL

    # -- the one guard around every store call ----------------------------------------------------

    def _call(
        self, who: Collection[CachedKind], operation: Callable[..., R], *args: Any
    ) -> R | _Unavailable:
        if not self.breaker.allow():
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

    def _failed(self, exc: BaseException, who: Collection[CachedKind]) -> None:
        """Count a store error; log the first of an outage only."""
        self.errors += 1
        self.breaker.failed(exc)
        for kind in set(who):
            kind.stats.errors += 1
        if self._healthy:
            self._healthy = False
            log.warning(
                "sa_cache: cache backend unavailable, serving from the database (%s)",
                describe_error(exc),
            )

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
        if (self._journal or self._journal_kinds) and not self._replay_journal():
            return None
        read = self._call(kinds, self._read, kinds, keys)
        return None if read is UNAVAILABLE else read  # type: ignore[return-value]

    def _read(
        self, kinds: Sequence[CachedKind], keys: Sequence[str]
    ) -> tuple[list[bytes], list[bytes | None], list[bytes | None]]:
        gen_keys = [kind.keys.generation_key for kind in kinds]
        store_keys = [*gen_keys, *keys]
        if self._mangle is not None:  # the hit path of most applications skips this
            store_keys = [self._mangle(key) for key in store_keys]
            gen_keys = store_keys[: len(kinds)]
        values = self.store.get_many(store_keys)
        generations = []
        for gen_key, value in zip(gen_keys, values, strict=False):
            if value is None:
                value = self.store.init_generation(gen_key, codec.new_generation())
            generations.append(value)
        stored = values[len(kinds) :]
        return generations, stored, stored if self._signer is None else self._open(keys, stored)

    def acquire(
        self, kind: CachedKind, key: str, lease_key: str, ttl: float
    ) -> tuple[bytes | None, bytes | None, bytes | None, bytes | None] | None:
        """Take the lease ``lease_key`` unless someone holds it, and read ``key`` and its kind's
        generation again, in one round trip: (the lease's owner token if this call took it,
        generation, stored, payload), or None if the store is unavailable."""
        token = os.urandom(LEASE_TOKEN_BYTES)
        result = self._call(
            (kind,),
            self.store.acquire,
            self._k(lease_key),
            token,
            ttl,
            [self._k(kind.keys.generation_key), self._k(key)],
        )
        if result is UNAVAILABLE:
            return None
        acquired, (generation, stored) = result  # type: ignore[misc]
        owned = token if acquired else None
        return owned, generation, stored, self._open([key], [stored])[0]

    def fill(
        self, fills: Sequence[tuple[CachedKind, Fill]], release: Sequence[Release] = ()
    ) -> None:
        """Apply conditional fills and release leases (only if still the caller's) in one round
        trip; failures are counted, never raised."""
        sealed = [
            Fill(self._k(f.key), f.expected, self._seal(f.key, f.value, f.ttl), f.ttl)
            for _, f in fills
        ]
        stored = self._call(
            [kind for kind, _ in fills],
            self.store.fill_many,
            sealed,
            [Release(self._k(key), token) for key, token in release],
        )
        if isinstance(stored, _Unavailable):
            return
        for (kind, _), ok in zip(fills, stored, strict=True):
            if ok:
                kind.stats.fills += 1

    def evict(self, keys: dict[str, CachedKind], kinds: Collection[CachedKind] = ()) -> bool:
        """Tombstone ``keys`` and replace the generations of ``kinds``, in one round trip.
        Whether the store has them now; if not, they are journaled and written before the next
        read."""
        kinds = set(kinds)
        if not self._write_evictions(keys, kinds):
            self._journal_evictions(keys, kinds)
            return False
        return True

    def _write_evictions(self, keys: dict[str, CachedKind], kinds: set[CachedKind]) -> bool:
        if not keys and not kinds:
            return True
        tombstones, generations = eviction_writes(keys, kinds, self.tombstone_ttl)
        writes = [
            Write(self._k(w.key), self._seal(w.key, w.value, w.ttl), w.ttl) for w in tombstones
        ]
        writes += [Write(self._k(w.key), w.value, w.ttl) for w in generations]
        who = list(keys.values()) + list(kinds)
        if self._call(who, self.store.write_many, writes) is UNAVAILABLE:
            return False
        for kind in who:
            kind.stats.evictions += 1
        return True

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

    def _replay_journal(self) -> bool:
        with self._lock:
            keys, kinds = dict(self._journal), set(self._journal_kinds)
            writes = self._journal_writes
        if not self._write_evictions(keys, kinds):
            return False
        with self._lock:
            if writes != self._journal_writes:
                return True  # journaled again meanwhile (maybe the same keys): replay it all later
            for key in keys:
                self._journal.pop(key, None)
            self._journal_kinds.difference_update(kinds)
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (unmangled: a key mangler that rewrites prefixes hides
        keys from this); raises what the store raises, so the caller knows it failed."""
        return self.store.delete_prefix(prefix)
