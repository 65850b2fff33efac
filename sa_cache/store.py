"""The store seam: the few operations the cache protocol asks of a key-value store.

Modelled on dogpile.cache's backend API (``dogpile/cache/api.py``): a small contract, one class
per store in :mod:`sa_cache.stores`, and one test suite (``tests/test_stores.py``) that every
store runs unchanged. dogpile gives sa_cache its configuration surface and connections, but its
fill is an unconditional SET; serving rows correctly needs a fill that stores only if the key
still holds exactly what the miss observed, or a reader that loaded a row before a commit could
overwrite that commit's eviction. :class:`Store` names those operations.

A store deals in stored bytes and nothing else: it knows no models, no entries, no signatures and
no key prefixes (those belong to :mod:`sa_cache.protocol` and :mod:`sa_cache.guarded`). Every
multi-key operation is one round trip. Implementations must be thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from .errors import UnsupportedBackend

__all__ = [
    "Capabilities",
    "Clock",
    "DomainFailure",
    "DomainStore",
    "FailoverStore",
    "Fill",
    "Release",
    "Store",
    "UnsupportedBackend",
    "Write",
]


class Fill(NamedTuple):
    """Store ``value`` at ``key`` only if the key still holds ``expected`` (None: still absent)."""

    key: str
    expected: bytes | None
    value: bytes
    ttl: float


class Write(NamedTuple):
    """Store ``value`` at ``key`` unconditionally; ``ttl=None`` keeps it until it is replaced."""

    key: str
    value: bytes
    ttl: float | None


class Release(NamedTuple):
    """Delete the lease ``key`` only if it still holds ``token``: the lease of the caller that
    took it, and no one else's after it expired."""

    key: str
    token: bytes


class Capabilities(NamedTuple):
    """What a store declares about itself, so nothing has to probe its attributes.

    :param shared: other processes see its writes (Redis); False for a store in this process's
        memory, which is coherent only within one process (a forked worker has its own copy).
    :param scans: :meth:`Store.delete_prefix` works (needed by ``flush``).
    :param clock: :meth:`Store.acquire_timed` reads one clock that every key's TTL runs on, and
        :meth:`Store.init_generation` honours its ``ttl`` (a single server, or this process).
    :param keeps_ttl: a key is never dropped before its TTL runs out (no eviction under memory
        pressure), so an absent key proves that nothing written to it within its shortest TTL
        is missing. Later fills in snapshot transactions rely on it (docs/protocol.md); False
        is always safe, and costs only those fills.
    :param failover: the store can lose acknowledged writes when its master changes (Redis
        Sentinel), so it is a :class:`FailoverStore`: the cache gives it the writes that replace
        every registered kind's generation, which it sends to a new master before serving from it.
    :param domains: the store partitions keys into failure domains that fail independently
        (the primaries of a Redis Cluster), so it is a :class:`DomainStore`: the guarded store
        keeps one breaker per domain, and an operation that fails on some domains raises
        :class:`DomainFailure` with the other domains' results, so one failed node costs only
        the keys it serves.
    :param near: reads may be answered from this process's memory, kept coherent by Redis
        tracking messages (:mod:`sa_cache.near`): another process's commit may be seen a little
        later than in Redis (docs/near-cache.md), this process's own never.
    """

    shared: bool
    scans: bool
    clock: bool = False
    keeps_ttl: bool = False
    failover: bool = False
    domains: bool = False
    near: bool = False


class Clock(NamedTuple):
    """The store's own clock, read in the same round trip as some keys.

    ``now``: seconds on the store's clock (Redis ``TIME``; ``time.monotonic()`` in process); only
    differences between two readings of the same store mean anything. ``left``: per key read
    (when asked for, else empty), the seconds it has left to live, None where it has no TTL or is
    absent. A store whose keys
    live on servers with different clocks must measure each key's ``left`` on the clock of
    ``now``, or not offer :meth:`Store.acquire_timed`.
    """

    now: float
    left: list[float | None]


class Store(Protocol):
    """What sa_cache asks of a cache store."""

    capabilities: Capabilities

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The stored values of ``keys`` (None where absent), in one round trip."""

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        """Apply each conditional fill atomically per key, then release the leases the fills were
        waited on for (each deleted only if it still holds its owner's token); one round trip for
        the batch. Returns, per fill, whether it was stored."""

    def write_many(self, writes: Sequence[Write]) -> None:
        """Apply unconditional writes (tombstones, generation changes) in one round trip."""

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        """Set ``key`` (a lease) to ``token``, its owner's, unless it exists, and read ``read``
        after that, in one round trip: whether this call set it, and the values read."""

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> tuple[bool, list[bytes | None], Clock]:
        """:meth:`acquire`, and in the same round trip the store's :class:`Clock`: its time and,
        with ``ttls``, the TTL each key of ``read`` has left (so a reader can tell when a value
        was written). Only called on stores that declare ``capabilities.clock``."""

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        """Set ``key`` to ``token`` with ``ttl`` (None: none) unless it exists; return whichever
        value it holds after."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix``; return how many were removed."""


class FailoverStore(Store, Protocol):
    """A store declaring ``capabilities.failover``."""

    def on_master_change(self, generations: Callable[[], Sequence[Write]]) -> None:
        """Set what makes every entry written before a change of master unreachable: a call
        returning, for every registered kind, a write of a new generation (keys as stored)."""


class DomainStore(Store, Protocol):
    """A store declaring ``capabilities.domains``."""

    def domain_of(self, key: str) -> Hashable:
        """The failure domain serving ``key`` now, without I/O (it may change: a failover moves
        a key to another domain). Keys that share a hash tag share a domain."""


class DomainFailure(Exception):
    """An operation of a :class:`DomainStore` failed on some of its domains and ran on the
    others: ``errors`` by failed domain, ``failed`` the indexes of the operation's commands
    (the keys of ``get_many``, the writes of ``write_many``, the fills then releases of
    ``fill_many``) that did not run or whose outcome is unknown, and ``results`` the replies
    of the others (None at a failed index). Raised only when some commands ran: when every
    domain involved failed, the store raises the error itself."""

    def __init__(
        self,
        errors: Mapping[Any, BaseException],
        failed: Collection[int],
        results: Sequence[Any],
    ) -> None:
        super().__init__(
            "cache store domains failed: "
            + ", ".join(f"{domain} ({type(exc).__name__})" for domain, exc in errors.items())
        )
        self.errors = dict(errors)
        self.failed = frozenset(failed)
        self.results = list(results)
