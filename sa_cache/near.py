"""The near cache: an in-process layer in front of a Redis store, kept coherent by Redis itself.

:class:`NearStore` wraps the store that talks to Redis and sits *under*
:class:`~sa_cache.guarded.GuardedStore`, so the breaker, the eviction journal, the key mangler and
signing apply to it exactly as to any store: it holds stored bytes by stored key. A read it can
answer from memory costs no round trip; every write goes to Redis.

Why an entry it holds is never older than a committed write (docs/near-cache.md):

- **Writes of this process** (a commit's eviction, a fill, a generation) drop the written keys
  from memory synchronously, after the write returns and before the writer goes on: within a
  process a commit is never followed by an older answer.
- **Writes of other processes** arrive as Redis tracking messages
  (:mod:`sa_cache.stores.invalidations`): applied by the listener's thread as they arrive, and
  drained by every read before it answers. Between a commit elsewhere and its message's arrival
  this process may still answer the older value: the one trade-off of this mode, measured in
  docs/near-cache.md.
- **A silent partition** (no message because nothing arrives at all) is bounded by the pings:
  entries are served only while the tracking connections have answered a ping sent within
  ``max_age`` seconds; after that every read goes to Redis (which, unreachable, opens the breaker).
- **Any loss** (a tracking connection dropped or timed out, a change of master, a store error,
  which is what opens the breaker) drops every entry.
- **A value read while its invalidation was on its way** is not kept: a fetch notes the keys it
  reads as in flight, an invalidation of such a key (or any loss) during the fetch marks it, and a
  marked key's value is answered but not kept. A fetch keeps nothing unless the tracking
  connections were confirmed before it began.

Every other attribute of the wrapped store (its client, ``on_master_change``, anything a store
declares later) is forwarded, and its :class:`~sa_cache.store.Capabilities` are its own with
``near=True``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .stats import NEAR_COUNTERS
from .store import Capabilities, Clock, DomainFailure, Fill, Release, Store, Write
from .stores.invalidations import Invalidations, endpoints_of

__all__ = ["NearCache", "NearStore"]


@dataclass(frozen=True)
class NearCache:
    """Settings of the near cache (``IdentityCache(near_cache=NearCache(...))``).

    :param max_entries: entries kept in memory, least recently used dropped first.
    :param max_age: seconds an entry may be served after the last ping its tracking connections
        answered was sent: the bound on staleness during a silent partition.
    :param ping_interval: seconds between two pings on each tracking connection.
    :param ttl: seconds an entry lives in memory at most, whatever Redis says (an entry dropped
        by Redis sends a message too; this bounds what a lost one could cost).
    :param timeout: seconds to connect, and for a ping to be answered before the connection is
        dropped.
    :param topology_interval: seconds between two checks of which servers are the masters
        (Sentinel, Cluster).
    """

    max_entries: int = 10_000
    max_age: float = 0.35
    ping_interval: float = 0.1
    ttl: float = 60.0
    timeout: float = 0.25
    topology_interval: float = 1.0


class NearStats:
    """Counters of the near cache (``IdentityCache.stats()["near"]``): keys answered from
    memory (``hits``) or fetched from Redis (``misses``), keys dropped by a message or a write
    (``invalidations``), and losses that dropped everything (``flushes``)."""

    __slots__ = NEAR_COUNTERS

    def __init__(self) -> None:
        self.hits = self.misses = self.invalidations = self.flushes = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in NEAR_COUNTERS}


class NearStore:
    """A :class:`~sa_cache.store.Store` in front of ``store`` (see the module docstring).
    ``prefix``: the stored keys' prefix that the tracking connections follow."""

    def __init__(self, store: Store, prefix: str, settings: NearCache | None = None) -> None:
        if not store.capabilities.shared:
            raise ValueError("a near cache needs a shared store (Redis) to be near to")
        self.inner = store
        self._capabilities = (store.capabilities, store.capabilities._replace(near=True))
        self.settings = settings or NearCache()
        self.stats = NearStats()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[bytes | None, float]] = OrderedDict()
        self._flushes = 0  # bumped by every loss: a fetch begun before one keeps nothing
        self._in_flight: dict[str, int] = {}
        self._marked: set[str] = set()  # keys in flight invalidated meanwhile
        self.invalidations = Invalidations(
            lambda: endpoints_of(store),
            prefix,
            self._invalidate,
            self.flush,
            ping_interval=self.settings.ping_interval,
            timeout=self.settings.timeout,
            topology_interval=self.settings.topology_interval,
        )
        self.invalidations.drain()  # starts the supervisor
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _forget_in_child(ref))

    @property
    def capabilities(self) -> Capabilities:
        """The wrapped store's, with ``near=True``; read by every guarded call, so made again
        only when the wrapped store's change (a store may learn one, as Redis learns
        ``keeps_ttl``)."""
        inner = self.inner.capabilities
        known = self._capabilities
        if known[0] is not inner:
            known = self._capabilities = (inner, inner._replace(near=True))
        return known[1]

    @capabilities.setter
    def capabilities(self, value: Capabilities) -> None:
        self.inner.capabilities = value._replace(near=False)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (during construction or unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def close(self) -> None:
        """Close the tracking connections and drop every entry."""
        self.invalidations.close()
        self.flush()

    # -- coherence -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Drop every entry, and what every fetch in flight read."""
        with self._lock:
            self._flushes += 1
            self._entries.clear()
            self._marked.update(self._in_flight)
            self.stats.flushes += 1

    def _invalidate(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                if self._entries.pop(key, None) is not None:
                    self.stats.invalidations += 1
                if key in self._in_flight:
                    self._marked.add(key)

    def _trusted(self, now: float) -> bool:
        return self.invalidations.confirmed() >= now - self.settings.max_age

    # -- reads ---------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.invalidations.drain()
        now = time.monotonic()
        if not self._trusted(now):
            with self._lock:
                had = bool(self._entries)
            if had:
                self.flush()
            self.stats.misses += len(keys)
            return self._fetch(keys)
        answers: list[bytes | None] = [None] * len(keys)
        missing: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                entry = self._entries.get(key)
                if entry is not None and entry[1] > now:
                    self._entries.move_to_end(key)
                    answers[i] = entry[0]
                else:
                    missing.append(i)
            self.stats.hits += len(keys) - len(missing)
            self.stats.misses += len(missing)
            if not missing:
                return answers
            wanted = [keys[i] for i in missing]
            for key in wanted:
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
            flushes = self._flushes
        kept = False
        try:
            try:
                values = self._fetch(wanted)
            except DomainFailure as failure:  # some domains answered: for ``keys``, not ``wanted``
                for i, value in zip(missing, failure.results, strict=True):
                    answers[i] = value
                failed = [missing[i] for i in failure.failed]
                raise DomainFailure(failure.errors, failed, answers) from failure
            self.invalidations.drain()
            kept = self._trusted(time.monotonic())
        finally:
            self._land(wanted, values if kept else None, flushes)
        for i, value in zip(missing, values, strict=True):
            answers[i] = value
        return answers

    def _land(self, keys: list[str], values: list[bytes | None] | None, flushes: int) -> None:
        """Keep what a fetch read (``values``; None: nothing), unless a loss or an invalidation
        of the key happened since it began; the keys are no longer in flight."""
        expires = time.monotonic() + self.settings.ttl
        with self._lock:
            keep = values is not None and flushes == self._flushes
            for i, key in enumerate(keys):
                if keep and key not in self._marked and values is not None:
                    self._entries[key] = (values[i], expires)
                    self._entries.move_to_end(key)
                left = self._in_flight[key] - 1
                if left:
                    self._in_flight[key] = left
                else:
                    del self._in_flight[key]
                    self._marked.discard(key)
            while len(self._entries) > self.settings.max_entries:
                self._entries.popitem(last=False)

    def _fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        try:
            return self.inner.get_many(keys)
        except Exception:
            self.flush()  # what opens the breaker drops everything
            raise

    # -- writes: Redis first, then the written keys are dropped here ---------------------------

    def _wrote(self, keys: Sequence[str]) -> None:
        self._invalidate(keys)

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        try:
            return self.inner.fill_many(fills, release)
        except Exception:
            self.flush()
            raise
        finally:
            self._wrote([f.key for f in fills])

    def write_many(self, writes: Sequence[Write]) -> None:
        try:
            self.inner.write_many(writes)
        except Exception:
            self.flush()
            raise
        finally:
            self._wrote([w.key for w in writes])

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        try:
            return self.inner.acquire(key, token, ttl, read)
        except Exception:
            self.flush()
            raise
        finally:
            self._wrote([key])

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> tuple[bool, list[bytes | None], Clock]:
        try:
            return self.inner.acquire_timed(key, token, ttl, read, ttls)
        except Exception:
            self.flush()
            raise
        finally:
            self._wrote([key])

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        try:
            return self.inner.init_generation(key, token, ttl)
        except Exception:
            self.flush()
            raise
        finally:
            self._wrote([key])

    def delete_prefix(self, prefix: str) -> int:
        try:
            return self.inner.delete_prefix(prefix)
        finally:
            self.flush()


def _forget_in_child(ref: weakref.ref[NearStore]) -> None:
    """A forked child starts with no entries and a lock of its own (another thread of the
    parent may have held it at the fork); its tracking connections are its own too (the
    listener notices the new process at its first drain)."""
    store = ref()
    if store is not None:
        store._lock = threading.Lock()
        store._entries.clear()
        store._in_flight.clear()
        store._marked.clear()
        store._flushes += 1
