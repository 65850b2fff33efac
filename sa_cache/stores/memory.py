"""The embedded default: dogpile.cache's in-process memory backend, with the conditional fill done
under a lock. Entries carry their own expiry time, because dogpile's memory backend has none.

Coherent within one process only: :attr:`MemoryStore.capabilities` says so, and the Flask
integration warns when an application runs in several worker processes on it."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from dogpile.cache.api import NO_VALUE

from ..store import Capabilities, Clock, Fill, Release, Write


class MemoryStore:
    """A :class:`~sa_cache.store.Store` over a dogpile ``dogpile.cache.memory`` backend.

    ``reader`` is the region's outermost backend: its dogpile proxies, if any, see every
    :meth:`get_many`. Conditional writes go to the backend itself (see :mod:`sa_cache.stores`).
    """

    def __init__(self, backend: Any, reader: Any = None) -> None:
        self._backend = backend
        self._reader = reader  # None: no proxies, read the backend directly
        self._lock = threading.Lock()
        # a plain dict drops nothing by itself; a cache_dict of the application's own (an LRU
        # mapping, say) may drop entries before they expire
        keeps_ttl = type(getattr(backend, "_cache", None)) is dict
        self.capabilities = Capabilities(shared=False, scans=True, clock=True, keeps_ttl=keeps_ttl)

    def _read(self, key: str, now: float, stored: Any = NO_VALUE) -> bytes | None:
        if stored is NO_VALUE:
            stored = self._backend.get(key)
        if stored is NO_VALUE:
            return None
        expires_at, value = stored
        if expires_at is not None and expires_at <= now:
            self._backend.delete(key)
            return None
        return value  # type: ignore[no-any-return]

    def _put(self, key: str, value: bytes, ttl: float | None, now: float) -> None:
        self._backend.set(key, (None if ttl is None else now + ttl, value))

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        if self._reader is not None:
            stored = self._reader.get_serialized_multi(keys)
            with self._lock:
                return [self._read(k, now, v) for k, v in zip(keys, stored, strict=True)]
        with self._lock:
            return [self._read(key, now) for key in keys]

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        now = time.monotonic()
        results = []
        with self._lock:
            for fill in fills:
                stored = fill.expected == self._read(fill.key, now)
                if stored:
                    self._put(fill.key, fill.value, fill.ttl, now)
                results.append(stored)
            for key, token in release:
                if self._read(key, now) == token:
                    self._backend.delete(key)
        return results

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        now = time.monotonic()
        with self._lock:
            acquired = self._read(key, now) is None
            if acquired:
                self._put(key, token, ttl, now)
            return acquired, [self._read(k, now) for k in read]

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> tuple[bool, list[bytes | None], Clock]:
        now = time.monotonic()
        with self._lock:
            acquired = self._read(key, now) is None
            if acquired:
                self._put(key, token, ttl, now)
            values = [self._read(k, now) for k in read]
            left: list[float | None] = []
            for k, value in zip(read if ttls else (), values, strict=False):
                expires_at = None if value is None else self._backend.get(k)[0]
                left.append(None if expires_at is None else expires_at - now)
            return acquired, values, Clock(now, left)

    def write_many(self, writes: Sequence[Write]) -> None:
        now = time.monotonic()
        with self._lock:
            for write in writes:
                self._put(write.key, write.value, write.ttl, now)

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        now = time.monotonic()
        with self._lock:
            current = self._read(key, now)
            if current is None:
                self._put(key, token, ttl, now)
                return token
            return current

    def delete_prefix(self, prefix: str) -> int:
        entries = self._backend._cache  # the dict dogpile's memory backend keeps its entries in
        with self._lock:
            doomed = [key for key in list(entries) if key.startswith(prefix)]
            for key in doomed:
                self._backend.delete(key)
        return len(doomed)
